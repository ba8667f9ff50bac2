"""`visrep rank` and `visrep.rank(...)`: a mixed pool (visrep runs, random init) on a real small target."""
import json

import pytest

import visrep
from visrep.cli import run
from visrep.errors import ConfigError, VisrepError

from conftest import tiny_overrides

DATA = {"dataset": "synthetic", "options": {"n": 64, "num_classes": 4}}
RANDOM = ["--backbone-options", "{cifar_stem: true, width: 8}"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    sup = tiny_overrides(root / "sup", method="supervised", monitor={"knn_every": 0, "rankme_every": 0})
    sup["projector"] = {"type": "linear"}
    visrep.pretrain(visrep.resolve(sup), quiet=True)
    ssl = tiny_overrides(root / "ssl", monitor={"knn_every": 0, "rankme_every": 0})
    visrep.pretrain(visrep.resolve(ssl), quiet=True)
    return root, [str(root / "sup" / "run"), str(root / "ssl" / "run")]


def test_rank_from_the_cli_with_and_without_a_truth(pool, tmp_path, capsys):
    root, runs = pool
    args = ["rank", "--models", *runs, "resnet18", *RANDOM, "--dataset", "synthetic",
            "--dataset-options", "{n: 64, num_classes: 4}", "--image-size", "16"]
    assert run(args + ["--scores", "logme,rankme,knn,leep", "--out", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "logme" in out and "resnet18" in out
    a = json.loads((tmp_path / "a.json").read_text())
    assert [m["model"] for m in a["models"]] == [*runs, "resnet18"] and "agreement" not in a
    sup, ssl, rnd = a["models"]
    assert sup["scores"]["leep"] is not None and ssl["scores"]["leep"] is None  # only the supervised run has a head
    assert "needs a classifier head" in ssl["notes"]["leep"]
    assert sorted(m["ranks"]["logme"] for m in a["models"]) == [1, 2, 3]

    assert run(args + ["--scores", "logme,hscore", "--truth", "linear", "--out", str(tmp_path / "b.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert all(0 <= m["truth"] <= 1 for m in b["models"]) and (tmp_path / "b.png").is_file()
    agree = b["agreement"]["logme"]
    assert set(agree) >= {"kendall_tau", "weighted_tau", "pearson_r", "top1_hit", "relative_top1"}
    assert 0 < agree["relative_top1"] <= 1


def test_python_api_pools_from_a_folder_or_a_yaml_list(pool, tmp_path):
    root, runs = pool
    (tmp_path / "pool.yaml").write_text("models:\n" + "".join(f"  - {r}\n" for r in runs))
    kw = dict(dataset="synthetic", dataset_options={"n": 64, "num_classes": 4}, scores=["rankme"], progress=False)
    a = visrep.rank(str(tmp_path / "pool.yaml"), **kw)  # visrep.rank is the package and the function
    assert [m["model"] for m in a["models"]] == runs
    folder = tmp_path / "runs"
    folder.mkdir()
    for name, r in zip(("a", "b"), runs):
        (folder / name).symlink_to(r)
    b = visrep.rank([str(folder)], **kw)
    assert len(b["models"]) == 2 and {m["scores"]["rankme"] for m in b["models"]} == \
        {m["scores"]["rankme"] for m in a["models"]}


def test_rank_mistakes_are_one_sentence(pool, tmp_path):
    _, runs = pool
    kw = dict(dataset="synthetic", dataset_options={"n": 64, "num_classes": 4}, progress=False)
    with pytest.raises(ConfigError, match="did you mean 'logme'"):
        visrep.rank(runs, scores=["logmee"], **kw)
    with pytest.raises(VisrepError, match="model '.*nowhere'"):
        visrep.rank([runs[0], str(tmp_path / "nowhere")], scores=["logme"], **kw)
    with pytest.raises(ConfigError, match="truth must be one of"):
        visrep.rank(runs, truth="finetune", **kw)
