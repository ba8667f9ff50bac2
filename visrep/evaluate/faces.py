"""Scoring and using a multi-task face run (Faceptor): every task's metric on its test split, the Layer-Attention
profile of each task, a figure of predictions, and predictions for image files.

Metrics by output type: classification → top-1 accuracy; multilabel → mean accuracy over the known attribute
labels; regression → MAE / RMSE; age_distribution → MAE of the expected age Σ p_i·i (years); landmarks → NME by
the inter-ocular distance and the failure rate (NME > 0.1), as `visrep eval classifier` reports them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from visrep.data.faces import _decode_square
from visrep.data.tasks import load_task_data, trained_tasks
from visrep.data.views import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from visrep.device import resolve_device
from visrep.errors import ConfigError, DataError
from visrep.evaluate.regression import landmark_nme, regression_metrics
from visrep.objectives.faces import expected_age
from visrep.runs import RebuiltRun, rebuild_run, run_path

__all__ = ["task_outputs", "decode_outputs", "evaluate_faceptor", "predict_images"]


def _run_of(source, force: bool = False) -> RebuiltRun:
    run = source if isinstance(source, RebuiltRun) else rebuild_run(run_path(source), force=force)
    if getattr(run.template, "task_head", None) is None or not run.cfg.tasks:
        raise ConfigError(f"'{run.source}' is not a multi-task run (no tasks / task_head); use eval knn, linear or "
                          "classifier")
    return run


def _scored_tasks(run: RebuiltRun) -> list:
    """The tasks a run answers for: all of its tasks, or a stage-2 run's target task (its new levels serve it)."""
    return trained_tasks(run.cfg.tasks, run.cfg.task_head)


@torch.no_grad()
def task_outputs(run: RebuiltRun, images: torch.Tensor, names: list[str], *, batch_size: int = 64,
                 device="cpu", attention: bool = False):
    """The run's outputs of tasks `names` for uint8 images [N, 3, H, W] (eval transform at the run's size):
    {task: {"values"} or {"heatmaps", "points"}} concatenated over batches; with `attention`, also the
    per-task Layer-Attention profile (share of the last decoder layer's cross-attention on each level)."""
    model = run.template.to(device).eval()
    head = model.task_head
    outs: dict[str, dict[str, list]] = {n: {} for n in names}
    profiles: dict[str, list] = {n: [] for n in names}
    want_attention = attention and hasattr(head, "level_profile")
    for i in range(0, len(images), batch_size):
        x = eval_transform(images[i:i + batch_size].to(device), run.image_size, IMAGENET_MEAN, IMAGENET_STD)
        slices = {n: (0, len(x)) for n in names}
        got = head(model.backbone, x, slices, return_attention=True) if want_attention else \
            head(model.backbone, x, slices)
        if want_attention:
            got, att = got
            for n in names:
                profiles[n].append(head.level_profile(att[n]) * len(x))
        for n in names:
            for k, v in got[n].items():
                outs[n].setdefault(k, []).append(v.float().cpu())
    merged = {n: {k: torch.cat(v) for k, v in d.items()} for n, d in outs.items()}
    if not want_attention:
        return merged
    levels = list(head.memory.all_levels)
    prof = {n: {"levels": levels, "share": [float(s) for s in (torch.stack(p).sum(0) / len(images)).cpu()]}
            for n, p in profiles.items() if p}
    return merged, prof


def decode_outputs(spec, out: dict, classes: list[str] | None = None) -> list:
    """Per-image predictions of one task: class name and probability, expected age, attribute probabilities,
    or landmark points (x, y in [0, 1] of the image)."""
    if spec.output == "classification":
        p = out["values"].softmax(-1)
        conf, idx = p.max(-1)
        names = classes or [str(i) for i in range(p.shape[1])]
        return [{"class": names[int(i)], "probability": round(float(c), 4)} for c, i in zip(conf, idx)]
    if spec.output == "age_distribution":
        return [{"age": round(float(a), 1)} for a in expected_age(out["values"])]
    if spec.output == "multilabel":
        return [{"probabilities": [round(float(v), 4) for v in row]} for row in out["values"].sigmoid()]
    if spec.output == "regression":
        return [{"values": [round(float(v), 4) for v in row]} for row in out["values"]]
    return [{"points": [[round(float(x), 4), round(float(y), 4)] for x, y in row]} for row in out["points"]]


def _metrics(spec, out: dict, ds) -> dict:
    if spec.output == "classification":
        return {"metric": "accuracy", "accuracy": float((out["values"].argmax(-1) == ds.labels).double().mean())}
    t = ds.targets
    if spec.output == "age_distribution":
        return {"metric": "mae", **regression_metrics(expected_age(out["values"]).unsqueeze(1), t[:, :1])}
    if spec.output == "multilabel":
        known = t >= 0
        right = ((out["values"] > 0).float() == t) & known
        per = right.sum(0).double() / known.sum(0).clamp_min(1).double()
        return {"metric": "mean_accuracy", "mean_accuracy": float(per.mean()), "accuracy_per_attribute":
                [float(v) for v in per]}
    if spec.output == "regression":
        return {"metric": "mae", **regression_metrics(out["values"], t)}
    pts = out["points"]  # [N, P, 2] → x1..xP, y1..yP as the targets
    flat = torch.cat([pts[..., 0], pts[..., 1]], dim=1)
    return {"metric": "nme", **landmark_nme(flat, t)}


def evaluate_faceptor(source, *, root: str | None = None, image_size: int | None = None, batch_size: int = 64,
                      device: str = "cpu", test_subset: int | None = None, seed: int = 0, out: str | None = None,
                      figures: bool = True, force: bool = False) -> dict:
    """Every task's metric on its test split (see the module docstring), the per-task Layer-Attention profiles
    (JSON, and a figure beside `out`), and a figure of predictions on a few test faces."""
    t0 = time.perf_counter()
    run = _run_of(source, force)
    dev = resolve_device(device)
    specs = _scored_tasks(run)
    size = run.image_size if image_size is None else int(image_size)
    results, profiles, shown = {}, {}, {}
    for spec in specs:
        ds = load_task_data(spec, spec.test_split, root=root or run.cfg.data.root, image_size=size, download=False)
        ds = ds.subset(test_subset, seed)
        trained = run.meta.get("task_classes", {}).get(spec.name)
        if spec.output == "classification" and trained is not None and list(ds.classes) != list(trained):
            raise DataError(f"task '{spec.name}': the test split's classes {ds.classes} are not the {trained} the "
                            "run was trained on, so its accuracy would compare the wrong labels")
        got = task_outputs(run, ds.images, [spec.name], batch_size=batch_size, device=dev, attention=True)
        outs, prof = got if isinstance(got, tuple) else (got, {})
        results[spec.name] = {"output": spec.output, "dataset": ds.name, "test_size": len(ds),
                              **_metrics(spec, outs[spec.name], ds)}
        if spec.name in prof:
            profiles[spec.name] = prof[spec.name]
        shown[spec.name] = (ds, outs[spec.name])
    record = {"protocol": "faceptor", "source": run.source, "method": run.cfg.method, "image_size": size,
              "tasks": results, "layer_attention": profiles, "seconds": time.perf_counter() - t0}
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if figures:
            record["figures"] = _figures(path, specs, shown, profiles)
        path.write_text(json.dumps(record, indent=2))
    return record


def _figures(path: Path, specs, shown: dict, profiles: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {}
    if profiles:
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(profiles), 3.2))
        names = list(profiles)
        levels = profiles[names[0]]["levels"]
        width = 0.8 / max(len(levels), 1)
        for j, lv in enumerate(levels):
            ax.bar([i + j * width for i in range(len(names))], [profiles[n]["share"][j] for n in names], width,
                   label=f"level {lv}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylabel("cross-attention share")
        ax.set_title("Layer-Attention per task")
        ax.legend(fontsize=7)
        fig.tight_layout()
        made["layer_attention"] = str(path.with_name(path.stem + "_layer_attention.png"))
        fig.savefig(made["layer_attention"], dpi=120)
        plt.close(fig)
    n_show = 4
    fig, axes = plt.subplots(len(specs), n_show, figsize=(2.0 * n_show, 2.2 * len(specs)), squeeze=False)
    for r, spec in enumerate(specs):
        ds, out = shown[spec.name]
        preds = decode_outputs(spec, {k: v[:n_show] for k, v in out.items()}, ds.classes)
        for c in range(n_show):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(ds):
                continue
            img = ds.images[c].permute(1, 2, 0).numpy()
            ax.imshow(img)
            h, w = img.shape[:2]
            p = preds[c]
            if "points" in p:
                xs, ys = zip(*p["points"])
                ax.scatter([x * w for x in xs], [y * h for y in ys], s=12, c="lime", edgecolors="black", linewidths=0.5)
                k = len(xs)
                tx, ty = ds.targets[c, :k] * w, ds.targets[c, k:] * h
                ax.scatter(tx, ty, s=10, marker="x", c="red", linewidths=0.8)
                label = "pred ● / true ×"
            elif "class" in p:
                label = f"{p['class']} ({p['probability']:.2f}) / true {ds.classes[int(ds.labels[c])]}"
            elif "age" in p:
                label = f"age {p['age']:.0f} / true {float(ds.targets[c, 0]):.0f}"
            else:
                label = str(next(iter(p.values())))[:30]
            ax.set_title(f"{spec.name}\n{label}", fontsize=7)
    fig.tight_layout()
    made["predictions"] = str(path.with_name(path.stem + "_predictions.png"))
    fig.savefig(made["predictions"], dpi=110)
    plt.close(fig)
    return made


def predict_images(source, images: list[str], *, device: str = "cpu", force: bool = False) -> list[dict]:
    """Every task's prediction for each image file: [{"image": path, task: prediction, ...}, ...]; landmarks as
    pixel coordinates of the image as given (`points_px`). Images are framed as the face datasets frame theirs
    (zero-padded to a centred square, resized). A missing or unreadable image is a one-sentence DataError."""
    run = _run_of(source, force)
    if not images:
        raise ConfigError("predict needs at least one image file")
    decoded, frames = [], []
    for p in images:
        path = Path(p).expanduser()
        if path.is_dir():
            raise DataError(f"'{p}' is a folder, not an image file")
        if not path.exists():
            raise DataError(f"image '{p}' does not exist")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"image '{p}' could not be read ({e.strerror or type(e).__name__})") from None
        # framed as the face datasets frame their images: zero-padded to a centred square, then resized
        (img, frame), = _decode_square([data], run.image_size, 1)
        if img is None:
            raise DataError(f"image '{p}' could not be read as an image")
        decoded.append(img)
        frames.append(frame)
    x = torch.stack(decoded)
    specs = _scored_tasks(run)
    outs = task_outputs(run, x, [s.name for s in specs], device=resolve_device(device))
    classes = run.meta.get("task_classes", {})
    rows = [{"image": str(p)} for p in images]
    for spec in specs:
        for row, pred, (side, left, top) in zip(rows, decode_outputs(spec, outs[spec.name], classes.get(spec.name)),
                                                frames):
            if "points" in pred:  # from [0, 1] of the padded square to pixels of the image as given
                pred = {"points_px": [[round(x * side - left, 1), round(y * side - top, 1)] for x, y in pred["points"]]}
            row[spec.name] = pred
    return rows

