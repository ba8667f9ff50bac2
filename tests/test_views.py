"""View policies: shapes, determinism, per-sample randomness, BYOL asymmetry, multi-crop, options."""
import pytest
import torch
import torch.nn.functional as F

from visrep.data import IMAGENET_MEAN, IMAGENET_STD, VIEWS, build_views, eval_transform
from visrep.data.views import ColorJitter, RandomResizedCropFlip, _hue_shift
from visrep.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    # the ops are tiny here; on a shared, busy CPU extra OpenMP threads only add stalls
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(b=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)


def test_policies_registered():
    desc = dict(VIEWS.describe())
    assert {"simclr", "byol", "multicrop", "none"} <= set(desc)
    assert all(desc[k] for k in ("simclr", "byol", "multicrop", "none"))


@pytest.mark.parametrize(
    "name,n_global,n_local,local",
    [("simclr", 2, 0, None), ("byol", 2, 0, None), ("multicrop", 2, 6, 16), ("none", 1, 0, None)],
)
def test_shapes_counts_dtypes(name, n_global, n_local, local):
    policy = build_views(name, 32)
    assert (policy.n_global, policy.n_local, policy.n_views) == (n_global, n_local, n_global + n_local)
    views = policy(_batch(), seed=0)
    assert len(views) == n_global + n_local
    for i, v in enumerate(views):
        size = 32 if i < n_global else local
        assert v.shape == (8, 3, size, size) and v.dtype == torch.float32 and torch.isfinite(v).all()


def test_none_is_eval_transform():
    x = _batch()
    (view,) = build_views("none", 32)(x, seed=3)
    assert torch.equal(view, eval_transform(x, 32, IMAGENET_MEAN, IMAGENET_STD))
    zeros = eval_transform(torch.zeros(2, 3, 40, 40, dtype=torch.uint8), 32)
    assert zeros.shape == (2, 3, 32, 32)
    assert torch.allclose(zeros[:, :, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))


@pytest.mark.parametrize("name", ["simclr", "byol", "multicrop"])
def test_seeded_determinism_and_global_rng_untouched(name):
    policy = build_views(name, 32)
    x = _batch()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = policy(x, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = policy(x, seed=7)
    c = policy(x, seed=8)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # the two views of one call differ


def test_per_sample_parameters_differ():
    same = _batch(1).expand(16, -1, -1, -1).contiguous()  # 16 copies of one image
    for name in ("simclr", "byol", "multicrop"):
        views = build_views(name, 32)(same, seed=0)
        for v in views:
            flat = v.flatten(1)
            distinct = len({tuple(row.tolist()) for row in flat.round(decimals=4)})
            assert distinct >= 14, (name, distinct)
    # the sampled crops themselves differ per sample
    boxes = RandomResizedCropFlip(32).sample(64, 32, 32)
    assert len({tuple(b.tolist()) for b in boxes}) > 60
    assert 0 < boxes[:, 4].sum() < 64  # some flipped, some not


def test_crop_identity_and_flip():
    x = torch.rand(2, 3, 8, 8)
    ident = RandomResizedCropFlip(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    assert torch.allclose(ident(x), x, atol=1e-6)
    flip = RandomResizedCropFlip(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    assert torch.allclose(flip(x), x.flip(-1), atol=1e-6)


def test_hand_written_colour_ops_match_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = torch.rand(4, 3, 16, 16)
    shifts = torch.tensor([-0.3, -0.05, 0.1, 0.45])
    ours = _hue_shift(x, shifts)
    for i in range(4):
        ref = tvf.adjust_hue(x[i : i + 1], float(shifts[i]))
        assert torch.allclose(ours[i : i + 1], ref, atol=1e-5)
    assert torch.equal(ColorJitter(p=0.0)(x), x)


def _high_freq(v: torch.Tensor) -> torch.Tensor:
    """Mean absolute Laplacian per sample."""
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return F.conv2d(v, k, groups=3).abs().mean(dim=(1, 2, 3))


def test_byol_views_are_asymmetric():
    policy = build_views("byol", 32)
    s1, s2 = policy.specs
    assert (s1.blur_p, s1.solarize_p, s2.blur_p, s2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert s1.jitter == (0.4, 0.4, 0.2, 0.1) and s1.jitter_p == 0.8 and s1.gray_p == 0.2
    # high-frequency content: view 1 (always blurred) has clearly less than view 2
    x = _batch(64, seed=1)
    v1, v2 = policy(x, seed=0)
    assert _high_freq(v1).mean() < 0.7 * _high_freq(v2).mean()
    # the probabilities are options
    p = build_views("byol", 32, blur_probs=[0.5, 0.5], solarize_probs=[0.0, 0.0])
    assert p.specs[0].blur_p == 0.5 and p.specs[1].solarize_p == 0.0


def test_simclr_options():
    p = build_views("simclr", 32, jitter_strength=0.5, blur_prob=0.0, crop_scale=[0.2, 1.0])
    spec = p.specs[0]
    assert spec.jitter == pytest.approx((0.4, 0.4, 0.4, 0.1)) and spec.blur_p == 0.0 and spec.scale == (0.2, 1.0)
    default = build_views("simclr", 32).specs[0]
    assert default.jitter == pytest.approx((0.8, 0.8, 0.8, 0.2)) and default.blur_p == 0.5
    assert build_views("simclr", 224).specs[0].blur_kernel == 23


def test_multicrop_local_sizes():
    p = build_views("multicrop", 32, n_local=3, local_size=12)
    views = p(_batch(4), seed=1)
    assert [v.shape[-1] for v in views] == [32, 32, 12, 12, 12] and p.local_size == 12
    assert build_views("multicrop", 224).local_size == 96
    assert build_views("multicrop", 64).local_size == 24
    assert len(build_views("multicrop", 32, n_local=0)(_batch(2), seed=0)) == 2
    s = build_views("multicrop", 32).specs
    assert s[0].scale == (0.4, 1.0) and s[2].scale == (0.05, 0.4)
    assert (s[0].blur_p, s[1].blur_p, s[2].blur_p) == (1.0, 0.1, 0.5) and s[1].solarize_p == 0.2 and s[0].solarize_p == 0


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="valid options: crop_scale, jitter_strength"):
        build_views("simclr", 32, jitter=0.5)
    with pytest.raises(ConfigError, match=r"valid options: \(none\)"):
        build_views("none", 32, blur_prob=0.1)
    with pytest.raises(ConfigError, match="probability"):
        build_views("simclr", 32, blur_prob=1.5)
    with pytest.raises(ConfigError, match="crop_scale"):
        build_views("simclr", 32, crop_scale=(0.5, 0.2))
    with pytest.raises(ConfigError, match="local_size"):
        build_views("multicrop", 32, local_size=64)
    with pytest.raises(ConfigError, match="valid choices"):
        build_views("simclrr", 32)
    with pytest.raises(ConfigError, match="image_size"):
        build_views("simclr", 2)


def test_float_input_and_other_sizes():
    policy = build_views("simclr", 24)
    x = _batch(4, size=40)
    a = policy(x, seed=0)
    b = policy(x.float() / 255, seed=0)
    assert a[0].shape == (4, 3, 24, 24)
    assert torch.allclose(a[0], b[0], atol=1e-5)


@pytest.mark.parametrize("name", ["simclr", "byol", "multicrop"])
def test_ranks_holding_rows_of_the_global_batch_get_one_process_views(name):
    """Under torchrun rank r holds rows [r·b, (r+1)·b); with `batch_rows` its views are exactly those rows of
    the one-process views of the global batch (crops, jitter, kornia grayscale/blur, solarize), for W = 2 and 4."""
    from visrep.data.batch_rows import batch_rows

    policy = build_views(name, 16)
    images = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    full = policy(images, seed=11)
    for world in (2, 4):
        b = 8 // world
        for rank in range(world):
            rows = slice(rank * b, (rank + 1) * b)
            with batch_rows(rank * b, b, 8):
                part = policy(images[rows], seed=11)
            for v_full, v_part in zip(full, part):
                torch.testing.assert_close(v_part, v_full[rows], rtol=0, atol=1e-6)
    own = policy(images[:4], seed=11)  # without the context the rows draw on their own: other views
    assert not torch.allclose(own[0], full[0][:4])


def test_batch_rows_docstring_example():
    import doctest

    import visrep.data.batch_rows as mod

    result = doctest.testmod(mod)
    assert result.attempted > 0 and result.failed == 0
