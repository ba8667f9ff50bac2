import math

import numpy as np
import torch

from visrep.train.optim import LARS, param_groups
from visrep.train.schedules import linear_warmup_constant, momentum_schedule, warmup_cosine


def test_warmup_cosine_values():
    s = warmup_cosine(1.0, 0.0, total_steps=6, warmup_steps=2)
    # warm-up 0, 0.5; then cosine over 4 steps: 1, (1+cos(pi/4))/2, 0.5, (1+cos(3pi/4))/2
    expected = [0.0, 0.5, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]
    np.testing.assert_allclose(s, expected, atol=1e-12)


def test_byol_momentum_schedule():
    s = momentum_schedule(0.99, 1.0, total_steps=4)
    # tau(t) = 1 - (1 - 0.99) (cos(pi t / T) + 1) / 2
    expected = [1 - 0.01 * (math.cos(math.pi * t / 4) + 1) / 2 for t in range(4)]
    np.testing.assert_allclose(s, expected, atol=1e-12)


def test_linear_warmup_constant():
    np.testing.assert_allclose(linear_warmup_constant(0.04, 0.07, 5, 4), [0.04, 0.05, 0.06, 0.07, 0.07])


def test_lars_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.5, eta=0.02)
    w.grad = torch.tensor([0.5, 1.0])
    opt.step()
    d = torch.tensor([0.5 + 1.5, 1.0 + 2.0])          # g + wd * w = (2, 3)
    trust = 0.02 * 5.0 / math.sqrt(13.0)
    expected = torch.tensor([3.0, 4.0]) - 0.1 * trust * d
    torch.testing.assert_close(w.detach(), expected)
    # second step uses momentum: v = 0.9 v + lr * trust' * d'
    v1 = 0.1 * trust * d
    w.grad = torch.tensor([0.5, 1.0])
    w1 = expected.clone()
    d2 = torch.tensor([0.5, 1.0]) + 0.5 * w1
    trust2 = 0.02 * w1.norm() / d2.norm()
    opt.step()
    torch.testing.assert_close(w.detach(), w1 - (0.9 * v1 + 0.1 * trust2 * d2))


def test_lars_excluded_group_is_plain_sgd_momentum():
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [b], "lars_exclude": True, "weight_decay": 0.0}], lr=0.1, momentum=0.9, weight_decay=0.5)
    b.grad = torch.tensor([2.0])
    opt.step()
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.2]))


def test_bias_and_norm_excluded_from_decay():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    groups = param_groups([m], weight_decay=0.1, exclude_bias_norm=True)
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([4, 3])]
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 3
