"""RankMe as an online monitor during pretraining (monitor.rankme_every), beside the kNN monitor."""
import json

import visrep

from conftest import tiny_overrides


def test_rankme_is_logged_every_epoch_without_or_with_the_knn_monitor(tmp_path):
    s = visrep.pretrain(visrep.resolve(tiny_overrides(tmp_path / "a", monitor={"knn_every": 0, "rankme_every": 1})),
                        quiet=True)
    assert [h["epoch"] for h in s["history"]] == [0, 1.0, 2.0]
    assert all("knn_top1" not in h and 1.0 <= h["rankme"] <= 64 for h in s["history"])  # width 8: 64 features
    lines = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("rankme" in r for r in lines) == 3
    s = visrep.pretrain(visrep.resolve(tiny_overrides(tmp_path / "b", monitor={"knn_every": 2, "rankme_every": 1})),
                        quiet=True)
    assert [sorted(k for k in h if k != "epoch") for h in s["history"]] == [
        ["knn_top1", "knn_top5", "rankme"], ["rankme"], ["knn_top1", "knn_top5", "rankme"]]


def test_rankme_monitor_off(tmp_path):
    s = visrep.pretrain(visrep.resolve(tiny_overrides(tmp_path, monitor={"knn_every": 0, "rankme_every": 0})),
                        quiet=True)
    assert s["history"] == []
