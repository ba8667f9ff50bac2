"""World-size invariance: 1 process on a batch of B vs 2 gloo CPU processes on B/2 rows each.

What must equal what (W = 2 ranks, rank r holds rows x_r of every view; L_r = loss returned
on rank r; L = 1-process loss of the full batch):

* loss: mean_r L_r == L. (Batch-statistics losses gather, so every rank returns the full
  loss (Barlow, VICReg) or the mean over its local rows of a full-batch score (NT-Xent,
  InfoNCE); the others are local means over equal chunks.)
* gradient: the trainer backprops L_r on rank r and DDP averages parameter gradients over
  the ranks. The gather's backward sums, into rank r's rows, the gradients that every
  rank's loss sends there, so x_r.grad = ∂(Σ_s L_s)/∂x_r (for local losses too, since L_s
  with s ≠ r does not depend on x_r). After DDP's 1/W this is ∂(mean_s L_s)/∂x_r = ∂L/∂x_r.
  So we assert x_r.grad / W == (1-process gradient)[rows of r].
* state: DINO's center and the MoCo queue/pointer equal their 1-process values, and the
  losses of later steps (which use that state) still match.
"""
from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from visrep.objectives import build_objective
from visrep.objectives import distributed as vd

WORLD = 2
B = 8  # full batch; B // WORLD rows per rank
STEPS = 2

# name: (constructor params, student views, teacher views, D, teacher kind)
#   teacher kind: "same" = the student tensors themselves (target "none"),
#                 "own" = separate tensors with gradient, "copy" = detached copies of student
CASES = {
    "ntxent": ({"temperature": 0.2}, 2, 2, 4, "same"),
    "infonce": ({"temperature": 0.2}, 2, 2, 4, "own"),
    "moco_queue": ({"queue_size": 24, "out_dim": 4}, 2, 2, 4, "own"),
    "byol": ({}, 2, 2, 4, "own"),
    "simsiam": ({}, 2, 2, 4, "own"),
    "barlow_twins": ({"lambda_offdiag": 0.1}, 2, 2, 4, "same"),
    "vicreg": ({}, 2, 2, 4, "same"),
    "dino": ({"out_dim": 5, "teacher_temp": 0.07}, 4, 2, 5, "own"),
    "swav": ({}, 4, 2, 6, "copy"),
}


def make_inputs(name):
    _, n_s, n_t, d, kind = CASES[name]
    g = torch.Generator().manual_seed(sorted(CASES).index(name))
    student = [torch.randn(B, d, generator=g) for _ in range(n_s)]
    if name == "swav":  # prototype scores are cosine similarities
        student = [torch.tanh(x) for x in student]
    teacher = [torch.randn(B, d, generator=g) for _ in range(n_t)] if kind == "own" else None
    return student, teacher


def run_case(name, rank, world):
    """Run STEPS forward/backward passes on this rank's rows; return losses, grads and state."""
    kw, _, n_t, _, kind = CASES[name]
    full_s, full_t = make_inputs(name)
    n = B // world
    rows = slice(rank * n, (rank + 1) * n)
    s = [x[rows].clone().requires_grad_() for x in full_s]
    if kind == "own":
        t = [x[rows].clone().requires_grad_() for x in full_t]
    elif kind == "same":
        t = s[:n_t]
    else:
        t = [x.detach().clone() for x in s[:n_t]]
    fn = build_objective(name, **kw)
    losses = []
    for _ in range(STEPS):
        loss = fn(s, t)
        loss.backward()
        losses.append(loss.item())
    grads = [x.grad for x in s] + ([x.grad for x in t] if kind == "own" else [])
    return {"losses": losses, "grads": grads, "state": dict(fn.state_dict())}


def worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        try:
            out = {"info": (vd.is_dist(), vd.world_size(), vd.rank())}
            out["cases"] = {name: run_case(name, rank, WORLD) for name in CASES}
            torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
            dist.barrier()  # tearing gloo down while the peer is still in a collective aborts the peer
        finally:
            dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    ctx = mp.get_context("spawn")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children before they import torch
    try:
        procs = [ctx.Process(target=worker, args=(r, str(tmp / "init"), str(tmp))) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)  # generous: the 2 cores may be busy with other tests
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join()
    errors = "".join(f.read_text() for f in sorted(tmp.glob("*.err")))
    assert all(p.exitcode == 0 for p in procs), errors or [p.exitcode for p in procs]
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_helpers_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert not vd.is_dist() and vd.world_size() == 1 and vd.rank() == 0
    assert vd.gather(x) is x
    assert torch.equal(vd.all_reduce_mean(x), x.detach()) and not vd.all_reduce_mean(x).requires_grad


def test_helpers_in_process_group(results):
    assert [res["info"] for res in results] == [(True, WORLD, r) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_world_size_invariance(results, name):
    single = run_case(name, 0, 1)
    per_rank = [res["cases"][name] for res in results]
    for step in range(STEPS):
        mean = sum(r["losses"][step] for r in per_rank) / WORLD
        assert mean == pytest.approx(single["losses"][step], rel=1e-5, abs=1e-5), (name, step)
    n = B // WORLD
    for rank, res in enumerate(per_rank):
        for g_rank, g_full in zip(res["grads"], single["grads"]):
            assert g_rank is not None and g_full is not None
            assert g_full.abs().sum() > 0
            torch.testing.assert_close(g_rank / WORLD, g_full[rank * n : (rank + 1) * n], rtol=1e-4, atol=1e-5)
        assert res["state"].keys() == single["state"].keys()
        for key, value in single["state"].items():  # DINO center, MoCo queue and pointer
            torch.testing.assert_close(res["state"][key], value, rtol=1e-5, atol=1e-6)
