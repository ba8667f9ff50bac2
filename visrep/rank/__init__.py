"""Rank backbones for a target task from frozen features: transferability scores (`visrep list scores`).

Each score is a pure function in its own module, registered in `SCORES` with what it needs:
labels (logme, hscore, shrinkage_hscore, transrate, gbc, sfda, nleep, tmi, knn), a source classifier's
probabilities (leep, nce) or nothing (rankme).
"""
from visrep.rank.base import SCORES, check_features, check_labels, check_probs, register_score

# Importing the modules registers their scores.
from visrep.rank import gbc, hscore, knn, leep, logme, nleep, rankme, sfda, tmi, transrate  # noqa: E402,F401

__all__ = ["SCORES", "register_score", "check_features", "check_labels", "check_probs"]
