"""Offline linear probe on frozen (cached) features.

Protocol (all of it is returned in the result dict):

1. standardise every feature dimension with the *training* mean and standard deviation (the test set
   uses the same statistics); this makes one learning rate work for features of any scale — the role the
   non-affine BatchNorm in front of the linear layer plays in the SimCLR/BYOL/MAE linear protocols;
2. a linear layer `nn.Linear(D, C)`, initialised to zero (so the only randomness is the data order);
3. multinomial cross-entropy, mini-batch SGD with Nesterov momentum 0.9, `batch_size` 256, `lr` 0.1
   annealed to 0 with a per-step cosine and no warm-up, for `epochs` 100 (DINO's eval_linear schedule:
   SGD momentum 0.9, cosine, 100 epochs), weight decay 0 by default (as DINO; pass a small value such as
   1e-4 to regularise on tiny training sets);
4. the training set is reshuffled each epoch by a generator seeded with `seed`, so a run is deterministic
   for a seed; the classifier after the last epoch is evaluated once on the test set (no model
   selection on the test set).

Features are fixed, so there are no augmentations and the probe is cheap on a CPU: 50k x 512 features,
100 classes, 100 epochs (~20k steps of batch 256) take about 40 s on one core; digits takes ~1 s.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from visrep.data.sources import stratified_split
from visrep.errors import ConfigError, VisrepError


def _topk_hits(logits: torch.Tensor, labels: torch.Tensor, m: int) -> torch.Tensor:
    ranked = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :m]
    return ranked == labels[:, None]


def _accuracies(test_logits, y_test, train_logits, y_train, num_classes: int, return_logits: bool) -> dict:
    """top-1 / top-min(5, C) test accuracy and training top-1 (fractions); the test logits when asked."""
    m = min(5, num_classes)
    hits = _topk_hits(test_logits, y_test, m)
    return {**({"test_logits": test_logits} if return_logits else {}),
            "top1": int(hits[:, 0].sum()) / hits.shape[0], "top5": int(hits.any(dim=1).sum()) / hits.shape[0],
            "top5_k": m, "metric": "fraction",
            "train_top1": int((train_logits.argmax(1) == y_train).sum()) / len(y_train)}


def _check_shapes(train_feats, train_labels, test_feats, test_labels) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise VisrepError("linear probe needs 2-D train/test feature matrices of the same width")
    if train_feats.shape[0] != train_labels.shape[0] or test_feats.shape[0] != test_labels.shape[0]:
        raise VisrepError("features and labels differ in number of rows")
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise VisrepError("linear probe needs at least one training and one test feature")


def _prepared(train_feats, train_labels, test_feats, test_labels, num_classes, standardize):
    """float32 CPU copies (train standardised with its own statistics, test with the same), int64 labels."""
    x_train = train_feats.detach().to("cpu", torch.float32).clone()
    x_test = test_feats.detach().to("cpu", torch.float32).clone()
    y_train = train_labels.detach().to("cpu", torch.long)
    y_test = test_labels.detach().to("cpu", torch.long)
    if num_classes is None:
        num_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    if int(min(y_train.min(), y_test.min())) < 0 or int(max(y_train.max(), y_test.max())) >= num_classes:
        raise VisrepError(f"labels must lie in [0, {num_classes})")
    if standardize:
        mu = x_train.mean(0, keepdim=True)
        sd = x_train.std(0, unbiased=False, keepdim=True).clamp_min(1e-6)
        x_train = (x_train - mu) / sd
        x_test = (x_test - mu) / sd
    return x_train, y_train, x_test, y_test, num_classes


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, epochs: int = 100, lr: float = 0.1, weight_decay: float = 0.0,
                 batch_size: int = 256, momentum: float = 0.9, seed: int = 0, standardize: bool = True,
                 num_classes: int | None = None, return_logits: bool = False) -> dict:
    """Train a linear classifier on frozen training features and report its test accuracy.

    See the module docstring for the protocol. Returns {"top1", "top5"} as fractions in [0, 1], "top5_k"
    (= min(5, C); with fewer than 5 classes "top5" is top-C accuracy), "train_top1", "train_loss" (mean
    cross-entropy over the last epoch) and every hyper-parameter: "epochs", "lr", "weight_decay",
    "batch_size", "momentum", "nesterov", "optimizer", "schedule", "init", "standardize", "seed",
    "steps", plus "num_classes", "n_train", "n_test", "feature_dim"; with return_logits the test logits
    [N, C] under "test_logits" (calibration).
    """
    _check_shapes(train_feats, train_labels, test_feats, test_labels)
    if epochs < 1:
        raise ConfigError(f"linear probe needs epochs >= 1, got {epochs}")
    if not lr > 0:
        raise ConfigError(f"linear probe lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ConfigError(f"linear probe weight_decay must be >= 0, got {weight_decay}")
    if batch_size < 1:
        raise ConfigError(f"linear probe batch_size must be >= 1, got {batch_size}")

    x_train, y_train, x_test, y_test, num_classes = _prepared(train_feats, train_labels, test_feats, test_labels,
                                                              num_classes, standardize)

    n, d = x_train.shape
    bs = min(int(batch_size), n)
    steps_per_epoch = math.ceil(n / bs)
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(int(seed))
    head = nn.Linear(d, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0,
                          weight_decay=weight_decay)
    step = 0
    last_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        loss_sum = 0.0
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            for g in opt.param_groups:  # per-step cosine from lr to 0
                g["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().item() * idx.numel()
            step += 1
        last_loss = loss_sum / n
    if not math.isfinite(last_loss):
        raise VisrepError(f"linear probe diverged (loss {last_loss}); lower lr (now {lr})")

    with torch.no_grad():
        test_logits, train_logits = head(x_test), head(x_train)
    return {
        **_accuracies(test_logits, y_test, train_logits, y_train, num_classes, return_logits),
        "train_loss": last_loss,
        "epochs": int(epochs),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "batch_size": bs,
        "momentum": float(momentum),
        "nesterov": momentum > 0,
        "optimizer": "sgd",
        "schedule": "cosine-per-step-to-0",
        "init": "zeros",
        "loss": "cross-entropy",
        "standardize": bool(standardize),
        "seed": int(seed),
        "steps": total,
        "num_classes": int(num_classes),
        "n_train": int(n),
        "n_test": int(x_test.shape[0]),
        "feature_dim": int(d),
    }


# ------------------------------------------------------------------------------------ full-batch L-BFGS
# Kornblith, Shlens & Le, "Do Better ImageNet Models Transfer Better?" (CVPR 2019): multinomial logistic
# regression on frozen features with an L2 penalty chosen on a held-out part of the training set, fitted
# to convergence with L-BFGS, then refitted on the whole training set with the chosen penalty.
L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _fit_lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int,
               init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """argmin_W,b  mean CE(xWᵀ + b, y) + l2·‖W‖²  by full-batch L-BFGS (strong Wolfe line search).
    Returns (W [C, D], b [C], function evaluations)."""
    d = x.shape[1]
    w = torch.zeros(num_classes, d, dtype=x.dtype) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)
    evals = 0

    def closure():
        nonlocal evals
        evals += 1
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(torch.addmm(b, x, w.t()), y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), evals


def lbfgs_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                test_labels: torch.Tensor, *, l2_grid=L2_GRID, held_out: float = 0.2, max_iter: int = 100,
                seed: int = 0, standardize: bool = True, num_classes: int | None = None,
                return_logits: bool = False) -> dict:
    """Linear probe as in Kornblith et al. 2019: full-batch L-BFGS logistic regression, L2 chosen on a held-out
    slice of the training set.

    Protocol: standardise with training statistics; hold out a seeded stratified `held_out` fraction of the
    training split; for each λ in `l2_grid` (strongest first, each fit warm-started from the previous one)
    minimise mean cross-entropy + λ‖W‖² with at most `max_iter` L-BFGS iterations on the rest and score
    top-1 on the held-out slice; refit on the whole training split with the best λ (ties: the stronger
    penalty), warm-started from its grid fit; evaluate once on the test set. Deterministic (no sampling
    besides the seeded split). Returns the same keys as `linear_probe` plus "l2", "l2_grid", "held_out_top1"
    (per λ) and "function_evals".
    """
    _check_shapes(train_feats, train_labels, test_feats, test_labels)
    grid = sorted((float(v) for v in l2_grid), reverse=True)
    if not grid or min(grid) < 0:
        raise ConfigError(f"linear probe l2_grid must hold non-negative values, got {list(l2_grid)}")
    if not 0 < held_out < 1:
        raise ConfigError(f"linear probe held_out must be in (0, 1), got {held_out}")
    if max_iter < 1:
        raise ConfigError(f"linear probe max_iter must be >= 1, got {max_iter}")
    x_train, y_train, x_test, y_test, num_classes = _prepared(train_feats, train_labels, test_feats, test_labels,
                                                              num_classes, standardize)

    fit, held = stratified_split(y_train, held_out, seed)
    scores, fits, evals, prev = {}, {}, 0, None
    for l2 in grid:  # strongest penalty first: each solution is a good start for the next, weaker one
        w, b, e = _fit_lbfgs(x_train[fit], y_train[fit], num_classes, l2, max_iter, prev)
        evals += e
        prev = fits[l2] = (w, b)
        pred = torch.addmm(b, x_train[held], w.t()).argmax(1) if len(held) else None
        scores[l2] = float((pred == y_train[held]).float().mean()) if pred is not None else 0.0
    best = max(grid, key=lambda v: (scores[v], v))  # ties: the stronger penalty
    w, b, e = _fit_lbfgs(x_train, y_train, num_classes, best, max_iter, fits[best])
    evals += e
    if not bool(torch.isfinite(w).all()):
        raise VisrepError("the L-BFGS linear probe diverged (non-finite weights); check the features")

    with torch.no_grad():
        test_logits = torch.addmm(b, x_test, w.t())
        train_logits = torch.addmm(b, x_train, w.t())
        train_loss = float(F.cross_entropy(train_logits, y_train))
    return {
        **_accuracies(test_logits, y_test, train_logits, y_train, num_classes, return_logits),
        "train_loss": train_loss,
        "optimizer": "lbfgs",
        "l2": best,
        "l2_grid": grid,
        "held_out": float(held_out),
        "held_out_top1": {str(k): v for k, v in scores.items()},
        "max_iter": int(max_iter),
        "function_evals": int(evals),
        "init": "zeros, warm-started along the grid",
        "loss": "cross-entropy + l2*||W||^2",
        "reference": "Kornblith, Shlens & Le, CVPR 2019",
        "standardize": bool(standardize),
        "seed": int(seed),
        "num_classes": int(num_classes),
        "n_train": int(len(y_train)),
        "n_test": int(x_test.shape[0]),
        "feature_dim": int(x_train.shape[1]),
    }
