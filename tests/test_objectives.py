"""Objectives against independent hand computations (plain python loops / closed forms)."""
from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch

from visrep.errors import ConfigError
from visrep.objectives import (
    OBJECTIVES,
    BarlowTwinsLoss,
    BYOLLoss,
    DINOLoss,
    InfoNCELoss,
    MoCoQueueLoss,
    NTXentLoss,
    SimSiamLoss,
    SwAVLoss,
    VICRegLoss,
    build_objective,
    loss_terms,
    sinkhorn_knopp,
)

# ---------------------------------------------------------------- plain-python helpers


def rows(t: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in r] for r in t.tolist()]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(a):
    n = math.sqrt(dot(a, a))
    return [x / n for x in a]


def logsumexp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def log_softmax(xs):
    lse = logsumexp(xs)
    return [x - lse for x in xs]


def softmax(xs):
    return [math.exp(v) for v in log_softmax(xs)]


def column(m, j):
    return [r[j] for r in m]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-5):
    a, b = (x.item() if isinstance(x, torch.Tensor) else x for x in (a, b))
    assert abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b))), (float(a), float(b))


# ---------------------------------------------------------------- NT-Xent


def ntxent_ref(z0, z1, tau):
    z = [unit(r) for r in rows(z0)] + [unit(r) for r in rows(z1)]
    n2 = len(z)
    total = 0.0
    for a in range(n2):
        pos = (a + n2 // 2) % n2
        others = [dot(z[a], z[b]) / tau for b in range(n2) if b != a]
        total += -(dot(z[a], z[pos]) / tau - logsumexp(others))
    return total / n2


def test_ntxent_closed_form_orthogonal():
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # norms differ: the loss normalizes
    loss = NTXentLoss(temperature=0.5)([z, z.clone()], [z, z])
    close(loss, math.log(1 + 2 * math.exp(-2.0)))


def test_ntxent_matches_loop_reference_and_is_symmetric():
    z0, z1 = randn(3, 4, seed=1), randn(3, 4, seed=2)
    fn = NTXentLoss(temperature=0.3)
    close(fn([z0, z1], []), ntxent_ref(z0, z1, 0.3))
    close(fn([z0, z1], []), fn([z1, z0], []))
    assert NTXentLoss().temperature == 0.1


# ---------------------------------------------------------------- MoCo v2 (queue)


def moco_ref(student, teacher, queue, tau):
    total = 0.0
    for i in (0, 1):
        qs = [unit(r) for r in rows(student[i])]
        ks = [unit(r) for r in rows(teacher[1 - i])]
        dirloss = 0.0
        for q, k in zip(qs, ks):
            logits = [dot(q, k) / tau] + [dot(q, m) / tau for m in rows(queue)]
            dirloss += -(logits[0] - logsumexp(logits))
        total += dirloss / len(qs)
    return total / 2


def test_moco_queue_closed_form():
    fn = MoCoQueueLoss(temperature=0.5, queue_size=2, out_dim=2)
    fn.queue.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    q = torch.tensor([[1.0, 0.0]])
    loss = fn([q, q], [q, q])
    close(loss, math.log(1 + 2 * math.exp(-2.0)))


def test_moco_queue_matches_reference_enqueues_and_wraps():
    fn = MoCoQueueLoss(temperature=0.2, queue_size=5, out_dim=3)
    assert MoCoQueueLoss(queue_size=5, out_dim=3).queue.equal(fn.queue)  # deterministic init
    sd = fn.state_dict()
    assert "queue" in sd and "queue_ptr" in sd
    s = [randn(2, 3, seed=3), randn(2, 3, seed=4)]
    t = [randn(2, 3, seed=5), randn(2, 3, seed=6)]
    before = fn.queue.clone()
    close(fn(s, t), moco_ref(s, t, before, 0.2))
    keys = [unit(r) for r in rows(t[0]) + rows(t[1])]  # view 0 keys then view 1 keys
    assert int(fn.queue_ptr) == 4
    for i in range(4):
        assert torch.allclose(fn.queue[i], torch.tensor(keys[i]), atol=1e-6)
    assert torch.equal(fn.queue[4], before[4])
    t2 = [randn(2, 3, seed=7), randn(2, 3, seed=8)]
    queue1 = fn.queue.clone()
    close(fn(s, t2), moco_ref(s, t2, queue1, 0.2))  # uses the queue as left by step 1
    keys2 = [unit(r) for r in rows(t2[0]) + rows(t2[1])]
    assert int(fn.queue_ptr) == (4 + 4) % 5
    for slot, key in zip([4, 0, 1, 2], keys2):  # wrapped around
        assert torch.allclose(fn.queue[slot], torch.tensor(key), atol=1e-6)
    assert torch.allclose(fn.queue[3], queue1[3])
    fn.eval()
    q_eval = fn.queue.clone()
    fn(s, t)
    assert torch.equal(fn.queue, q_eval) and int(fn.queue_ptr) == 3  # no enqueue in eval


def test_moco_queue_enqueue_more_than_size_keeps_newest():
    fn = MoCoQueueLoss(queue_size=3, out_dim=2)
    keys = (2 * torch.arange(5, dtype=torch.float32)).repeat_interleave(2).view(5, 2)  # row i = [2i, 2i]
    fn.enqueue(keys)
    assert int(fn.queue_ptr) == 2
    # slots written in order 0,1,2,0,1: slot 0 <- row 3, slot 1 <- row 4, slot 2 <- row 2
    assert fn.queue[:, 0].tolist() == [6.0, 8.0, 4.0]


# ---------------------------------------------------------------- MoCo v3 (batch InfoNCE)


def infonce_ref(student, teacher, tau):
    total = 0.0
    for i in (0, 1):
        qs = [unit(r) for r in rows(student[i])]
        ks = [unit(r) for r in rows(teacher[1 - i])]
        ce = 0.0
        for b, q in enumerate(qs):
            logits = [dot(q, k) / tau for k in ks]
            ce += -(logits[b] - logsumexp(logits))
        total += 2 * tau * ce / len(qs)  # summed over the two directions
    return total


def test_infonce_closed_form_and_reference():
    e = torch.eye(2)
    close(InfoNCELoss(temperature=1.0)([e, e], [e, e]), 2 * 2 * math.log(1 + math.exp(-1)))
    s = [randn(3, 4, seed=9), randn(3, 4, seed=10)]
    t = [randn(3, 4, seed=11), randn(3, 4, seed=12)]
    fn = InfoNCELoss()
    close(fn(s, t), infonce_ref(s, t, 0.2))
    close(fn(s, t), fn(s[::-1], t[::-1]))  # symmetric in the view order


# ---------------------------------------------------------------- BYOL / SimSiam


def test_byol_closed_form_and_symmetry():
    p, z = torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])
    # cos = 24/25 in both directions: (2 - 2·0.96) + (2 - 2·0.96)
    close(BYOLLoss()([p, p], [z, z]), 2 * (2 - 2 * 0.96))
    s = [randn(3, 4, seed=13), randn(3, 4, seed=14)]
    t = [randn(3, 4, seed=15), randn(3, 4, seed=16)]
    ref = 0.0
    for i in (0, 1):
        pairs = list(zip(rows(s[i]), rows(t[1 - i])))
        ref += sum(2 - 2 * dot(unit(a), unit(b)) for a, b in pairs) / len(pairs)
    close(BYOLLoss()(s, t), ref)
    close(BYOLLoss()(s, t), BYOLLoss()(s[::-1], t[::-1]))


def test_simsiam_reference():
    s = [randn(3, 4, seed=17), randn(3, 4, seed=18)]
    t = [randn(3, 4, seed=19), randn(3, 4, seed=20)]
    ref = 0.0
    for i in (0, 1):
        pairs = list(zip(rows(s[i]), rows(t[1 - i])))
        ref += -0.5 * sum(dot(unit(a), unit(b)) for a, b in pairs) / len(pairs)
    close(SimSiamLoss()(s, t), ref)
    p = torch.tensor([[1.0, 1.0]])
    close(SimSiamLoss()([p, p], [-p, -p]), 1.0)


# ---------------------------------------------------------------- Barlow Twins


def standardize_ref(m):
    out_cols = []
    for j in range(len(m[0])):
        col = column(m, j)
        mu = sum(col) / len(col)
        var = sum((v - mu) ** 2 for v in col) / len(col)
        out_cols.append([(v - mu) / math.sqrt(var + 1e-5) for v in col])
    return [list(r) for r in zip(*out_cols)]


def barlow_ref(z0, z1, lam):
    a, b = standardize_ref(rows(z0)), standardize_ref(rows(z1))
    n, d = len(a), len(a[0])
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k][i] * b[k][j] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lam * c**2
    return loss


def test_barlow_closed_form():
    z0 = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])  # standardized: [[1, 1], [-1, -1]]
    z1 = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # standardized: [[1, -1], [-1, 1]]
    # C = [[1, -1], [1, -1]]: on-diagonal (1-1)² + (1+1)² = 4, off-diagonal 1 + 1
    close(BarlowTwinsLoss(lambda_offdiag=0.5)([z0, z1], []), 4 + 0.5 * 2, tol=1e-4)


def test_barlow_reference_and_symmetry():
    z0, z1 = randn(4, 3, seed=21), randn(4, 3, seed=22)
    fn = BarlowTwinsLoss(lambda_offdiag=0.1)
    close(fn([z0, z1], []), barlow_ref(z0, z1, 0.1))
    close(fn([z0, z1], []), fn([z1, z0], []))
    assert BarlowTwinsLoss().lambda_offdiag == pytest.approx(0.0051)


# ---------------------------------------------------------------- VICReg


def vicreg_ref(z0, z1, sim=25.0, std=25.0, cov=1.0, gamma=1.0, eps=1e-4):
    a, b = rows(z0), rows(z1)
    n, d = len(a), len(a[0])
    inv = sum((a[k][j] - b[k][j]) ** 2 for k in range(n) for j in range(d)) / (n * d)
    var_term = cov_term = 0.0
    for m in (a, b):
        means = [sum(column(m, j)) / n for j in range(d)]
        c = [[v - means[j] for j, v in enumerate(r)] for r in m]
        hinge = 0.0
        for j in range(d):
            s = math.sqrt(sum(r[j] ** 2 for r in c) / (n - 1) + eps)
            hinge += max(0.0, gamma - s)
        var_term += hinge / d / 2
        for i in range(d):
            for j in range(d):
                if i != j:
                    cov_term += (sum(r[i] * r[j] for r in c) / (n - 1)) ** 2 / d
    return sim * inv + std * var_term + cov * cov_term


def test_vicreg_closed_form():
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # feature 2 collapsed
    close(VICRegLoss()([z, z], []), 25 * (1 - math.sqrt(1e-4)) / 2)
    # fully correlated features: Cov = [[2, 2], [2, 2]] -> off-diag 2·4/2 = 4 per view
    z = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    close(VICRegLoss(std_coeff=0.0)([z, z], []), 2 * 4.0)


def test_vicreg_reference_and_symmetry():
    z0, z1 = 0.5 * randn(4, 3, seed=23), 2.0 * randn(4, 3, seed=24)  # one branch below γ
    fn = VICRegLoss()
    close(fn([z0, z1], []), vicreg_ref(z0, z1))
    close(fn([z0, z1], []), fn([z1, z0], []))
    fn2 = VICRegLoss(sim_coeff=1.0, std_coeff=2.0, cov_coeff=3.0, gamma=0.5)
    close(fn2([z0, z1], []), vicreg_ref(z0, z1, 1.0, 2.0, 3.0, 0.5))


# ---------------------------------------------------------------- DINO


def dino_ref(student, teacher, center, ts, tt):
    probs = [[softmax([(v - c) / tt for v, c in zip(r, center)]) for r in rows(t)] for t in teacher]
    logps = [[log_softmax([v / ts for v in r]) for r in rows(s)] for s in student]
    terms = []
    for i, p in enumerate(probs):
        for j, lq in enumerate(logps):
            if j != i:
                terms.append(sum(-dot(pb, lb) for pb, lb in zip(p, lq)) / len(p))
    return sum(terms) / len(terms)


def test_dino_reference_center_and_teacher_temp():
    k = 3
    fn = DINOLoss(out_dim=k)
    assert fn.teacher_temp == 0.04 and fn.student_temp == 0.1 and fn.center.shape == (1, k)
    s = [randn(2, k, seed=s_) for s_ in (25, 26, 27)]  # 2 global + 1 local
    t = [randn(2, k, seed=28), randn(2, k, seed=29)]
    close(fn(s, t), dino_ref(s, t, [0.0] * k, 0.1, 0.04))
    t_rows = rows(t[0]) + rows(t[1])
    mean1 = [sum(column(t_rows, j)) / 4 for j in range(k)]
    c1 = [0.1 * m for m in mean1]  # 0.9·0 + 0.1·mean
    assert torch.allclose(fn.center, torch.tensor([c1]), atol=1e-6)
    fn.teacher_temp = 0.07  # the schedule sets a plain attribute
    close(fn(s, t), dino_ref(s, t, c1, 0.1, 0.07))  # the loss uses the center of step 1
    c2 = [0.9 * c + 0.1 * m for c, m in zip(c1, mean1)]
    assert torch.allclose(fn.center, torch.tensor([c2]), atol=1e-6)
    fn.eval()
    fn(s, t)
    assert torch.allclose(fn.center, torch.tensor([c2]), atol=1e-6)  # frozen in eval
    assert "center" in fn.state_dict()


def test_dino_uniform_and_pairs():
    # teacher one-hot-ish (sharp), student uniform: CE = log K for every pair
    fn = DINOLoss(out_dim=4)
    s = [torch.zeros(2, 4)] * 3
    close(fn(s, [10 * torch.eye(4)[:2]] * 2), math.log(4))


# ---------------------------------------------------------------- SwAV


def sinkhorn_ref(scores, eps, iters):
    q = [[math.exp(v / eps) for v in r] for r in rows(scores)]
    n, k = len(q), len(q[0])
    total = sum(map(sum, q))
    q = [[v / total for v in r] for r in q]
    for _ in range(iters):
        cols = [sum(column(q, j)) for j in range(k)]
        q = [[v / cols[j] / k for j, v in enumerate(r)] for r in q]
        q = [[v / sum(r) / n for v in r] for r in q]
    return [[v * n for v in r] for r in q]


def test_sinkhorn_reference_and_marginals():
    scores = torch.tanh(randn(4, 3, seed=30))
    codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    ref = sinkhorn_ref(scores, 0.05, 3)
    for got, want in zip(rows(codes), ref):
        for g, w in zip(got, want):
            close(g, w)
    assert torch.allclose(codes.sum(dim=1), torch.ones(4), atol=1e-5)  # each sample: 1
    assert not codes.requires_grad
    many = sinkhorn_knopp(scores, epsilon=0.5, iterations=200)
    assert torch.allclose(many.sum(dim=0), torch.full((3,), 4 / 3), atol=1e-4)  # N/K each


def test_swav_reference():
    s = [torch.tanh(randn(4, 3, seed=31 + v)).requires_grad_() for v in range(3)]  # 2 global + 1 local
    t = [x.detach().clone().requires_grad_() for x in s[:2]]
    loss = SwAVLoss()(s, t)
    codes = [sinkhorn_ref(x, 0.05, 3) for x in t]
    logps = [[log_softmax([v / 0.1 for v in r]) for r in rows(x)] for x in s]
    terms = [
        sum(-dot(qb, lb) for qb, lb in zip(codes[i], logps[j])) / 4
        for i in range(2)
        for j in range(3)
        if j != i
    ]
    close(loss, sum(terms) / len(terms))
    loss.backward()
    assert t[0].grad is None and s[0].grad is not None  # codes are computed without gradient


# ---------------------------------------------------------------- common behaviour


def _inputs(name):
    d = 4
    s = [randn(4, d, seed=40 + v) for v in range(2)]
    t = [randn(4, d, seed=50 + v) for v in range(2)]
    kw = {"moco_queue": {"queue_size": 8, "out_dim": d}, "dino": {"out_dim": d}}.get(name, {})
    return s, t, kw


def _extra_inputs(name):
    """The keyword inputs an objective names in `inputs` (mask / loss_pred / labels), and its own views."""
    if name in ("reconstruction", "hpm"):
        mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
        return [randn(2, 4, 6, seed=1)], [randn(2, 4, 6, seed=2)], {"mask": mask, "loss_pred": randn(2, 4, seed=3)}
    if name == "cross_entropy":
        return [randn(4, 5, seed=4)], [], {"labels": torch.tensor([0, 3, 4, 1])}
    if name == "regression":
        return [randn(4, 2, seed=5)], [], {"targets": randn(4, 2, seed=6) * 10 + 30}
    if name == "faceptor":
        heat = randn(2, 10, seed=8).view(2, 5, 1, 2).expand(2, 5, 2, 2).contiguous()
        outputs = {"age": {"values": randn(3, 101, seed=7)},
                   "points": {"heatmaps": heat, "points": torch.rand(2, 5, 2, generator=torch.Generator().manual_seed(9))}}
        return [], [], {"task_outputs": outputs, "task_labels": {"age": torch.zeros(3, dtype=torch.long),
                                                                 "points": torch.zeros(2, dtype=torch.long)},
                        "task_targets": {"age": torch.tensor([[3.0], [40.0], [75.0]]), "points": torch.rand(2, 10)}}
    return None


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_fp32_under_bf16_autocast(name):
    s, t, kw = _inputs(name)
    fn = build_objective(name, **kw).eval()
    extra = _extra_inputs(name)
    inputs = {}
    if extra is not None:
        s, t, inputs = extra
    inputs = {k: inputs[k] for k in getattr(fn, "inputs", ())}
    if hasattr(fn, "set_target_stats"):  # regression standardises by the training targets' statistics
        fn.set_target_stats(inputs["targets"])
    if hasattr(fn, "set_tasks"):  # faceptor: the tasks come from the training data
        fn.set_tasks({"age": ("age_distribution", "dldl", 1.0), "points": ("landmarks", "landmarks", 1.0)})
    s16, t16 = [x.bfloat16() for x in s], [x.bfloat16() for x in t]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_terms(fn(s16, t16, **inputs))["loss"]
    ref = loss_terms(fn([x.float() for x in s16], [x.float() for x in t16], **inputs))["loss"]
    assert low.dtype == torch.float32 and low.dim() == 0
    assert torch.allclose(low, ref, atol=1e-5, rtol=1e-5), (low, ref)


def test_registry_names():
    assert OBJECTIVES.names() == sorted(
        ["ntxent", "moco_queue", "infonce", "byol", "simsiam", "barlow_twins", "vicreg", "dino", "swav",
         "reconstruction", "hpm", "cross_entropy", "regression", "faceptor"]
    )


def test_build_objective_params():
    fn = build_objective("ntxent", temperature=0.5)
    assert isinstance(fn, NTXentLoss) and fn.temperature == 0.5
    with pytest.raises(ConfigError) as err:
        build_objective("ntxent", temprature=0.5)
    msg = str(err.value)
    assert "temprature" in msg and "temperature" in msg and "gather_distributed" in msg
    with pytest.raises(ConfigError):
        build_objective("simclr")
    with pytest.raises(ConfigError):
        build_objective("ntxent", temperature=0.0)


def test_bad_views_raise_config_error():
    z = randn(4, 3)
    with pytest.raises(ConfigError):
        NTXentLoss()([z], [])
    with pytest.raises(ConfigError):
        BarlowTwinsLoss()([z, z, z], [])
    with pytest.raises(ConfigError):
        DINOLoss(out_dim=5)([z, z], [z, z])


@pytest.mark.parametrize("module", ["contrastive", "byol", "barlow_twins", "vicreg", "dino", "swav",
                                    "reconstruction", "supervised"])
def test_docstring_examples(module):
    mod = importlib.import_module(f"visrep.objectives.{module}")
    result = doctest.testmod(mod)
    assert result.attempted > 0 and result.failed == 0
