"""visrep.rank: LogME, RankMe and leave-one-out kNN against naive transcriptions and hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visrep.errors import DataError
from visrep.rank.base import SCORES
from visrep.rank.knn import knn
from visrep.rank.logme import logme
from visrep.rank.rankme import RANKME_EPS, effective_rank, rankme


def _clusters(n_per=40, classes=4, d=16, spread=0.1, seed=0):
    """Well-separated class clusters around random centres, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * 3
    y = np.repeat(np.arange(classes), n_per)
    return centres[y] + spread * rng.normal(size=(len(y), d)), y


def test_scores_are_registered_with_their_needs():
    assert SCORES.get("logme") is logme and logme.needs == "labels"
    assert SCORES.get("rankme") is rankme and rankme.needs == "none"
    assert SCORES.get("knn") is knn and knn.needs == "labels"
    shown = dict(SCORES.describe())
    assert all(shown[name] for name in ("logme", "rankme", "knn"))


# --------------------------------------------------------------------------------------------- LogME
def _paper_evidence(f, y, alpha, beta, m):
    """The paper's log evidence with explicit D x D matrices: D/2 log α + N/2 log β − ½ log|A| − β/2‖y−Fm‖²
    − α/2‖m‖² − N/2 log 2π, A = αI + βFᵀF."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    return (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - np.linalg.slogdet(a)[1] / 2
            - beta / 2 * np.sum((y - f @ m) ** 2) - alpha / 2 * m @ m - n / 2 * math.log(2 * math.pi))


def _naive_logme(f, labels):
    """Reference LogME written naively: one class at a time, A⁻¹ by solve, γ = D − α tr(A⁻¹) (MacKay), the
    official start (α = β = 1), update guard 1e-5, stop |Δ(α/β)|/(α/β) ≤ 1e-3 or 11 updates, evidence / N."""
    n, d = f.shape
    out = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            a = alpha * np.eye(d) + beta * f.T @ f
            m = beta * np.linalg.solve(a, f.T @ y)
            gamma = d - alpha * np.trace(np.linalg.inv(a))
            alpha = gamma / (m @ m + 1e-5)
            beta = (n - gamma) / (np.sum((y - f @ m) ** 2) + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        out.append(_paper_evidence(f, y, alpha, beta, m) / n)
    return float(np.mean(out))


@pytest.mark.parametrize("n,d", [(60, 8), (15, 40)])
def test_paper_evidence_is_the_gaussian_marginal_likelihood(n, d):
    """Checks the transcription above: at the posterior mean m = βA⁻¹Fᵀy the formula equals
    log N(y; 0, FFᵀ/α + I/β), for N > D and N < D alike (so log|A| needs all D eigenvalues)."""
    rng = np.random.default_rng(1)
    f, y = rng.normal(size=(n, d)), rng.normal(size=n)
    alpha, beta = 0.7, 2.5
    m = beta * np.linalg.solve(alpha * np.eye(d) + beta * f.T @ f, f.T @ y)
    cov = f @ f.T / alpha + np.eye(n) / beta
    marginal = -0.5 * (y @ np.linalg.solve(cov, y) + np.linalg.slogdet(cov)[1] + n * math.log(2 * math.pi))
    assert _paper_evidence(f, y, alpha, beta, m) == pytest.approx(marginal, rel=1e-10)


@pytest.mark.parametrize("n,d,classes", [(120, 10, 4), (30, 70, 3), (40, 40, 5)])
def test_logme_matches_the_naive_reference(n, d, classes):
    rng = np.random.default_rng(n + d)
    f = rng.normal(size=(n, d)) + 0.5 * rng.normal(size=d)  # an offset, as real features have
    labels = rng.integers(0, classes, size=n)
    labels[:classes] = np.arange(classes)
    assert logme(torch.from_numpy(f), torch.from_numpy(labels)) == pytest.approx(_naive_logme(f, labels), rel=1e-6)
    assert logme(f.astype(np.float32), labels) == pytest.approx(_naive_logme(f.astype(np.float32).astype(np.float64),
                                                                             labels), rel=1e-6)


def test_logme_rank_deficient_features_match_the_naive_reference():
    """Duplicated and zero columns: FᵀF is singular, no singular value is cut off, log|A| stays exact."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(80, 6))
    f = np.concatenate([base, base[:, :3], np.zeros((80, 2))], axis=1)
    labels = rng.integers(0, 3, size=80)
    assert logme(f, labels) == pytest.approx(_naive_logme(f, labels), rel=1e-6)


def test_logme_matches_the_official_fixed_point_for_full_rank_n_greater_than_d():
    """Official `_fit_fixed_point` arithmetic (SVD of F, sums over the singular values), transcribed."""
    rng = np.random.default_rng(4)
    f, labels = rng.normal(size=(90, 7)), rng.integers(0, 3, size=90)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sig = s ** 2
    evidences = []
    for c in range(3):
        y = (labels == c).astype(np.float64)
        x2 = (u.T @ y) ** 2
        res_x2 = y @ y - x2.sum()
        alpha = beta = 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sig / (sig + t)).sum()
            m2 = (sig * x2 / (t + sig) ** 2).sum()
            res2 = (x2 / (1 + sig / t) ** 2).sum() + res_x2
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        evidences.append((d / 2 * math.log(alpha) + n / 2 * math.log(beta) - np.log(alpha + beta * sig).sum() / 2
                          - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi)) / n)
    assert logme(f, labels) == pytest.approx(float(np.mean(evidences)), rel=1e-8)


def test_logme_ranks_class_clusters_above_shuffled_labels():
    f, y = _clusters()
    shuffled = np.random.default_rng(0).permutation(y)
    assert logme(f, y) > logme(f, shuffled) + 0.1


def test_logme_bad_input_is_one_sentence():
    f, y = _clusters()
    with pytest.raises(DataError, match="1 class"):
        logme(f, np.zeros(len(y), dtype=int))
    f_nan = f.copy()
    f_nan[3, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        logme(f_nan, y)
    with pytest.raises(DataError, match="labels"):
        logme(f, y[:-1])
    with pytest.raises(DataError, match="all zero"):
        logme(np.zeros_like(f), y)


# -------------------------------------------------------------------------------------------- RankMe
def _with_singular_values(sigma, n, seed=0):
    """An n x len(sigma) matrix Q diag(σ) Rᵀ with orthonormal Q, R: its singular values are exactly σ."""
    rng = np.random.default_rng(seed)
    d = len(sigma)
    q = np.linalg.qr(rng.normal(size=(n, d)))[0]
    r = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return q @ np.diag(sigma) @ r.T


def _exp_entropy(sigma, eps=1e-7):
    p = [s / sum(sigma) + eps for s in sigma]
    return math.exp(-sum(pk * math.log(pk) for pk in p))


def test_rankme_hand_case_known_singular_values():
    z = _with_singular_values([4.0, 3.0, 2.0, 1.0], n=50)
    # p = (0.4, 0.3, 0.2, 0.1) + ε:  exp(−Σ p log p) = 3.5961...
    assert _exp_entropy([4, 3, 2, 1], eps=0) == pytest.approx(3.596115, abs=1e-6)
    assert rankme(z) == pytest.approx(_exp_entropy([4, 3, 2, 1]), rel=1e-10)
    assert RANKME_EPS == 1e-7
    # N < D: the singular values of Zᵀ are the same.
    assert rankme(z.T) == pytest.approx(_exp_entropy([4, 3, 2, 1]), rel=1e-10)


def test_rankme_of_rank_r_features_is_r():
    sigma = [1.0] * 10 + [0.0] * 54  # rank 10 of 64 dimensions, equal singular values
    z = _with_singular_values(sigma, n=300, seed=1)
    value = rankme(z)
    assert value == pytest.approx(_exp_entropy(sigma), rel=1e-5)
    assert value == pytest.approx(10.0, abs=0.01)


def test_rankme_subsamples_with_a_seed():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(300, 20)) * np.linspace(0.1, 2, 20)
    assert rankme(z, max_samples=100, seed=0) == rankme(z, max_samples=100, seed=0)
    assert rankme(z, max_samples=100, seed=0) != rankme(z, max_samples=100, seed=1)
    assert rankme(z, max_samples=300) == rankme(z)


def test_rankme_ranks_isotropic_features_above_collapsed_ones():
    rng = np.random.default_rng(3)
    full = rng.normal(size=(2000, 32))
    collapsed = full[:, :4] @ rng.normal(size=(4, 32)) + 1e-3 * rng.normal(size=(2000, 32))
    assert rankme(full) > 25 > 5 > rankme(collapsed)
    assert rankme(3.0 * full) == pytest.approx(rankme(full), rel=1e-10)  # scale-free


def test_effective_rank_monitor_on_a_training_batch():
    z = torch.from_numpy(_with_singular_values([4.0, 3.0, 2.0, 1.0], n=64)).float().requires_grad_()
    assert effective_rank(z) == pytest.approx(_exp_entropy([4, 3, 2, 1]), rel=1e-5)
    assert effective_rank(z.bfloat16()) == pytest.approx(_exp_entropy([4, 3, 2, 1]), rel=1e-2)


def test_rankme_bad_input_is_one_sentence():
    with pytest.raises(DataError, match="all zero"):
        rankme(np.zeros((10, 4)))
    with pytest.raises(DataError, match="NaN"):
        rankme(np.array([[1.0, np.nan], [0.0, 1.0]]))


# ----------------------------------------------------------------------------------------------- kNN
def _naive_loo_knn(f, labels, k, temperature):
    """One sample at a time: cosine to every other sample, k best vote exp(s/T), argmax (lowest class on ties)."""
    x = f / np.linalg.norm(f, axis=1, keepdims=True)
    correct = 0
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        sims = x[others] @ x[i]
        votes = np.zeros(labels.max() + 1)
        for j in np.argsort(-sims, kind="stable")[:k]:
            votes[labels[others[j]]] += math.exp(sims[j] / temperature)
        correct += int(np.argmax(votes) == labels[i])
    return correct / len(x)


def _at(deg, norm=1.0):
    return [norm * math.cos(math.radians(deg)), norm * math.sin(math.radians(deg))]


def test_knn_hand_case():
    """A 0° (class 0), B 30° and C 40° (class 1), D −50° (class 0), k = 2, T = 0.07:
    A's two nearest others are B, C -> 1 (wrong); B's are C (cos 0.985) and A (0.866) -> C outvotes A -> 1;
    C's are B and A -> 1; D's are A (0.643) and B (0.174) -> 0. Accuracy 3/4. Counting itself, A would be
    right (4/4); an unweighted vote would tie at B and pick class 0 (2/4). Norms differ: cosine ignores them."""
    f = torch.tensor([_at(0, 5.0), _at(30), _at(40, 0.2), _at(-50, 3.0)])
    y = torch.tensor([0, 1, 1, 0])
    assert knn(f, y, k=2) == 0.75
    assert _naive_loo_knn(f.numpy(), y.numpy(), k=2, temperature=0.07) == 0.75


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (500, 0.07)])
def test_knn_matches_the_naive_reference(k, temperature):
    rng = np.random.default_rng(k)
    f = rng.normal(size=(90, 6))
    labels = rng.integers(0, 3, size=90)
    expected = _naive_loo_knn(f, labels, min(k, 89), temperature)
    for batch_size in (1, 7, 1024):  # the batching must not change a vote
        assert knn(f, labels, k=k, temperature=temperature, batch_size=batch_size) == pytest.approx(expected)


def test_knn_ranks_class_clusters_above_shuffled_labels():
    f, y = _clusters()
    assert knn(f, y) == 1.0
    assert knn(f, np.random.default_rng(0).permutation(y)) < 0.5


def test_knn_bad_input_is_one_sentence():
    f, y = _clusters()
    with pytest.raises(DataError, match="1 class"):
        knn(f, np.zeros(len(y), dtype=int))
    with pytest.raises(DataError, match="NaN"):
        knn(np.full_like(f, np.nan), y)
