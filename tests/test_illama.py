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
    # the official form at r = 0 still normalises over the future keys, so a patch's token depends (weakly)
    # on later patches; the renormalised form is exactly causal
    official = _tiny(soft_mask="none")
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    g, = torch.autograd.grad(official.forward_features(x)[0, 0].sum(), x)
    g[..., :4, :4] = 0
    assert g.abs().sum() > 0
    m = _tiny(soft_mask="none", soft_mask_form="renormalised")
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


@pytest.mark.parametrize("size, official", [("tiny", 5_701_096), ("small", 22_018_024), ("base", 86_502_376)])
def test_parameter_counts_equal_the_official_code(size, official):
    m = il.build_illama(size, image_size=224, patch_size=16, num_classes=1000)
    assert sum(p.numel() for p in m.parameters()) == official


def test_official_soft_mask_multiplies_the_softmax_without_renormalising():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, 4, 8).unbind(0)   # [B=1, H=1, N=4, d=8]
    r = 0.25
    M = il.official_soft_mask(4, r)
    assert torch.equal(M, torch.tensor([[1, r, r, r], [1, 1, r, r], [1, 1, 1, r], [1, 1, 1, 1.0]]))
    s = (q @ k.transpose(-1, -2))[0, 0, 1] / math.sqrt(8)            # row i = 1
    w = s.softmax(-1) * torch.tensor([1.0, 1.0, r, r])                # scaled after normalising: sums to < 1
    out = il.attend(q, k, v, ("multiply", M))
    assert torch.allclose(out[0, 0, 1], w @ v[0, 0], atol=1e-6) and float(w.sum()) < 1
    # r = 0: the official "causal" attention divides by the future keys too, so it is not causal attention
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    official0 = il.attend(q, k, v, ("multiply", il.official_soft_mask(4, 0.0)))
    assert torch.allclose(official0[0, 0, -1], causal[0, 0, -1], atol=1e-6)  # the last row sees every key
    assert not torch.allclose(official0[0, 0, 0], causal[0, 0, 0], atol=1e-3)
    # r = 1: both forms are bidirectional attention
    bi = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(il.attend(q, k, v, ("multiply", il.official_soft_mask(4, 1.0))), bi, atol=1e-6)


def test_official_recipes_per_size():
    assert [(il.ILLAMA_RECIPES[s]["soft_mask"], il.ILLAMA_RECIPES[s]["soft_mask_epochs"]) for s in ("tiny", "small", "base")] \
        == [("constant", 50.0), ("linear", 50.0), ("linear", 25.0)]
    base = il.build_illama("base", image_size=32, patch_size=16, depth=3)
    assert [float(getattr(b.drop_path, "drop_prob", 0.0)) for b in base.blocks] == pytest.approx([0.0, 0.2, 0.4])
    tiny = il.build_illama("tiny", image_size=32, patch_size=16, depth=2)
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in tiny.blocks)
    assert tiny.soft_mask_form == "official" and "pos_embed" in tiny.no_weight_decay()
    assert tiny.pos_embed.shape == (1, 5, 192) and tiny.blocks[0].attn.qkv.bias is not None


def test_renormalised_form_one_mask_then_the_fused_causal_kernel():
    m = _tiny(soft_mask="linear", soft_mask_ratio=1.0, soft_mask_epochs=10, soft_mask_form="renormalised")
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
        m.set_progress(step=33, total_steps=1000, steps_per_epoch=10)   # step 33 of a 100-step linear ramp
        assert float(m.soft_mask_current) == pytest.approx(1 - 33 / 99)
        m(x)
        assert len(masks) == 1 and len(calls) == 2                      # one mask, shared by both blocks
        assert all(c[0] is calls[0][0] and c[1] is False for c in calls)
        calls.clear(); masks.clear()
        m.set_progress(step=100, total_steps=1000, steps_per_epoch=10)  # cutoff reached: fused causal
        m(x)
        assert masks == [] and all(c[0] is None and c[1] is True for c in calls)


def test_soft_mask_schedules():
    # the official mask_scheduler: linspace(r, 0, n) over the n = epochs x steps-per-epoch early steps, then 0
    lin = _tiny(soft_mask="linear", soft_mask_ratio=1.0, soft_mask_epochs=2)
    assert [lin.ratio_at(s, steps_per_epoch=2) for s in range(6)] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 0.0, 0.0])
    const = _tiny(soft_mask="constant", soft_mask_ratio=0.6, soft_mask_epochs=2)
    assert [const.ratio_at(s, steps_per_epoch=2) for s in (0, 3, 4)] == [0.6, 0.6, 0.0]
    assert _tiny(soft_mask="none").ratio_at(0, 1) == 0.0
    with pytest.raises(ConfigError, match="soft_mask must be one of"):
        _tiny(soft_mask="cosine")


def test_illama_state_dict_keeps_the_soft_mask_ratio():
    m = _tiny(soft_mask="linear", soft_mask_epochs=4)
    m.set_progress(13, 100, 10)  # step 13 of 40 -> r = 1 − 13/39
    m2 = _tiny(soft_mask="linear", soft_mask_epochs=4)
    m2.load_state_dict(m.state_dict())
    assert float(m2.soft_mask_current) == pytest.approx(1 - 13 / 39)


@pytest.mark.parametrize("method", ["simclr", "byol", "supervised"])
def test_illama_trains_with_joint_embedding_and_supervised_presets(tmp_path, method):
    over = tiny_overrides(tmp_path, method=method)
    over["backbone"] = {"name": "illama_tiny", "options": {"depth": 2, "soft_mask_epochs": 1}}
    if method == "supervised":
        over["classifier"] = {"type": "linear"}
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


def test_the_ema_teacher_has_no_drop_path():
    from visrep.methods import build_template

    cfg = visrep.resolve({"method": "byol", "backbone": {"name": "illama_small", "options": {"depth": 3}},
                          "data": {"image_size": 32}})
    model = build_template(cfg, 32, 10)
    student = [m.drop_prob for m in model.backbone.modules() if hasattr(m, "drop_prob")]
    teacher = [m.drop_prob for m in model.teacher_backbone.modules() if hasattr(m, "drop_prob")]
    assert max(student) == pytest.approx(0.1) and teacher and max(teacher) == 0.0
