"""Shared helpers for the benchmarks: machine description, JSON results, the data archive, backbones.

Every benchmark writes `benchmarks/results/<name>.json` with a `machine` block (CPU model, core
count, torch version and threads, platform, date, git commit) next to its numbers.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
# The offline copy beside the checkout (../shared/data); override with --data or $VISREP_CIFAR10_ARCHIVE.
DEFAULT_DATA = os.environ.get(
    "VISREP_CIFAR10_ARCHIVE",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10", "cifar10-jpeg.tar.gz"))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/bX.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))


# ------------------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))
    except OSError:
        pass
    return []


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


def machine_info() -> dict:
    """Where and with what a number was measured."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain")
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count_os": os.cpu_count(),
        "cpu_count_affinity": affinity,
        "loadavg_1_5_15": list(load) if load else None,
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "cuda_available": torch.cuda.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _package_version(p) for p in ("torchvision", "timm", "kornia", "lightly", "numpy", "pillow")},
        "date_utc": now_iso(),
        "git_commit": commit or "none (no commit yet)",
        "git_dirty": bool(dirty) if dirty is not None else None,
    }


def load_check(label: str) -> dict:
    """Load average before the benchmark starts its own work; warns when other processes use the cores
    (on a shared 2-core machine a busy neighbour makes steps several times slower, unevenly)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return {"loadavg_1min_at_start": None, "busy": None}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = load > 0.5
    if busy:
        print(f"{label}: WARNING: 1-min load average {load:.2f} on {cores} cores before starting; other processes "
              "are using the CPU, timings will be noisy and slow (run on a quiet machine)", file=sys.stderr, flush=True)
    return {"loadavg_1min_at_start": load, "cores": cores, "busy": busy}


def train_step(model, optimizers, views, objective, x, y, seed: int) -> None:
    """One supervised training step of a Template, as the loop takes it: views, forward, loss, backward, step."""
    out = model(views(x, seed=seed), 1)
    loss = objective(out.student, out.target, labels=y)
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in optimizers:
        o.step()


def interleaved_step_cost(paths: dict, rounds: int, baseline: str, steps_per_round: int = 3) -> dict:
    """Median seconds per call of each `paths[name](i)`, measured round-robin in this process: every round
    runs each path `steps_per_round` times, the order rotating by one each round, so no path always follows
    the same one. The very first call of each path warms up and is not counted. Returns medians, their
    ratios to `baseline`, and the per-round ratios (their spread is the machine's noise)."""
    import time

    names = list(paths)
    times = {n: [] for n in names}
    per_round = []
    for r in range(rounds):
        this_round = {n: [] for n in names}
        for name in names[r % len(names):] + names[:r % len(names)]:
            for i in range(steps_per_round):
                t0 = time.perf_counter()
                paths[name](i)
                if i > 0 or r > 0:
                    this_round[name].append(time.perf_counter() - t0)
            times[name] += this_round[name]
        if all(this_round.values()):
            per_round.append({n: median(this_round[n]) / median(this_round[baseline]) for n in names})
    med = {n: median(t) for n, t in times.items()}
    return {"rounds": rounds, "steps_per_round": steps_per_round, "order": "rotating", "median_step_s": med,
            f"ratio_to_{baseline}": {n: med[n] / med[baseline] for n in med},
            f"per_round_ratio_to_{baseline}": per_round}


def merge_step_cost(path: str | Path, benchmark: str, cost: dict, load: dict) -> None:
    """Add an interleaved per-step cost measurement (`--cost-only`) to a benchmark's existing results JSON,
    with its own machine description: it is usually measured at another time than the runs."""
    data = read_json(path) or {"benchmark": benchmark}
    data["step_cost"] = {**cost, "machine": machine_info(), "load_at_start": load, "measured_utc": now_iso()}
    write_json(path, data)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------ JSON
def result_path(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def write_json(path: str | Path, data: dict) -> Path:
    """Atomic write (a temp file moved over the target)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _json_default(o):
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


# ------------------------------------------------------------------------------------------ data
def load_cifar10(split: str, root: str = DEFAULT_DATA):
    """visrep's `ImageDataset` (uint8 [N,3,32,32]) for the CIFAR-10 JPEG archive. The first call decodes
    the JPEGs and caches the tensor in $VISREP_CACHE (or ~/.cache/visrep); later calls read the cache."""
    from visrep.data.sources import load_dataset

    return load_dataset("imagefolder", split, root=root)


# ------------------------------------------------------------------------------------------ models
def timm_cifar_resnet(name: str = "resnet18", width: int = 64) -> nn.Module:
    """A timm ResNet with the CIFAR stem (3x3 stride-1 conv1, no max-pool), `num_classes=0` (pooled
    features), channels (w, 2w, 4w, 8w): built with timm directly, the way a plain-PyTorch or lightly
    user would, and checked against visrep's `build_backbone` by `same_architecture`."""
    import timm

    extra = {} if width == 64 else dict(channels=(width, 2 * width, 4 * width, 8 * width), stem_width=width)
    model = timm.create_model(name, pretrained=False, num_classes=0, **extra)
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    """Same parameter/buffer names and shapes."""
    sa = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    sb = {k: tuple(v.shape) for k, v in b.state_dict().items()}
    return sa == sb


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def bias_norm_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """Two parameter groups as SimCLR/BYOL (and visrep's `param_groups`) use them: weights with decay and
    LARS adaptation; biases and norm parameters (ndim <= 1 or *.bias) without either."""
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if (p.ndim <= 1 or name.endswith(".bias")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def set_threads(n: int) -> None:
    torch.set_num_threads(int(n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (only allowed once, before parallel work)
        pass


def median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


class UInt8ImageDataset(torch.utils.data.Dataset):
    """A torchvision-CIFAR10-style dataset over decoded images: HWC uint8 numpy array, PIL image per item,
    then the transform (the way lightly's examples feed torchvision.datasets.CIFAR10)."""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def calibrate_step_s(cfg: dict, out_dir: Path, steps: int = 6) -> float:
    """Median seconds per training step of `visrep.pretrain(cfg)` over steps 3..`steps` (the first steps warm
    up allocators), measured by the loop's own per-step log. Used to set a schedule horizon that fits a budget."""
    import copy
    import json
    import shutil

    import visrep

    cfg = copy.deepcopy(cfg)
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg["out_dir"] = str(out_dir)
    cfg["train"].update(max_steps=steps, steps=1000, log_every=1)
    visrep.pretrain(visrep.resolve(cfg), quiet=True)
    recs = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    batch = cfg["train"]["batch_size"]
    return median([batch / r["images_per_s"] for r in recs[2:]])
