"""Few-shot evaluation on frozen features: n-shot episodes, nearest class centroid, mean ± 95 % CI.

Protocol (SimpleShot, Wang et al. 2019, "SimpleShot: Revisiting Nearest-Neighbor Classification for
Few-Shot Learning"; prototypes as in Snell et al. 2017):

1. an episode draws `ways` classes (all classes by default), `shots` support images per class from the
   training split and `queries` query images per class from the test split, seeded by (seed, episode);
2. CL2N features: subtract the mean of the episode's support features, then L2-normalise;
3. each class's prototype is the mean of its normalised supports; a query gets the class of the nearest
   prototype (Euclidean);
4. over E episodes with accuracies a_e the result is  mean = (1/E) Σ a_e  and the 95 % confidence
   interval  ± 1.96 · s / √E  with s the sample standard deviation (the usual few-shot report).

Example:
    >>> mean_ci95([0.5, 0.7, 0.6])       # s = 0.1
    (0.6, 0.11316...)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from visrep.errors import ConfigError, VisrepError


def mean_ci95(values) -> tuple[float, float]:
    """(mean, half-width of the normal 95 % interval 1.96·s/√E) of per-episode accuracies."""
    v = torch.as_tensor(list(values), dtype=torch.float64)
    if v.numel() == 0:
        raise VisrepError("no episodes to summarise")
    half = 1.96 * float(v.std(unbiased=True)) / math.sqrt(v.numel()) if v.numel() > 1 else float("nan")
    return float(v.mean()), half


def episode_accuracy(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                     query_labels: torch.Tensor) -> float:
    """Nearest-centroid accuracy of one episode on CL2N features (labels 0..ways-1)."""
    mu = support.mean(0, keepdim=True)
    s, q = F.normalize(support - mu, dim=1), F.normalize(query - mu, dim=1)
    ways = int(support_labels.max()) + 1
    protos = torch.zeros(ways, s.shape[1], dtype=s.dtype).index_add_(0, support_labels, s)
    protos /= torch.bincount(support_labels, minlength=ways).clamp_min(1).unsqueeze(1).to(s.dtype)
    pred = torch.cdist(q, protos).argmin(1)
    return float((pred == query_labels).double().mean())


def fewshot_eval(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, shots: int = 5, ways: int | None = None, queries: int = 15,
                 episodes: int = 200, seed: int = 0) -> dict:
    """Mean ± 95 % CI accuracy over seeded n-shot episodes (see the module docstring)."""
    for name, v, lo in (("shots", shots, 1), ("queries", queries, 1), ("episodes", episodes, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"few-shot {name} must be an integer >= {lo}, got {v!r}")
    classes = [c for c in torch.unique(train_labels).tolist()
               if int((train_labels == c).sum()) >= shots and int((test_labels == c).sum()) >= 1]
    if ways is None:
        ways = len(classes)
    if isinstance(ways, bool) or not isinstance(ways, int) or not 2 <= ways <= len(classes):
        raise ConfigError(f"few-shot ways must be in [2, {len(classes)}] (classes with >= {shots} training "
                          f"images), got {ways!r}")
    tr_idx = {c: (train_labels == c).nonzero().squeeze(1) for c in classes}
    te_idx = {c: (test_labels == c).nonzero().squeeze(1) for c in classes}
    accs = []
    for e in range(episodes):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + e)
        chosen = [classes[i] for i in torch.randperm(len(classes), generator=g)[:ways].tolist()]
        sup, sup_y, qry, qry_y = [], [], [], []
        for j, c in enumerate(chosen):
            a = tr_idx[c][torch.randperm(len(tr_idx[c]), generator=g)[:shots]]
            b = te_idx[c][torch.randperm(len(te_idx[c]), generator=g)[:queries]]
            sup.append(train_feats[a]), qry.append(test_feats[b])
            sup_y.append(torch.full((len(a),), j)), qry_y.append(torch.full((len(b),), j))
        accs.append(episode_accuracy(torch.cat(sup).double(), torch.cat(sup_y), torch.cat(qry).double(),
                                     torch.cat(qry_y)))
    mean, ci = mean_ci95(accs)
    return {"top1": mean, "ci95": ci, "shots": shots, "ways": ways, "queries": queries, "episodes": episodes,
            "seed": int(seed), "classifier": "nearest-centroid (CL2N)", "reference": "SimpleShot (Wang et al. 2019)",
            "episode_min": min(accs), "episode_max": max(accs)}
