"""What the loop watches while it trains, on detached features (solo-learn's monitors):

* `OnlineProbe`: a linear classifier on the step's detached backbone features, trained by its own SGD; its
  training accuracy tracks the representation without stopping pretraining. Gradients never reach the backbone.
* `FeatureMonitor`: at epoch ends, the kNN accuracy on a fixed test subset and RankMe (Garrido et al. 2023), the
  effective rank of a fixed bank of training features, whose fall warns of dimensional collapse.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visrep.data.sources import load_dataset
from visrep.data.views import IMAGENET_MEAN, IMAGENET_STD
from visrep.errors import VisrepError
from visrep.evaluate.effective_rank import effective_rank
from visrep.evaluate.features import extract_features
from visrep.evaluate.knn import knn_classify


class OnlineProbe:
    """Linear probe [D → C] with SGD (momentum 0.9) on detached features; `step` returns its batch accuracy as a
    0-d tensor on the device (read it only when logging, so the step needs no host sync).

    Example:
        >>> probe = OnlineProbe(4, 2, lr=0.1, device=torch.device("cpu"))
        >>> acc = probe.step(torch.randn(6, 4), torch.tensor([0, 1, 0]), n_global=2)
        >>> 0.0 <= float(acc) <= 1.0
        True
    """

    def __init__(self, dim: int, num_classes: int, lr: float, device: torch.device, wrap=None):
        self.linear = nn.Linear(dim, num_classes).to(device)
        self.forward = wrap(self.linear) if wrap is not None else self.linear  # DDP under torchrun
        self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=0.9)

    def step(self, features: torch.Tensor, labels: torch.Tensor, n_global: int) -> torch.Tensor:
        """One SGD step on features [n_global·B, D] of the global views and their labels [B]."""
        y = labels.repeat(n_global)
        logits = self.forward(features.float())
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return (logits.detach().argmax(1) == y).float().mean()


class FeatureMonitor:
    """kNN accuracy and RankMe on frozen features of a fixed subset of the training set (the bank); one feature
    pass serves both. The kNN test split is loaded when the monitor is built, so a missing split fails before
    training, not at the end of the first epoch."""

    def __init__(self, cfg, train, image_size: int, device: torch.device, knn: bool = True):
        d, m = cfg.data, cfg.monitor
        self.bank = train.subset(m.bank_size, cfg.seed) if m.bank_size and m.bank_size < len(train) else train
        self.test, self.cfg, self.image_size, self.device = None, cfg, image_size, device
        if not knn:
            return
        try:
            test = load_dataset(d.dataset, d.test_split, d.root, image_size=image_size, download=d.download,
                                **d.options)
        except VisrepError as e:
            raise type(e)(f"the kNN monitor cannot load split '{d.test_split}' ({e}); set data.test_split, "
                          "or monitor.knn_every=0 to train without it") from None
        if m.test_size and m.test_size < len(test):
            test = test.subset(m.test_size, cfg.seed)
        self.test = test

    @torch.no_grad()
    def __call__(self, backbone: nn.Module, knn: bool = True, rankme: bool = False) -> dict:
        was = backbone.training
        kw = dict(image_size=self.image_size, device=self.device, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  progress=False)
        fb, lb = extract_features(backbone, self.bank, **kw)
        out = {}
        if knn and self.test is not None:
            ft, lt = extract_features(backbone, self.test, **kw)
            res = knn_classify(fb, lb, ft, lt, k=self.cfg.monitor.knn_k,
                               temperature=self.cfg.monitor.knn_temperature, num_classes=len(self.bank.classes))
            out.update(knn_top1=float(res["top1"]), knn_top5=float(res["top5"]))
        backbone.train(was)
        if rankme:  # on at most RankMe's 25,600 samples; NaN when undefined (all-zero or non-finite features)
            z = fb[:25_600]
            try:
                out["rankme"] = float(effective_rank(z)) if bool(torch.isfinite(z).all()) else float("nan")
            except VisrepError:
                out["rankme"] = float("nan")
        return out
