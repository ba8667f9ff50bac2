"""The one training loop. Every method runs through `pretrain`; none has a branch of its own here.

Per step:  uint8 batch ─► views(seed) ─► template (backbone, heads, target branch) ─► objective ─► loss
           + an online linear probe on the detached features (solo-learn's monitor), then the optimizer
           step, then the EMA teacher update. Hyper-parameters come from plain arrays indexed by step.

Reproducibility: the data order is a permutation seeded by (seed, epoch) and the views are seeded by
(seed, step, rank), so a run can restart at any step from its checkpoint and continue bit-for-bit.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from visrep.config import RunConfig
from visrep.errors import ConfigError, TrainingError, VisrepError
from visrep.data.views import IMAGENET_MEAN, IMAGENET_STD
from visrep.train.checkpoint import (CheckpointError, add_prefix, check_resume_meta, clean_stale_temps, first_non_finite,
                                     load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint,
                                     strip_prefix)
from visrep.train.distributed import any_rank, resolve_device, setup_distributed, teardown_distributed
from visrep.train.optim import build_optimizer, build_param_groups
from visrep.train.schedules import linear_warmup_constant, momentum_schedule, warmup_cosine

def view_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**62)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class Schedules:
    """Every per-step hyper-parameter as an array: lr, weight decay, EMA momentum, objective attributes."""

    def __init__(self, cfg: RunConfig, steps_per_epoch: int):
        total = total_steps_of(cfg, steps_per_epoch)
        o = cfg.optim
        scale = cfg.train.batch_size / 256 if o.lr_scaling == "linear" else 1.0
        warmup = round(o.warmup_epochs * steps_per_epoch)
        self.lr = warmup_cosine(o.lr * scale, o.min_lr * scale, total, warmup)
        # Riemannian SGD (GCR bases): the same shape, from its own base lr (not batch-scaled).
        m_lr = o.lr * scale if o.manifold_lr is None else o.manifold_lr
        self.manifold_lr = warmup_cosine(m_lr, m_lr * (o.min_lr / o.lr if o.lr else 0.0), total, warmup)
        wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
        self.wd = warmup_cosine(o.weight_decay, wd_end, total, 0)
        self.momentum = momentum_schedule(cfg.target.momentum, cfg.target.momentum_end, total)
        self.objective = {
            name: linear_warmup_constant(s.get("start", 0.0), s.get("end", 0.0), total,
                                         round(s.get("warmup_epochs", 0.0) * steps_per_epoch))
            for name, s in cfg.objective.schedules.items()
        }


def total_steps_of(cfg: RunConfig, steps_per_epoch: int) -> int:
    """The schedules' horizon: train.steps when set (e.g. for a time budget), else epochs x steps per epoch."""
    return cfg.train.steps if cfg.train.steps else cfg.train.epochs * steps_per_epoch


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _log_line(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


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


def _pretrain(cfg: RunConfig, *, resume: bool, quiet: bool, force: bool) -> dict:
    from visrep.data.sources import load_dataset
    from visrep.data.views import build_views
    from visrep.methods import build_template
    from visrep.objectives import build_objective

    t_start = time.time()
    tc = cfg.train
    if tc.precision == "fp16" and not (tc.device.startswith("cuda") or (tc.device == "auto" and torch.cuda.is_available())):
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    dist_info = setup_distributed(torch.device("cuda" if torch.cuda.is_available() and tc.device != "cpu" else "cpu"))
    device = resolve_device(tc.device, dist_info.local_rank)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "checkpoints" / "last.safetensors"
    if ckpt_path.exists() and not resume:
        raise ConfigError(f"'{out_dir}' already holds a run; pass --resume to continue it or choose another out_dir")
    if resume and not ckpt_path.exists():
        raise ConfigError(f"nothing to resume: '{ckpt_path}' does not exist")
    resumed = None
    if resume:  # verified (hash, schema, step, finite weights) before anything is built or written
        resumed = load_checkpoint(ckpt_path, force=force)
        check_resume_meta(resumed[1], ckpt_path)
        bad = first_non_finite({k: v for k, v in resumed[0].items() if k.startswith(("model.", "objective.", "probe."))})
        if bad is not None:
            raise CheckpointError(f"cannot resume: checkpoint '{ckpt_path}' holds non-finite weights ('{bad}' has "
                                  "NaN/Inf), so training from it would only diverge; start a new out_dir")
        _check_resumable(resumed[1], cfg)
        done = _finished(resumed[1], cfg)
        if done:
            return _existing_summary(out_dir, resumed[1], done)
    if int(os.environ.get("RANK", "0")) == 0:
        clean_stale_temps(ckpt_path.parent)  # leftovers of checkpoint writes that a kill interrupted

    # ---------------------------------------------------------------- data and parts of the template
    d = cfg.data
    train = load_dataset(d.dataset, d.split, d.root, image_size=d.image_size, download=d.download, **d.options)
    train = train.subset(d.subset, cfg.seed)
    if d.holdout is not None:  # the held-out part is for model selection; never trained on
        train = train.holdout(d.holdout, cfg.seed)[0]
    if d.label_fraction is not None:  # low-label protocols (1 %, 10 % of the labels)
        train = train.fraction(d.label_fraction, cfg.seed)
    image_size = int(train.images.shape[-1])
    num_classes = len(train.classes)
    batch = tc.batch_size
    if batch % dist_info.world_size:
        raise ConfigError(f"train.batch_size {batch} must be divisible by the {dist_info.world_size} processes")
    local_batch = batch // dist_info.world_size
    steps_per_epoch = len(train) // batch
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size {batch} is larger than the {len(train)} training images")

    policy = build_views(cfg.views.policy, image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         **cfg.views.options).to(device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    objective = build_objective(cfg.objective.name, **cfg.objective.params)
    objective_inputs = tuple(getattr(objective, "inputs", ()))
    n_label_values = int(torch.unique(train.labels).numel())
    if "labels" in objective_inputs and n_label_values < 2:
        raise ConfigError(f"objective '{cfg.objective.name}' classifies, but the training set of '{d.dataset}' holds "
                          f"{n_label_values} class; a classifier needs at least two")
    monitors_on = n_label_values >= 2  # with one class, probe and kNN accuracy are a meaningless 1.000
    if not monitors_on and (cfg.monitor.online_probe or cfg.monitor.knn_every):
        import warnings

        warnings.warn(f"the training set of '{d.dataset}' holds one class, so the online probe and kNN monitor "
                      "are off", stacklevel=2)
    num_outputs = num_classes  # out_dim of a classifier head: classes, or regression targets
    if "targets" in objective_inputs:
        if train.targets is None:
            raise ConfigError(f"objective '{cfg.objective.name}' needs regression targets, and dataset "
                              f"'{d.dataset}' has none with these options (e.g. utkface task=age, mtfl task=landmarks)")
        num_outputs = int(train.targets.shape[1])
        objective.set_target_stats(train.targets)
    # A resumed run's weights come from its checkpoint, so finetune.init is not read again (it may have moved).
    model = build_template(cfg, image_size, num_outputs, load_init=resumed is None, force=force).to(device)
    objective = objective.to(device)
    from visrep.data.mixing import build_mixing

    mixing = build_mixing(cfg.mixing, num_classes)
    if mixing is not None and policy.n_views != 1:
        raise ConfigError(f"mixing needs a one-view policy (e.g. views.policy=crop), '{cfg.views.policy}' makes "
                          f"{policy.n_views} views")
    for name in cfg.objective.schedules:
        if not hasattr(objective, name):
            raise ConfigError(f"objective.schedules.{name}: objective '{cfg.objective.name}' has no attribute "
                              f"'{name}' to schedule")
    # Parts whose behaviour follows training progress (iLLaMA's soft mask, HPM's α_t) expose
    # `set_progress(step, total_steps, steps_per_epoch)`; the loop calls it before every step.
    progress_hooks = [m for m in (*model.modules(), *objective.modules()) if hasattr(m, "set_progress")]
    feat_dim = int(getattr(model.backbone, "num_features"))
    probe = nn.Linear(feat_dim, num_classes).to(device)

    ddp_model, ddp_probe = model, probe
    if dist_info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if tc.sync_bn and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [device.index] if device.type == "cuda" else None
        ddp_model = DDP(model, device_ids=ids)
        ddp_probe = DDP(probe, device_ids=ids)

    groups, manifold = build_param_groups(model, cfg)
    optimizer = build_optimizer(cfg.optim, groups)
    # GCR's class subspaces: Riemannian SGD beside the Euclidean optimiser (no weight decay on them).
    manifold_opt = None
    if manifold:
        from visrep.train.riemannian import RiemannianSGD

        manifold_opt = RiemannianSGD(manifold, lr=float(cfg.optim.manifold_lr or cfg.optim.lr),
                                     momentum=cfg.optim.manifold_momentum, qr_every=cfg.optim.manifold_qr_every)
    optimizers = [optimizer] + ([manifold_opt] if manifold_opt is not None else [])
    probe_opt = torch.optim.SGD(probe.parameters(), lr=cfg.monitor.probe_lr, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=tc.precision == "fp16")
    sched = Schedules(cfg, steps_per_epoch)
    total_steps = total_steps_of(cfg, steps_per_epoch)

    start_step = 0
    history: list[dict] = []
    last_saved = None  # step of the last checkpoint on disk (named in the error messages)
    if resumed is not None:
        tensors, meta = resumed
        resumed = None  # the tensors are loaded into the modules below; don't keep a second copy
        try:
            model.load_state_dict(strip_prefix(tensors, "model."))
            objective.load_state_dict(strip_prefix(tensors, "objective."))
            probe.load_state_dict(strip_prefix(tensors, "probe."))
            optimizer_from_tensors(optimizer, tensors, meta["optimizer"])
            if manifold_opt is not None:
                optimizer_from_tensors(manifold_opt, strip_prefix(tensors, "manifold_"), meta["manifold_optimizer"])
            optimizer_from_tensors(probe_opt, strip_prefix(tensors, "probe_"), meta["probe_optimizer"])
            if "scaler" in meta:
                scaler.load_state_dict(meta["scaler"])
            torch.set_rng_state(tensors["rng.torch"])
            if "rng.cuda" in tensors and device.type == "cuda":
                torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:  # a well-formed file of another run
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"cannot resume: checkpoint '{ckpt_path}' does not hold this run's state "
                                  f"({type(e).__name__}: {msg[:200]})") from None
        start_step = last_saved = int(meta["step"])
        history = meta.get("history", [])
        del tensors

    # ---------------------------------------------------------------- logging
    main = dist_info.is_main
    writer = None
    metrics_path = out_dir / "metrics.jsonl"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume and metrics_path.exists():  # leftovers of a run that never wrote a checkpoint
            metrics_path.unlink()
        if resume:  # lines logged after the checkpoint (before a kill) are logged again: keep each step once
            _truncate_metrics(metrics_path, start_step, steps_per_epoch)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step if resume else None)
        except ImportError:  # tensorboard is optional at run time
            writer = None

    def save(step: int, reason: str, collective: bool = True) -> None:
        nonlocal last_saved
        # The guard covers what is saved: every parameter and buffer (BatchNorm statistics diverge before the
        # loss does). Every rank checks its own state, so all stop together under torchrun.
        states = {**add_prefix(model.state_dict(), "model."), **add_prefix(objective.state_dict(), "objective."),
                  **add_prefix(probe.state_dict(), "probe.")}
        bad = first_non_finite(states)
        if any_rank(bad is not None, dist_info) if collective else bad is not None:
            raise TrainingError(
                f"at step {step} the weights are no longer finite ('{bad or 'on another process'}' holds NaN/Inf), "
                f"so no checkpoint was written; {_kept(last_saved, ckpt_path)}; lower optim.lr or set optim.clip_grad")
        if not main:
            last_saved = step  # rank 0 writes it; every rank names it in its messages
            return
        opt_t, opt_meta = optimizer_to_tensors(optimizer)
        popt_t, popt_meta = optimizer_to_tensors(probe_opt)
        mopt_t, mopt_meta = optimizer_to_tensors(manifold_opt) if manifold_opt is not None else ({}, None)
        tensors = {**states, **opt_t, **add_prefix(popt_t, "probe_"),
                   **add_prefix(mopt_t, "manifold_"),
                   **_rng_tensors()}
        meta = {"config": cfg.to_dict(), "step": step, "epoch": step / steps_per_epoch,
                "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "image_size": image_size,
                "num_classes": num_classes, "num_outputs": num_outputs, "classes": train.classes, "optimizer": opt_meta,
                "probe_optimizer": popt_meta, "history": history, "reason": reason}
        if mopt_meta is not None:
            meta["manifold_optimizer"] = mopt_meta
        if scaler.is_enabled():
            meta["scaler"] = scaler.state_dict()
        save_checkpoint(ckpt_path, tensors, meta)
        last_saved = step

    knn_on = bool(cfg.monitor.knn_every) and monitors_on
    rankme_on = bool(cfg.monitor.rankme_every)  # label-free: also with one class
    monitor = _Monitor(cfg, train, image_size, device, knn=knn_on) if main and (knn_on or rankme_on) else None
    if monitor is not None and start_step == 0 and not history:
        # the random-init reference point
        history.append({"epoch": 0, **monitor(model.backbone, knn=knn_on, rankme=rankme_on)})
        _log_line(metrics_path, {"epoch": 0, **history[-1]})

    # ---------------------------------------------------------------- the loop
    images, labels, targets = train.images, train.labels, train.targets
    n_global = policy.n_global
    step = start_step
    stop_reason = "completed"
    seen, t_seen = 0, time.time()
    t_loop = time.time()  # train.time_budget_s counts the loop only (not data decoding or model building)
    last_loss = float("nan")
    in_step = False  # True while the weights and `step` disagree (no checkpoint may be written then)
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_step, disable=not (main and tc.progress and not quiet),
                   desc=f"{cfg.method}", unit="step", dynamic_ncols=True)
        while step < total_steps:
            epoch, i = divmod(step, steps_per_epoch)
            perm = epoch_permutation(len(train), cfg.seed, epoch)
            model.train()
            for i in range(i, min(steps_per_epoch, total_steps - epoch * steps_per_epoch)):
                idx = perm[i * batch + dist_info.rank * local_batch: i * batch + (dist_info.rank + 1) * local_batch]
                x = images[idx].to(device, non_blocking=True)
                y = labels[idx].to(device, non_blocking=True)
                t = targets[idx].to(device, non_blocking=True) if targets is not None else None
                for g in optimizer.param_groups:
                    g["lr"] = float(sched.lr[step]) * g.get("lr_scale", 1.0)  # lr_scale: layer-wise decay
                    g["weight_decay"] = float(sched.wd[step]) * g.get("wd_scale", 1.0)
                if manifold_opt is not None:
                    for g in manifold_opt.param_groups:
                        g["lr"] = float(sched.manifold_lr[step])
                for name, values in sched.objective.items():
                    setattr(objective, name, float(values[step]))
                for m in progress_hooks:
                    m.set_progress(step, total_steps, steps_per_epoch)

                in_step = True
                vseed = view_seed(cfg.seed, step, dist_info.rank)
                views = policy(x, seed=vseed)
                y_obj = y
                if mixing is not None:  # Mixup/CutMix: mixed images, soft targets for the objective
                    views[0], y_obj = mixing(views[0], y, seed=vseed + 2)
                with _autocast(device, tc.precision):
                    out = ddp_model(views, n_global, seed=vseed + 1)  # seed: the step's masks, if any
                    available = {"labels": y_obj, "targets": t, **out.extras}
                    loss = objective(out.student, out.teacher, **{k: available[k] for k in objective_inputs})
                # Every process must agree to stop, or the others would wait forever in the next collective.
                if any_rank(not bool(torch.isfinite(loss)), dist_info):
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {step} (epoch {epoch}); "
                        f"{_kept(last_saved, ckpt_path)}; lower optim.lr or set optim.clip_grad"
                        + ("" if tc.precision == "fp32" else f", or use train.precision=fp32 instead of {tc.precision}"))
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.optim.clip_grad:
                    for opt in optimizers:
                        scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_([p for o in optimizers for g in o.param_groups for p in g["params"]],
                                                   cfg.optim.clip_grad)
                for opt in optimizers:
                    scaler.step(opt)
                scaler.update()
                model.update_teacher(float(sched.momentum[step]))

                probe_acc = float("nan")
                if cfg.monitor.online_probe and monitors_on:
                    feats = out.features.float()
                    yy = y.repeat(n_global)
                    logits = ddp_probe(feats)
                    probe_loss = F.cross_entropy(logits, yy)
                    probe_opt.zero_grad(set_to_none=True)
                    probe_loss.backward()
                    probe_opt.step()
                    probe_acc = (logits.argmax(1) == yy).float().mean().item()

                step += 1
                in_step = False
                seen += x.shape[0] * dist_info.world_size
                last_loss = loss.item()
                bar.update(1)
                stopping = any_rank((tc.max_steps is not None and step >= tc.max_steps) or (
                    tc.time_budget_s is not None and time.time() - t_loop >= tc.time_budget_s), dist_info)
                if main and (step % tc.log_every == 0 or step == total_steps or stopping):
                    ips = seen / max(time.time() - t_seen, 1e-9)
                    rec = {"step": step, "epoch": step / steps_per_epoch, "loss": last_loss,
                           "lr": float(sched.lr[step - 1]), "momentum": float(sched.momentum[step - 1]),
                           "probe_acc": probe_acc, "images_per_s": ips,
                           **getattr(objective, "last_terms", {})}  # e.g. HPM's two loss terms
                    _log_line(metrics_path, rec)
                    bar.set_postfix(loss=f"{last_loss:.3f}", ips=f"{ips:.0f}")
                    if writer:
                        for k in ("loss", "lr", "momentum", "probe_acc", "images_per_s"):
                            writer.add_scalar(f"train/{k}", rec[k], step)
                    seen, t_seen = 0, time.time()
                if stopping:
                    stop_reason = "max_steps" if tc.max_steps is not None and step >= tc.max_steps else "time_budget"
                    break
            epoch_done = step % steps_per_epoch == 0 or step == total_steps
            ep = step // steps_per_epoch
            def due(every: int) -> bool:
                return bool(every) and (ep % every == 0 or step == total_steps)

            want_knn, want_rankme = knn_on and due(cfg.monitor.knn_every), rankme_on and due(cfg.monitor.rankme_every)
            if epoch_done and monitor is not None and (want_knn or want_rankme):
                res = monitor(model.backbone, knn=want_knn, rankme=want_rankme)
                history.append({"epoch": step / steps_per_epoch, **res})
                _log_line(metrics_path, history[-1])
                if writer:
                    for k in ("knn_top1", "rankme"):
                        if k in res:
                            writer.add_scalar(f"monitor/{k}", res[k], step)
                bar.set_postfix(loss=f"{last_loss:.3f}", **{("knn" if k == "knn_top1" else k): f"{res[k]:.3f}"
                                                            for k in ("knn_top1", "rankme") if k in res})
            if stop_reason != "completed" or (epoch_done and (ep % tc.checkpoint_every == 0 or step == total_steps)):
                save(step, stop_reason if stop_reason != "completed" else "epoch")
            if stop_reason != "completed":
                break
        bar.close()
    except KeyboardInterrupt:
        if not in_step:
            save(step, "interrupted", collective=False)
        raise TrainingError(f"interrupted; continue with --resume from the last checkpoint ({ckpt_path})") from None
    finally:
        if writer:
            writer.close()
        teardown_distributed(dist_info)

    summary = {"out_dir": str(out_dir), "method": cfg.method, "backbone": cfg.backbone.name, "steps": step,
               "total_steps": total_steps, "train_size": len(train), "epochs_done": step / steps_per_epoch,
               "stop_reason": stop_reason,
               "final_loss": last_loss, "seconds": time.time() - t_start, "loop_seconds": time.time() - t_loop,
               "history": history,
               "checkpoint": str(ckpt_path)}
    if main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


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


def _truncate_metrics(path: Path, step: int, steps_per_epoch: int) -> None:
    """Drop metrics.jsonl lines logged after checkpoint `step` (they will be logged again), atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        at = rec.get("step", rec.get("epoch", 0) * steps_per_epoch)
        if isinstance(at, (int, float)) and at <= step + 1e-9:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class _Monitor:
    """Monitors on frozen features of a fixed subset of the training set (the bank): the kNN accuracy on a
    fixed test subset (solo-learn's online kNN) and RankMe, the effective rank of the bank's features
    (Garrido et al. 2023), whose fall warns of dimensional collapse. One feature pass serves both."""

    def __init__(self, cfg: RunConfig, train, image_size: int, device: torch.device, knn: bool = True):
        from visrep.data.sources import load_dataset

        d, m = cfg.data, cfg.monitor
        self.bank = train.subset(m.bank_size, cfg.seed) if m.bank_size and m.bank_size < len(train) else train
        self.test, self.cfg, self.image_size, self.device = None, cfg, image_size, device
        if not knn:
            return
        try:  # fail before training, not at the end of the first epoch
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
        from visrep.evaluate.features import extract_features
        from visrep.evaluate.knn import knn_classify
        from visrep.rank.rankme import effective_rank

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
