"""Run a study: every missing run and evaluation, resumably, on N local worker processes; and its status.

    visrep study run studies/demo.yaml --workers 2
    visrep study run studies/demo.yaml --executor slurm --executor-options '{slurm_partition: dev, gpus_per_node: 1}'
    visrep study run studies/demo.yaml --executor slurm \
        --executor-options '{nodes: 2, tasks_per_node: 8, gpus_per_node: 8, cpus_per_task: 10}'   # 16 GPUs a run
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

from visrep.cache import atomic_write
from visrep.config import config_from_json
from visrep.errors import ConfigError, VisrepError
from visrep.evaluate.api import _load_model
from visrep.study.plan import _protocols, plan
from visrep.study.store import ResultsStore
from visrep.train.loop import pretrain


def _status_path(run_dir: Path) -> Path:
    return run_dir / "study_status.json"


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _evaluate(spec: dict, source: str, out: Path, model: dict | None = None) -> dict:
    """One evaluation of one backbone: a study's run folder, or a `models:` entry (source + backbone options)."""
    kwargs = {k: v for k, v in spec.items() if k not in ("protocol", "data_dir", "options", "metric")}
    kwargs.update(root=spec.get("data_dir"), dataset_options=spec.get("options"), out=str(out), progress=False)
    if model is not None:
        if model.get("backbone_options"):
            kwargs["backbone_options"] = model["backbone_options"]
        if model.get("pretrained"):
            kwargs["pretrained"] = True
    fn = _protocols()[spec["protocol"]]
    if spec["protocol"] == "rank":
        return fn([source], **kwargs)
    return fn(source, **kwargs)


def backbone_params(source: str, model: dict | None = None) -> int:
    """Parameters of the backbone that the evaluations see (the cost axis of the report)."""
    options = (model or {}).get("backbone_options") or None
    net, _ = _load_model(source, None, "student", 0, options)
    return int(sum(p.numel() for p in net.parameters()))


def _join_job_processes(job: dict) -> int:
    """A submitit job of several tasks (nodes × tasks_per_node) trains one run with all of them: export the
    variables torchrun would set (rank, world size, local rank, master address and port from the job's first
    host), so the loop's `setup_distributed` joins them into one process group. Returns this task's rank."""
    if int(job.get("tasks") or 1) <= 1:
        return 0
    import submitit

    # each task sees every GPU of its node and takes cuda:LOCAL_RANK (submitit would otherwise hide the others)
    return submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False).rank


def _task_rank() -> int:
    """This submitit task's global rank (0 outside a job of several tasks)."""
    import submitit

    try:
        return int(submitit.JobEnvironment().global_rank)
    except RuntimeError:  # not inside a submitit job
        return 0


def run_one(job: dict) -> dict:
    """Train one run of the study (or resume / find it finished), then its missing evaluations, and record the
    results in the store. Never raises for the run's own failure: returns (and writes) its status.

    In a job of several tasks every task trains (one process group); task 0 alone evaluates and records."""
    import torch

    if job.get("model") is not None and int(job.get("tasks") or 1) > 1 and _task_rank() > 0:
        return {"run_id": job["id"], "factors": job["factors"], "state": "done", "rank": _task_rank()}  # eval only
    rank = _join_job_processes(job) if job.get("model") is None else 0
    run_dir = Path(job["config"]["out_dir"])
    threads = int(job.get("threads") or 0)
    if threads:
        torch.set_num_threads(threads)
    status = {"run_id": job["id"], "factors": job["factors"], "state": "failed", "error": None}
    t0 = time.perf_counter()
    model = job.get("model")
    try:
        if model is None:
            cfg = config_from_json(json.dumps(job["config"]))
            if threads:
                cfg.train.num_threads = threads
            cfg.train.progress = False
            resume = (run_dir / "checkpoints" / "last.safetensors").is_file()
            summary = pretrain(cfg, resume=resume, quiet=True)
            status.update(steps=summary.get("steps", summary.get("step")), train_seconds=summary.get("loop_seconds"),
                          stop_reason=summary.get("stop_reason") or summary.get("already_finished"))
            source = str(run_dir)
            if rank:  # the other tasks' part ends with the training; task 0 writes the status
                return {**status, "state": "done", "rank": rank}
        else:  # a `models:` entry: evaluated as it is
            status.update(steps=0, train_seconds=0.0, model=model)
            source = model["source"]
        status["backbone_params"] = backbone_params(source, model)
        store = ResultsStore(job["store"], job["study"])
        for ev in job["evaluations"]:
            out = run_dir / "eval" / f"{ev['id']}.json"
            if out.is_file():
                result = json.loads(out.read_text())
            else:
                result = _evaluate(ev["spec"], source, out, model)
            store.record(job["id"], job["factors"], ev["id"], ev["protocol"], result)
        status["state"] = "done"
    except VisrepError as e:
        status["error"] = str(e)
    except Exception as e:  # noqa: BLE001 - a bug in one run must not stop the study; the traceback is kept
        status["error"] = f"{type(e).__name__}: {e}"
        status["traceback"] = traceback.format_exc()
    if rank:  # task 0 alone writes the run's status (its own failure is the run's failure)
        return {**status, "rank": rank}
    status["wall_seconds"] = time.perf_counter() - t0
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(_status_path(run_dir), status)
    return status


def _jobs(p, threads: int, tasks: int = 1) -> list[dict]:
    evaluations = [{"id": e.id, "protocol": e.protocol, "spec": e.spec} for e in p.evaluations]
    store = str(Path(p.out_dir) / "results.sqlite")
    return [{"id": r.id, "factors": r.factors, "config": r.config, "model": r.model, "evaluations": evaluations,
             "store": store, "study": p.name, "threads": threads, "tasks": tasks} for r in p.runs]


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


DEFAULT_TIMEOUT_MIN = 24 * 60
# submitit's update_parameters keys that a study may set (generic ones, plus any slurm_* / local_* key).
SUBMITIT_KEYS = ("cluster", "timeout_min", "mem_gb", "nodes", "tasks_per_node", "cpus_per_task", "gpus_per_node",
                 "name", "stderr_to_stdout")


def _check_executor_options(options) -> dict:
    options = dict(options or {})
    for key in options:
        if not isinstance(key, str):
            raise ConfigError(f"executor option names are text, got {key!r}")
        if key not in SUBMITIT_KEYS and not key.startswith(("slurm_", "local_")):
            import difflib

            close = difflib.get_close_matches(str(key), SUBMITIT_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown executor option '{key}'{hint}; valid: {', '.join(SUBMITIT_KEYS)} or any "
                              "slurm_*/local_* parameter of submitit")
    if options.get("cluster", "slurm") not in ("slurm", "local", "debug"):
        raise ConfigError(f"executor option cluster must be slurm, local or debug, got {options['cluster']!r}")
    return options


def _positive(options: dict, key: str) -> int:
    value = options.get(key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"executor option {key} must be a positive integer, got {value!r}")
    return value


def _submit(p, todo: list[dict], workers: int, options: dict, bar) -> list[dict]:
    """Run the jobs through submitit (the launcher of the DINOv2 and MAE codebases): one Slurm job per run, as a
    job array of at most `workers` at a time. cluster=local/debug runs the same path on this machine (tests)."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor slurm needs submitit (pip install submitit)") from None
    options = dict(options)
    cluster = options.pop("cluster", "slurm")
    # submitit's own default time limit is a few minutes, which would kill every real run: a day unless told
    options.setdefault("timeout_min", DEFAULT_TIMEOUT_MIN)
    options.setdefault("slurm_array_parallelism", workers)
    options.setdefault("name", f"visrep-{p.name}")
    folder = Path(p.out_dir) / "submitit" / "%j"  # on Slurm the study's folder must be on a shared filesystem
    try:
        ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        ex.update_parameters(**options)
    except (AssertionError, NameError, TypeError, ValueError) as e:
        raise ConfigError(f"submitit refused the executor options {options} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'a value of the wrong type'})") from None
    # Slurm runs `workers` array tasks at a time; the local executors ignore that, so submit in waves of `workers`
    waves = [todo] if cluster == "slurm" else [todo[i:i + workers] for i in range(0, len(todo), workers)]
    results = []
    for wave in waves:
        try:
            jobs = ex.map_array(run_one, wave)
        except OSError as e:  # e.g. no sbatch on this machine
            raise ConfigError(f"could not submit to {cluster} ({e.strerror or e}); is this a Slurm login node?") from None
        results += _wait(jobs, wave, cluster, bar)
    return results


def _wait(jobs, todo: list[dict], cluster: str, bar) -> list[dict]:
    """Each job's status: its own, or `failed` with submitit's last log line when the job died without one."""
    results = []
    for job, spec in zip(jobs, todo):
        try:
            results.append(job.results()[0])  # task 0's status (the only one with a job of several tasks)
        except Exception as e:  # noqa: BLE001 - the job died (time limit, memory, node): record it, go on
            msg = str(e).strip().splitlines()
            status = {"run_id": spec["id"], "factors": spec["factors"], "state": "failed",
                      "error": f"the {cluster} job {job.job_id} ended without a result: "
                               f"{msg[-1] if msg else type(e).__name__}", "submitit_job": str(job.job_id)}
            run_dir = Path(spec["config"]["out_dir"])
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(_status_path(run_dir), status)
            results.append(status)
        bar.update(1)
    return results


def run_study(study, *, workers: int = 1, executor: str = "local", executor_options: dict | None = None,
              retry_failed: bool = True, progress: bool = True) -> dict:
    """Run every missing run and evaluation of `study` (a YAML path or dict). Returns {"done", "failed", "skipped"}
    run ids and the path of the results store.

    executor: "local" (`workers` processes on this machine) or "slurm" (one submitit job per run, at most
    `workers` at once; executor_options are submitit's parameters, e.g. {slurm_partition: dev, timeout_min: 240,
    gpus_per_node: 1, cpus_per_task: 10}; {cluster: local} or {cluster: debug} runs the same path here)."""
    if executor not in ("local", "slurm"):
        raise ConfigError(f"executor must be local or slurm, got {executor!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    if executor_options and executor != "slurm":
        raise ConfigError("executor options are submitit's: give them with --executor slurm")
    options = _check_executor_options(executor_options)
    p = plan(study)
    _prepare_out_dir(p)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_cores = max(1, cores // workers)
    if executor == "slurm":  # a job's threads: its cpus_per_task, or on this machine its share of the cores
        threads = int(options.get("cpus_per_task") or (0 if options.get("cluster", "slurm") == "slurm" else local_cores))
    else:
        threads = local_cores
    tasks = 1
    if executor == "slurm":  # a run on several processes (GPUs, nodes): one submitit job with that many tasks
        tasks = _positive(options, "nodes") * _positive(options, "tasks_per_node")
        if not options.get("cpus_per_task"):
            threads = max(1, threads // tasks) if threads else 0  # this machine's share, split between the tasks
    jobs = _jobs(p, threads=threads, tasks=tasks)
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
        if executor == "slurm":
            if todo:
                results = _submit(p, todo, workers, options, bar)
        elif workers == 1:
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
