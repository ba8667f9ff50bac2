"""H-score, shrinkage H-score, TransRate and GBC: hand-computed cases, naive transcriptions, properties.

Expected values come from hand derivations (in the comments) or from plain numpy/sklearn transcriptions
of the papers' formulas written here, never from the functions under test.
"""
import math

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf
from sklearn.decomposition import PCA

from visrep.errors import ConfigError, DataError
from visrep.rank import SCORES
from visrep.rank.gbc import gbc
from visrep.rank.hscore import hscore, ledoit_wolf_shrinkage, shrinkage_hscore
from visrep.rank.transrate import transrate

SCORE_FNS = {"hscore": hscore, "shrinkage_hscore": shrinkage_hscore, "transrate": transrate, "gbc": gbc}


def _correlated(n, d, classes, seed=0, sep=1.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    means = rng.normal(size=(classes, d)) * sep
    x = (rng.normal(size=(n, d)) @ rng.normal(size=(d, d))) * 0.5 + means[y]
    return x, y


# ---- naive transcriptions of the papers' formulas ------------------------------------------------

def _class_mean_rows(x, y):
    g = np.zeros_like(x)
    for c in np.unique(y):
        g[y == c] = x[y == c].mean(0)
    return g


def _cov(x):
    xc = x - x.mean(0)
    return xc.T @ xc / len(x)


def naive_hscore(x, y):
    return np.trace(np.linalg.pinv(_cov(x)) @ _cov(_class_mean_rows(x, y)))


def naive_shrinkage_hscore(x, y):
    cov_alpha, alpha = ledoit_wolf(x)
    return np.trace(np.linalg.inv(cov_alpha) @ ((1 - alpha) * _cov(_class_mean_rows(x, y))))


def naive_transrate(x, y, eps=1e-4, normalize=True, weights="uniform"):
    def rate(z):
        n, d = z.shape
        return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1]

    z = x / np.linalg.norm(x, axis=1, keepdims=True) if normalize else x
    z = z - z.mean(0)
    if normalize:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    classes = np.unique(y)
    w = {c: (np.mean(y == c) if weights == "size" else 1 / len(classes)) for c in classes}
    return rate(z) - sum(w[c] * rate(z[y == c]) for c in classes)


def naive_gbc(x, y, spherical=False):
    stats = []
    for c in np.unique(y):
        v = np.maximum(x[y == c].var(0), 1e-4)
        stats.append((x[y == c].mean(0), np.full_like(v, v.mean()) if spherical else v))
    total = 0.0
    for i, (m1, v1) in enumerate(stats):
        for j, (m2, v2) in enumerate(stats):
            if i != j:
                s = (v1 + v2) / 2
                db = np.sum((m1 - m2) ** 2 / s) / 8 + 0.5 * np.log(np.prod(s) / np.sqrt(np.prod(v1) * np.prod(v2)))
                total += np.exp(-db)
    return -total


# ---- H-score -------------------------------------------------------------------------------------

# Classes {(0,0),(2,0)}, {(2,2),(4,2)}, {(0,2),(0,4)}; mean (4/3, 5/3). With 1/N covariances:
#   cov(f) = [[20, −2], [−2, 17]]/9,  class means (1,0), (3,2), (0,3)  ->  cov(E[f|y]) = [[14, −2], [−2, 14]]/9
#   det cov(f) = 112/27,  cov(f)⁻¹ = [[51/112, 3/56], [3/56, 15/28]]
#   H = 51/112·14/9 + 2·(3/56)(−2/9) + 15/28·14/9 = (714 − 24 + 840)/1008 = 85/56
# (the elementwise product inside the trace would give 51/112·14/9 + 15/28·14/9 = 37/24).
HAND_X = np.array([[0, 0], [2, 0], [2, 2], [4, 2], [0, 2], [0, 4]], dtype=float)
HAND_Y = np.array([0, 0, 1, 1, 2, 2])


def test_hscore_hand_case():
    assert hscore(HAND_X, HAND_Y) == pytest.approx(85 / 56, rel=1e-12)
    assert abs(85 / 56 - 37 / 24) > 0.02  # the case tells the matrix product from the elementwise one


def test_hscore_matches_the_pinv_formula():
    x, y = _correlated(300, 12, 4)
    assert hscore(x, y) == pytest.approx(naive_hscore(x, y), rel=1e-9)
    assert hscore(torch.from_numpy(x).float(), torch.from_numpy(y)) == pytest.approx(naive_hscore(x, y), rel=1e-4)


def test_hscore_n_below_d_is_c_minus_one():
    # N ≤ D: the centred features span the whole centred sample space, so H = tr(P) − 1 = C − 1.
    x, y = _correlated(20, 50, 4)
    assert hscore(x, y) == pytest.approx(3.0, abs=1e-8)


def test_hscore_pseudo_inverse_ignores_duplicated_and_constant_columns():
    x, y = _correlated(200, 6, 3)
    redundant = np.concatenate([x, x[:, :2], np.full((200, 1), 5.0)], axis=1)
    assert hscore(redundant, y) == pytest.approx(hscore(x, y), rel=1e-8)


# ---- shrinkage H-score ---------------------------------------------------------------------------

# Classes {(0,1),(3,0)}, {(5,0),(4,0)}, {(6,0),(4,1)}; mean (11/3, 1/3). With 1/N covariances:
#   S = cov(f) = [[32, −5], [−5, 2]]/9,  tr S = 34/9,  μ = 17/9,  ‖S‖²_F = 1078/81
#   δ = (‖S‖²_F − (tr S)²/2)/2 = 250/81;  ‖x_k‖² = (125, 5, 17, 2, 50, 5)/9, Σ‖x_k‖⁴ = 228
#   β = (228/6 − 1078/81)/(2·6) = 500/243;  α = min(β, δ)/δ = 2/3
#   Σ_α = S/3 + (2/3)(17/9) I = [[22/9, −5/27], [−5/27, 4/3]],  det = 2351/729
#   centred class means (−13/6, 1/6), (5/6, −1/3), (4/3, 1/6)  ->  cov(E[f|y]) = [[43/18, −5/36], [−5/36, 1/18]]
#   tr(Σ_α⁻¹ cov(E[f|y])) = (972·43/18 − 2·135·5/36 + 1782/18)/2351 = 4767/4702
#   H_α = (1 − α) · 4767/4702 = 1589/4702
SHRINK_X = np.array([[0, 1], [3, 0], [5, 0], [4, 0], [6, 0], [4, 1]], dtype=float)
SHRINK_Y = np.array([0, 0, 1, 1, 2, 2])


def test_shrinkage_hscore_hand_case():
    assert ledoit_wolf(SHRINK_X)[1] == pytest.approx(2 / 3, rel=1e-12)  # the hand α is sklearn's
    assert shrinkage_hscore(SHRINK_X, SHRINK_Y) == pytest.approx(1589 / 4702, rel=1e-12)


@pytest.mark.parametrize("n,d", [(300, 12), (30, 80)])
def test_ledoit_wolf_shrinkage_matches_sklearn(n, d):
    x, _ = _correlated(n, d, 3, seed=1)
    xc = torch.from_numpy(x - x.mean(0))
    lam = torch.linalg.eigvalsh(xc.T @ xc / n)
    assert ledoit_wolf_shrinkage(lam, (xc ** 2).sum(1), d) == pytest.approx(ledoit_wolf(x)[1], rel=1e-9)


@pytest.mark.parametrize("n,d", [(300, 12), (30, 80)])
def test_shrinkage_hscore_matches_the_sklearn_transcription(n, d):
    x, y = _correlated(n, d, 4, seed=2)
    assert shrinkage_hscore(x, y) == pytest.approx(naive_shrinkage_hscore(x, y), rel=1e-8)


# ---- TransRate -----------------------------------------------------------------------------------

# Z = (1,1), (−1,1), (0,−2) (already centred), classes {first two}, {last}; ε = 1, no normalisation:
#   R(Z)   = ½ logdet(I + diag(2, 6)/3) = ½ log(5/3 · 3) = ½ log 5
#   R(Z_0) = ½ logdet(I + diag(2, 2)/2) = log 2,   R(Z_1) = ½ logdet(I + diag(0, 4)) = ½ log 5
#   uniform: ½ log 5 − ½(log 2 + ½ log 5) = ¼ log(5/4);   by size: ½ log 5 − ⅔ log 2 − ⅙ log 5 = ⅓ log(5/4)
# A rotation (3/5, 4/5) makes the Gram matrices non-diagonal and changes no determinant.
ROT = np.array([[3, -4], [4, 3]]) / 5
TR_Z = np.array([[1, 1], [-1, 1], [0, -2]], dtype=float)
TR_Y = np.array([0, 0, 1])


@pytest.mark.parametrize("z", [TR_Z, TR_Z @ ROT])
def test_transrate_hand_case(z):
    assert transrate(z, TR_Y, eps=1.0, normalize=False) == pytest.approx(math.log(5 / 4) / 4, rel=1e-12)
    assert transrate(z, TR_Y, eps=1.0, normalize=False, class_weights="size") == pytest.approx(
        math.log(5 / 4) / 3, rel=1e-12)


@pytest.mark.parametrize("n,d", [(400, 16), (60, 100)])
@pytest.mark.parametrize("weights", ["uniform", "size"])
def test_transrate_matches_the_paper_listing(n, d, weights):
    x, y = _correlated(n, d, 5, seed=3)
    y[: n // 4] = 0  # unequal classes, so the two weightings differ
    expected = naive_transrate(x, y, weights=weights)
    assert transrate(x, y, class_weights=weights) == pytest.approx(expected, rel=1e-9)
    assert transrate(x, y, normalize=False, eps=0.5, class_weights=weights) == pytest.approx(
        naive_transrate(x, y, eps=0.5, normalize=False, weights=weights), rel=1e-9)


def test_transrate_normalised_is_scale_free_and_leaves_the_input_alone():
    x, y = _correlated(200, 8, 3, seed=4)
    t = torch.from_numpy(x.copy())
    assert transrate(t, y) == pytest.approx(transrate(t * 1000, y), rel=1e-9)
    assert torch.equal(t, torch.from_numpy(x))


# ---- GBC -----------------------------------------------------------------------------------------

def test_gbc_hand_case_two_1d_gaussians():
    # Class A {−1, 1}: mean 0, variance 1; class B {2, 6}: mean 4, variance 4 (population variances).
    # D_B = ⅛ · 4²/((1 + 4)/2) + ½ log(2.5/√(1·4)) = 0.8 + ½ log 1.25;  GBC = −2 exp(−D_B)
    x = np.array([[-1.0], [1.0], [2.0], [6.0]])
    y = np.array([0, 0, 1, 1])
    expected = -2 * math.exp(-0.8) / math.sqrt(1.25)
    assert gbc(x, y) == pytest.approx(expected, rel=1e-12)
    assert gbc(x, y, covariance="spherical") == pytest.approx(expected, rel=1e-12)


def test_gbc_hand_case_diagonal_and_spherical_2d():
    # A = (±1, ±2): mean (0, 0), variances (1, 4); B = (4 ± 3, ±3): mean (4, 0), variances (9, 9).
    # diagonal:  σ̄² = (5, 6.5);  D_B = ⅛ · 16/5 + ½ log(5 · 6.5 / √(1·4 · 9·9)) = 0.4 + ½ log(32.5/18)
    # spherical: σ_A² = 2.5, σ_B² = 9, σ̄² = 5.75;  D_B = ⅛ · 16/5.75 + (2/2) log(5.75/√(2.5·9))
    a = np.array([[1, 2], [1, -2], [-1, 2], [-1, -2]], dtype=float)
    b = np.array([[7, 3], [7, -3], [1, 3], [1, -3]], dtype=float)
    x, y = np.concatenate([a, b]), np.array([0] * 4 + [1] * 4)
    diag = 0.4 + 0.5 * math.log(32.5 / 18)
    sph = 2 / 5.75 + math.log(5.75 / math.sqrt(22.5))
    assert gbc(x, y) == pytest.approx(-2 * math.exp(-diag), rel=1e-12)
    assert gbc(x, y, covariance="spherical") == pytest.approx(-2 * math.exp(-sph), rel=1e-12)


@pytest.mark.parametrize("n,d", [(300, 80), (40, 100)])
@pytest.mark.parametrize("covariance", ["diagonal", "spherical"])
def test_gbc_after_pca_matches_sklearn_pca(n, d, covariance):
    x, y = _correlated(n, d, 4, seed=5, sep=3.0)
    reduced = PCA(n_components=min(64, n), svd_solver="full").fit_transform(x)
    expected = naive_gbc(reduced, y, spherical=covariance == "spherical")
    assert gbc(x, y, covariance=covariance) == pytest.approx(expected, rel=1e-7)


def test_gbc_bounds():
    rng = np.random.default_rng(6)
    y = np.arange(600) % 4
    apart = rng.normal(size=(600, 8)) * 0.01 + 100.0 * y[:, None]
    assert gbc(apart, y) == pytest.approx(0.0, abs=1e-12)
    same = rng.normal(size=(600, 8))
    assert -12 < gbc(same, y) < -12 * 0.9  # −C(C−1) when the classes overlap completely


# ---- every score -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCORE_FNS)
def test_separated_classes_score_above_shuffled_labels(name):
    rng = np.random.default_rng(7)
    y = np.arange(500) % 5
    x = rng.normal(size=(500, 16)) + 3.0 * rng.normal(size=(5, 16))[y]
    score = SCORE_FNS[name]
    assert score(x, y) > score(x, rng.permutation(y)) + 0.1


@pytest.mark.parametrize("name", SCORE_FNS)
def test_more_dims_than_samples_works(name):
    x, y = _correlated(30, 200, 3, seed=8, sep=3.0)
    assert math.isfinite(SCORE_FNS[name](x, y))


@pytest.mark.parametrize("name", SCORE_FNS)
def test_bad_input_is_one_data_error(name):
    x, y = _correlated(50, 4, 2, seed=9)
    score = SCORE_FNS[name]
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        score(bad, y)
    with pytest.raises(DataError, match="1 class"):
        score(x, np.zeros(50, dtype=int))
    with pytest.raises(DataError, match="labels"):
        score(x, y[:-1])


@pytest.mark.parametrize("name", ["hscore", "shrinkage_hscore"])
def test_constant_features_are_a_data_error(name):
    with pytest.raises(DataError, match="same features"):
        SCORE_FNS[name](np.full((10, 3), 0.1), np.arange(10) % 2)


def test_bad_options_are_config_errors():
    x, y = _correlated(50, 4, 2)
    with pytest.raises(ConfigError):
        gbc(x, y, covariance="full")
    with pytest.raises(ConfigError):
        gbc(x, y, pca_dim=0)
    with pytest.raises(ConfigError):
        transrate(x, y, class_weights="balanced")
    with pytest.raises(ConfigError):
        hscore(x, y, rtol=-1.0)


@pytest.mark.parametrize("name", SCORE_FNS)
def test_registered_with_labels_and_a_short_description(name):
    fn = SCORES.get(name)
    assert fn is SCORE_FNS[name] and fn.needs == "labels"
    first = fn.__doc__.strip().splitlines()[0]
    assert len(first) <= 100 and first.endswith(".")
