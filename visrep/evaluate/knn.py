"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (InstDisc), as used to evaluate DINO (Caron et al. 2021):

* every feature is L2-normalised, so the similarity of a test feature x to a training feature x_i is the
  cosine s_i = <x/|x|, x_i/|x_i|>;
* the k training features with the largest s_i are the neighbours N_k(x);
* each neighbour votes for its label with weight w_i = exp(s_i / T);
* the score of class c is  S_c(x) = sum_{i in N_k(x), y_i = c} exp(s_i / T),  and the prediction is
  argmax_c S_c(x) (ties go to the lowest class index).

Defaults k = 20 and T = 0.07 are those of InstDisc and DINO's kNN evaluation (DINO also reports
k = 10, 20, 100 and 200; 20 was the best overall). A small T makes the vote close to "nearest neighbour
wins"; a large T makes it close to an unweighted majority vote.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from visrep.errors import ConfigError, VisrepError

# exp(s/T) with |s| <= 1 overflows float32 once 1/T > ~88; below this T the votes are rescaled per test
# row by exp(-max_i s_i / T), which does not change the ranking of the classes.
_STABLE_T = 1.0 / 80.0


def _check(train_feats, train_labels, test_feats, test_labels):
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise VisrepError("kNN needs 2-D feature matrices [N, D]")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise VisrepError(f"train and test features differ in size ({train_feats.shape[1]} vs {test_feats.shape[1]})")
    if train_feats.shape[0] != train_labels.shape[0] or test_feats.shape[0] != test_labels.shape[0]:
        raise VisrepError("features and labels differ in number of rows")
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise VisrepError("kNN needs at least one training and one test feature")


def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, *,
               k: int = 20, temperature: float = 0.07, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Class scores S_c(x) = sum over the k nearest (cosine) neighbours of class c of exp(s_i / T).

    Returns float32 [N_test, num_classes]. For T < 1/80 each row is divided by exp(max_i s_i / T) to avoid
    overflow (same ranking). Computed in chunks of `chunk_size` test rows, so memory is
    chunk_size x N_train similarities at a time.
    """
    if k < 1:
        raise ConfigError(f"kNN needs k >= 1, got {k}")
    if not temperature > 0:
        raise ConfigError(f"kNN temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    device = train_feats.device
    train = F.normalize(train_feats.detach().float(), dim=1)
    train_labels = train_labels.detach().to(device, torch.long)
    kk = min(int(k), train.shape[0])
    out = []
    for start in range(0, test_feats.shape[0], chunk_size):
        q = F.normalize(test_feats[start:start + chunk_size].detach().to(device).float(), dim=1)
        sims, idx = (q @ train.t()).topk(kk, dim=1)  # [c, kk], sorted descending
        if temperature < _STABLE_T:
            sims = sims - sims[:, :1]
        weights = (sims / temperature).exp()
        scores = torch.zeros(q.shape[0], num_classes, device=device, dtype=torch.float32)
        scores.scatter_add_(1, train_labels[idx], weights)
        out.append(scores.cpu())
    return torch.cat(out)


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024) -> dict:
    """Weighted kNN accuracy of `test_feats` against `train_feats` (InstDisc / DINO protocol).

    Score of class c for a test feature x, over its k nearest training features by cosine similarity s_i:

        S_c(x) = sum_{i in top-k(x), y_i = c} exp(s_i / T)          prediction = argmax_c S_c(x)

    k=20, temperature=0.07: the defaults of Wu et al. 2018 and DINO (Caron et al. 2021), which also
    reports k = 10/20/100/200. k larger than the training set uses the whole training set.

    Returns {"top1", "top5"} as fractions in [0, 1] (e.g. "top1": 0.93), plus "top5_k" = min(5, C) —
    with fewer than 5 classes "top5" is top-C accuracy (hence 1.0) — "k", "temperature", "num_classes",
    "n_train", "n_test", "feature_dim", "metric": "fraction".
    """
    _check(train_feats, train_labels, test_feats, test_labels)
    test_labels = test_labels.detach().to("cpu", torch.long)
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes or \
            int(test_labels.min()) < 0 or int(test_labels.max()) >= num_classes:
        raise VisrepError(f"labels must lie in [0, {num_classes})")
    scores = knn_scores(train_feats, train_labels, test_feats, k=k, temperature=temperature,
                        num_classes=num_classes, chunk_size=chunk_size)
    m = min(5, num_classes)
    # A stable descending sort breaks ties by the lowest class index, for top-1 and top-5 alike.
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :m]
    hits = ranked == test_labels[:, None]
    return {
        "top1": int(hits[:, 0].sum()) / hits.shape[0],
        "top5": int(hits.any(dim=1).sum()) / hits.shape[0],
        "top5_k": m,
        "metric": "fraction",
        "k": int(k),
        "k_used": min(int(k), int(train_feats.shape[0])),
        "temperature": float(temperature),
        "num_classes": int(num_classes),
        "n_train": int(train_feats.shape[0]),
        "n_test": int(test_feats.shape[0]),
        "feature_dim": int(train_feats.shape[1]),
    }
