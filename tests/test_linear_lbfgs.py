"""The full-batch L-BFGS linear probe (Kornblith et al. 2019): its objective, its L2 selection, its CLI flag."""
import numpy as np
import pytest
import torch

from visrep.errors import ConfigError
from visrep.data.sources import stratified_split
from visrep.evaluate.linear import _fit_lbfgs, lbfgs_probe


def _blobs(n, d, c, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * 2
    y = torch.arange(n) % c
    return centers[y] + spread * torch.randn(n, d, generator=g), y


def test_the_objective_is_mean_cross_entropy_plus_l2_as_scikit_learn_solves_it():
    # mean CE + λ‖W‖² (bias unpenalised) has the minimiser of scikit-learn's ½‖W‖² + C·Σ CE with C = 1/(2nλ)
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(240, 5, 3, 1.5, 0)
    x = x.double()  # float64, so both solvers can converge tightly
    lam = 1e-2
    w, b, _ = _fit_lbfgs(x, y, 3, lam, max_iter=500)
    ref = LogisticRegression(C=1 / (2 * len(y) * lam), tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    # the logits are determined up to a per-sample constant: compare probabilities
    p = torch.softmax(torch.addmm(b, x, w.t()), 1).numpy()
    np.testing.assert_allclose(p, ref.predict_proba(x.numpy()), atol=1e-4)
    np.testing.assert_allclose(w.numpy() - w.numpy().mean(0), ref.coef_ - ref.coef_.mean(0), atol=1e-3)
    w2, b2, _ = _fit_lbfgs(x, y, 3, 2 * lam, max_iter=500)  # the test can tell a factor of 2 in the penalty
    p2 = torch.softmax(torch.addmm(b2, x, w2.t()), 1).numpy()
    assert np.abs(p2 - ref.predict_proba(x.numpy())).max() > 1e-2


def test_held_out_split_is_stratified_seeded_and_disjoint():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    fit, held = stratified_split(y, 0.2, seed=3)
    assert set(fit.tolist()).isdisjoint(held.tolist()) and len(fit) + len(held) == 16
    assert [int((y[held] == c).sum()) for c in range(3)] == [2, 1, 0]  # the single sample of class 2 is kept to fit
    assert torch.equal(held, stratified_split(y, 0.2, seed=3)[1])


def test_lbfgs_probe_picks_a_penalty_on_held_out_data_and_is_deterministic():
    x, y = _blobs(600, 20, 4, 3.0, 1)
    xt, yt = _blobs(400, 20, 4, 3.0, 1)
    a = lbfgs_probe(x, y, xt, yt)
    assert a["top1"] > 0.8 and a["l2"] in a["l2_grid"] and len(a["held_out_top1"]) == len(a["l2_grid"])
    assert a["l2"] == max(a["l2_grid"], key=lambda v: (a["held_out_top1"][str(v)], v))
    assert lbfgs_probe(x, y, xt, yt)["top1"] == a["top1"]
    shuffled = lbfgs_probe(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))], xt, yt)
    assert shuffled["top1"] < 0.5  # no signal, no accuracy
    with pytest.raises(ConfigError, match="held_out"):
        lbfgs_probe(x, y, xt, yt, held_out=1.5)


def test_eval_linear_solver_flag(tmp_path, capsys):
    import json

    from visrep.cli import run

    out = tmp_path / "lin.json"
    assert run(["eval", "linear", "--model", "resnet18", "--backbone-options", "{cifar_stem: true, width: 8}",
                "--dataset", "digits", "--solver", "lbfgs", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["optimizer"] == "lbfgs" and res["top1"] > 0.5


def test_channels_last_extraction_gives_the_same_features_and_returns_the_model_unchanged():
    from visrep.data.sources import load_dataset
    from visrep.evaluate.features import extract_features
    from visrep.models.backbones import build_backbone

    torch.manual_seed(0)
    model = build_backbone("resnet18", cifar_stem=True, width=8)
    ds = load_dataset("synthetic", "train", image_size=16, n=40, num_classes=4)
    a, _ = extract_features(model, ds, image_size=16, cache_dir=False, progress=False)
    b, _ = extract_features(model, ds, image_size=16, cache_dir=False, progress=False, channels_last=True)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())
