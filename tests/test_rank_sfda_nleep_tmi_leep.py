"""SFDA, NLEEP, TMI, LEEP and NCE against hand computations and independent numpy transcriptions."""
from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
import torch

from visrep.errors import DataError
from visrep.rank import SCORES
from visrep.rank.leep import empirical_joint, leep, nce
from visrep.rank.nleep import nleep, pca_keep_variance
from visrep.rank.sfda import sfda
from visrep.rank.tmi import tmi

MODULES = ["visrep.rank.leep", "visrep.rank.sfda", "visrep.rank.nleep", "visrep.rank.tmi"]


def clusters(n_per_class=30, d=5, c=3, spread=0.5, gap=6.0, seed=0):
    """Gaussian blobs with centres `gap` apart along the axes, labels 0..c-1."""
    rng = np.random.default_rng(seed)
    centres = gap * np.eye(c, d)
    x = np.concatenate([centres[j] + spread * rng.standard_normal((n_per_class, d)) for j in range(c)])
    y = np.repeat(np.arange(c), n_per_class)
    return x, y


def shuffled(y, seed=1):
    return np.random.default_rng(seed).permutation(y)


# ---------------------------------------------------------------- registry, doctests


def test_registered_with_needs_and_a_short_description():
    for m in MODULES:
        importlib.import_module(m)
    needs = {"sfda": "labels", "nleep": "labels", "tmi": "labels", "leep": "probs", "nce": "probs"}
    described = dict(SCORES.describe())
    for name, kind in needs.items():
        assert SCORES.get(name).needs == kind
        assert 10 < len(described[name]) <= 110, described[name]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


# ---------------------------------------------------------------- LEEP / NCE: 4 samples by hand

THETA = [[0.7, 0.2, 0.1],  # z = argmax 0
         [0.1, 0.6, 0.3],  # z = 1
         [0.5, 0.3, 0.2],  # z = 0
         [0.5, 0.2, 0.3]]  # z = 0
LABELS = [3, 7, 3, 7]  # non-contiguous: remapped to 0, 1


def test_empirical_joint_by_hand():
    y = torch.tensor([0, 1, 0, 1])
    joint = empirical_joint(torch.tensor(THETA, dtype=torch.float64), y, 2)
    # P(y=0, z) = (θ1 + θ3)/4 = [1.2, 0.5, 0.3]/4 ; P(y=1, z) = (θ2 + θ4)/4 = [0.6, 0.8, 0.6]/4
    assert torch.allclose(joint, torch.tensor([[0.3, 0.125, 0.075], [0.15, 0.2, 0.15]], dtype=torch.float64))
    hard = empirical_joint(torch.tensor([0, 1, 0, 0]), y, 2, num_source=3)
    assert torch.allclose(hard, torch.tensor([[0.5, 0, 0], [0.25, 0.25, 0]], dtype=torch.float64))


def test_leep_by_hand():
    # P(z) = [0.45, 0.325, 0.225]; P(y=0|z) = [2/3, 5/13, 1/3], P(y=1|z) = [1/3, 8/13, 2/3]
    p1 = 0.7 * 2 / 3 + 0.2 * 5 / 13 + 0.1 * 1 / 3   # sample 1, true y = 0
    p2 = 0.1 * 1 / 3 + 0.6 * 8 / 13 + 0.3 * 2 / 3   # sample 2, true y = 1
    p3 = 0.5 * 2 / 3 + 0.3 * 5 / 13 + 0.2 * 1 / 3   # sample 3, true y = 0
    p4 = 0.5 * 1 / 3 + 0.2 * 8 / 13 + 0.3 * 2 / 3   # sample 4, true y = 1
    expected = (math.log(p1) + math.log(p2) + math.log(p3) + math.log(p4)) / 4
    assert leep(torch.tensor(THETA, dtype=torch.float64), torch.tensor(LABELS)) == pytest.approx(expected, abs=1e-12)
    assert leep(np.array(THETA), np.array(LABELS)) == pytest.approx(expected, abs=1e-12)  # numpy in, same float


def test_nce_by_hand():
    # z = [0, 1, 0, 0], y = [0, 1, 0, 1]: P(0,0) = 1/2, P(1,0) = 1/4, P(1,1) = 1/4; P(z=0) = 3/4, P(z=1) = 1/4
    expected = 0.5 * math.log(0.5 / 0.75) + 0.25 * math.log(0.25 / 0.75) + 0.25 * math.log(0.25 / 0.25)
    assert nce(torch.tensor(THETA), torch.tensor(LABELS)) == pytest.approx(expected, abs=1e-12)


def _source_probs(y, cs=6, noise=0.3, seed=0):
    """A source classifier whose top class is a function of the target class (2 source classes each)."""
    rng = np.random.default_rng(seed)
    logits = noise * rng.standard_normal((len(y), cs))
    logits[np.arange(len(y)), 2 * y + rng.integers(0, 2, len(y))] += 3.0
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("score", [leep, nce])
def test_informative_source_beats_shuffled_labels(score):
    y = np.repeat(np.arange(3), 40)
    probs = _source_probs(y)
    assert score(probs, y) > score(probs, shuffled(y)) + 0.3
    assert score(probs, y) <= 1e-12  # both are log-likelihoods / negative entropies


def test_probs_must_be_softmax_outputs():
    with pytest.raises(DataError, match="sum to 1"):
        leep(torch.tensor([[2.0, -1.0], [0.5, 0.5]]), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="at least 2"):
        nce(torch.tensor(THETA), torch.tensor([1, 1, 1, 1]))


# ---------------------------------------------------------------- SFDA: naive transcription of the paper + official code


def _naive_sfda(x, y, log=True):
    """Independent numpy/scipy transcription: generalised eigenvectors and coef = μ V Vᵀ as in the official code."""
    from scipy import linalg

    def fit(x, lam=None):
        classes = np.unique(y)
        priors = np.array([np.mean(y == c) for c in classes])
        means = np.array([x[y == c].mean(0) for c in classes])
        sw = sum(p * np.atleast_2d(np.cov(x[y == c].T, bias=True)) for p, c in zip(priors, classes))
        if lam is None:
            lam = max(math.exp(-5 * np.linalg.eigvalsh(sw).max()), 1e-10)
        d = x.shape[1]
        sw_s = (1 - lam) * sw + lam * np.trace(sw) / d * np.eye(d)
        st = np.cov(x.T, bias=True)
        st_s = (1 - lam) * st + lam * np.trace(st) / d * np.eye(d)
        _, v = linalg.eigh(st_s - sw_s, sw_s)
        coef = means @ v @ v.T
        logits = x @ coef.T - 0.5 * np.diag(means @ coef.T) + np.log(priors)
        return logits, lam, means

    def softmax(a):
        e = np.exp(a - a.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    logits, lam, means = fit(x)
    soft = softmax(softmax(logits))
    mixed = x.copy()
    c = len(means)
    for j in range(c):
        other = (means.sum(0) - means[j]) / (c - 1)
        p = soft[y == j, j][:, None]
        mixed[y == j] = p * x[y == j] + (1 - p) * other
    logits, _, _ = fit(mixed, lam)
    prob = softmax(logits)[np.arange(len(y)), y]
    return float(np.mean(np.log(prob)) if log else np.mean(prob))


@pytest.mark.parametrize("scale", [1.0, 0.15])  # 0.15: σ_max(S_w) small, so λ = exp(−5σ) is above its floor
def test_sfda_matches_naive_transcription(scale):
    x, y = clusters(n_per_class=6, d=3, c=3, spread=1.0, gap=2.0, seed=3)
    x = x * scale
    for log in (True, False):
        assert sfda(x, y, log=log) == pytest.approx(_naive_sfda(x, y, log=log), rel=1e-7, abs=1e-9)


def test_sfda_hand_case_two_points_per_class():
    # 1-D, classes {0, 2} and {10, 12}: S_w = 1 (both classes have variance 1), λ = max(e^-5, 1e-10) = e^-5,
    # S̃_w = (1 − λ)·1 + λ·1 = 1. Scores s_c(x) = x μ_c − μ_c²/2 + log ½ with μ = (1, 11).
    lam = math.exp(-5)
    x = np.array([[0.0], [2.0], [10.0], [12.0]])
    y = np.array([0, 0, 1, 1])

    def probs(points, mu, sw):
        s = [[p * m / sw - m * m / (2 * sw) for m in mu] for p in points]
        return [[math.exp(v - max(r)) / sum(math.exp(u - max(r)) for u in r) for v in r] for r in s]

    p1 = probs([0.0, 2.0, 10.0, 12.0], [1.0, 11.0], 1.0)
    q = [[math.exp(v) / sum(math.exp(u) for u in r) for v in r] for r in p1]  # the official second softmax
    w = [q[0][0], q[1][0], q[2][1], q[3][1]]
    # ConfMix: class 0 moves towards μ_1 = 11, class 1 towards μ_0 = 1
    mixed = [w[0] * 0 + (1 - w[0]) * 11, w[1] * 2 + (1 - w[1]) * 11, w[2] * 10 + (1 - w[2]) * 1, w[3] * 12 + (1 - w[3]) * 1]
    mu = [(mixed[0] + mixed[1]) / 2, (mixed[2] + mixed[3]) / 2]
    sw = (sum((m - mu[0]) ** 2 for m in mixed[:2]) + sum((m - mu[1]) ** 2 for m in mixed[2:])) / 4
    sw_shrunk = (1 - lam) * sw + lam * sw  # 1-D: the shrinkage target tr(S)/D is S itself
    p2 = probs(mixed, mu, sw_shrunk)
    expected = (math.log(p2[0][0]) + math.log(p2[1][0]) + math.log(p2[2][1]) + math.log(p2[3][1])) / 4
    assert sfda(x, y) == pytest.approx(expected, rel=1e-9)


def test_sfda_separated_beats_shuffled_and_leaves_input_alone():
    x, y = clusters(n_per_class=30, d=8, c=4, spread=1.0, gap=4.0)
    xt = torch.from_numpy(x.copy())
    assert sfda(xt, y) > sfda(xt, shuffled(y)) + 0.1
    assert torch.equal(xt, torch.from_numpy(x))  # ConfMix must not write into the caller's array


def test_sfda_works_with_fewer_samples_than_dims():
    x, y = clusters(n_per_class=5, d=60, c=3, spread=1.0, gap=3.0)
    value = sfda(x, y)
    assert math.isfinite(value) and value <= 0


# ---------------------------------------------------------------- NLEEP


def test_pca_keeps_the_sklearn_number_of_axes():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 12)) * np.linspace(3, 0.2, 12)
    for fraction in (0.3, 0.8, 0.95):
        ref = PCA(n_components=fraction, svd_solver="full").fit(x)
        ours = pca_keep_variance(torch.from_numpy(x), fraction)
        assert ours.shape[1] == ref.n_components_
        # same subspace: identical scores up to the sign of each axis
        assert np.allclose(np.abs(ours.numpy()), np.abs(ref.transform(x)), atol=1e-8)
    # by hand: orthogonal ±1 zero-mean columns (Hadamard) scaled to variances 5, 2, 2, 1
    # → cumulative explained-variance ratios .5, .7, .9, 1 → 3 axes for 80 %, 1 for 40 %, 4 for 95 %
    from scipy.linalg import hadamard

    x = hadamard(8)[:, 1:5] * np.sqrt([5.0, 2.0, 2.0, 1.0])
    assert pca_keep_variance(torch.from_numpy(x), 0.4).shape[1] == 1
    assert pca_keep_variance(torch.from_numpy(x), 0.95).shape[1] == 4
    assert pca_keep_variance(torch.from_numpy(x), 0.8).shape[1] == 3


def test_nleep_matches_naive_transcription():
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    x, y = clusters(n_per_class=25, d=6, c=3, spread=1.0, gap=5.0, seed=2)
    reduced = PCA(n_components=0.8, svd_solver="full").fit_transform(x)
    gmm = GaussianMixture(n_components=15, covariance_type="diag", random_state=0).fit(reduced)
    theta = gmm.predict_proba(reduced)
    n, k = theta.shape
    joint = [[sum(theta[i, z] for i in range(n) if y[i] == c) / n for z in range(k)] for c in range(3)]
    p_z = [sum(joint[c][z] for c in range(3)) for z in range(k)]
    total = 0.0
    for i in range(n):
        total += math.log(sum(joint[y[i]][z] / p_z[z] * theta[i, z] for z in range(k)))
    assert nleep(x, y) == pytest.approx(total / n, rel=1e-6)


def test_nleep_separated_beats_shuffled_and_handles_few_samples():
    x, y = clusters(n_per_class=20, d=10, c=3, spread=1.0, gap=5.0)
    assert nleep(x, y) > nleep(x, shuffled(y)) + 0.2
    x, y = clusters(n_per_class=4, d=40, c=3)  # N = 12 < D, and K = 15 > N is capped at N
    assert math.isfinite(nleep(x, y))


# ---------------------------------------------------------------- TMI


def test_tmi_by_hand_1d_and_max_norm():
    # 1-D, k = 1. Class A {0, 1, 3}: ε = 1, 1, 2 → Ĥ = ψ(3) − ψ(1) + (1/3)(log 2 + log 2 + log 4)
    # Class B {10, 10.5, 12, 14}: ε = .5, .5, 1.5, 2 → Ĥ = ψ(4) − ψ(1) + (1/4)(log 1 + log 1 + log 3 + log 4)
    x = np.array([0, 1, 3, 10, 10.5, 12, 14.0])[:, None]
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    h_a = 1.5 + (4 * math.log(2)) / 3
    h_b = (1 + 1 / 2 + 1 / 3) + (math.log(3) + math.log(4)) / 4
    assert tmi(x, y, k=1, min_dist=1e-12) == pytest.approx(3 / 7 * h_a + 4 / 7 * h_b, abs=1e-12)
    # the official floor min_dist = 1.0 lifts B's two ε = .5 to 1: (1/4)(log 2 + log 2 + log 3 + log 4)
    h_b_floored = (1 + 1 / 2 + 1 / 3) + (2 * math.log(2) + math.log(3) + math.log(4)) / 4
    assert tmi(x, y, k=1) == pytest.approx(3 / 7 * h_a + 4 / 7 * h_b_floored, abs=1e-12)
    # 2-D: Chebyshev, not Euclidean. A {(0,0), (1,2), (3,0)}: max-norm ε = 2, 2, 2 (Euclidean: √5, √5, √8)
    # B {(10,10), (10,11), (12,10), (10,13)}: ε = 1, 1, 2, 2
    x = np.array([[0, 0], [1, 2], [3, 0], [10, 10], [10, 11], [12, 10], [10, 13.0]])
    h_a = 1.5 + (2 / 3) * 3 * math.log(4)
    h_b = 11 / 6 + (2 / 4) * (2 * math.log(2) + 2 * math.log(4))
    assert tmi(x, y, k=1, min_dist=1e-12) == pytest.approx(3 / 7 * h_a + 4 / 7 * h_b, abs=1e-12)
    assert tmi(x, y, k=1, min_dist=1e-12, normalize=True) == pytest.approx((3 / 7 * h_a + 4 / 7 * h_b) / 2)


def _naive_tmi(x, y, k):
    """Brute-force transcription: all within-class Chebyshev distances, k-th smallest excluding self."""
    from scipy.special import digamma

    total = 0.0
    for c in np.unique(y):
        xc = x[y == c]
        n, d = xc.shape
        dist = np.abs(xc[:, None, :] - xc[None, :, :]).max(-1)
        eps = np.sort(dist, axis=1)[:, k]  # column 0 is the point itself
        total += n / len(y) * (digamma(n) - digamma(k) + d / n * np.sum(np.log(2 * eps)))
    return total


def test_tmi_reference_k3_matches_brute_force():
    x, y = clusters(n_per_class=15, d=4, c=3, spread=4.0, gap=20.0)
    assert tmi(x, y) == pytest.approx(_naive_tmi(x, y, 3), rel=1e-12)  # spread 4: no distance below 1


def test_tmi_grows_with_intra_class_spread():
    # the paper's convention: more intra-class variance = more adaptable = higher score
    tight, y = clusters(n_per_class=30, d=4, spread=2.0, gap=30.0)
    wide, _ = clusters(n_per_class=30, d=4, spread=4.0, gap=30.0)
    assert tmi(wide, y) > tmi(tight, y)
    # scaling the features by s adds exactly D log s (no distance floored)
    assert tmi(3 * wide, y) - tmi(wide, y) == pytest.approx(4 * math.log(3), abs=1e-9)
    # and by construction (not a separability score) shuffled labels mix the clusters and raise it
    assert tmi(tight, shuffled(y)) > tmi(tight, y)


def test_tmi_normalized_is_comparable_across_widths():
    narrow, y = clusters(n_per_class=30, d=4, c=3, spread=3.0, gap=20.0)
    wider, _ = clusters(n_per_class=30, d=4, c=3, spread=4.0, gap=20.0, seed=5)
    padded = np.concatenate([narrow, np.zeros((len(y), 12))], 1)  # D 4 → 16 with zero coordinates
    duplicated = np.concatenate([narrow] * 4, 1)  # D 4 → 16 with copies
    from scipy.special import digamma

    n_c, k = 30, 3
    offset = (digamma(n_c) - digamma(k)) * (1 / 4 - 1 / 16)  # the only width-dependent part of TMI / D
    for wide in (padded, duplicated):
        assert tmi(wide, y) > 3 * tmi(narrow, y)  # raw TMI grows ∝ D
        assert tmi(narrow, y, normalize=True) - tmi(wide, y, normalize=True) == pytest.approx(offset, abs=1e-9)
        # a model with more intra-class spread stays ahead of the padded one only once normalised
        assert tmi(wide, y) > tmi(wider, y)
        assert tmi(wider, y, normalize=True) > tmi(wide, y, normalize=True)


def test_tmi_class_too_small_is_one_sentence():
    x, y = clusters(n_per_class=10, d=3)
    y = y.copy()
    y[:7] = 5  # class 0 keeps 3 samples
    with pytest.raises(DataError, match=r"holds 3 samples.*k \+ 1 = 4") as err:
        tmi(x, y)
    assert "\n" not in str(err.value)


def test_tmi_warns_when_the_floor_saturates():
    x, y = clusters(n_per_class=20, d=4, spread=0.01, gap=0.1)
    with pytest.warns(UserWarning, match="floored"):
        tmi(x, y)


def test_tmi_works_with_fewer_samples_than_dims():
    x, y = clusters(n_per_class=5, d=100, c=2, spread=3.0)
    assert math.isfinite(tmi(x, y))


# ---------------------------------------------------------------- bad input: one sentence


@pytest.mark.parametrize("score", [sfda, nleep, tmi])
def test_feature_scores_reject_nan_and_one_class(score):
    x, y = clusters(n_per_class=10, d=3)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        score(bad, y)
    with pytest.raises(DataError, match="at least 2"):
        score(x, np.zeros(len(y), dtype=int))
    with pytest.raises(DataError, match="labels"):
        score(x, y[:-1])


@pytest.mark.parametrize("bad", [float("nan"), -0.1, float("inf"), "logits"])
def test_source_probabilities_that_are_not_probabilities_are_one_sentence(bad):
    y = torch.tensor([0, 1, 0, 1])
    p = torch.tensor([[0.5, 0.5], [0.2, 0.8], [1.0, 0.0], [0.0, 1.0]])
    if bad == "logits":
        p = torch.tensor([[2.0, -1.0], [0.3, 1.2], [4.0, 0.0], [-2.0, 3.0]])
    else:
        p[0, 0] = bad
    for score in (leep, nce):
        with pytest.raises(DataError, match="must be finite, non-negative and sum to 1 per row"):
            score(p, y)
    assert leep(torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]]), y) == 0.0  # integer one-hot rows are fine
