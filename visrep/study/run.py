"""Run a study: every missing run and evaluation, resumably, on N local worker processes; and its status.

    visrep study run studies/demo.yaml --workers 2
    visrep study status studies/demo.yaml

Layout under the study's out_dir:

    study.json                     the plan (name, budget, every run's resolved config, the evaluations)
    results.sqlite                 the results store (visrep.study.store)
    runs/<run id>/                 an ordinary visrep run folder (checkpoints, metrics.jsonl, summary.json)
    runs/<run id>/study_status.json  done | failed (with the error), steps, seconds
    runs/<run id>/eval/<evaluation id>.json   each evaluation's JSON, as `visrep eval --out` writes it

The unit of work is a run: train it (or resume it from its checkpoint, or find it finished), then every
evaluation it lacks. A run that fails is recorded with its error and the others go on. A killed `study run`
loses nothing: finished runs and evaluations are skipped, half-finished runs resume from their checkpoint.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

from visrep.errors import ConfigError, VisrepError


def _status_path(run_dir: Path) -> Path:
    return run_dir / "study_status.json"


def _write_json(path: Path, data: dict) -> None:
    from visrep.cache import atomic_write

    text = json.dumps(data, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _evaluate(spec: dict, run_dir: Path, out: Path) -> dict:
    from visrep.study.plan import _protocols

    kwargs = {k: v for k, v in spec.items() if k not in ("protocol", "data_dir", "options")}
    kwargs.update(root=spec.get("data_dir"), dataset_options=spec.get("options"), out=str(out), progress=False)
    fn = _protocols()[spec["protocol"]]
    if spec["protocol"] == "rank":
        return fn([str(run_dir)], **kwargs)
    return fn(str(run_dir), **kwargs)


def run_one(job: dict) -> dict:
    """Train one run of the study (or resume / find it finished), then its missing evaluations, and record the
    results in the store. Never raises for the run's own failure: returns (and writes) its status."""
    import torch

    from visrep.config import config_from_json
    from visrep.study.store import ResultsStore
    from visrep.train.loop import pretrain

    run_dir = Path(job["config"]["out_dir"])
    threads = int(job.get("threads") or 0)
    if threads:
        torch.set_num_threads(threads)
    status = {"run_id": job["id"], "factors": job["factors"], "state": "failed", "error": None}
    t0 = time.perf_counter()
    try:
        cfg = config_from_json(json.dumps(job["config"]))
        if threads:
            cfg.train.num_threads = threads
        cfg.train.progress = False
        resume = (run_dir / "checkpoints" / "last.safetensors").is_file()
        summary = pretrain(cfg, resume=resume, quiet=True)
        status.update(steps=summary.get("steps", summary.get("step")), train_seconds=summary.get("loop_seconds"),
                      stop_reason=summary.get("stop_reason") or summary.get("already_finished"))
        store = ResultsStore(job["store"], job["study"])
        for ev in job["evaluations"]:
            out = run_dir / "eval" / f"{ev['id']}.json"
            if out.is_file():
                result = json.loads(out.read_text())
            else:
                result = _evaluate(ev["spec"], run_dir, out)
            store.record(job["id"], job["factors"], ev["id"], ev["protocol"], result)
        status["state"] = "done"
    except VisrepError as e:
        status["error"] = str(e)
    except Exception as e:  # noqa: BLE001 - a bug in one run must not stop the study; the traceback is kept
        status["error"] = f"{type(e).__name__}: {e}"
        status["traceback"] = traceback.format_exc()
    status["wall_seconds"] = time.perf_counter() - t0
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(_status_path(run_dir), status)
    return status


def _jobs(p, threads: int) -> list[dict]:
    evaluations = [{"id": e.id, "protocol": e.protocol, "spec": e.spec} for e in p.evaluations]
    store = str(Path(p.out_dir) / "results.sqlite")
    return [{"id": r.id, "factors": r.factors, "config": r.config, "evaluations": evaluations, "store": store,
             "study": p.name, "threads": threads} for r in p.runs]


def _done(job: dict) -> bool:
    run_dir = Path(job["config"]["out_dir"])
    path = _status_path(run_dir)
    if not path.is_file():
        return False
    try:
        state = json.loads(path.read_text()).get("state")
    except (OSError, json.JSONDecodeError):
        return False
    return state == "done" and all((run_dir / "eval" / f"{e['id']}.json").is_file() for e in job["evaluations"])


def _prepare_out_dir(p) -> None:
    """study.json records the plan; a folder that holds another study is refused."""
    from visrep.study.store import ResultsStore

    out = Path(p.out_dir)
    meta = out / "study.json"
    if meta.is_file():
        try:
            name = json.loads(meta.read_text()).get("name")
        except (OSError, json.JSONDecodeError):
            name = None
        if name != p.name:
            raise ConfigError(f"'{out}' holds study '{name}', not '{p.name}'; give this study its own out_dir")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(meta, p.to_dict())
    ResultsStore(out / "results.sqlite", p.name)  # created now, so a foreign or old store is refused before work


def run_study(study, *, workers: int = 1, executor: str = "local", retry_failed: bool = True,
              progress: bool = True) -> dict:
    """Run every missing run and evaluation of `study` (a YAML path or dict). Returns {"done", "failed", "skipped"}
    run ids and the path of the results store."""
    from visrep.study.plan import plan

    if executor != "local":
        raise ConfigError(f"executor must be 'local' (slurm through submitit comes next), got {executor!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    p = plan(study)
    _prepare_out_dir(p)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = _jobs(p, threads=max(1, cores // workers))
    todo, skipped = [], []
    for job in jobs:
        if _done(job):
            skipped.append(job["id"])
        elif not retry_failed and _failed(job):
            skipped.append(job["id"])
        else:
            todo.append(job)
    from tqdm.auto import tqdm

    results = []
    with tqdm(total=len(todo), desc=f"study {p.name}", unit="run", disable=not progress) as bar:
        if workers == 1:
            for job in todo:
                results.append(run_one(job))
                bar.update(1)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn: a fresh interpreter per worker (no forked torch thread pools or locks)
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                for fut in as_completed([pool.submit(run_one, job) for job in todo]):
                    results.append(fut.result())
                    bar.update(1)
    return {"study": p.name, "out_dir": p.out_dir, "store": str(Path(p.out_dir) / "results.sqlite"),
            "done": [r["run_id"] for r in results if r["state"] == "done"],
            "failed": {r["run_id"]: r["error"] for r in results if r["state"] != "done"},
            "skipped": skipped}


def _failed(job: dict) -> bool:
    path = _status_path(Path(job["config"]["out_dir"]))
    try:
        return path.is_file() and json.loads(path.read_text()).get("state") == "failed"
    except (OSError, json.JSONDecodeError):
        return False


def status(study) -> dict:
    """Per run: done | failed (with its error) | started (a checkpoint, not finished: running or killed) |
    pending; and the counts."""
    from visrep.study.plan import plan

    p = plan(study, check_build=False)
    jobs = _jobs(p, threads=0)
    rows = []
    for job in jobs:
        run_dir = Path(job["config"]["out_dir"])
        state, error = "pending", None
        if _done(job):
            state = "done"
        elif _failed(job):
            state, error = "failed", json.loads(_status_path(run_dir).read_text()).get("error")
        elif (run_dir / "checkpoints").is_dir() or (run_dir / "metrics.jsonl").is_file():
            state = "started"
        rows.append({"run_id": job["id"], "factors": job["factors"], "state": state, "error": error})
    counts = {s: sum(r["state"] == s for r in rows) for s in ("done", "failed", "started", "pending")}
    return {"study": p.name, "out_dir": p.out_dir, "runs": rows, "counts": counts}
