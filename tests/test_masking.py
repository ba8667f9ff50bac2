"""Masked image modelling: mask generators, the masked forward, pixel targets and the HPM losses."""
import math

import pytest
import torch

import visrep
from visrep.data.masking import MASKS, HardPatchesMask, build_mask_generator, num_masked
from visrep.errors import ConfigError
from visrep.models import build_backbone
from visrep.models.masked import encode_masked, patchify, sincos_2d, unpatchify
from visrep.objectives.reconstruction import HPMLoss, ReconstructionLoss, per_patch_loss, relative_loss

from conftest import tiny_overrides


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- mask generators
@pytest.mark.parametrize("name, ratio, grid", [("random", 0.75, (8, 8)), ("random", 0.6, (14, 14)),
                                               ("block", 0.4, (8, 8)), ("block", 0.75, (14, 14)),
                                               ("hard_patches", 0.75, (8, 8))])
def test_mask_counts_are_exact(name, ratio, grid):
    gen = build_mask_generator({"name": name, "ratio": ratio})
    L = grid[0] * grid[1]
    scores = torch.randn(16, L)
    if name == "hard_patches":
        gen.alpha = 0.5
    m = gen(16, grid, _gen(), scores)
    assert m.shape == (16, L) and m.dtype == torch.bool
    assert (m.sum(1) == math.floor(L * ratio + 1e-9)).all()
    # hand counts: 64·0.75 = 48, 196·0.6 = 117.6 -> 117, 64·0.4 = 25.6 -> 25
    assert num_masked(64, 0.75) == 48 and num_masked(196, 0.6) == 117 and num_masked(64, 0.4) == 25


def test_masks_are_seeded_and_differ_per_image():
    gen = build_mask_generator({"name": "random", "ratio": 0.5})
    a, b = gen(4, (4, 4), _gen(1)), gen(4, (4, 4), _gen(1))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    blk = build_mask_generator({"name": "block", "ratio": 0.5})
    assert torch.equal(blk(4, (8, 8), _gen(3)), blk(4, (8, 8), _gen(3)))


def test_block_masks_are_blocks():
    """BEiT blocks: with a 4-patch minimum, a masked patch has a masked 4-neighbour far more often than random."""
    def neighbour_rate(m):
        m = m.view(-1, 8, 8).float()
        nb = torch.zeros_like(m)
        nb[:, 1:] += m[:, :-1]; nb[:, :-1] += m[:, 1:]; nb[:, :, 1:] += m[:, :, :-1]; nb[:, :, :-1] += m[:, :, 1:]
        return ((nb > 0) & (m > 0)).sum() / m.sum()
    blk = build_mask_generator({"name": "block", "ratio": 0.3, "min_patches": 4})(64, (8, 8), _gen())
    rnd = build_mask_generator({"name": "random", "ratio": 0.3})(64, (8, 8), _gen())
    assert neighbour_rate(blk) > neighbour_rate(rnd) + 0.1


def test_hard_patches_takes_the_top_predicted_then_random():
    gen = HardPatchesMask(ratio=0.5, alpha_end=0.5)
    gen.alpha = 0.5
    scores = torch.arange(16.0).repeat(3, 1)  # patch 15 hardest
    m = gen(3, (4, 4), _gen(), scores)
    # n = 8 masked, ⌊16·0.5·0.5⌋ = 4 hardest: patches 12..15 always masked; 4 more at random among 0..11
    assert m[:, 12:].all() and (m[:, :12].sum(1) == 4).all()
    gen.alpha = 0.0
    m0 = gen(3, (4, 4), _gen(), scores)
    assert (m0.sum(1) == 8).all() and not m0[:, 12:].all()


def test_alpha_schedule_rises_linearly_from_0_to_half():
    a = HardPatchesMask.alpha_at
    # per step (alpha_schedule=step): α = 0.5·t/T
    assert a(0, 100) == 0.0 and a(50, 100) == 0.25 and a(100, 100) == 0.5 and a(25, 100) == 0.125
    # per epoch (official): α = 0.5·(e + 1)/E; 12 epochs of 10 steps: step 30 is epoch 3 -> 0.5·4/12
    assert a(30, 120, 0.5, steps_per_epoch=10) == pytest.approx(0.5 * 4 / 12)
    assert a(39, 120, 0.5, steps_per_epoch=10) == a(30, 120, 0.5, steps_per_epoch=10)  # constant within an epoch
    assert a(0, 120, 0.5, steps_per_epoch=10) == pytest.approx(0.5 / 12) and a(119, 120, 0.5, 10) == 0.5
    gen = HardPatchesMask(ratio=0.75)
    gen.set_progress(30, 120, 10)
    assert gen.alpha == pytest.approx(0.5 * 4 / 12)
    gen = HardPatchesMask(ratio=0.75, alpha_schedule="step")
    gen.set_progress(30, 120, 10)
    assert gen.alpha == pytest.approx(0.125)


def test_linear_teacher_momentum_per_epoch_as_in_hpm():
    from visrep.train.schedules import momentum_schedule

    # 0.999 -> 0.9999 linearly over the first 100 epochs, constant within an epoch, then 0.9999
    m = momentum_schedule(0.999, 0.9999, 300, "linear", steps_per_epoch=2, epochs=100)
    assert m[0] == m[1] == pytest.approx(0.999) and m[2] == pytest.approx(0.999 + 0.0009 / 100)
    assert m[100] == pytest.approx(0.999 + 0.0009 / 2) and m[200] == m[299] == pytest.approx(0.9999)


def test_mask_config_errors_are_one_sentence():
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        build_mask_generator({"name": "random", "ratio": 1.0})
    with pytest.raises(ConfigError, match="did you mean 'random'"):
        build_mask_generator({"name": "randon", "ratio": 0.5})
    with pytest.raises(ConfigError, match="unknown option"):
        build_mask_generator({"name": "random", "ratio": 0.5, "alpha_end": 0.5})
    with pytest.raises(ConfigError, match="mode must be one of"):
        build_mask_generator({"name": "random", "ratio": 0.5, "mode": "zero"})
    assert set(MASKS.names()) == {"random", "block", "hard_patches"}


# ---------------------------------------------------------------- targets and losses
def test_patchify_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 12)
    # patch 1 = rows 0-1, cols 2-3; first pixel (0, 2) channels 0,1,2
    assert p[0, 1, :3].tolist() == [x[0, 0, 0, 2].item(), x[0, 1, 0, 2].item(), x[0, 2, 0, 2].item()]
    assert torch.equal(unpatchify(p, 2, 2, 2), x)


def test_reconstruction_loss_hand_computed():
    pred = torch.zeros(1, 2, 4)
    tgt = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]])
    mask = torch.tensor([[True, False]])  # only patch 0 counts
    # raw MSE: (1 + 4 + 9 + 16) / 4 = 7.5
    assert ReconstructionLoss(loss="mse", norm_pix=False)([pred], [tgt], mask=mask).item() == pytest.approx(7.5)
    # norm_pix: patch 0 -> (x − 2.5)/sqrt(var_unbiased + 1e-6), var = 5/3; MSE vs 0 = mean(t²) = (3/4)·var/(var+ε)
    var = 5.0 / 3.0
    assert ReconstructionLoss(loss="mse", norm_pix=True)([pred], [tgt], mask=mask).item() == pytest.approx(
        0.75 * var / (var + 1e-6), rel=1e-5)
    # SimMIM L1: mean |0 − x| over patch 0 = 2.5
    assert ReconstructionLoss(loss="l1", norm_pix=False)([pred], [tgt], mask=mask).item() == pytest.approx(2.5)
    assert per_patch_loss(pred, tgt)[0, 1].item() == pytest.approx(25.0)


def test_relative_loss_hand_computed():
    """One image, masked patches {0, 1, 2} (patch 3 unmasked), t = (1, 3, 3, 9), p = (0, 1, 2, 5).

    Untied ordered pairs among masked patches: (0,1), (1,0), (0,2), (2,0); (1,2) and (2,1) tie, patch 3 is
    not masked. BCE(σ(p_j − p_i), 1[t_j > t_i]): (0,1): −log σ(1); (1,0): −log(1 − σ(−1)) = −log σ(1);
    (0,2): −log σ(2); (2,0): −log σ(2). Mean = (2·softplus(−1) + 2·softplus(−2)) / 4.
    """
    p = torch.tensor([[0.0, 1.0, 2.0, 5.0]])
    t = torch.tensor([[1.0, 3.0, 3.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    sp = torch.nn.functional.softplus
    expected = (2 * sp(torch.tensor(-1.0)) + 2 * sp(torch.tensor(-2.0))) / 4
    assert relative_loss(p, t, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    # wrong order is penalised more: swapping the predictions of patches 0 and 2
    assert relative_loss(torch.tensor([[2.0, 1.0, 0.0, 5.0]]), t, mask) > relative_loss(p, t, mask)
    # batched = per-image average weighted by pair counts (here two identical images)
    assert relative_loss(p.repeat(2, 1), t.repeat(2, 1), mask.repeat(2, 1)).item() == pytest.approx(expected.item())


def test_hpm_loss_is_reconstruction_plus_prediction_and_t_is_detached():
    pred = torch.zeros(1, 2, 3, requires_grad=True)
    tgt = torch.tensor([[[1.0] * 3, [2.0] * 3]])
    m, lp = torch.tensor([[True, True]]), torch.zeros(1, 2, requires_grad=True)
    terms = HPMLoss(norm_pix=False)([pred], [tgt], mask=m, loss_pred=lp)
    loss = terms["loss"]
    assert loss.item() == pytest.approx((1 + 4) / 2 + math.log(2), rel=1e-6)
    # the two terms, logged as they are: ℓ_rec = (1 + 4)/2, ℓ_pred = log 2 (uniform softmax over 2 patches)
    assert terms["reconstruction"].item() == pytest.approx(2.5) and terms["loss_prediction"].item() == pytest.approx(math.log(2))
    assert not terms["reconstruction"].requires_grad
    loss.backward()
    # reconstruction gradient only: d/dpred of mean over 2 patches of mean_k (pred − t)² = 2(pred − t)/(2·3)
    assert torch.allclose(pred.grad, -(tgt / 3.0))


# ---------------------------------------------------------------- masked forward
@pytest.mark.parametrize("name", ["vit_tiny", "illama_tiny"])
def test_drop_mode_encoder_never_sees_masked_patches(name):
    torch.manual_seed(0)
    bb = build_backbone(name, image_size=16, patch_size=4, depth=2).eval()
    x = torch.randn(2, 3, 16, 16)
    mask = build_mask_generator({"name": "random", "ratio": 0.75})(2, (4, 4), _gen())
    tokens, pooled = encode_masked(bb, x, mask)
    assert tokens.shape == (2, 4, 192) and pooled.shape == (2, 192)
    # change every masked patch's pixels: the output must not move
    px = patchify(x, 4)
    px2 = torch.where(mask.unsqueeze(-1), torch.randn_like(px), px)
    t2, p2 = encode_masked(bb, unpatchify(px2, 4, 4, 4), mask)
    assert torch.allclose(tokens, t2, atol=1e-5) and torch.allclose(pooled, p2, atol=1e-5)
    # token mode: masked patches replaced by the mask token, also blind to their pixels, all L tokens out
    tok = torch.randn(1, 1, 192)
    a, _ = encode_masked(bb, x, mask, tok)
    b, _ = encode_masked(bb, unpatchify(px2, 4, 4, 4), mask, tok)
    assert a.shape == (2, 16, 192) and torch.allclose(a, b, atol=1e-5)
    # no mask: the plain forward's pooled feature
    _, full = encode_masked(bb, x)
    assert torch.allclose(full, bb(x), atol=1e-5)


def test_sincos_position_embedding_is_fixed_and_mae_like():
    t = sincos_2d(8, 2, 3)
    assert t.shape == (6, 8)
    # position (row 1, col 2): first half encodes the row, second the column; ω = (1, 10000^(−1/2))
    row = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    col = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    assert torch.allclose(t[5], torch.tensor(row + col), atol=1e-6)
    bb = build_backbone("vit_tiny", image_size=16, patch_size=4, depth=1, pos_embed="sincos")
    assert not bb.pos_embed.requires_grad and torch.equal(bb.pos_embed[0, 0], torch.zeros(192))


# ---------------------------------------------------------------- presets through the one loop
def _mim_overrides(tmp_path, method, backbone="vit_tiny", **extra):
    over = tiny_overrides(tmp_path, method=method)
    over["backbone"] = {"name": backbone, "options": {"depth": 2, "patch_size": 4}}
    over.pop("projector", None)
    dec = {"type": "mae", "dim": 32, "depth": 1, "heads": 2}
    if method in ("mae", "hpm", "hpm_loss_pred_only"):
        over["decoder"] = dec
    if method in ("hpm", "hpm_loss_pred_only"):
        over["loss_predictor"] = dec
    over.update(extra)
    return over


def test_hpm_resume_equals_uninterrupted_run(tmp_path):
    """Masks (seeded per step), α_t, the EMA teacher and the optimizer all resume exactly."""
    from visrep.checkpoint import load_checkpoint

    visrep.pretrain(visrep.resolve(_mim_overrides(tmp_path / "a", "hpm")), quiet=True)
    part = _mim_overrides(tmp_path / "b", "hpm")
    part["train"]["max_steps"] = 3
    visrep.pretrain(visrep.resolve(part), quiet=True)
    part["train"]["max_steps"] = None
    visrep.pretrain(visrep.resolve(part), resume=True, quiet=True)
    ta, _ = load_checkpoint(tmp_path / "a" / "run")
    tb, _ = load_checkpoint(tmp_path / "b" / "run")
    assert any(k.startswith("model.teacher_loss_predictor.") for k in ta)
    for k in ta:
        if not k.startswith("rng."):
            assert torch.equal(ta[k], tb[k]), k


def test_mim_config_mistakes_fail_at_config_time(tmp_path):
    with pytest.raises(ConfigError, match="needs a loss_predictor"):
        visrep.resolve(_mim_overrides(tmp_path, "hpm", loss_predictor=None))
    with pytest.raises(ConfigError, match="needs a decoder"):
        visrep.resolve(_mim_overrides(tmp_path, "mae", decoder=None))
    with pytest.raises(ConfigError, match="unknown option 'width' for decoder 'mae'"):
        visrep.resolve(_mim_overrides(tmp_path, "mae", decoder={"type": "mae", "width": 3}))
    with pytest.raises(ConfigError, match="needs every patch token"):
        visrep.resolve(_mim_overrides(tmp_path, "mae", decoder={"type": "linear"}))
    over = _mim_overrides(tmp_path, "mae")
    over["backbone"] = {"name": "resnet18", "options": {"cifar_stem": True, "width": 8}}
    with pytest.raises(ConfigError, match="needs a ViT-style backbone"):
        visrep.pretrain(visrep.resolve(over), quiet=True)


def test_hpm_preset_matches_the_official_code(tmp_path):
    """Raw-pixel targets, linear per-epoch teacher momentum 0.999 -> 0.9999 over 100 epochs, a loss predictor
    that shares the reconstructor's input layers and predicts p·p·3 values averaged, the class token in both
    decoders, xavier init and LayerNorm eps 1e-6."""
    from visrep.methods import build_template

    cfg = visrep.resolve(_mim_overrides(tmp_path, "hpm"))
    assert cfg.objective.params["norm_pix"] is False
    assert (cfg.target.momentum, cfg.target.momentum_end, cfg.target.momentum_schedule, cfg.target.momentum_epochs) \
        == (0.999, 0.9999, "linear", 100)
    torch.manual_seed(0)
    model = build_template(cfg, 16, 4)
    dec, lp = model.decoder, model.loss_predictor
    assert not hasattr(lp, "embed") and not hasattr(lp, "mask_token") and lp.pred.out_features == 4 * 4 * 3
    assert all(float(m.bias.detach().abs().max()) == 0 for m in dec.modules() if isinstance(m, torch.nn.Linear))
    w = dec.pred.weight
    assert float(w.detach().abs().max()) <= math.sqrt(6 / (w.shape[0] + w.shape[1]))  # xavier-uniform bound
    assert all(m.eps == 1e-6 for m in (*dec.modules(), *lp.modules()) if isinstance(m, torch.nn.LayerNorm))
    # the loss prediction is a function of the shared input layers: its gradient reaches decoder.embed
    out = model.train()([torch.rand(2, 3, 16, 16)], 1, seed=0)
    out.extras["loss_pred"].sum().backward()
    assert float(dec.embed.weight.grad.abs().sum()) > 0 and float(dec.mask_token.grad.abs().sum()) > 0
    assert out.extras["loss_pred"].shape == (2, 16)


def test_mae_decoder_reads_the_class_token_and_drops_it_from_its_output():
    from visrep.models.decoders import MAEDecoder

    torch.manual_seed(0)
    dec = MAEDecoder(8, out_dim=5, dim=8, depth=1, heads=2).eval()
    tokens, cls = torch.randn(2, 4, 8), torch.randn(2, 8)
    x = dec.embed_input(tokens, None, (2, 2), cls)
    assert x.shape == (2, 5, 8) and torch.allclose(x[:, 0], dec.embed(cls))  # class token first, position zeros
    out = dec(tokens, None, (2, 2), cls)
    assert out.shape == (2, 4, 5)
    assert not torch.allclose(out, dec(tokens, None, (2, 2), cls + 1.0))       # it attends to the class token
    no_cls = MAEDecoder(8, out_dim=5, dim=8, depth=1, heads=2, cls_token=False).eval()
    assert torch.equal(no_cls(tokens, None, (2, 2), cls), no_cls(tokens, None, (2, 2), cls + 1.0))


@pytest.mark.parametrize("pos_embed", ["learn", "sincos"])
def test_encode_masked_without_a_mask_is_timms_own_forward(pos_embed):
    """`encode_masked` reaches into timm's ViT (_pos_embed, patch_drop, norm_pre); unmasked it must give exactly
    what timm's forward_features / forward_head give, so a timm release that changes those internals fails here."""
    from visrep.models.masked import encode_masked

    torch.manual_seed(0)
    bb = build_backbone("vit_tiny", image_size=16, patch_size=4, depth=2, pos_embed=pos_embed).eval()
    x = torch.randn(2, 3, 16, 16)
    tokens, pooled = encode_masked(bb, x)
    full = bb.forward_features(x)
    torch.testing.assert_close(tokens, full[:, bb.num_prefix_tokens:])
    torch.testing.assert_close(pooled, bb.forward_head(full, pre_logits=True))
    torch.testing.assert_close(pooled, bb(x))


@pytest.mark.parametrize("name", ["random", "block", "hard_patches"])
def test_masks_of_a_ranks_rows_equal_the_one_process_masks(name):
    """Each rank masks its rows of the global batch exactly as one process masks them (`batch_rows`)."""
    from visrep.data.batch_rows import batch_rows

    gen = build_mask_generator({"name": name, "ratio": 0.5})
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(3))
    if name == "hard_patches":
        gen.alpha = 0.5

    def masks(rows, offset=None):
        g = torch.Generator().manual_seed(5)
        if offset is None:
            return gen(len(range(6)[rows]), (4, 4), g, scores[rows])
        with batch_rows(offset, 2, 6):
            return gen(2, (4, 4), g, scores[rows])

    full = masks(slice(0, 6))
    for rank in range(3):
        rows = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(masks(rows, offset=2 * rank), full[rows]), rank
