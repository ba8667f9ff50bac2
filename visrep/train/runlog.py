"""Where a run reports: `metrics.jsonl` (one JSON record per logging step or monitor pass), TensorBoard scalars and
a tqdm progress bar. Only the main process writes; on the others every call is a no-op.

A resumed run first drops the metric lines logged after its checkpoint (a kill may have left some), so each step
appears once in `metrics.jsonl`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml


class RunLog:
    def __init__(self, out_dir: Path, cfg, *, main: bool, resume_step: int | None, steps_per_epoch: int,
                 total_steps: int, show_bar: bool):
        from tqdm.auto import tqdm

        self.main, self.path, self.writer = main, out_dir / "metrics.jsonl", None
        start = resume_step or 0
        self.bar = tqdm(total=total_steps, initial=start, disable=not (main and show_bar), desc=f"{cfg.method}",
                        unit="step", dynamic_ncols=True)
        if not main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None and self.path.exists():  # leftovers of a run that never wrote a checkpoint
            self.path.unlink()
        if resume_step is not None:
            _truncate_metrics(self.path, resume_step, steps_per_epoch)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"),
                                        purge_step=resume_step if resume_step is not None else None)
        except ImportError:  # tensorboard is optional at run time
            self.writer = None

    def record(self, rec: dict, step: int, group: str, scalars=()) -> None:
        """Append `rec` to metrics.jsonl and write its `scalars` to TensorBoard as `group/name`."""
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.writer:
            for k in scalars:
                if k in rec:
                    self.writer.add_scalar(f"{group}/{k}", rec[k], step)

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            self.writer.close()


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
