"""`visrep study run|status`: resumable runs on local workers, failures recorded, one results store."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visrep.cli import main
from visrep.errors import ConfigError
from visrep.study import ResultsStore, run_study, status

SYN = {"n": 64, "num_classes": 4}


def tiny(out_dir, steps=3, **extra):
    return {"name": "tiny", "out_dir": str(out_dir),
            "base": {"data": {"dataset": "synthetic", "image_size": 16, "options": SYN},
                     "backbone": {"name": "resnet18", "options": {"cifar_stem": True, "width": 8}},
                     "train": {"batch_size": 32, "deterministic": True},
                     "monitor": {"knn_every": 0, "rankme_every": 0}},
            "budget": {"steps": steps}, "factors": {"method": ["simclr", "byol"], "seed": [0, 1]},
            "evaluations": [{"protocol": "knn", "dataset": "synthetic", "options": SYN},
                            {"protocol": "linear", "dataset": "synthetic", "options": SYN, "solver": "lbfgs"}],
            **extra}


def _checkpoints(out_dir):
    return {p: p.stat().st_mtime_ns for p in Path(out_dir).glob("runs/*/checkpoints/last.safetensors")}


def test_a_study_runs_then_reruns_nothing_and_the_store_holds_each_metric_once(tmp_path):
    spec = tiny(tmp_path / "s")
    res = run_study(spec, progress=False)
    assert len(res["done"]) == 4 and not res["failed"] and not res["skipped"]
    st = status(spec)
    assert st["counts"] == {"done": 4, "failed": 0, "started": 0, "pending": 0}
    rows = ResultsStore(res["store"], "tiny").rows()
    assert {(r["evaluation_id"].split("-")[0], r["metric"]) for r in rows} >= {("knn", "top1"), ("linear", "top1")}
    assert len(rows) == len({(r["run_id"], r["evaluation_id"], r["metric"]) for r in rows})
    assert all(json.loads(r["factors"])["method"] in ("simclr", "byol") for r in rows)
    stamps = _checkpoints(tmp_path / "s")
    again = run_study(spec, progress=False)
    assert again["skipped"] and len(again["skipped"]) == 4 and not again["done"]
    assert _checkpoints(tmp_path / "s") == stamps and len(ResultsStore(res["store"], "tiny").rows()) == len(rows)
    csv = ResultsStore(res["store"], "tiny").export_csv(tmp_path / "long.csv").read_text().splitlines()
    assert csv[0].startswith("run_id,method,seed,evaluation_id,protocol,metric,value") and len(csv) == len(rows) + 1


def test_a_failing_run_is_recorded_and_the_others_go_on(tmp_path):
    spec = tiny(tmp_path / "s")
    spec["factors"] = {"data.options.n": [64, 16]}  # 16 images cannot fill a batch of 32: fails when it trains
    res = run_study(spec, progress=False)
    assert len(res["done"]) == 1 and len(res["failed"]) == 1
    error = next(iter(res["failed"].values()))
    assert "batch_size 32 is larger than the 16 training images" in error
    st = status(spec)
    assert st["counts"]["failed"] == 1 and st["counts"]["done"] == 1
    assert any(r["state"] == "failed" and "larger than" in r["error"] for r in st["runs"])


def test_two_workers_write_one_store_without_losing_a_row(tmp_path):
    one, two = tiny(tmp_path / "one"), tiny(tmp_path / "two")
    run_study(one, progress=False)
    res = run_study(two, workers=2, progress=False)
    assert len(res["done"]) == 4
    a = {(r["run_id"], r["evaluation_id"], r["metric"]): r["value"] for r in ResultsStore(tmp_path / "one" / "results.sqlite", "tiny").rows()}
    b = {(r["run_id"], r["evaluation_id"], r["metric"]): r["value"] for r in ResultsStore(tmp_path / "two" / "results.sqlite", "tiny").rows()}
    assert set(a) == set(b)  # same runs (content ids), same evaluations, same metrics
    for key in a:
        if key[2] in ("top1", "top5"):
            assert a[key] == pytest.approx(b[key])  # deterministic runs: the workers changed nothing


def test_a_killed_study_loses_nothing_and_resumes(tmp_path):
    spec = tiny(tmp_path / "s", steps=40)
    path = tmp_path / "study.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "visrep.cli", "study", "run", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "s").glob("runs/*/study_status.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name for p in (tmp_path / "s").glob("runs/*/study_status.json")}
    assert finished and len(finished) < 4  # killed part-way
    stamps = {p: t for p, t in _checkpoints(tmp_path / "s").items() if p.parent.parent.name in finished}
    res = run_study(str(path), progress=False)
    assert set(res["skipped"]) == finished and len(res["done"]) == 4 - len(finished) and not res["failed"]
    assert {p: t for p, t in _checkpoints(tmp_path / "s").items() if p in stamps} == stamps
    assert status(str(path))["counts"]["done"] == 4


def test_a_store_or_folder_of_another_study_is_refused(tmp_path):
    spec = tiny(tmp_path / "s")
    ResultsStore(tmp_path / "s" / "results.sqlite", "other")
    with pytest.raises(ConfigError, match="belongs to study 'other', not 'tiny'"):
        run_study(spec, progress=False)
    db = sqlite3.connect(str(tmp_path / "old.sqlite"))
    with db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('study', 'tiny'), ('store_version', '0')")
    db.close()
    with pytest.raises(ConfigError, match="has format 0"):
        ResultsStore(tmp_path / "old.sqlite", "tiny")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "study.json").write_text(json.dumps({"name": "someone_else"}))
    with pytest.raises(ConfigError, match="holds study 'someone_else'"):
        run_study(tiny(tmp_path / "t"), progress=False)


def test_status_and_run_from_the_cli(tmp_path, capsys):
    import yaml

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path / "s")))
    with pytest.raises(SystemExit) as done:
        main(["study", "status", str(path)])
    assert done.value.code == 0 and "pending: 4" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["study", "run", str(path), "--workers", "1"])
    assert done.value.code == 0 and "4 runs done now" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["study", "status", str(path)])
    assert "done: 4" in capsys.readouterr().out
