"""B10: a linear probe fast enough to be a ground truth — visrep's SGD probe vs its full-batch L-BFGS probe vs
scikit-learn's L-BFGS LogisticRegression on the same cached features, in one run; and feature extraction
(visrep's `extract_features`) against a plain `torch.no_grad()` loop over the same model and images.

Features: CIFAR-10 (the shared JPEG archive, 50,000 train / 10,000 test images, 32 px) through a seeded
random-init ResNet-18 with the CIFAR stem at width --width (features 8·width wide), via visrep's feature
cache. Random-init features keep the task hard (top-1 ≈ 0.35–0.45), the regime the probe must resolve.

Probes (each gets the same standardised features; times exclude feature extraction):
- visrep SGD: `linear_probe` defaults (100 epochs, batch 256, lr 0.1 cosine, Nesterov 0.9).
- visrep L-BFGS: `lbfgs_probe` defaults (L2 grid 1e-1 … 1e-6 chosen on a seeded 20 % held-out slice,
  100 L-BFGS iterations per fit, warm starts, refit on all training data).
- scikit-learn: `LogisticRegression(solver="lbfgs", max_iter=--sk-max-iter)` at C = 1/(2nλ*) for the λ*
  visrep's grid chose (the same objective; scikit-learn is given the chosen penalty, not a grid — this
  favours it by a factor of the grid size).

Feature extraction: --fx-images training images, batch 256, interleaved rounds of (visrep, plain loop,
plain loop with channels-last) on the same model; images/s and ratios. visrep's is called as `visrep eval`
calls it (channels-last for convolutional networks).

--issue-shape runs the same three probes on seeded synthetic features of the issue's shape instead (39,209 ×
512 training and 12,630 test features, 43 classes: Gaussian clusters, class means 0.06·N(0, I), so top-1 is
about 0.19) and writes results/b10_linear_probe_issue_shape.json; no extraction part.

    python benchmarks/b10_linear_probe.py                  # all of it (~15 min on 2 quiet cores)
    python benchmarks/b10_linear_probe.py --issue-shape    # the issue's 512-d, 43-class shape (~10 min)
    python benchmarks/b10_linear_probe.py --train-subset 5000 --test-subset 1000 --fx-images 512 --out /tmp/b10.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402


def features(args):
    from visrep.evaluate.features import extract_features
    from visrep.models.backbones import build_backbone
    from visrep.checkpoint import weights_fingerprint

    train = common.load_cifar10("train", args.data).subset(args.train_subset, 0)
    test = common.load_cifar10("test", args.data).subset(args.test_subset, 0)
    torch.manual_seed(0)
    model = build_backbone("resnet18", cifar_stem=True, width=args.width).eval()
    fp = weights_fingerprint(model.state_dict())
    kw = dict(image_size=32, model_fingerprint=fp, progress=True)
    ftr, ltr = extract_features(model, train, **kw)
    fte, lte = extract_features(model, test, **kw)
    return model, train, (ftr, ltr, fte, lte)


def probes(feats, args, out: dict, path):
    from visrep.evaluate.linear import lbfgs_probe, linear_probe

    ftr, ltr, fte, lte = feats
    runs = out.setdefault("probes", {})
    if "visrep_lbfgs" not in runs:
        t = time.perf_counter()
        r = lbfgs_probe(ftr, ltr, fte, lte)
        runs["visrep_lbfgs"] = {"seconds": time.perf_counter() - t, **{k: r[k] for k in (
            "top1", "top5", "l2", "held_out_top1", "function_evals", "max_iter", "train_loss")}}
        common.write_json(path, out)
        print(f"b10: visrep L-BFGS  {runs['visrep_lbfgs']['seconds']:.1f} s  top-1 {r['top1']:.4f}", flush=True)
    if "visrep_sgd" not in runs:
        t = time.perf_counter()
        r = linear_probe(ftr, ltr, fte, lte)
        runs["visrep_sgd"] = {"seconds": time.perf_counter() - t,
                              **{k: r[k] for k in ("top1", "top5", "epochs", "lr", "steps", "train_loss")}}
        common.write_json(path, out)
        print(f"b10: visrep SGD     {runs['visrep_sgd']['seconds']:.1f} s  top-1 {r['top1']:.4f}", flush=True)
    if "sklearn_lbfgs" not in runs and not args.skip_sklearn:
        import warnings

        import sklearn
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        mu, sd = ftr.mean(0, keepdim=True), ftr.std(0, unbiased=False, keepdim=True).clamp_min(1e-6)
        xtr, xte = ((ftr - mu) / sd).numpy(), ((fte - mu) / sd).numpy()
        lam = runs["visrep_lbfgs"]["l2"]
        clf = LogisticRegression(C=1.0 / (2 * len(ltr) * lam), solver="lbfgs", max_iter=args.sk_max_iter)
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(xtr, ltr.numpy())
        seconds = time.perf_counter() - t
        top1 = float((clf.predict(xte) == lte.numpy()).mean())
        runs["sklearn_lbfgs"] = {"seconds": seconds, "top1": top1, "l2": lam, "C": clf.C,
                                 "max_iter": args.sk_max_iter, "n_iter": int(clf.n_iter_.max()),
                                 "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
                                 "version": sklearn.__version__}
        common.write_json(path, out)
        print(f"b10: scikit-learn   {seconds:.1f} s  top-1 {top1:.4f}", flush=True)
    sgd = runs["visrep_sgd"]
    out["ratios"] = {
        "sgd_seconds_over_lbfgs_seconds": sgd["seconds"] / runs["visrep_lbfgs"]["seconds"],
        "lbfgs_minus_sgd_top1_points": 100 * (runs["visrep_lbfgs"]["top1"] - sgd["top1"]),
        **({"sklearn_seconds_over_lbfgs_seconds": runs["sklearn_lbfgs"]["seconds"] / runs["visrep_lbfgs"]["seconds"]}
           if "sklearn_lbfgs" in runs else {}),
    }


def extraction(model, dataset, args) -> dict:
    """Images/s of visrep's extract_features vs a plain no_grad loop (and one with channels-last), interleaved."""
    from visrep.data.views import eval_transform
    from visrep.evaluate.features import extract_features

    images = dataset.select(torch.arange(min(args.fx_images, len(dataset))), "fx")

    def plain(channels_last: bool):
        m = model.to(memory_format=torch.channels_last) if channels_last else model
        with torch.no_grad():
            for s in range(0, len(images), 256):
                x = eval_transform(images.images[s:s + 256], 32, common.IMAGENET_MEAN, common.IMAGENET_STD)
                m(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        model.to(memory_format=torch.contiguous_format)

    ways = {"visrep": lambda: extract_features(model, images, image_size=32, cache_dir=False, progress=False,
                                               channels_last=True),  # as `visrep eval` calls it
            "plain_no_grad": lambda: plain(False), "plain_no_grad_channels_last": lambda: plain(True)}
    times = {k: [] for k in ways}
    for r in range(args.fx_rounds):
        order = list(ways)[r % 3:] + list(ways)[:r % 3]  # rotate, so no side always runs first
        for k in order:
            t = time.perf_counter()
            ways[k]()
            times[k].append(time.perf_counter() - t)
    med = {k: common.median(v) for k, v in times.items()}
    return {"images": len(images), "rounds": args.fx_rounds, "batch": 256, "seconds": times,
            "images_per_s": {k: len(images) / v for k, v in med.items()},
            "visrep_over_plain_throughput": med["plain_no_grad"] / med["visrep"],
            "channels_last_over_plain_throughput": med["plain_no_grad"] / med["plain_no_grad_channels_last"]}


def issue_shape(args) -> None:
    """The three probes on seeded Gaussian-cluster features of the issue's shape (GTSRB-sized: 43 classes)."""
    args.out = args.out or str(common.result_path("b10_linear_probe_issue_shape"))
    out = common.read_json(args.out) or {}
    out.update(benchmark="b10_linear_probe_issue_shape", machine=common.machine_info(), load=common.load_check("b10"),
               recipe={k: v for k, v in vars(args).items() if k != "out"},
               features="seeded synthetic: x = N(0, I) + mu_y, mu = 0.06 N(0, I) per class, uniform labels")
    g = torch.Generator().manual_seed(0)
    n, n_test, dim, classes = 39209, 12630, 512, 43
    mu = 0.06 * torch.randn(classes, dim, generator=g)
    ltr, lte = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (n_test,), generator=g)
    ftr = torch.randn(n, dim, generator=g) + mu[ltr]
    fte = torch.randn(n_test, dim, generator=g) + mu[lte]
    out["shape"] = {"n_train": n, "n_test": n_test, "dim": dim, "classes": classes}
    probes((ftr, ltr, fte, lte), args, out, args.out)
    common.write_json(args.out, out)
    print(f"b10: wrote {args.out}: {out['ratios']}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=common.DEFAULT_DATA)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--sk-max-iter", type=int, default=1000)
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--fx-images", type=int, default=4096)
    p.add_argument("--fx-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--issue-shape", action="store_true", help="synthetic 39,209 x 512 features, 43 classes")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    common.set_threads(args.threads)
    if args.issue_shape:
        issue_shape(args)
        return
    args.out = args.out or str(common.result_path("b10_linear_probe"))
    out = common.read_json(args.out) or {}
    out.update(benchmark="b10_linear_probe", machine=common.machine_info(), load=common.load_check("b10"),
               recipe={k: v for k, v in vars(args).items() if k != "out"},
               features="CIFAR-10 through a seeded random-init ResNet-18 (CIFAR stem), visrep's feature cache")
    model, train, feats = features(args)
    out["shape"] = {"n_train": int(feats[0].shape[0]), "n_test": int(feats[2].shape[0]),
                    "dim": int(feats[0].shape[1]), "classes": int(feats[1].max()) + 1}
    probes(feats, args, out, args.out)
    if "extraction" not in out:
        out["extraction"] = extraction(model, train, args)
    common.write_json(args.out, out)
    print(f"b10: wrote {args.out}: {out['ratios']}; extraction {out['extraction']['visrep_over_plain_throughput']:.2f}x"
          " plain", flush=True)


if __name__ == "__main__":
    main()
