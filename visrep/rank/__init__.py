"""Rank backbones for a target task from frozen features: transferability scores (`visrep list scores`).

Each score is a pure function in its own module, registered in `SCORES` with what it needs:
labels (logme, hscore, shrinkage_hscore, transrate, gbc, sfda, nleep, tmi, knn), a source classifier's
probabilities (leep, nce) or nothing (rankme).
"""
import sys
import types

from visrep.rank.base import SCORES, check_features, check_labels, check_probs, register_score

# Importing the modules registers their scores.
from visrep.rank import gbc, hscore, knn, leep, logme, nleep, rankme, sfda, tmi, transrate  # noqa: E402,F401

__all__ = ["SCORES", "register_score", "check_features", "check_labels", "check_probs", "rank"]


def rank(models, **kwargs) -> dict:
    """Score a pool of backbones on one target; see `visrep.rank.api.rank`."""
    from visrep.rank.api import rank as _rank

    return _rank(models, **kwargs)


class _CallableModule(types.ModuleType):
    # `visrep.rank` is this package (the rank stage) and also the function users call, visrep.rank(models,
    # dataset=...): a package attribute of the same name would be shadowed by the subpackage on import.
    def __call__(self, models, **kwargs) -> dict:
        return rank(models, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
