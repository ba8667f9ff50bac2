"""Tests that fail when training breaks: every registered preset learns, and a method registered from this file
trains through the same loop without any change to visrep/.

"Learns" is measured the same way for every method: on one fixed batch, with one fixed draw of views and masks,
the loss of the model after N steps is below the loss of the model before them, both under the objective's
state at the end (a frozen copy, so DINO's center and MoCo's queue are the same on both sides: the loss of the
running objective is not comparable over steps, e.g. DINO's starts low because a zero center gives an easy,
collapsed target). Every trainable parameter must have changed too.
"""
import copy

import pytest
import torch

import visrep
from visrep.methods import METHODS
from visrep.objectives import loss_terms
from visrep.train import loop
from visrep.train.distributed import DistInfo
from visrep.train.state import build_state, load_training_data

from conftest import preset_overrides

STEPS = 12
# DINO's center moves with momentum 0.9: for its first ~20 steps the targets change faster than the student
# learns (the loss under the final center falls only once the center has settled), so it gets more steps.
# SimCLR's official head ends in a scale-only BatchNorm trained by plain SGD (LARS leaves norm layers alone): at the
# preset's lr its loss first rises for a few dozen steps (lightly's head does the same), then falls.
STEPS_OF = {"dino": 30, "simclr": 80}


def _build(tmp_path, method, **extra):
    over = preset_overrides(tmp_path, method, train={"steps": STEPS_OF.get(method, STEPS)}, monitor={"knn_every": 0, "rankme_every": 0},
                            **extra)
    # The presets warm up for 10 epochs: learn from step 0. Their lr is stated at batch 256; unscaled here, so the
    # tiny test batch trains at the preset's reference lr (linear scaling would divide it by 8).
    over.setdefault("optim", {}).update(warmup_epochs=0, lr_scaling="none")
    cfg = visrep.resolve(over)
    train = load_training_data(cfg)
    batches = train.batches(cfg.train.batch_size, cfg.seed)
    return build_state(cfg, train, batches.steps_per_epoch, torch.device("cpu"), DistInfo()), batches(0)


@torch.no_grad()
def _loss(model, objective, state, batch) -> float:
    model = copy.deepcopy(model).train()  # batch statistics, as in training; the copy keeps BN buffers intact
    views = state.views(batch["images"], seed=123)
    out = model(views, state.views.n_global, seed=124, **{k: batch[k] for k in model.inputs})
    available = {**batch, **out.extras}
    return float(loss_terms(objective(out.student, out.target, **{k: available[k] for k in state.inputs}))["loss"])


def _learns(state, batch):
    """Train STEPS steps on `batch`; check every trainable parameter got a gradient and every part of the model
    moved; return the loss before and after (see the module docstring)."""
    before = copy.deepcopy(state.model)
    parts = {type(m).__name__ + f"#{i}": m for i, m in enumerate(state.model.student_modules())}
    params = {f"{k}.{n}": p for k, m in parts.items() for n, p in m.named_parameters() if p.requires_grad}
    start = {k: p.detach().clone() for k, p in params.items()}
    got_grad = set()
    state.model.train()
    for _ in range(state.total_steps):
        terms = loop.train_step(state, batch)
        got_grad |= {k for k, p in params.items() if p.grad is not None and bool(p.grad.abs().max() > 0)}
    assert torch.isfinite(terms["loss"])
    # A zero-initialised last BatchNorm (timm) gives its block's earlier weights gradients too small to move a
    # float32 weight in a few steps, so "moved" is asked of every part and "got a gradient" of every tensor.
    no_grad = sorted(set(params) - got_grad)
    assert not no_grad, f"parameters that never got a gradient: {no_grad[:5]}"
    still = [k for k, m in parts.items() if any(p.requires_grad for p in m.parameters())
             and not any(not torch.equal(p, start[f"{k}.{n}"]) for n, p in m.named_parameters() if p.requires_grad)]
    assert not still, f"parts the optimiser never moved: {still}"
    objective = copy.deepcopy(state.objective).eval()  # frozen: no center update, no enqueue
    return _loss(before, objective, state, batch), _loss(state.model, objective, state, batch)


@pytest.mark.parametrize("method", METHODS.names())
def test_every_preset_learns_on_a_fixed_batch(tmp_path, method):
    state, batch = _build(tmp_path, method)
    first, last = _learns(state, batch)
    # by at least 0.5 % (measured: 1.4 % for MoCo v2, whose queue keeps its loss near log(queue), to 75 % for BYOL)
    assert last < first - 5e-3 * abs(first), f"{method}: loss {first:.4f} before training, {last:.4f} after"


def test_a_broken_optimiser_is_caught(tmp_path):
    """The checks above are not vacuous: a zero learning rate, or a part cut off from the loss, fails them."""
    state, batch = _build(tmp_path / "a", "simclr")
    for opt in state.optimizers:
        opt.lr[:] = 0.0
    with pytest.raises(AssertionError, match="never"):
        _learns(state, batch)
    state, batch = _build(tmp_path / "b", "byol")
    state.model.backbone.register_forward_hook(lambda m, i, o: o.detach())  # a stop-gradient in the wrong place
    with pytest.raises(AssertionError, match="never got a gradient"):
        _learns(state, batch)


def test_a_method_registered_from_a_test_file_trains_without_touching_visrep(tmp_path):
    """Adding a method is a preset (plus an objective if the loss is new): here both come from this file."""
    from torch import nn

    from visrep.methods.presets import METHODS as REG, MethodPreset
    from visrep.objectives import OBJECTIVES

    class CosineAlignment(nn.Module):
        """ℓ = 1 − mean_b cos(z₁, z₂) between the two views' projections (a toy loss for this test)."""

        def __init__(self, *, eps: float = 1e-8):
            super().__init__()
            self.eps = eps

        def forward(self, student, target):
            cos = nn.functional.cosine_similarity(student[0].float(), student[1].float(), eps=self.eps)
            return {"loss": 1 - cos.mean(), "mean_cosine": cos.mean().detach()}

    OBJECTIVES.add("test_cosine_alignment", CosineAlignment)
    REG.add("test_cosine_method", MethodPreset(
        "test_cosine_method", "a method registered by tests/test_learning.py",
        {"views": {"policy": "simclr"}, "projector": {"type": "mlp", "hidden_dim": 32, "out_dim": 16},
         "predictor": None, "target": {"branch": "none"}, "objective": {"name": "test_cosine_alignment", "params": {}},
         "optim": {"name": "sgd", "lr": 0.5, "weight_decay": 0.0}}))
    try:
        state, batch = _build(tmp_path / "unit", "test_cosine_method")
        first, last = _learns(state, batch)
        assert last < first
        # ... and through the whole run: CLI-equivalent pretrain, its extra loss term logged as it is, resumable.
        cfg = visrep.resolve(preset_overrides(tmp_path, "test_cosine_method"))
        summary = visrep.pretrain(cfg, quiet=True)
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        assert summary["steps"] == 4 and any('"mean_cosine"' in line for line in lines)
    finally:
        REG._items.pop("test_cosine_method", None)
        OBJECTIVES._items.pop("test_cosine_alignment", None)
