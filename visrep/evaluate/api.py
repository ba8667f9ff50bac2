"""High-level evaluation: a backbone source + a dataset -> one JSON-able result with the exact protocol.

    evaluate_knn("runs/simclr", dataset="cifar10")            # weighted kNN, k=20, T=0.07
    evaluate_linear("timm:resnet18", dataset="digits")         # linear probe on frozen features

Both load the backbone with `load_backbone`, both splits with `load_dataset` (at their native size; the
evaluation transform resizes), extract features through the on-disk cache, run the classifier and return
(and write to `out`, if given) a dict with "top1"/"top5" (fractions in [0, 1]) and everything needed to
reproduce the number: the source and its weight fingerprint, the dataset and split sizes, image size,
normalisation, classifier hyper-parameters, feature size, cache hits, visrep version, time.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from visrep.checkpoint import weights_fingerprint
from visrep.data.sources import load_dataset
from visrep.device import resolve_device
from visrep.errors import ConfigError, DataError, VisrepError
from visrep.evaluate.calibration import expected_calibration_error, reliability_diagram
from visrep.evaluate.features import IMAGENET_MEAN, IMAGENET_STD, TRANSFORM_VERSION, extract_features_with_info
from visrep.evaluate.fewshot import fewshot_eval
from visrep.evaluate.knn import knn_classify
from visrep.evaluate.linear import lbfgs_probe, linear_probe
from visrep.evaluate.regression import landmark_nme, regression_metrics
from visrep.models.heads import classifier_head_names
from visrep.runs import RebuiltRun, load_backbone, load_run, run_path
from visrep.version import __version__


def _version() -> str:
    return str(__version__)





def _looks_like_path(source: str) -> bool:
    return (os.sep in source or "/" in source or source.endswith(".safetensors") or source.startswith(".")
            or source.startswith("~")) and not source.startswith("timm:")


def _load_model(source: str, image_size: int | None, branch: str, seed: int, options: dict | None = None,
                force: bool = False, pretrained: bool = False):
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise ConfigError(f"model source must be a checkpoint path, run directory or timm:NAME, got {source!r}")
    source = str(source)
    if _looks_like_path(source):
        source = run_path(source)
    # Random-init backbones are built under a fixed seed (without touching the caller's RNG), so a
    # random-init baseline is reproducible and its features cache like any other model's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            return load_backbone(source, image_size=image_size, branch=branch, options=options, force=force,
                                 pretrained=pretrained and source.startswith("timm:"))
        except VisrepError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, OSError) as e:
            raise VisrepError(f"could not load a backbone from '{source}' ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _load_split(dataset: str, split: str, root, download: bool, options: dict, subset: int | None, seed: int,
                image_size: int | None = None):
    # --image-size resizes on load too, so a folder of mixed sizes loads (resize + centre crop, as evaluation does).
    ds = load_dataset(dataset, split, root, image_size=image_size, download=download, **options)
    if len(ds.labels) == 0:
        raise DataError(f"the {split} split of dataset '{dataset}' is empty")
    if subset is not None:
        if subset < 1:
            raise ConfigError(f"{split} subset must be >= 1, got {subset}")
        if subset < len(ds.labels):
            ds = ds.subset(int(subset), seed)
    return ds


def check_evaluable(train, test, dataset: str, train_split: str, test_split: str) -> None:
    """Refuse evaluations whose number would mean nothing: one class (every accuracy is 1.000), or a test split
    that is the training split under another name (a leak)."""
    n = int(torch.unique(train.labels).numel())
    if n < 2:
        raise DataError(f"the {train_split} split of '{dataset}' holds {n} class; classification needs at least two")
    if train_split != test_split and train.meta.get("fingerprint") == test.meta.get("fingerprint"):
        raise DataError(f"splits '{train_split}' and '{test_split}' of '{dataset}' hold the same images, so the test "
                        "would score the training data; give a real test split")


def _prepare(source, *, dataset, root, train_split, test_split, image_size, branch, batch_size, device,
             cache_dir, train_subset, test_subset, seed, progress, mean, std, download, dataset_options,
             backbone_options=None, label_fraction=None, force=False, pretrained=False):
    t0 = time.perf_counter()
    dev = resolve_device(device)
    options = dict(dataset_options or {})
    train = _load_split(dataset, train_split, root, download, options, train_subset, seed, image_size)
    if label_fraction is not None:  # low-label probes: the same seeded class-balanced subset as finetune's
        train = train.fraction(label_fraction, seed)
    test = _load_split(dataset, test_split, root, download, options, test_subset, seed, image_size)
    if list(train.classes) != list(test.classes):
        raise DataError(f"splits '{train_split}' and '{test_split}' of '{dataset}' have different classes")
    check_evaluable(train, test, dataset, train_split, test_split)
    native = int(train.image_size[1])
    is_checkpoint = Path(str(source)).expanduser().exists()
    # Image size: the caller's, else the checkpoint's recorded one, else the dataset's native size.
    model, info = _load_model(source, image_size if (image_size or is_checkpoint) else native, branch, seed,
                              backbone_options, force, pretrained)
    size = int(image_size or info.get("image_size") or native)
    mean = tuple(float(m) for m in (IMAGENET_MEAN if mean is None else mean))
    std = tuple(float(s) for s in (IMAGENET_STD if std is None else std))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError("mean and std must be three numbers each, std > 0")
    kw = dict(image_size=size, batch_size=batch_size, device=dev, cache_dir=cache_dir,
              model_fingerprint=info.get("fingerprint"), mean=mean, std=std, progress=progress, channels_last=True)
    try:
        ftr, ltr, ctr = extract_features_with_info(model, train, **kw)
        fte, lte, cte = extract_features_with_info(model, test, **kw)
    except VisrepError:
        raise
    except (RuntimeError, AssertionError, ValueError) as e:  # e.g. a ViT fed the wrong image size
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VisrepError(f"the backbone failed on {size}x{size} images ({msg})") from None
    record = {
        "source": str(source),
        "model": {k: info.get(k) for k in ("kind", "fingerprint", "method", "epoch", "backbone", "branch",
                                           "image_size")},
        "dataset": {"name": dataset, "root": None if root is None else str(root),
                    "train_split": train_split, "test_split": test_split,
                    "train_size": int(len(ltr)), "test_size": int(len(lte)),
                    "train_subset": train_subset, "test_subset": test_subset, "label_fraction": label_fraction,
                    "num_classes": len(train.classes), "classes": list(train.classes),
                    "train_fingerprint": train.meta.get("fingerprint"),
                    "test_fingerprint": test.meta.get("fingerprint"), "options": options},
        "image_size": size,
        "normalization": {"mean": list(mean), "std": list(std), "transform": TRANSFORM_VERSION},
        "feature_dim": int(ftr.shape[1]),
        "cache": {"train": ctr["cache"], "test": cte["cache"]},
        "device": str(dev),
        "seed": int(seed),
    }
    return (ftr, ltr, fte, lte, len(train.classes)), record, t0


def _finish(record: dict, result: dict, t0: float, out) -> dict:
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record["visrep_version"] = _version()
    record["timestamp"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    final = {**result, **record}
    if out is not None:
        path = Path(out).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(final, indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            raise VisrepError(f"could not write the result to '{out}' ({e.strerror or e})") from None
        final["out"] = str(path)
    return final


def evaluate_knn(source: str, *, dataset: str = "digits", root: str | None = None, train_split: str = "train",
                 test_split: str = "test", image_size: int | None = None, k: int = 20,
                 temperature: float = 0.07, branch: str = "student", batch_size: int = 256,
                 device: str = "cpu", cache_dir: str | None = None, train_subset: int | None = None,
                 label_fraction: float | None = None,
                 test_subset: int | None = None, seed: int = 0, out: str | None = None, progress: bool = True,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 download: bool = True, dataset_options: dict | None = None,
                 backbone_options: dict | None = None,
                 force: bool = False, pretrained: bool = False) -> dict:
    """Weighted kNN accuracy (Wu et al. 2018; k=20, T=0.07 as DINO) of a backbone's frozen features.

    source: checkpoint file, run directory, or `timm:NAME` / backbone name (random init, seeded by `seed`;
    `pretrained=True` loads timm's weights for a `timm:` source, which needs internet or timm's cache).
    image_size: None -> the checkpoint's recorded size, else the dataset's native size.
    train_subset / test_subset: seeded subsets (by `seed`) of N images. device: cpu | cuda | auto.
    label_fraction: low-label protocols (0.01, 0.1): the probe/bank sees only this seeded class-balanced
    fraction of the training split, the same subset `finetune` draws with data.label_fraction and that seed.
    cache_dir: feature cache (None: `$VISREP_CACHE/features` or `~/.cache/visrep/features`; False: off).
    mean/std: normalisation (None: ImageNet's). out: write the result as JSON there.
    Returns {"protocol": "knn", "top1", "top5" (fractions), "k", "temperature", ..., "source", "model",
    "dataset", "image_size", "normalization", "feature_dim", "cache", "visrep_version", "timestamp",
    "seconds"}.
    """
    (ftr, ltr, fte, lte, c), record, t0 = _prepare(
        source, dataset=dataset, root=root, train_split=train_split, test_split=test_split,
        image_size=image_size, branch=branch, batch_size=batch_size, device=device, cache_dir=cache_dir,
        train_subset=train_subset, test_subset=test_subset, seed=seed, progress=progress, mean=mean, std=std,
        download=download, dataset_options=dataset_options, backbone_options=backbone_options,
        label_fraction=label_fraction, force=force, pretrained=pretrained)
    res = knn_classify(ftr, ltr, fte, lte, k=k, temperature=temperature, num_classes=c)
    res.update(similarity="cosine", weighting="exp(s/T)", reference="Wu et al. 2018 / DINO (Caron et al. 2021)")
    return _finish(record, {"protocol": "knn", **res}, t0, out)


def evaluate_linear(source: str, *, dataset: str = "digits", root: str | None = None, train_split: str = "train",
                    test_split: str = "test", image_size: int | None = None, epochs: int = 100,
                    lr: float = 0.1, weight_decay: float = 0.0, probe_batch_size: int = 256,
                    standardize: bool = True, branch: str = "student", batch_size: int = 256,
                    device: str = "cpu", cache_dir: str | None = None, train_subset: int | None = None,
                    label_fraction: float | None = None,
                    test_subset: int | None = None, seed: int = 0, out: str | None = None,
                    progress: bool = True, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, download: bool = True,
                    dataset_options: dict | None = None, backbone_options: dict | None = None,
                    solver: str = "sgd", force: bool = False, pretrained: bool = False) -> dict:
    """Linear-probe accuracy of a backbone's frozen (cached) features; see `visrep.evaluate.linear`.

    Same data/model arguments as `evaluate_knn`; `batch_size` is the feature-extraction batch, the probe's
    own is `probe_batch_size`. solver "sgd": train-standardised features, zero-init nn.Linear, SGD Nesterov
    momentum 0.9, cosine lr from `lr` to 0 over `epochs`, `weight_decay`, data order seeded by `seed`.
    solver "lbfgs": full-batch L-BFGS logistic regression with its L2 penalty chosen on a held-out slice of
    the training split (Kornblith et al. 2019; `lbfgs_probe`); `epochs`, `lr`, `weight_decay` do not apply.
    Returns {"protocol": "linear", "top1", "top5" (fractions), every probe hyper-parameter, and the same
    provenance fields as `evaluate_knn`}.
    """
    if solver not in ("sgd", "lbfgs"):
        raise ConfigError(f"linear probe solver must be sgd or lbfgs, got {solver!r}")
    (ftr, ltr, fte, lte, c), record, t0 = _prepare(
        source, dataset=dataset, root=root, train_split=train_split, test_split=test_split,
        image_size=image_size, branch=branch, batch_size=batch_size, device=device, cache_dir=cache_dir,
        train_subset=train_subset, test_subset=test_subset, seed=seed, progress=progress, mean=mean, std=std,
        download=download, dataset_options=dataset_options, backbone_options=backbone_options,
        label_fraction=label_fraction, force=force, pretrained=pretrained)
    if solver == "lbfgs":
        res = lbfgs_probe(ftr, ltr, fte, lte, seed=seed, standardize=standardize, num_classes=c)
    else:
        res = linear_probe(ftr, ltr, fte, lte, epochs=epochs, lr=lr, weight_decay=weight_decay,
                           batch_size=probe_batch_size, seed=seed, standardize=standardize, num_classes=c)
    return _finish(record, {"protocol": "linear", **res}, t0, out)


def _has_classifier_head(source: str, force: bool = False) -> bool:
    path = Path(str(source)).expanduser()
    if not path.exists():
        return False
    tensors, _, cfg = load_run(str(path), force=force)
    # an exported backbone keeps its run's config but not the head's weights
    return cfg.classifier is not None and any(k.startswith("model.classifier.") for k in tensors)


def _source_name(source) -> str:
    return source.source if isinstance(source, RebuiltRun) else str(source)


def _load_head(source, image_size: int | None, force: bool = False):
    """(backbone + trained head as one nn.Module in eval mode, RunConfig, meta, tensors) of a supervised or
    fine-tuned run (a path, or a `RebuiltRun` already in memory); raises ConfigError for runs without a
    classifier/regression head."""
    if isinstance(source, RebuiltRun):  # e.g. `finetune` evaluating the run it has just rebuilt: no second load
        run = source
        tensors, meta, cfg = run.tensors, run.meta, run.cfg
    else:
        path = run_path(source)
        tensors, meta, cfg = load_run(path, force=force)
    if (cfg.classifier or {}).get("type") not in classifier_head_names():
        raise ConfigError(f"'{_source_name(source)}' has no classifier head (its method is '{cfg.method}'); use eval knn or "
                          "eval linear for self-supervised checkpoints")
    if not any(k.startswith("model.classifier.") for k in tensors):
        raise ConfigError(f"'{_source_name(source)}' holds a backbone only (an export keeps no classifier head); evaluate the run "
                          "it was exported from, or use eval knn / eval linear")
    if not isinstance(source, RebuiltRun):
        run = RebuiltRun.of(path, tensors, meta, cfg, image_size)
    return nn.Sequential(run.template.backbone, run.template.classifier).eval(), cfg, meta, tensors, run.image_size


def _head_outputs(source, *, dataset, root, test_split, image_size, batch_size, device, cache_dir, test_subset,
                  seed, progress, download, dataset_options, force=False):
    model, cfg, meta, tensors, size = _load_head(source, image_size, force)
    test = _load_split(dataset, test_split, root, download, dict(dataset_options or {}), test_subset, seed,
                       image_size)
    dev = resolve_device(device)
    fp = weights_fingerprint(model.state_dict())
    outputs, labels, info = extract_features_with_info(
        model, test, image_size=size, batch_size=batch_size, device=dev, cache_dir=cache_dir,
        model_fingerprint=fp, mean=IMAGENET_MEAN, std=IMAGENET_STD, progress=progress, channels_last=True)
    record = {"source": _source_name(source),
              "model": {"kind": "checkpoint", "fingerprint": fp, "method": cfg.method, "backbone": cfg.backbone.name,
                        "head": cfg.classifier.get("type"), "finetune_mode": cfg.finetune.mode,
                        "epoch": meta.get("epoch")},
              "dataset": {"name": dataset, "test_split": test_split, "test_size": int(len(labels)),
                          "test_subset": test_subset, "test_fingerprint": test.meta.get("fingerprint"),
                          "options": dict(dataset_options or {}), "task": test.meta.get("task")},
              "image_size": size, "cache": {"test": info["cache"]}, "device": str(dev), "seed": int(seed)}
    return outputs, labels, test, cfg, meta, tensors, record


def evaluate_classifier(source: str, *, dataset: str = "digits", root: str | None = None, test_split: str = "test",
                        image_size: int | None = None, batch_size: int = 256, device: str = "cpu",
                        cache_dir: str | None = None, test_subset: int | None = None, seed: int = 0,
                        out: str | None = None, progress: bool = True, download: bool = True,
                        dataset_options: dict | None = None,
                        force: bool = False) -> dict:
    """Test metrics of a supervised or fine-tuned run's own head (backbone + linear/cosine/GCR classifier,
    or a regression head).

    source: a checkpoint file or run directory written by `visrep pretrain` / `visrep finetune` with a
    classifier head, or that run rebuilt already (`visrep.runs.rebuild_run`). The outputs go through the same eval transform and cache as kNN features.
    Classification: "top1", "top5". Regression (objective `regression`): "mae", "rmse" in the target's
    units; landmarks (mtfl task=landmarks) add "nme" and "failure_rate" (see visrep.evaluate.regression).
    """
    t0 = time.perf_counter()
    outputs, labels, test, cfg, meta, tensors, record = _head_outputs(
        source, dataset=dataset, root=root, test_split=test_split, image_size=image_size, batch_size=batch_size,
        device=device, cache_dir=cache_dir, test_subset=test_subset, seed=seed, progress=progress,
        download=download, dataset_options=dataset_options, force=force)
    if cfg.objective.name == "regression":
        if test.targets is None:
            raise DataError(f"'{_source_name(source)}' is a regression run, and dataset '{dataset}' has no regression targets "
                            "with these options (e.g. utkface task=age, mtfl task=landmarks)")
        if outputs.shape[1] != test.targets.shape[1]:
            raise DataError(f"'{_source_name(source)}' predicts {outputs.shape[1]} targets, the dataset has {test.targets.shape[1]}")
        mean, std = tensors.get("objective.target_mean"), tensors.get("objective.target_std")
        pred = outputs * std + mean if mean is not None and mean.numel() else outputs
        res = {"protocol": "regression", **regression_metrics(pred, test.targets, test.meta.get("target_names"))}
        if test.meta.get("task_type") == "landmarks":
            res.update(protocol="landmarks", **landmark_nme(pred, test.targets))
        return _finish(record, res, t0, out)
    if meta.get("classes") and list(meta["classes"]) != list(test.classes):
        raise DataError(f"the classes of '{dataset}' ({len(test.classes)}) differ from the ones the classifier "
                        f"was trained on ({len(meta['classes'])})")
    top5 = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
    res = {"protocol": "classifier", "top1": float((top5[:, 0] == labels).float().mean()),
           "top5": float((top5 == labels.unsqueeze(1)).any(1).float().mean())}
    return _finish(record, res, t0, out)


def evaluate_fewshot(source: str, *, dataset: str = "digits", root: str | None = None, train_split: str = "train",
                     test_split: str = "test", image_size: int | None = None, shots: Sequence[int] = (1, 5),
                     ways: int | None = None, queries: int = 15, episodes: int = 200, branch: str = "student",
                     batch_size: int = 256, device: str = "cpu", cache_dir: str | None = None,
                     train_subset: int | None = None, test_subset: int | None = None, seed: int = 0,
                     out: str | None = None, progress: bool = True, download: bool = True,
                     dataset_options: dict | None = None, backbone_options: dict | None = None,
                     force: bool = False, pretrained: bool = False) -> dict:
    """n-shot accuracy (mean ± 95 % CI over seeded episodes) of frozen features; see visrep.evaluate.fewshot.

    Supports come from `train_split`, queries from `test_split`; one result per entry of `shots`, under
    "results" (and "top1"/"ci95" of the first). ways=None: every class.
    """
    shots = [shots] if isinstance(shots, int) else list(shots)
    if not shots:
        raise ConfigError("few-shot needs at least one value of shots")
    (ftr, ltr, fte, lte, c), record, t0 = _prepare(
        source, dataset=dataset, root=root, train_split=train_split, test_split=test_split,
        image_size=image_size, branch=branch, batch_size=batch_size, device=device, cache_dir=cache_dir,
        train_subset=train_subset, test_subset=test_subset, seed=seed, progress=progress, mean=None, std=None,
        download=download, dataset_options=dataset_options, backbone_options=backbone_options, force=force,
        pretrained=pretrained)
    results = [fewshot_eval(ftr, ltr, fte, lte, shots=int(n), ways=ways, queries=queries, episodes=episodes,
                            seed=seed) for n in shots]
    res = {"protocol": "fewshot", "top1": results[0]["top1"], "ci95": results[0]["ci95"], "results": results}
    return _finish(record, res, t0, out)


def evaluate_calibration(source: str, *, dataset: str = "digits", root: str | None = None,
                         train_split: str = "train", test_split: str = "test", image_size: int | None = None,
                         n_bins: int = 15, head: str = "auto", plot: str | None = None, epochs: int = 100,
                         lr: float = 0.1, weight_decay: float = 0.0, branch: str = "student", batch_size: int = 256,
                         device: str = "cpu", cache_dir: str | None = None, train_subset: int | None = None,
                         label_fraction: float | None = None,
                         test_subset: int | None = None, seed: int = 0, out: str | None = None,
                         progress: bool = True, download: bool = True, dataset_options: dict | None = None,
                         backbone_options: dict | None = None,
                         force: bool = False, pretrained: bool = False) -> dict:
    """Expected calibration error (15 equal-width bins, Guo et al. 2017) and a reliability diagram.

    head: "own" (a supervised / fine-tuned run's classifier), "linear" (a linear probe on frozen features,
    the `eval linear` protocol) or "auto" (own when the run has a classifier head, else linear).
    plot: PNG path for the reliability diagram (default: next to `out` as <out>.png, else none).
    """
    if head not in ("auto", "own", "linear"):
        raise ConfigError(f"calibration head must be auto, own or linear, got {head!r}")
    if head == "auto":
        head = "own" if _has_classifier_head(source, force) else "linear"
    t0 = time.perf_counter()
    if head == "own":
        logits, labels, test, cfg, _, _, record = _head_outputs(
            source, dataset=dataset, root=root, test_split=test_split, image_size=image_size,
            batch_size=batch_size, device=device, cache_dir=cache_dir, test_subset=test_subset, seed=seed,
            progress=progress, download=download, dataset_options=dataset_options, force=force)
        if cfg.objective.name == "regression":
            raise ConfigError("calibration needs a classifier; this run is a regression run")
        extra = {"head": "own classifier"}
    else:
        (ftr, ltr, fte, labels, c), record, t0 = _prepare(
            source, dataset=dataset, root=root, train_split=train_split, test_split=test_split,
            image_size=image_size, branch=branch, batch_size=batch_size, device=device, cache_dir=cache_dir,
            train_subset=train_subset, test_subset=test_subset, seed=seed, progress=progress, mean=None, std=None,
            download=download, dataset_options=dataset_options, backbone_options=backbone_options,
            label_fraction=label_fraction, force=force, pretrained=pretrained)
        probe = linear_probe(ftr, ltr, fte, labels, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed,
                             num_classes=c, return_logits=True)
        logits = probe.pop("test_logits")
        extra = {"head": "linear probe", "probe": {k: probe[k] for k in ("epochs", "lr", "weight_decay", "top1")}}
    res = expected_calibration_error(torch.softmax(logits.double(), 1), labels, n_bins=n_bins)
    if plot is None and out is not None:
        plot = str(Path(out).expanduser().with_suffix(".png"))
    if plot:
        res["plot"] = str(reliability_diagram(res, plot, title=f"{Path(str(source)).name} on {dataset}: "
                                              f"ECE {100 * res['ece']:.2f} %"))
    return _finish(record, {"protocol": "calibration", **extra, **res}, t0, out)
