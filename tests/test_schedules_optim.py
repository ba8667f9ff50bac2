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
    """trust = eta|w| / (|g| + wd|w|); d = trust (g + wd w); v = mu v + d; w -= lr v (no clipping)."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.5, eta=0.02, clip_lr=False, eps=0.0)
    w.grad = torch.tensor([0.6, 0.8])                  # |g| = 1
    opt.step()
    trust = 0.02 * 5.0 / (1.0 + 0.5 * 5.0)             # = 0.1 / 3.5
    d1 = trust * torch.tensor([0.6 + 1.5, 0.8 + 2.0])
    w1 = torch.tensor([3.0, 4.0]) - 0.1 * d1
    torch.testing.assert_close(w.detach(), w1)
    w.grad = torch.tensor([0.6, 0.8])
    opt.step()
    trust2 = 0.02 * w1.norm() / (1.0 + 0.5 * w1.norm())
    d2 = trust2 * (torch.tensor([0.6, 0.8]) + 0.5 * w1)
    torch.testing.assert_close(w.detach(), w1 - 0.1 * (0.9 * d1 + d2))


def test_lars_clip_lr_caps_the_local_rate_at_the_global_one():
    # trust = 0.02 * 5 / 1 = 0.1; with lr = 0.05 the clipped factor is min(0.1 / 0.05, 1) = 1 -> plain SGD step
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = LARS([w], lr=0.05, momentum=0.0, weight_decay=0.0, eta=0.02, clip_lr=True, eps=0.0)
    w.grad = torch.tensor([0.6, 0.8])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0 - 0.05 * 0.6, 4.0 - 0.05 * 0.8]))
    # with lr = 0.4 the factor is 0.1 / 0.4 = 0.25 -> step lr * 0.25 * g = 0.1 * g
    w2 = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt2 = LARS([w2], lr=0.4, momentum=0.0, weight_decay=0.0, eta=0.02, clip_lr=True, eps=0.0)
    w2.grad = torch.tensor([0.6, 0.8])
    opt2.step()
    torch.testing.assert_close(w2.detach(), torch.tensor([3.0 - 0.1 * 0.6, 4.0 - 0.1 * 0.8]))


def test_lars_excluded_group_is_plain_sgd_momentum():
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [b], "lars_exclude": True, "weight_decay": 0.0}], lr=0.1, momentum=0.9, weight_decay=0.5)
    # excluded: no decay, no adaptation -> w -= lr * g
    b.grad = torch.tensor([2.0])
    opt.step()
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.2]))


def test_bias_and_norm_excluded_from_decay():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    groups = param_groups([m], weight_decay=0.1, exclude_bias_norm=True)
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([4, 3])]
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 3
