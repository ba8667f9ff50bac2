"""The one training loop. Every method runs through `pretrain`; none has a branch of its own here.

    state = build_state(cfg, train, ...)              # views, template, objective, optimisers, probe, schedules
    for step in range(state.step, stop_at):
        terms = train_step(state, batches(step))      # views ─► template ─► objective ─► loss ─► optimisers
        log every train.log_every steps; kNN/RankMe monitors and checkpoints at epoch ends

A step: uint8 batch ─► views(seed) ─► batch transforms (Mixup/CutMix) ─► template (backbone, heads, target
branch) ─► objective ─► loss terms; backward; every optimiser steps; the EMA teacher follows; the online probe
trains on the detached features. Hyper-parameters come from plain arrays indexed by step (DINOv2, nanoGPT).
What differs between methods is in the state's parts, never here: if a method needs a branch in this file,
the template is missing a field.

Reproducibility: the data order is a permutation seeded by (seed, epoch) and the views are seeded by
(seed, step) (each rank keeps its rows of the global draws), so a run can restart at any step from its checkpoint and continue bit-for-bit.

Failures: a step reads nothing back from the device. A non-finite loss is recorded on the device; it is read
on logging steps and before every checkpoint, where the run stops with a message and the last good checkpoint
is kept (no checkpoint is written from weights that saw a non-finite loss).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from visrep.config import RunConfig, upgrade_saved_run
from visrep.errors import ConfigError, TrainingError
from visrep.objectives import loss_terms
from visrep.checkpoint import (CheckpointError, check_resume_meta, clean_stale_temps, first_non_finite,
                                     load_checkpoint, save_checkpoint)
from visrep.device import resolve_device
from visrep.data.batch_rows import batch_rows
from visrep.train.distributed import any_rank, any_rank_flags, setup_distributed, teardown_distributed
from visrep.train.monitor import FeatureMonitor
from visrep.train.runlog import RunLog
from visrep.train.state import (TrainState, build_state, checkpoint_contents, load_state, load_training_data,
                                parameter_counts)


def view_seed(seed: int, step: int) -> int:
    """The step's seed for views, masks and batch transforms: the same on every rank, which draw per-sample
    values for the whole global batch and keep their own rows (`visrep.data.batch_rows`)."""
    return (seed * 1_000_003 + step * 7919) % (2**62)


def train_step(state: TrainState, batch: dict) -> dict[str, torch.Tensor]:
    """One optimisation step at `state.step` on `batch` (images, labels, targets on the device).

    Returns the step's loss terms and the probe's accuracy as 0-d tensors on the device (no host sync).
    """
    step, cfg = state.step, state.cfg
    for opt in state.optimizers:
        opt.apply(step)
    for name, values in state.schedules.objective.items():
        setattr(state.objective, name, float(values[step]))
    for part in state.progress_hooks:
        part.set_progress(step, state.total_steps, state.steps_per_epoch)

    seed = view_seed(cfg.seed, step)
    local = batch["images"].shape[0]  # this rank's rows [rank·b, (rank+1)·b) of the global batch
    with batch_rows(state.dist.rank * local, local, local * state.dist.world_size):
        views = state.views(batch["images"], seed=seed)
        if state.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        labels = batch["labels"]
        for i, transform in enumerate(state.batch_transforms):  # Mixup/CutMix: mixes within this rank's rows
            views, labels = transform(views, labels, seed=seed + 2 + i)
        with state.autocast():
            out = state.forward(views, state.views.n_global, seed=seed + 1,  # seed: the step's masks, if any
                                **{k: batch[k] for k in state.model.inputs})  # batch fields the template names
            available = {**batch, "labels": labels, **out.extras}  # what an objective may name in `inputs`
            terms = loss_terms(state.objective(out.student, out.target, **{k: available[k] for k in state.inputs}))
    loss = terms["loss"]
    bad = ~torch.isfinite(loss.detach()) & (state.bad_step < 0)
    state.bad_step = torch.where(bad, step, state.bad_step)
    state.bad_loss = torch.where(bad, loss.detach().float(), state.bad_loss)

    optimizers = [o.optimizer for o in state.optimizers]
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if cfg.optim.clip_grad:
        for opt in optimizers:
            state.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for o in optimizers for g in o.param_groups for p in g["params"]],
                                       cfg.optim.clip_grad)
    for opt in optimizers:
        state.scaler.step(opt)
    state.scaler.update()
    state.model.update_teacher(float(state.schedules.momentum[step]))

    logged = {k: v.detach() if torch.is_tensor(v) else torch.tensor(float(v)) for k, v in terms.items()}
    if state.probe_on:
        logged["probe_acc"] = state.probe.step(out.features, batch["labels"], state.views.n_global)
    state.step += 1
    return logged


def pretrain(cfg: RunConfig, *, resume: bool = False, quiet: bool = False, force: bool = False) -> dict:
    """Pretrain with the composition `cfg` describes; returns a summary dict (also in out_dir/summary.json).

    resume=True continues from `out_dir/checkpoints/last.safetensors` (a run killed at any point can
    continue); a run that already finished is reported as such (summary["already_finished"]) and nothing
    is changed. Without it, an out_dir that already holds a checkpoint is refused, so nothing is
    overwritten by accident. force=True resumes from a checkpoint that fails its integrity check.
    """
    with _run_lock(Path(cfg.out_dir)):
        return _pretrain(cfg, resume=resume, quiet=quiet, force=force)


@contextlib.contextmanager
def _run_lock(out_dir: Path):
    """One process (group) per run folder: a second `visrep pretrain` into the same out_dir, spelled any way,
    is refused instead of interleaving its checkpoints with the first's. The lock lives in the cache folder
    (keyed by the resolved path), so nothing is created in out_dir before the run starts; the OS drops it if
    the holder dies. Under torchrun only rank 0 holds it."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    import hashlib

    from filelock import FileLock, Timeout

    from visrep.data.sources import cache_dir

    folder = cache_dir() / "locks"
    key = hashlib.sha1(str(out_dir.expanduser().resolve()).encode()).hexdigest()[:20]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / f"run-{key}.lock"), timeout=0)
        lock.acquire()
    except Timeout:
        raise ConfigError(f"another visrep process is training in '{out_dir}'; wait for it to finish or choose "
                          "another out_dir") from None
    except OSError:  # a read-only cache: run unguarded rather than not at all
        yield
        return
    try:
        yield
    finally:
        lock.release()


def elastic_restart() -> bool:
    """True in workers that torchrun restarted (`--max-restarts`): TORCHELASTIC_RESTART_COUNT counts the restarts."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def _open_checkpoint(cfg: RunConfig, ckpt_path: Path, resume: bool, force: bool):
    """The checkpoint to resume from, verified before anything is built or written (None for a new run)."""
    if ckpt_path.exists() and not resume:
        raise ConfigError(f"'{cfg.out_dir}' already holds a run; pass --resume to continue it or choose another out_dir")
    if not resume:
        return None
    if not ckpt_path.exists():
        raise ConfigError(f"nothing to resume: '{ckpt_path}' does not exist")
    tensors, meta = load_checkpoint(ckpt_path, force=force)  # hash, schema, step
    check_resume_meta(meta, ckpt_path)
    config, tensors = upgrade_saved_run(meta["config"], tensors)  # a run saved under an older config schema
    meta = {**meta, "config": config}
    bad = first_non_finite({k: v for k, v in tensors.items() if k.startswith(("model.", "objective.", "probe."))})
    if bad is not None:
        raise CheckpointError(f"cannot resume: checkpoint '{ckpt_path}' holds non-finite weights ('{bad}' has "
                              "NaN/Inf), so training from it would only diverge; start a new out_dir")
    _check_resumable(meta, cfg)
    return tensors, meta


def _pretrain(cfg: RunConfig, *, resume: bool, quiet: bool, force: bool) -> dict:
    t_start = time.time()
    tc = cfg.train
    if tc.precision == "fp16" and not (tc.device.startswith("cuda") or (tc.device == "auto" and torch.cuda.is_available())):
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    dist = setup_distributed(torch.device("cuda" if torch.cuda.is_available() and tc.device != "cpu" else "cpu"))
    device = resolve_device(tc.device, dist.local_rank)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "checkpoints" / "last.safetensors"
    if elastic_restart() and ckpt_path.exists() and not resume:
        # torchrun --max-restarts restarted the workers after a failure: continue from the last checkpoint
        if dist.is_main and not quiet:
            print(f"restart {os.environ['TORCHELASTIC_RESTART_COUNT']} of an elastic job: resuming from {ckpt_path}")
        resume = True
    resumed = _open_checkpoint(cfg, ckpt_path, resume, force)
    if resumed is not None:
        done = _finished(resumed[1], cfg)
        if done:
            return _existing_summary(out_dir, resumed[1], done)
        _check_defaults_version(resumed[1])  # a finished run is only reported, so only an unfinished one is refused
    if dist.is_main:
        clean_stale_temps(ckpt_path.parent)  # leftovers of checkpoint writes that a kill interrupted

    train = load_training_data(cfg, saved=resumed[1] if resumed is not None else None)
    batches = train.batches(tc.batch_size, cfg.seed, dist.rank, dist.world_size)  # addressed by step
    spe = batches.steps_per_epoch
    state = build_state(cfg, train, spe, device, dist, load_init=resumed is None, force=force)
    last_saved = None  # step of the last checkpoint on disk (named in the error messages)
    if resumed is not None:
        try:
            load_state(state, *resumed)
        except (KeyError, RuntimeError, ValueError, TypeError, CheckpointError) as e:  # a well-formed file of another run
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"cannot resume: checkpoint '{ckpt_path}' does not hold this run's state "
                                  f"({type(e).__name__}: {msg[:200]})") from None
        last_saved = state.step
        resumed = None  # loaded into the modules; don't keep a second copy

    log = RunLog(out_dir, cfg, main=dist.is_main, resume_step=state.step if resume else None, steps_per_epoch=spe,
                 total_steps=state.total_steps, show_bar=tc.progress and not quiet)

    def checkpoint(reason: str, collective: bool = True) -> None:
        nonlocal last_saved
        if int(state.bad_step) >= 0:  # never a checkpoint from weights that saw a non-finite loss
            raise _loss_error(state, state.step, last_saved, ckpt_path)
        tensors, meta = checkpoint_contents(state, reason)
        # The guard covers what is saved: every parameter and buffer (BatchNorm statistics diverge before the
        # loss does). Every rank checks its own state, so all stop together under torchrun.
        bad = first_non_finite({k: v for k, v in tensors.items() if k.startswith(("model.", "objective.", "probe."))})
        if any_rank(bad is not None, dist) if collective else bad is not None:
            raise TrainingError(
                f"at step {state.step} the weights are no longer finite ('{bad or 'on another process'}' holds "
                f"NaN/Inf), so no checkpoint was written; {_kept(last_saved, ckpt_path)}; lower optim.lr or set "
                "optim.clip_grad")
        if dist.is_main:
            save_checkpoint(ckpt_path, tensors, meta)
        last_saved = state.step  # rank 0 writes it; every rank names it in its messages

    knn_on = bool(cfg.monitor.knn_every) and state.monitors_on
    rankme_on = bool(cfg.monitor.rankme_every)  # label-free: also with one class
    monitor = (FeatureMonitor(cfg, train, state.info["image_size"], device, knn=knn_on)
               if dist.is_main and (knn_on or rankme_on) else None)
    if monitor is not None and state.step == 0 and not state.history:  # the random-init reference point
        state.history.append({"epoch": 0, **monitor(state.model.backbone, knn=knn_on, rankme=rankme_on)})
        log.record(state.history[-1], 0, "monitor")

    total = state.total_steps
    stop_at = min(total, tc.max_steps) if tc.max_steps is not None else total
    stop_reason = "completed" if stop_at == total else "max_steps"
    last_loss = float("nan")
    seen, t_seen = 0, time.time()
    t_loop = time.time()  # train.time_budget_s counts the loop only (not data decoding or model building)
    in_step = False  # True while the weights and `state.step` disagree (no checkpoint may be written then)
    finished = False  # every rank left the loop normally (then they can meet once more before teardown)
    try:
        state.model.train()
        for step in range(state.step, stop_at):
            in_step = True
            terms = train_step(state, batches(step, device))
            in_step = False
            seen += tc.batch_size
            log.bar.update(1)
            done = step + 1
            epoch_end = done % spe == 0 or done == total
            last = done == stop_at
            # One host sync and (under torchrun) one collective per logging step, epoch end or last step; with
            # one process the time budget is checked after every step.
            sync = done % tc.log_every == 0 or epoch_end or last
            over_time = tc.time_budget_s is not None and time.time() - t_loop >= tc.time_budget_s
            if not sync and not (over_time and dist.world_size == 1):
                continue
            bad, over_time = any_rank_flags(torch.stack([(state.bad_step >= 0).float(),
                                                         torch.tensor(float(over_time), device=device)]), dist)
            if bad:
                raise _loss_error(state, step, last_saved, ckpt_path)
            if over_time and not last:
                stop_reason, last = "time_budget", True
            last_loss = float(terms["loss"])
            if dist.is_main and (done % tc.log_every == 0 or done == total or last):
                ips = seen / max(time.time() - t_seen, 1e-9)
                rec = {"step": done, "epoch": done / spe, "loss": last_loss,
                       "lr": float(state.optimizers[0].lr[step]), "momentum": float(state.schedules.momentum[step]),
                       "probe_acc": float(terms.get("probe_acc", float("nan"))), "images_per_s": ips,
                       **{k: float(v) for k, v in terms.items() if k not in ("loss", "probe_acc")}}
                log.record(rec, done, "train", ("loss", "lr", "momentum", "probe_acc", "images_per_s"))
                log.bar.set_postfix(loss=f"{last_loss:.3f}", ips=f"{ips:.0f}")
                seen, t_seen = 0, time.time()
            if epoch_end:
                _run_monitors(state, monitor, log, knn_on, rankme_on, done == total, last_loss)
            if last or (epoch_end and ((done // spe) % tc.checkpoint_every == 0 or done == total)):
                checkpoint(stop_reason if last and stop_reason != "completed" else "epoch")
            if last:
                break
        finished = True
    except KeyboardInterrupt:
        if not in_step:
            checkpoint("interrupted", collective=False)
        raise TrainingError(f"interrupted; continue with --resume from the last checkpoint ({ckpt_path})") from None
    finally:
        log.close()
        if hasattr(batches, "close"):  # a streaming source's DataLoader workers
            batches.close()
        teardown_distributed(dist, finished=finished)

    summary = {"out_dir": str(out_dir), "method": cfg.method, "backbone": cfg.backbone.name, "steps": state.step,
               "total_steps": total, "train_size": len(train), "epochs_done": state.step / spe,
               "stop_reason": stop_reason, "final_loss": last_loss, "seconds": time.time() - t_start,
               "loop_seconds": time.time() - t_loop, "history": state.history, "checkpoint": str(ckpt_path),
               "parameters": parameter_counts(state.model), "processes": dist.world_size}
    if hasattr(batches, "skipped"):  # streamed samples that could not be read (their slots took other images)
        summary["data_skipped"] = int(batches.skipped)
    if dist.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run_monitors(state: TrainState, monitor, log: RunLog, knn_on: bool, rankme_on: bool, final: bool,
                  last_loss: float) -> None:
    """kNN / RankMe at an epoch end when due (every monitor.*_every epochs, and at the end of training)."""
    if monitor is None:
        return
    ep = state.step // state.steps_per_epoch

    def due(every: int) -> bool:
        return bool(every) and (ep % every == 0 or final)

    want_knn, want_rankme = knn_on and due(state.cfg.monitor.knn_every), rankme_on and due(state.cfg.monitor.rankme_every)
    if not (want_knn or want_rankme):
        return
    res = monitor(state.model.backbone, knn=want_knn, rankme=want_rankme)
    state.history.append({"epoch": state.step / state.steps_per_epoch, **res})
    log.record(state.history[-1], state.step, "monitor", ("knn_top1", "rankme"))
    log.bar.set_postfix(loss=f"{last_loss:.3f}", **{("knn" if k == "knn_top1" else k): f"{res[k]:.3f}"
                                                    for k in ("knn_top1", "rankme") if k in res})


def _check_defaults_version(meta: dict) -> None:
    from visrep.version import DEFAULTS_VERSION

    if meta.get("defaults_version", 1) != DEFAULTS_VERSION:
        raise ConfigError(f"cannot resume: this run was saved by a visrep whose defaults differ (defaults version "
                          f"{meta.get('defaults_version', 1)}, now {DEFAULTS_VERSION}: iLLaMA, the MAE/HPM decoders "
                          "and GCR now follow their official code), so its config would now train differently; "
                          "finish it with that version or start a new out_dir")


def _check_resumable(meta: dict, cfg: RunConfig) -> None:
    saved = meta.get("config", {})
    now = cfg.to_dict()
    # Only what changes the trajectory matters; train.max_steps / time budget / progress may differ.
    ignore = {"max_steps", "time_budget_s", "progress", "log_every", "num_threads", "device", "root", "download"}
    for section in now:
        if section == "out_dir":  # the run is the folder it is in, however it is spelled, moved or copied
            continue
        a, b = saved.get(section), now[section]
        if isinstance(a, dict) and isinstance(b, dict):
            a = {k: v for k, v in a.items() if k not in ignore}
            b = {k: v for k, v in b.items() if k not in ignore}
        if json.loads(json.dumps(a)) != json.loads(json.dumps(b)):
            raise ConfigError(f"cannot resume: config section '{section}' differs from the checkpoint's; "
                              "resume with the same config or start a new out_dir")


def _loss_error(state: TrainState, step: int, last_saved: int | None, ckpt_path: Path) -> TrainingError:
    """The one message for a non-finite loss: where it happened (this process's first bad step, else the step at
    which another process reported one), what was kept, and what to change."""
    at = int(state.bad_step)
    value = float(state.bad_loss) if at >= 0 else "non-finite on another process"
    at = at if at >= 0 else step
    precision = state.cfg.train.precision
    return TrainingError(f"the loss became {value} at step {at} (epoch {at // state.steps_per_epoch}); "
                         f"{_kept(last_saved, ckpt_path)}; lower optim.lr or set optim.clip_grad"
                         + ("" if precision == "fp32" else f", or use train.precision=fp32 instead of {precision}"))


def _kept(step: int | None, path: Path) -> str:
    if step is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint (step {step}) is kept at {path}"


def _finished(meta: dict, cfg: RunConfig) -> str | None:
    """Why a checkpointed run has nothing left to do ("completed", "max_steps"), or None."""
    if meta["step"] >= meta["total_steps"]:
        return "completed"
    if cfg.train.max_steps is not None and meta["step"] >= cfg.train.max_steps:
        return "max_steps"
    return None


def _existing_summary(out_dir: Path, meta: dict, reason: str) -> dict:
    """The summary of a run that is already done, read back, never rewritten."""
    summary = None
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    if not isinstance(summary, dict) or summary.get("steps") != meta["step"]:
        summary = { "method": meta["config"].get("method"), "steps": meta["step"],
                   "total_steps": meta["total_steps"], "epochs_done": meta["step"] / meta["steps_per_epoch"],
                   "stop_reason": reason, "final_loss": None, "history": meta.get("history", [])}
    # The run is the folder it is in now (it may have been moved or copied since it finished).
    return {**summary, "out_dir": str(out_dir), "checkpoint": str(out_dir / "checkpoints" / "last.safetensors"),
            "already_finished": reason}


