"""Faceptor's parts: multi-dataset batches (one sampler per task), and their resume."""
import doctest
import json
from pathlib import Path
import math
import importlib

import pytest
import torch

from visrep.data.multitask import TaskBatches
from visrep.data.sources import ImageDataset
from visrep.errors import ConfigError


def _ds(n: int, name: str, size: int = 4) -> ImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return ImageDataset(images, torch.arange(n), [str(i) for i in range(n)], name)


@pytest.mark.parametrize("module", ["visrep.data.multitask", "visrep.data.batches"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_each_task_sees_every_sample_once_per_pass_and_restarts_on_its_own():
    batches = TaskBatches({"big": _ds(12, "big"), "small": _ds(5, "small")}, {"big": 3, "small": 2}, seed=0)
    assert batches.steps_per_pass == {"big": 4, "small": 2} and batches.steps_per_epoch == 4
    seen = {"big": [], "small": []}
    for step in range(8):
        b = batches(step)
        for name, (lo, hi) in b["task_slices"].items():
            assert torch.equal(b["images"][lo:hi, 0, 0, 0].long(), b["task_labels"][name])  # rows and labels agree
            seen[name].append(b["task_labels"][name].tolist())
    big = [x for batch in seen["big"] for x in batch]
    assert sorted(big[:12]) == list(range(12)) and sorted(big[12:]) == list(range(12))  # two whole passes
    small = [x for batch in seen["small"] for x in batch]
    for p in range(4):  # 2 steps per pass: 4 of its 5 images each pass (the remainder is dropped), new order each
        assert len(set(small[4 * p:4 * p + 4])) == 4
    assert small[0:4] != small[4:8]  # each pass is a new permutation


def test_a_resumed_sampler_draws_what_an_uninterrupted_one_does_and_ranks_split_each_task():
    data = {"a": _ds(10, "a"), "b": _ds(7, "b")}
    run = TaskBatches(data, {"a": 4, "b": 2}, seed=3)
    history = [run(s) for s in range(9)]
    resumed = TaskBatches(data, {"a": 4, "b": 2}, seed=3)  # a new process, started at step 6
    for s in range(6, 9):
        assert torch.equal(resumed(s)["images"], history[s]["images"])
    ranks = [TaskBatches(data, {"a": 4, "b": 2}, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in range(9):
        for name in data:
            joined = torch.cat([r(s)["task_labels"][name] for r in ranks])
            assert torch.equal(joined, history[s]["task_labels"][name])
    # adding a task leaves the others' order as it was
    more = TaskBatches({**data, "c": _ds(6, "c")}, {"a": 4, "b": 2, "c": 3}, seed=3)
    assert torch.equal(more(5)["task_labels"]["b"], history[5]["task_labels"]["b"])


def test_sampler_mistakes_are_one_sentence():
    with pytest.raises(ConfigError, match="holds only 3 images"):
        TaskBatches({"a": _ds(3, "a")}, {"a": 4}, seed=0)
    with pytest.raises(ConfigError, match="differ in size"):
        TaskBatches({"a": _ds(8, "a", 4), "b": _ds(8, "b", 6)}, {"a": 2, "b": 2}, seed=0)
    with pytest.raises(ConfigError, match="multiple of the 2 processes"):
        TaskBatches({"a": _ds(8, "a")}, {"a": 3}, seed=0, world_size=2)


# ------------------------------------------------------------------------------------------------ the model parts
from visrep.models import build_backbone  # noqa: E402
from visrep.models.faceptor import (FaceptorDecoder, LayerAttentionMemory, MapHead, TaskQueries,  # noqa: E402
                                    ValueHead, encoder_levels, sine_2d, soft_argmax_points)


def test_faceptor_docstring_examples():
    import visrep.models.faceptor as mod

    result = doctest.testmod(mod)
    assert result.attempted > 0 and result.failed == 0


def test_adding_a_task_costs_exactly_its_two_query_tables():
    queries = TaskQueries(32, {"age": 101, "gender": 2})
    before = sum(p.numel() for p in queries.parameters())
    queries.add("smile", 2)
    assert sum(p.numel() for p in queries.parameters()) - before == 2 * 2 * 32
    with pytest.raises(ConfigError, match="declared twice"):
        queries.add("age", 3)


def test_sine_2d_is_the_sine_of_the_normalised_grid_centre():
    e = sine_2d(2, 4, 8)  # 4 features per axis: [sin(2π c), sin(2π c / 100), cos(2π c), cos(2π c / 100)]
    assert e.shape == (8, 8)
    c_y, c_x = 0.25, 0.625  # row 0 of 2, column 2 of 4
    want_y = [math.sin(2 * math.pi * c_y), math.sin(2 * math.pi * c_y / 100), math.cos(2 * math.pi * c_y),
              math.cos(2 * math.pi * c_y / 100)]
    want_x = [math.sin(2 * math.pi * c_x), math.sin(2 * math.pi * c_x / 100), math.cos(2 * math.pi * c_x),
              math.cos(2 * math.pi * c_x / 100)]
    assert torch.allclose(e[2], torch.tensor(want_y + want_x), atol=1e-6)


def test_a_decoder_layer_is_cross_attention_then_self_attention_then_ffn_post_norm():
    torch.manual_seed(0)
    dec = FaceptorDecoder(dim=8, depth=1, heads=2, ffn_dim=16).eval()
    layer = dec.layers[0]
    x, qp, m, mp = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    a = layer.norm1(x + layer.cross(x + qp, m + mp, m)[0])  # keys carry the memory's position, values do not
    b = layer.norm2(a + layer.self_attn(a + qp, a + qp, a)[0])
    want = layer.norm3(b + layer.ffn(b))
    assert torch.allclose(dec(x, qp, m, mp), want, atol=1e-6)
    swapped = layer.norm1(x + layer.self_attn(x + qp, x + qp, x)[0])  # the other order gives something else
    assert not torch.allclose(want, layer.norm3(swapped + layer.ffn(swapped)), atol=1e-3)


@pytest.mark.parametrize("name", ["vit_tiny", "illama_tiny"])
def test_layer_attention_reads_several_levels_and_stage_two_adds_only_its_new_parameters(name):
    torch.manual_seed(0)
    backbone = build_backbone(name, image_size=32, patch_size=8, depth=4).eval()
    x = torch.rand(2, 3, 32, 32)
    maps, grid = encoder_levels(backbone, x, [3])
    assert grid == (4, 4) and maps[0].shape == (2, 16, backbone.embed_dim)
    if name == "illama_tiny":  # the last level (through the final norm) is what the encoder itself returns
        assert torch.allclose(maps[0], backbone.forward_masked(x)[0], atol=1e-5)
    else:
        assert torch.allclose(maps[0], backbone.forward_features(x)[:, backbone.num_prefix_tokens:], atol=1e-5)
    memory = LayerAttentionMemory(backbone.embed_dim, 16, [3])
    m, pos, last = memory(maps, grid)
    assert m.shape == (2, 16, 16) and pos.shape == (1, 16, 16) and torch.equal(last, m)
    before = {k for k, _ in memory.named_parameters()}
    memory.add_levels([0, 1])
    added = {k: p.numel() for k, p in memory.named_parameters() if k not in before}
    assert added == {"new_proj.0.weight": 16 * backbone.embed_dim, "new_proj.0.bias": 16,
                     "new_proj.1.weight": 16 * backbone.embed_dim, "new_proj.1.bias": 16, "new_level_embed": 2 * 16}
    maps, grid = encoder_levels(backbone, x, memory.all_levels)
    m2, pos2, last2 = memory(maps, grid)
    assert m2.shape == (2, 48, 16) and torch.equal(m2[:, :16], m) and torch.equal(last2, last)
    with pytest.raises(ConfigError, match="must be new"):
        memory.add_levels([3])
    with pytest.raises(ConfigError, match="does not exist"):
        encoder_levels(backbone, x, [4])


def test_value_and_map_heads_give_one_output_per_query():
    q, tokens = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    assert ValueHead(16)(q).shape == (2, 5)
    maps = MapHead(16)(q, tokens, (3, 3))
    assert maps.shape == (2, 5, 12, 12) and soft_argmax_points(maps).shape == (2, 5, 2)


# ------------------------------------------------------------------------------------------------ the losses
from visrep.objectives.faces import (dldl_v2_loss, expected_age, gaussian_heatmaps, landmark_loss,  # noqa: E402
                                     task_weights)


def test_face_loss_docstring_examples():
    import visrep.objectives.faces as mod

    result = doctest.testmod(mod)
    assert result.attempted >= 3 and result.failed == 0


def test_dldl_v2_on_a_hand_computed_case():
    # 3 bins, true age 1, σ = 1: q ∝ (e^-0.5, 1, e^-0.5); logits with sigmoid (0.5, 0.5, 0.5) → p = (1/3, 1/3, 1/3)
    q = torch.tensor([math.exp(-0.5), 1.0, math.exp(-0.5)])
    q = q / q.sum()
    kl = float((q * torch.log(q * 3)).sum())
    assert float(dldl_v2_loss(torch.zeros(1, 3), torch.tensor([1.0]), sigma=1.0)) == pytest.approx(kl + 0.0, abs=1e-6)
    assert float(expected_age(torch.zeros(1, 3))) == pytest.approx(1.0)
    # a confident wrong prediction costs more than a right one
    right, wrong = torch.tensor([[-9.0, 9.0, -9.0]]), torch.tensor([[9.0, -9.0, -9.0]])
    assert dldl_v2_loss(right, torch.tensor([1.0])) < dldl_v2_loss(wrong, torch.tensor([1.0]))


def test_landmark_loss_and_its_gaussian_targets():
    pts = torch.tensor([[[0.375, 0.625]]])  # in a 4×4 heatmap: pixel column 1, row 2
    g = gaussian_heatmaps(pts, (4, 4), sigma=1.0)
    assert g.shape == (1, 1, 4, 4) and float(g[0, 0, 2, 1]) == pytest.approx(1.0)
    assert float(g[0, 0, 2, 2]) == pytest.approx(math.exp(-0.5))
    logits = torch.zeros(1, 1, 4, 4)
    bce = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, g))
    assert float(landmark_loss(logits, pts, pts, sigma=1.0)) == pytest.approx(bce)  # perfect points: BCE only
    off = pts + torch.tensor([0.3, 0.4])
    assert float(landmark_loss(logits, off, pts, sigma=1.0)) == pytest.approx(bce + 0.5)


def test_landmarks_outside_the_image_are_refused_when_the_task_loads(tmp_path):
    fake_mtfl_folder(tmp_path)
    listing = tmp_path / "MTFL" / "training.txt"
    first, *rest = listing.read_text().splitlines()
    fields = first.split()
    fields[1] = "45"  # x1 beyond the 40-pixel-wide image
    listing.write_text("\n".join([" ".join(fields), *rest]) + "\n")
    spec = resolve_tasks(["mtfl_landmarks"])[0]
    with pytest.raises(DataError, match="landmarks outside the image"):
        load_task_data(spec, "train", root=tmp_path, image_size=16)


def test_the_lists_of_output_types_agree():
    from visrep.data.tasks import OUTPUTS
    from visrep.models.faceptor import MAP_OUTPUTS, VALUE_OUTPUTS
    from visrep.objectives.faces import OUTPUT_TYPES

    assert set(OUTPUTS) == set(OUTPUT_TYPES) == set(VALUE_OUTPUTS + MAP_OUTPUTS)


def test_task_weights_are_normalised_within_each_type():
    w = task_weights({"a": ("multilabel", 2.0), "b": ("multilabel", 2.0), "c": ("landmarks", 1.0)},
                     {"multilabel": 1.0, "landmarks": 4.0})
    assert w == {"a": 0.5, "b": 0.5, "c": 4.0}
    with pytest.raises(ConfigError, match="every task has weight 0"):
        task_weights({"a": ("classification", 0.0)})


# ------------------------------------------------------------------------------------------------ tasks as data
from conftest import fake_utk_archive  # noqa: E402
from visrep.data.tasks import TASKS, load_task_data, num_queries, resolve_tasks  # noqa: E402
from visrep.errors import DataError  # noqa: E402


def _folder_dataset(root, classes=("happy", "sad", "surprised"), n=4, size=12):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_a_new_task_is_declared_by_config_alone(tmp_path):
    import yaml

    root = _folder_dataset(tmp_path / "expressions")
    declared = yaml.safe_load(f"""
tasks:
  - utkface_age
  - {{task: mtfl_smile, weight: 0.5}}
  - {{name: expression, dataset: imagefolder, data_dir: {root}, output: classification}}
""")["tasks"]
    specs = resolve_tasks(declared)
    assert [t.name for t in specs] == ["utkface_age", "mtfl_smile", "expression"]
    assert specs[1].weight == 0.5 and specs[1].dataset == "mtfl" and specs[2].loss == "cross_entropy"
    ds = load_task_data(specs[2], "train", image_size=16)
    assert ds.classes == ["happy", "sad", "surprised"] and num_queries(specs[2], ds) == 3


@pytest.mark.parametrize("entries, match", [
    ([], "non-empty list"),
    (["utkface_gender", "utkface_gender"], "used twice"),
    (["no_such_task"], "unknown task 'no_such_task'"),
    ([{"name": "x", "dataset": "utkface"}], "needs output"),
    ([{"name": "x", "dataset": "utkface", "output": "boxes"}], "output must be one of"),
    ([{"task": "utkface_age", "loss": "bce"}], "does not fit output 'age_distribution'"),
    ([{"task": "utkface_age", "weight": 0}], "every task has weight 0"),
    ([{"task": "utkface_age", "sigma": 2}], "unknown key"),
    ([{"task": "utkface_age", "queries": 0}], "positive integer"),
])
def test_task_mistakes_are_one_sentence(entries, match):
    with pytest.raises(ConfigError, match=match):
        resolve_tasks(entries)


@pytest.mark.filterwarnings("ignore:utkface. skipped")
def test_a_task_whose_data_lacks_its_labels_is_refused(tmp_path):
    fake_utk_archive(tmp_path / "utkface-96.tar.gz")
    wrong = resolve_tasks([{"task": "utkface_gender", "output": "age_distribution", "loss": None, "queries": None}])[0]
    with pytest.warns(UserWarning, match="malformed"), pytest.raises(DataError, match="needs one regression target"):
        load_task_data(wrong, "train", root=tmp_path, image_size=16)
    age = resolve_tasks(["utkface_age"])[0]
    ds = load_task_data(age, "train", root=tmp_path, image_size=16)
    assert num_queries(age, ds) == 101 and ds.targets.shape[1] == 1
    race = resolve_tasks([{"task": "utkface_race", "queries": 4}])[0]
    with pytest.raises(ConfigError, match="4 queries, but its data has 5 classes"):
        num_queries(race, load_task_data(race, "train", root=tmp_path, image_size=16))
    assert set(TASKS.names()) >= {"utkface_age", "utkface_gender", "utkface_race", "utkface_age_group",
                                  "mtfl_landmarks", "mtfl_smile", "mtfl_glasses", "mtfl_gender", "mtfl_pose"}


# ------------------------------------------------------------------------------------------------ the whole head
from visrep.models.faceptor import FaceptorHead, NaiveTaskHeads  # noqa: E402

TASKS3 = {"age": ("age_distribution", 101), "smile": ("classification", 2), "points": ("landmarks", 5)}


def _tiny_vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", image_size=32, patch_size=8, depth=3)


def test_the_head_decodes_each_tasks_rows_with_its_queries():
    vit, head = _tiny_vit(), FaceptorHead(192, TASKS3, dim=16, depth=2, heads=2, ffn_dim=32)
    x = torch.rand(6, 3, 32, 32)
    out = head(vit, x, {"age": (0, 2), "smile": (2, 5), "points": (5, 6)})
    assert out["age"]["values"].shape == (2, 101) and out["smile"]["values"].shape == (3, 2)
    assert out["points"]["heatmaps"].shape == (1, 5, 16, 16) and out["points"]["points"].shape == (1, 5, 2)
    alone = head(vit, x[2:5], {"smile": (0, 3)})  # a task's outputs depend on its own rows only
    assert set(alone) == {"smile"} and torch.allclose(alone["smile"]["values"], out["smile"]["values"], atol=1e-5)
    naive = NaiveTaskHeads(192, TASKS3, dim=16, levels=(0, 2))(vit, x, {"age": (0, 2), "smile": (2, 5), "points": (5, 6)})
    assert {k: tuple(v[next(iter(v))].shape) for k, v in naive.items()} == {"age": (2, 101), "smile": (3, 2),
                                                                            "points": (1, 5, 16, 16)}


def test_adding_a_task_to_the_head_adds_exactly_its_query_tables():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    base = FaceptorHead(192, TASKS3, dim=16, depth=2, heads=2, ffn_dim=32)
    more = FaceptorHead(192, {**TASKS3, "glasses": ("classification", 2), "pose": ("classification", 5)},
                        dim=16, depth=2, heads=2, ffn_dim=32)
    assert count(more) - count(base) == 2 * (2 + 5) * 16


def test_stage_two_trains_only_the_new_levels():
    vit, head = _tiny_vit(), FaceptorHead(192, TASKS3, dim=16, depth=2, heads=2, ffn_dim=32)
    trainable = head.stage2([0, 1])
    assert sorted(trainable) == ["memory.new_level_embed", "memory.new_proj.0.bias", "memory.new_proj.0.weight",
                                 "memory.new_proj.1.bias", "memory.new_proj.1.weight"]
    vit.requires_grad_(False)
    before = {k: v.detach().clone() for k, v in head.state_dict().items()}
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.1)
    x = torch.rand(4, 3, 32, 32)
    out, attention = head(vit, x, {"age": (0, 4)}, return_attention=True)
    out["age"]["values"].square().mean().backward()
    opt.step()
    changed = {k for k, v in head.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(trainable)
    profile = head.level_profile(attention["age"])
    assert profile.shape == (3,) and float(profile.sum()) == pytest.approx(1.0, abs=1e-5)
    weights = attention["age"].detach()  # levels [-1, 0, 1], 16 tokens each, in the memory's order
    by_hand = [float(weights[..., 16 * i:16 * (i + 1)].sum(-1).mean()) for i in range(3)]
    assert profile.tolist() == pytest.approx(by_hand, abs=1e-6)


def test_the_faceptor_objective_is_the_weighted_mean_of_the_task_losses():
    from visrep.objectives import build_objective

    fn = build_objective("faceptor", type_weights={"classification": 3.0})
    fn.set_tasks({"smile": ("classification", "cross_entropy", 1.0), "attrs": ("multilabel", "bce", 1.0)})
    outputs = {"smile": {"values": torch.zeros(2, 2)}, "attrs": {"values": torch.zeros(2, 3)}}
    labels = {"smile": torch.tensor([0, 1]), "attrs": torch.zeros(2, dtype=torch.long)}
    targets = {"smile": None, "attrs": torch.tensor([[1.0, 0.0, -1.0], [1.0, 1.0, 0.0]])}
    terms = fn([], [], task_outputs=outputs, task_labels=labels, task_targets=targets)
    ce, bce = math.log(2), 5 * math.log(2) / 2  # 5 known attribute labels, all at logit 0, summed / batch of 2
    assert float(terms["loss_smile"]) == pytest.approx(ce) and float(terms["loss_attrs"]) == pytest.approx(bce)
    assert float(terms["loss"]) == pytest.approx((3 * ce + 1 * bce) / 4)
    with pytest.raises(ConfigError, match="unknown output types boxes"):
        build_objective("faceptor", type_weights={"boxes": 1.0}).set_tasks({"smile": ("classification", "cross_entropy", 1.0)})
    with pytest.raises(ConfigError, match="must be >= 0"):
        build_objective("faceptor", type_weights={"multilabel": -1.0}).set_tasks({"a": ("multilabel", "bce", 1.0)})


# ------------------------------------------------------------------------------------------------ through the loop
import visrep  # noqa: E402
from conftest import fake_mtfl_folder  # noqa: E402
from visrep.checkpoint import load_checkpoint  # noqa: E402


def _faceptor_run(tmp_path, out: str, method: str = "faceptor", **extra) -> dict:
    from visrep.config import deep_merge

    root = tmp_path / "faces"
    if not root.exists():
        root.mkdir()
        fake_utk_archive(root / "utkface-96.tar.gz")
        fake_mtfl_folder(root)
    base = {"method": method, "seed": 0, "out_dir": str(tmp_path / out),
            "data": {"root": str(root), "image_size": 32},
            "tasks": ["utkface_age", "utkface_gender", "mtfl_landmarks", "mtfl_smile"],
            "backbone": {"name": "vit_tiny", "options": {"depth": 2, "patch_size": 8}},
            "task_head": ({"dim": 16, "depth": 1, "heads": 2, "ffn_dim": 32} if method == "faceptor" else {"dim": 16}),
            "train": {"epochs": 2, "batch_size": 8, "progress": False, "log_every": 1, "deterministic": True}}
    return deep_merge(base, extra)


@pytest.mark.filterwarnings("ignore:utkface. skipped")
@pytest.mark.parametrize("method", ["faceptor", "faceptor_naive"])
def test_faceptor_trains_in_the_one_loop_and_resumes_bit_exactly(tmp_path, method):
    full = visrep.pretrain(visrep.resolve(_faceptor_run(tmp_path, "full", method)), quiet=True)
    # 4 tasks x 2 per step; UTKFace holds 6 training faces (3 steps a pass), MTFL 8 (4 steps): epochs of 4 steps
    assert full["steps"] == 8 and math.isfinite(full["final_loss"])
    lines = (tmp_path / "full" / "metrics.jsonl").read_text()
    assert all(f'"loss_{t}"' in lines for t in ("utkface_age", "utkface_gender", "mtfl_landmarks", "mtfl_smile"))
    part = _faceptor_run(tmp_path, "part", method, train={"max_steps": 3})
    assert visrep.pretrain(visrep.resolve(part), quiet=True)["steps"] == 3
    part["train"]["max_steps"] = None
    assert visrep.pretrain(visrep.resolve(part), resume=True, quiet=True)["steps"] == 8
    a, _ = load_checkpoint(tmp_path / "full")
    b, meta = load_checkpoint(tmp_path / "part")
    assert meta["tasks"]["utkface_age"] == ["age_distribution", 101]
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model.", "optim.")))


# ------------------------------------------------------------------------------------------------ eval and predict
@pytest.mark.filterwarnings("ignore:utkface. skipped")
def test_eval_faceptor_and_predict_from_the_cli(tmp_path, capsys):
    import json

    from visrep.cli import main, run

    over = _faceptor_run(tmp_path, "run", train={"epochs": 1})
    visrep.pretrain(visrep.resolve(over), quiet=True)
    out = tmp_path / "eval" / "faces.json"
    assert run(["eval", "faceptor", "--model", str(tmp_path / "run"), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    res = json.loads(out.read_text())
    tasks = res["tasks"]
    assert set(tasks) == {"utkface_age", "utkface_gender", "mtfl_landmarks", "mtfl_smile"}
    assert tasks["utkface_age"]["metric"] == "mae" and tasks["utkface_age"]["mae"] >= 0
    assert tasks["mtfl_landmarks"]["metric"] == "nme" and "failure_rate" in tasks["mtfl_landmarks"]
    assert 0 <= tasks["utkface_gender"]["accuracy"] <= 1 and printed["tasks"]["mtfl_smile"]["metric"] == "accuracy"
    assert res["layer_attention"]["utkface_age"]["levels"] == [1]  # the last of the encoder's 2 blocks
    for fig in res["figures"].values():
        assert Path(fig).is_file() and Path(fig).stat().st_size > 1000

    face = next((tmp_path / "faces" / "MTFL" / "lfw_5590").glob("*.jpg"))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert run(["predict", "--model", str(tmp_path / "run"), str(face), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["utkface_gender"]["class"] in ("male", "female") and len(rows[0]["mtfl_landmarks"]["points_px"]) == 5
    assert all(0 <= v <= 40 for point in rows[0]["mtfl_landmarks"]["points_px"] for v in point)  # pixels of a 40² face
    assert 0 <= rows[0]["utkface_age"]["age"] <= 100
    for image, message in ((tmp_path / "nope.jpg", "does not exist"), (tmp_path / "bad.jpg", "could not be read")):
        with pytest.raises(SystemExit) as exit_:
            main(["predict", "--model", str(tmp_path / "run"), str(image)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:utkface. skipped")
def test_stage_two_trains_only_the_new_levels_of_a_stage_one_run(tmp_path):
    stage1 = _faceptor_run(tmp_path, "stage1", train={"epochs": 1})
    visrep.pretrain(visrep.resolve(stage1), quiet=True)
    head = {**stage1["task_head"], "stage2": {"init": str(tmp_path / "stage1"), "task": "utkface_age", "levels": [0]}}
    stage2 = _faceptor_run(tmp_path, "stage2", task_head=head, train={"epochs": 1, "batch_size": 2})
    s = visrep.pretrain(visrep.resolve(stage2), quiet=True)
    assert s["steps"] == s["train_size"] // 2  # the target task alone, 2 faces per step
    a, _ = load_checkpoint(tmp_path / "stage1")
    b, meta = load_checkpoint(tmp_path / "stage2")
    new = {k for k in b if k.startswith("model.") and k not in a}
    assert new == {"model.task_head.memory.new_proj.0.weight", "model.task_head.memory.new_proj.0.bias",
                   "model.task_head.memory.new_level_embed"}
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))  # everything else as stage 1 left it
    assert set(meta["tasks"]) == set(stage1["tasks"])  # the stage-1 model, whole
    res = visrep.evaluate_faceptor(str(tmp_path / "stage2"), figures=False)
    assert set(res["tasks"]) == {"utkface_age"} and res["layer_attention"]["utkface_age"]["levels"] == [1, 0]
    assert sum(res["layer_attention"]["utkface_age"]["share"]) == pytest.approx(1.0, abs=1e-4)
    wrong = _faceptor_run(tmp_path, "wrong", task_head={**head, "stage2": {**head["stage2"], "task": "mtfl_pose"}},
                          tasks=[*stage1["tasks"], "mtfl_pose"])
    with pytest.raises(ConfigError, match="has no task 'mtfl_pose'"):
        visrep.pretrain(visrep.resolve(wrong), quiet=True)


def test_auxiliary_mode_scales_the_helpers_down():
    from visrep.objectives import build_objective

    fn = build_objective("faceptor", main_task="age", helper_weight=0.25)
    fn.set_tasks({"age": ("age_distribution", "dldl", 1.0), "gender": ("classification", "cross_entropy", 1.0),
                  "race": ("classification", "cross_entropy", 1.0)})
    assert fn.weights == {"age": 1.0, "gender": 0.125, "race": 0.125}  # 1/2 within classification, then × 0.25
    with pytest.raises(ConfigError, match="main_task 'pose' is not one of the tasks"):
        build_objective("faceptor", main_task="pose").set_tasks({"age": ("age_distribution", "dldl", 1.0)})


@pytest.mark.filterwarnings("ignore:utkface. skipped")
def test_a_task_trains_on_a_fraction_of_its_labels_and_the_summary_counts_each_tasks_parameters(tmp_path):
    full = _faceptor_run(tmp_path, "full", train={"epochs": 1, "max_steps": 1})
    s_full = visrep.pretrain(visrep.resolve(full), quiet=True)
    few = _faceptor_run(tmp_path, "few", train={"epochs": 1, "max_steps": 1},
                        tasks=["utkface_age", "utkface_gender", "mtfl_landmarks",
                               {"task": "mtfl_smile", "label_fraction": 0.5}])
    s_few = visrep.pretrain(visrep.resolve(few), quiet=True)
    assert s_full["train_size"] - s_few["train_size"] == 4  # half of the smile task's 8 faces (class-balanced)
    head = s_full["parameters"]["task_head"]["breakdown"]
    assert head["tasks"] == {"utkface_age": 2 * 101 * 16, "utkface_gender": 2 * 2 * 16, "mtfl_landmarks": 2 * 5 * 16,
                             "mtfl_smile": 2 * 2 * 16}
    assert s_full["parameters"]["all"]["total"] == sum(v["total"] for k, v in s_full["parameters"].items() if k != "all")


@pytest.mark.filterwarnings("ignore:utkface. skipped")
@pytest.mark.parametrize("change, match", [
    ({"task_head": {"levels": [0]}}, "must include the encoder's last block"),
    ({"task_head": {"levels": [1, -1]}}, "names a block twice"),
    ({"task_head": {"levels": [5]}}, "block 5 does not exist"),
    ({"train": {"batch_size": 6}}, "multiple of the 4 tasks"),
    ({"views": {"policy": "crop"}}, "landmark tasks need views.policy=none"),
    ({"monitor": {"knn_every": 1}}, "read one labelled dataset"),
    ({"projector": {"type": "mlp"}}, "projector must be null"),
])
def test_multi_task_mistakes_are_one_sentence(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        visrep.pretrain(visrep.resolve(_faceptor_run(tmp_path, "run", **change)), quiet=True)


@pytest.mark.filterwarnings("ignore:utkface. skipped")
def test_faceptor_trains_under_torchrun_with_two_processes(tmp_path):
    """Every parameter of the task head and the encoder gets a gradient on every rank (DDP would stop otherwise)."""
    import os
    import subprocess
    import sys

    import yaml

    over = _faceptor_run(tmp_path, "ddp", train={"epochs": 1, "deterministic": False})
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(over))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "visrep.cli", "pretrain", "--config", str(config)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["steps"] == 4 and math.isfinite(summary["final_loss"])
