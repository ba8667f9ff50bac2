"""GCR heads and Riemannian SGD, cosine head, Mixup/CutMix and the regression objective, on hand-made cases."""
import math
from pathlib import Path

import pytest
import torch

import visrep
from visrep.checkpoint import load_checkpoint, save_checkpoint
from visrep.errors import ConfigError
from visrep.models.heads import CosineHead, GrassmannHead, build_head
from visrep.train.riemannian import RiemannianSGD, geodesic_step, orthonormalize, tangent_projection

from conftest import tiny_overrides as _tiny


def tiny_overrides(tmp_path, classifier=None, **extra):
    """conftest's tiny run, with the classifier section replaced (not merged into the preset's options)."""
    over = _tiny(tmp_path, **extra)
    if classifier is not None:
        over["classifier"] = classifier
    return over


# ----------------------------------------------------------------------------------------------- GCR head
def test_gcr_logit_with_k1_is_gamma_abs_cosine():
    torch.manual_seed(0)
    head = GrassmannHead(16, out_dim=5, k=1, gamma=25.0)
    x = torch.randn(7, 16)
    s = head.bases[:, :, 0]                                   # [C, d], unit columns
    expected = 25.0 * (torch.nn.functional.normalize(x, dim=1) @ s.t()).abs()
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)


def test_gcr_logit_is_norm_of_projection_and_scale_invariant():
    torch.manual_seed(1)
    head = GrassmannHead(8, out_dim=3, k=4, gamma=2.0)
    S = head.bases.detach()
    assert torch.allclose(S.transpose(1, 2) @ S, torch.eye(4).expand(3, 4, 4), atol=1e-5)  # orthonormal at init
    x = torch.randn(2, 8)
    xn = x / x.norm(dim=1, keepdim=True)
    by_hand = torch.stack([2.0 * (S[c].t() @ xn.t()).norm(dim=0) for c in range(3)], dim=1)
    torch.testing.assert_close(head(x), by_hand)
    torch.testing.assert_close(head(10 * x), by_hand)
    # logits <= gamma: a projection never lengthens a unit vector
    assert float(head(torch.randn(50, 8)).detach().max()) <= 2.0 + 1e-5


def test_gcr_head_options_are_checked():
    with pytest.raises(ConfigError, match="k in"):
        GrassmannHead(4, out_dim=2, k=5)
    with pytest.raises(ConfigError, match="gamma"):
        GrassmannHead(4, out_dim=2, k=1, gamma=0)
    head = build_head({"type": "gcr", "k": 2}, 8, num_classes=6)
    assert tuple(head.bases.shape) == (6, 8, 2) and head.gamma == 25.0


def test_cosine_head_by_hand():
    head = CosineHead(2, out_dim=2, scale=10.0)
    head.weight.data = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    out = head(torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[10.0, 10.0 / math.sqrt(2)]]))


# ----------------------------------------------------------------------------------------- Riemannian SGD
def test_one_geodesic_step_by_hand_d2_k1():
    """S = e1, D = (0.3, 0.4): G = (0, 0.4); with lr 0.5 the basis rotates by −0.2 rad."""
    S = torch.nn.Parameter(torch.tensor([[1.0], [0.0]]))
    opt = RiemannianSGD([S], lr=0.5, momentum=0.0)
    S.grad = torch.tensor([[0.3], [0.4]])
    opt.step()
    torch.testing.assert_close(S.data, torch.tensor([[math.cos(0.2)], [-math.sin(0.2)]]))


def test_one_geodesic_step_by_hand_d3_k2():
    """S = [e1 e2], D has only a third row (a, b): G = D, H = −D = U Σ Vᵀ with σ = ‖(a, b)‖, v = (a, b)/σ.
    The geodesic gives S(1) = [I + (cos σ − 1) v vᵀ ; −sin σ vᵀ]."""
    a, b = 0.3, 0.4
    S = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    D = torch.tensor([[0.0, 0.0], [0.0, 0.0], [a, b]], dtype=torch.float64)
    G = tangent_projection(S, D)
    torch.testing.assert_close(G, D)
    out = geodesic_step(S, -G)
    sigma = 0.5
    v = torch.tensor([[0.6], [0.8]], dtype=torch.float64)
    expected = torch.cat([torch.eye(2, dtype=torch.float64) + (math.cos(sigma) - 1) * v @ v.t(),
                          -math.sin(sigma) * v.t()])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.t() @ out, torch.eye(2, dtype=torch.float64))


def test_tangent_projection_removes_the_normal_part():
    torch.manual_seed(0)
    S = orthonormalize(torch.randn(6, 3, dtype=torch.float64))
    D = torch.randn(6, 3, dtype=torch.float64)
    G = tangent_projection(S, D)
    torch.testing.assert_close(S.t() @ G, torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(tangent_projection(S, S @ torch.randn(3, 3, dtype=torch.float64)),
                               torch.zeros(6, 3, dtype=torch.float64))  # moving inside the subspace: no step


def test_momentum_is_transported_to_the_new_tangent_space():
    """Step 1: M1 = (0, 0.4) rotates e1 by −0.2 rad. Step 2 with zero gradient: M2 = μ·proj(M1) has length
    0.9·0.4·cos(0.2), so the basis turns by another lr·‖M2‖ in the same direction."""
    S = torch.nn.Parameter(torch.tensor([[1.0], [0.0]]))
    opt = RiemannianSGD([S], lr=0.5, momentum=0.9)
    S.grad = torch.tensor([[0.3], [0.4]])
    opt.step()
    S.grad = torch.zeros(2, 1)
    opt.step()
    angle = -0.2 - 0.5 * 0.9 * 0.4 * math.cos(0.2)
    torch.testing.assert_close(S.data, torch.tensor([[math.cos(angle)], [math.sin(angle)]]))


def test_qr_keeps_the_subspace():
    torch.manual_seed(0)
    S = torch.randn(5, 2, dtype=torch.float64)
    Q = orthonormalize(S)
    P = lambda A: A @ torch.linalg.pinv(A)  # noqa: E731 - projector onto the column space
    torch.testing.assert_close(P(Q), P(S))
    assert bool((torch.diagonal(Q.t() @ S) > 0).all())  # signs fixed: Q stays close to S (diag R > 0)


def test_qr_runs_at_step_0_and_every_qr_every_steps_as_in_the_official_code():
    """A basis of length 2 with a zero gradient stays put under the geodesic step; only QR rescales it to 1, and
    it does so at steps 0, 5, 10, ... (counted before the step)."""
    S = torch.nn.Parameter(torch.tensor([[2.0], [0.0]]))
    opt = RiemannianSGD([S], lr=0.1, momentum=0.0, qr_every=5)
    lengths = []
    for step in range(11):
        S.grad = torch.zeros(2, 1)
        opt.step()
        lengths.append(round(float(S.data.norm()), 6))
        S.data.mul_(2.0)  # knock it off the manifold again
    assert lengths == [1.0, 2.0, 4.0, 8.0, 16.0, 1.0, 2.0, 4.0, 8.0, 16.0, 1.0]


def test_manifold_lr_is_batch_scaled_like_the_main_lr():
    from visrep import api
    from visrep.train.state import Schedules

    cfg = api.resolve({"method": "supervised_gcr", "train": {"batch_size": 64, "epochs": 10},
                       "optim": {"lr": 0.1, "manifold_lr": 0.2, "warmup_epochs": 1, "min_lr": 0.0}})
    sch = Schedules(cfg, steps_per_epoch=4)
    # after warm-up: base lr × batch/256 for both (GCR: the bases' group lr is the scaled lr × its factor)
    assert sch.lr[4] == pytest.approx(0.1 * 64 / 256) and sch.manifold_lr[4] == pytest.approx(0.2 * 64 / 256)
    assert api.resolve({"method": "supervised_gcr"}).optim.manifold_qr_every == 5


def test_gcr_training_keeps_bases_orthonormal_and_out_of_weight_decay(tmp_path):
    from visrep import api
    from visrep.methods import build_template
    from visrep.runs import load_run
    from visrep.train.optim import build_param_groups

    over = tiny_overrides(tmp_path, method="supervised", classifier={"type": "gcr", "k": 3},
                          optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.5, "manifold_lr": 0.5,
                                 "manifold_qr_every": 4},
                          train={"epochs": 3}, monitor={"knn_every": 0})
    cfg = api.resolve(over)
    model = build_template(cfg, 16, 4)
    groups, manifold = build_param_groups(model, cfg)
    assert [p is model.classifier.bases for p in manifold] == [True]
    assert all(p is not model.classifier.bases for g in groups for p in g["params"])
    before = model.classifier.bases.detach().clone()
    s = api.pretrain(cfg, quiet=True)
    assert s["steps"] == 6  # 6 steps: the last QR was at step 4, so steps 5-6 are plain geodesic steps
    tensors, meta, _ = load_run(s["out_dir"])
    S = tensors["model.classifier.bases"].double()
    err = (S.transpose(1, 2) @ S - torch.eye(3, dtype=torch.float64)).abs().max()
    assert float(err) < 1e-5
    assert "manifold_optimizer" in meta
    assert not torch.allclose(S.float(), before)  # the bases did move


def test_gcr_run_resumes_exactly(tmp_path):
    from visrep import api
    from visrep.runs import load_run

    def cfg(out, **train):
        return api.resolve(tiny_overrides(tmp_path, out_dir=str(tmp_path / out), method="supervised",
                                          classifier={"type": "gcr", "k": 2}, optim={"manifold_lr": 0.3},
                                          train={"epochs": 2, **train}, monitor={"knn_every": 0}))
    api.pretrain(cfg("full"), quiet=True)
    api.pretrain(cfg("half", max_steps=2), quiet=True)
    api.pretrain(cfg("half"), resume=True, quiet=True)
    a, b = load_run(str(tmp_path / "full"))[0], load_run(str(tmp_path / "half"))[0]
    for k in ("model.classifier.bases", "manifold_optim.0.momentum_buffer"):
        torch.testing.assert_close(a[k], b[k])


# ------------------------------------------------------------------------------------------ Mixup/CutMix
def _const_batch(values):
    return torch.stack([torch.full((3, 8, 8), float(v)) for v in values])


def test_mixup_formula():
    from visrep.data.mixing import build_mixing

    mix = build_mixing({"mixup_alpha": 0.4, "cutmix_alpha": 0.0}, num_classes=4)
    x, y = _const_batch([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])
    xm, t = mix(x, y, seed=3)
    lam = float(t[0, 0])
    # x̃_i = λ x_i + (1 − λ) x_(B−1−i);  ỹ_i = λ onehot(y_i) + (1 − λ) onehot(y_(B−1−i))
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    eye = torch.eye(4)
    torch.testing.assert_close(t, lam * eye[y] + (1 - lam) * eye[y.flip(0)])
    assert torch.equal(x, _const_batch([0, 1, 2, 3]))  # the input is not changed in place
    xm2, t2 = mix(x, y, seed=3)
    assert torch.equal(xm, xm2) and torch.equal(t, t2)  # seeded: a resumed run mixes the same way


def test_cutmix_target_weight_is_the_pasted_area():
    from visrep.data.mixing import build_mixing

    mix = build_mixing({"mixup_alpha": 0.0, "cutmix_alpha": 1.0}, num_classes=2)
    x, y = _const_batch([0, 1]), torch.tensor([0, 1])
    for seed in range(5):
        xm, t = mix(x, y, seed=seed)
        kept = float((xm[0] == 0).float().mean())  # share of image 0's own pixels
        assert abs(float(t[0, 0]) - kept) < 1e-6


def test_mixing_config_errors():
    from visrep import api

    with pytest.raises(ConfigError, match="unknown option 'mixing.alpha'"):
        api.resolve({"method": "supervised", "mixing": {"alpha": 1.0}})
    with pytest.raises(ConfigError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        api.resolve({"method": "supervised", "mixing": {"mixup_alpha": 0, "cutmix_alpha": 0}})


def test_supervised_run_with_mixup_cutmix_and_soft_targets(tmp_path):
    from visrep import api

    over = tiny_overrides(tmp_path, method="supervised", classifier={"type": "cosine"},
                          mixing={"mixup_alpha": 0.8, "cutmix_alpha": 1.0}, monitor={"knn_every": 0})
    s = api.pretrain(api.resolve(over), quiet=True)
    assert s["steps"] == 4 and math.isfinite(s["final_loss"])
    with pytest.raises(ConfigError, match="one-view policy"):
        api.pretrain(api.resolve(tiny_overrides(tmp_path, out_dir=str(tmp_path / "two"), method="simclr",
                                                mixing={"mixup_alpha": 0.8})), quiet=True)


def test_cross_entropy_with_soft_targets_and_smoothing_by_hand():
    from visrep.objectives import build_objective

    ce = build_objective("cross_entropy", label_smoothing=0.2)
    logits = torch.tensor([[2.0, 0.0]])
    soft = torch.tensor([[0.75, 0.25]])
    q = 0.8 * soft + 0.2 / 2                                       # smoothing applied to the soft target
    expected = -(q * torch.log_softmax(logits, 1)).sum()
    torch.testing.assert_close(ce([logits], [], labels=soft), expected)


def test_regression_loss_standardises_targets_by_hand():
    from visrep.objectives import build_objective

    loss = build_objective("regression", loss="mse")
    loss.set_target_stats(torch.tensor([[0.0, 10.0], [2.0, 30.0]]))   # μ = (1, 20), σ = (1, 10)
    pred = torch.tensor([[0.0, 0.0]])
    value = loss([pred], [], targets=torch.tensor([[3.0, 40.0]]))       # standardised (2, 2)
    torch.testing.assert_close(value, torch.tensor(4.0))
    torch.testing.assert_close(loss.denormalize(torch.tensor([[2.0, 2.0]])), torch.tensor([[3.0, 40.0]]))
    with pytest.raises(ConfigError, match="regression targets"):
        loss([pred], [])


def _as_saved_before_the_classifier_section(run_dir) -> None:
    """Rewrite a run's checkpoint the way visrep saved it before `classifier:` existed: the head under `projector`
    in the config and its tensors under `model.projector.`."""
    path = run_dir / "checkpoints" / "last.safetensors"
    tensors, meta = load_checkpoint(path)
    config = dict(meta["config"])
    config["projector"] = config.pop("classifier")
    tensors = {k.replace("model.classifier.", "model.projector."): v for k, v in tensors.items() if k != "state.step"}
    save_checkpoint(path, tensors, {k: v for k, v in meta.items() if k not in ("format", "sha256")} | {"config": config})


def test_a_run_saved_with_its_classifier_under_projector_loads_evaluates_and_resumes(tmp_path):
    """Old runs are brought to the current schema in one place (`upgrade_saved_run`): same head, same weights."""
    over = tiny_overrides(tmp_path, method="supervised", classifier={"type": "cosine"}, monitor={"knn_every": 0})
    full = visrep.pretrain(visrep.resolve(over), quiet=True)
    run = Path(over["out_dir"])
    ev = dict(dataset="synthetic", dataset_options={"n": 64, "num_classes": 4}, image_size=16, cache_dir=False,
              progress=False)
    before = visrep.evaluate_classifier(str(run), **ev)
    _as_saved_before_the_classifier_section(run)
    assert "classifier" not in load_checkpoint(run / "checkpoints" / "last.safetensors")[1]["config"]
    after = visrep.evaluate_classifier(str(run), **ev)
    assert after["top1"] == before["top1"] and after["model"]["head"] == "cosine"

    # an unfinished old run resumes to the same weights as an uninterrupted one
    part = tiny_overrides(tmp_path / "b", method="supervised", classifier={"type": "cosine"}, monitor={"knn_every": 0})
    part["train"]["max_steps"] = 2
    visrep.pretrain(visrep.resolve(part), quiet=True)
    _as_saved_before_the_classifier_section(Path(part["out_dir"]))
    # resumed from the folder alone (the CLI's `pretrain --resume RUN_DIR`): the saved config is upgraded too
    resumed = visrep.pretrain(visrep.resume_config(part["out_dir"], ["train.max_steps=null"]), resume=True,
                              quiet=True)
    assert resumed["steps"] == full["steps"] == 4
    a = load_checkpoint(run / "checkpoints" / "last.safetensors")[0]  # rewritten above: model.projector.*
    b = load_checkpoint(Path(part["out_dir"]) / "checkpoints" / "last.safetensors")[0]  # saved anew
    a = {k.replace("model.projector.", "model.classifier."): v for k, v in a.items() if k.startswith("model.")}
    assert "model.classifier.weight" in a and a.keys() == {k for k in b if k.startswith("model.")}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_classifier_heads_have_their_own_section():
    with pytest.raises(ConfigError, match="projector.type=gcr is a classifier head .*classifier.type=gcr and projector=null"):
        visrep.resolve({"method": "supervised", "projector": {"type": "gcr"}})
    with pytest.raises(ConfigError, match="one head after its backbone"):
        visrep.resolve({"method": "supervised", "projector": {"type": "mlp"}})
    with pytest.raises(ConfigError, match="classifier.type must be one of"):
        visrep.resolve({"method": "supervised", "classifier": {"type": "mlp"}})
    cfg = visrep.resolve({"method": "supervised_gcr"})
    assert cfg.projector is None and cfg.classifier["type"] == "gcr"
