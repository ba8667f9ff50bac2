"""`python tests/helpers/record_steps.py <visrep CLI args>`: the visrep CLI, recording every training step.

For the torchrun tests: each rank appends one JSON line per step to `$VISREP_RECORD.rank<r>.jsonl` with the
step, its loss and a hash of every image row it trained on, so a test can check which samples each rank saw
and compare the ranks' losses with a one-process run. The training itself is untouched.
"""
import hashlib
import json
import os
import sys

import visrep.train.loop as loop
from visrep.cli import main

_train_step = loop.train_step


def recording_step(state, batch):
    rows = [hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest()[:16] for x in batch["images"]]
    out = _train_step(state, batch)
    with open(f"{os.environ['VISREP_RECORD']}.rank{state.dist.rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": state.step - 1, "rows": rows, "loss": float(out["loss"])}) + "\n")
    return out


loop.train_step = recording_step
sys.exit(main())
