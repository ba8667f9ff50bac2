"""iLLaMA: causal LLaMA blocks as a vision backbone (Wang et al. 2024)."""
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import visrep
from visrep.errors import ConfigError
from visrep.methods import METHODS
from visrep.models import build_backbone
from visrep.models import illama as il

from conftest import preset_overrides, tiny_overrides


def _attn(q, k, v, mask):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
    return s.softmax(-1) @ v


def test_soft_mask_endpoints_equal_bidirectional_and_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 5, 8).unbind(0)
    n = 5
    causal = torch.zeros(n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    r1 = il.soft_causal_mask(n, 1.0)
    r0 = il.soft_causal_mask(n, 0.0)
    assert torch.equal(r1, torch.zeros(n, n))
    assert torch.allclose(_attn(q, k, v, r1), _attn(q, k, v, torch.zeros(n, n)))
    assert torch.allclose(_attn(q, k, v, r0), _attn(q, k, v, causal))
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v, attn_mask=r0),
                          F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
    # in between: the future keys' weights are scaled by r before normalising (hand check, one row)
    r = 0.25
    s = (q @ k.transpose(-1, -2) / math.sqrt(8))[0, 1]      # image 0, row i = 1
    w = s.exp() * torch.tensor([1.0, 1.0, r, r, r])
    expected = (w / w.sum()) @ v[0]
    assert torch.allclose(_attn(q, k, v, il.soft_causal_mask(n, r))[0, 1], expected, atol=1e-6)


def _tiny(**kw):
    torch.manual_seed(0)
    opts = dict(image_size=16, patch_size=4, depth=2)
    opts.update(kw)
    return build_backbone("illama_tiny", **opts).eval()


def test_causal_mask_class_token_sees_all_patches_and_first_patch_only_itself():
    m = _tiny(soft_mask="none")
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    tokens = m.forward_features(x)           # [1, 16 patches + cls, D]
    assert tokens.shape == (1, 17, 192)
    # gradient of the first patch token w.r.t. the input lives only in the first 4x4 patch
    g0, = torch.autograd.grad(tokens[0, 0].sum(), x, retain_graph=True)
    assert g0[..., :4, :4].abs().sum() > 0
    g0[..., :4, :4] = 0
    assert g0.abs().sum() == 0
    # the post-sequence class token (last position) depends on every patch
    gc, = torch.autograd.grad(tokens[0, -1].sum(), x)
    per_patch = gc.abs().view(1, 3, 4, 4, 4, 4).sum(dim=(0, 1, 3, 5))
    assert (per_patch > 0).all()
    assert torch.allclose(m(x), tokens[:, -1])  # forward reads the last position


def test_rope_preserves_norms_and_depends_only_on_relative_position():
    torch.manual_seed(0)
    d = 16
    q, k = torch.randn(d), torch.randn(d)
    def rot(x, pos, axes=1):
        ang = il.rope_angles(torch.tensor([pos] if axes == 1 else [pos]).view(1, axes), d)
        return il.apply_rope(x.view(1, d), il.rope_cos_sin(ang)).view(d)
    for pos in (0, 3, 17):
        assert torch.allclose(rot(q, pos).norm(), q.norm(), atol=1e-5)
    # q_m · k_n depends only on m − n
    assert torch.allclose(rot(q, 5) @ rot(k, 2), rot(q, 13) @ rot(k, 10), atol=1e-4)
    assert not torch.allclose(rot(q, 5) @ rot(k, 2), rot(q, 5) @ rot(k, 4), atol=1e-3)
    assert torch.allclose(rot(q, 0), q)
    # 2-D axial: depends only on (Δrow, Δcol)
    r2 = lambda x, p: il.apply_rope(x.view(1, d), il.rope_cos_sin(il.rope_angles(torch.tensor([p]), d))).view(d)
    assert torch.allclose(r2(q, (3, 1)) @ r2(k, (1, 4)), r2(q, (7, 2)) @ r2(k, (5, 5)), atol=1e-4)
    assert torch.allclose(r2(q, (3, 1)).norm(), q.norm(), atol=1e-5)
    # pairs (i, i + d/2) rotate by m·θ_i with θ_i = 10000^(−2i/d): pair 0 at position 1 by exactly 1 radian,
    # pair 1 by 10000^(−2/16) radians
    e = torch.zeros(d); e[0] = 1.0
    out = rot(e, 1)
    assert out[0].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert out[d // 2].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert out.abs().sum().item() == pytest.approx(abs(math.cos(1.0)) + abs(math.sin(1.0)), abs=1e-6)
    e1 = torch.zeros(d); e1[1] = 1.0
    assert rot(e1, 1)[d // 2 + 1].item() == pytest.approx(math.sin(10000 ** (-2 / 16)), abs=1e-6)


@pytest.mark.parametrize("size, paper_millions", [("tiny", 5.7), ("small", 21.9), ("base", 86.3)])
def test_parameter_counts_match_the_paper(size, paper_millions):
    m = il.build_illama(size, image_size=224, patch_size=16, num_classes=1000)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n / 1e6 - paper_millions) / paper_millions < 0.02, n


def test_fused_causal_path_once_the_mask_is_fully_causal_and_one_mask_before():
    m = _tiny(soft_mask="linear", soft_mask_ratio=1.0, soft_mask_epochs=10)
    x = torch.randn(2, 3, 16, 16)
    calls = []
    real = F.scaled_dot_product_attention
    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
    masks = []
    real_mask = il.soft_causal_mask
    def mask_spy(*a, **kw):
        masks.append(1)
        return real_mask(*a, **kw)
    with mock.patch.object(il.F, "scaled_dot_product_attention", spy), mock.patch.object(il, "soft_causal_mask", mask_spy):
        m.set_progress(step=50, total_steps=1000, steps_per_epoch=10)   # epoch 5 of a 10-epoch linear ramp
        assert float(m.soft_mask_current) == pytest.approx(0.5)
        m(x)
        assert len(masks) == 1 and len(calls) == 2                      # one mask, shared by both blocks
        assert all(c[0] is calls[0][0] and c[1] is False for c in calls)
        calls.clear(); masks.clear()
        m.set_progress(step=100, total_steps=1000, steps_per_epoch=10)  # cutoff reached: fused causal
        m(x)
        assert masks == [] and all(c[0] is None and c[1] is True for c in calls)


def test_soft_mask_schedules():
    lin = _tiny(soft_mask="linear", soft_mask_ratio=1.0, soft_mask_epochs=4)
    assert [lin.ratio_at(e) for e in (0, 1, 2, 4, 9)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    const = _tiny(soft_mask="constant", soft_mask_ratio=0.6, soft_mask_epochs=4)
    assert [const.ratio_at(e) for e in (0, 3.9, 4)] == [0.6, 0.6, 0.0]
    assert _tiny(soft_mask="none").ratio_at(0) == 0.0
    with pytest.raises(ConfigError, match="soft_mask must be one of"):
        _tiny(soft_mask="cosine")


def test_illama_state_dict_keeps_the_soft_mask_ratio():
    m = _tiny(soft_mask="linear", soft_mask_epochs=4)
    m.set_progress(10, 100, 10)  # epoch 1 -> r = 0.75
    m2 = _tiny(soft_mask="linear", soft_mask_epochs=4)
    m2.load_state_dict(m.state_dict())
    assert float(m2.soft_mask_current) == pytest.approx(0.75)


@pytest.mark.parametrize("method", ["simclr", "byol", "supervised"])
def test_illama_trains_with_joint_embedding_and_supervised_presets(tmp_path, method):
    over = tiny_overrides(tmp_path, method=method)
    over["backbone"] = {"name": "illama_tiny", "options": {"depth": 2, "soft_mask_epochs": 1}}
    if method == "supervised":
        over["projector"] = {"type": "linear"}
    if method == "byol":
        over["predictor"] = {"hidden_dim": 32, "out_dim": 16}
    s = visrep.pretrain(visrep.resolve(over), quiet=True)
    assert s["steps"] == 4 and math.isfinite(s["final_loss"])


@pytest.mark.parametrize("backbone", ["illama_tiny", "vit_tiny"])
@pytest.mark.parametrize("method", METHODS.names())
def test_every_preset_runs_with_vit_and_illama(tmp_path, method, backbone):
    """One step of every method with a 1-block ViT / iLLaMA (the preset's heads shrunk), then a kNN eval."""
    over = preset_overrides(tmp_path, method)
    over["backbone"] = {"name": backbone, "options": {"depth": 1}}
    over["train"].update(epochs=1, max_steps=1)
    over["monitor"]["knn_every"] = 0
    s = visrep.pretrain(visrep.resolve(over), quiet=True)
    assert s["steps"] == 1 and math.isfinite(s["final_loss"])
    res = visrep.evaluate_knn(s["out_dir"], dataset="synthetic", dataset_options={"n": 64, "num_classes": 4},
                              image_size=16, progress=False, cache_dir=False)
    assert 0.0 <= res["top1"] <= 1.0
