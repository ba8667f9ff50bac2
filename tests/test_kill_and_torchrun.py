"""Real process-level behaviour: a SIGKILLed run resumes exactly, and torchrun runs the same loop."""
import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

import visrep
from visrep.checkpoint import strip_prefix

from conftest import tiny_overrides


def _dotted(d, prefix=""):
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += _dotted(v, key + ".")
        else:
            out.append(f"{key}={json.dumps(v)}")
    return out


def _run_overrides(tmp_path, epochs):
    over = tiny_overrides(tmp_path, method="byol",
                          projector={"hidden_dim": 32, "out_dim": 16}, predictor={"hidden_dim": 32, "out_dim": 16})
    over["train"]["epochs"] = epochs
    over["monitor"] = {"knn_every": 0, "online_probe": True}
    # Same thread count in the killed subprocess and here: float sums must be reduced in the same order.
    over["train"]["num_threads"] = torch.get_num_threads()
    return over


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    epochs = 12
    ref = visrep.resolve(_run_overrides(tmp_path / "ref", epochs))
    visrep.pretrain(ref, quiet=True)

    over = _run_overrides(tmp_path / "killed", epochs)
    ckpt = tmp_path / "killed" / "run" / "checkpoints" / "last.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "visrep.cli", "pretrain", *_dotted(over)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up, as with a crash or an OOM kill
    proc.wait()
    stopped_at = json.loads(__import__("safetensors").safe_open(str(ckpt), "pt").metadata()["visrep"])["step"]
    assert 0 < stopped_at < epochs * 2

    summary = visrep.pretrain(visrep.resolve(over), resume=True, quiet=True)
    assert summary["steps"] == epochs * 2
    a = strip_prefix(load_file(str(tmp_path / "ref" / "run" / "checkpoints" / "last.safetensors")), "model.")
    b = strip_prefix(load_file(str(ckpt)), "model.")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_torchrun_two_cpu_processes_train_with_the_same_loop(tmp_path):
    over = tiny_overrides(tmp_path, method="simclr")
    over["train"]["epochs"] = 1
    over["monitor"]["knn_every"] = 1
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "visrep.cli", "pretrain", *_dotted(over)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["epochs_done"] == 1.0
    assert 0.0 <= summary["history"][-1]["knn_top1"] <= 1.0
    assert r.stdout.count("done: 2/2 steps") == 1  # only rank 0 reports



def _torchrun(tmp_path, over, extra=(), **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *extra, "-m", "visrep.cli", "pretrain", *_dotted(over)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_elastic_restart_after_a_killed_worker_finishes_from_the_last_checkpoint(tmp_path):
    """torchrun --max-restarts 1: one of two workers is SIGKILLed after the first checkpoint; torchrun restarts
    both, they resume from the checkpoint (TORCHELASTIC_RESTART_COUNT > 0) and the job ends with the weights of an
    uninterrupted run. (The restarted group gets a key space of its own in torchrun's store: without it, it read
    the killed group's gloo addresses and failed to connect in 4 of 6 tries.)"""
    import psutil

    def over(name):
        o = tiny_overrides(tmp_path / name, method="simclr")
        o["train"].update(epochs=16, checkpoint_every=1, num_threads=1)
        o["monitor"] = {"knn_every": 0, "online_probe": False}
        return o

    ref = _torchrun(tmp_path, over("ref"))
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-2000:]

    job = _torchrun(tmp_path, over("elastic"), extra=("--max-restarts=1",))
    ckpt = tmp_path / "elastic" / "run" / "checkpoints" / "last.safetensors"
    deadline = time.time() + 300
    while not ckpt.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    workers = [c for c in psutil.Process(job.pid).children(recursive=True) if "visrep.cli" in " ".join(c.cmdline())]
    assert job.poll() is None and workers, "the job ended before a worker could be killed"
    workers[-1].kill()
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-2000:]
    assert "resuming from" in out
    summary = json.loads((tmp_path / "elastic" / "run" / "summary.json").read_text())
    assert summary["steps"] == 32 and summary["stop_reason"] == "completed"
    a = strip_prefix(load_file(str(tmp_path / "ref" / "run" / "checkpoints" / "last.safetensors")), "model.")
    b = strip_prefix(load_file(str(ckpt)), "model.")
    for k in a:
        assert torch.equal(a[k], b[k]), k
