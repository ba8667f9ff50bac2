import pytest

from visrep.config import RunConfig, parse_overrides, resolve_config
from visrep.errors import ConfigError


def test_preset_fills_sections_and_overrides_win():
    cfg = resolve_config(overrides=["method=byol", "optim.lr=0.5", "train.epochs=3"])
    assert cfg.method == "byol"
    assert cfg.target.branch == "ema" and cfg.predictor is not None and cfg.views.policy == "byol"
    assert cfg.optim.lr == 0.5 and cfg.train.epochs == 3


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: simsiam\ntrain: {epochs: 7, batch_size: 64}\n")
    cfg = resolve_config(str(p), ["train.batch_size=32"])
    assert (cfg.method, cfg.train.epochs, cfg.train.batch_size) == ("simsiam", 7, 32)
    assert cfg.target.branch == "stopgrad"


def test_parse_overrides_types():
    assert parse_overrides(["a.b=1", "a.c=0.5", "d=true", "e=null", "f=[1, 2]", "g=hello"]) == {
        "a": {"b": 1, "c": 0.5}, "d": True, "e": None, "f": [1, 2], "g": "hello"}


@pytest.mark.parametrize("override, fragment", [
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?); valid keys: name, lr,"),
    (["trian.epochs=1"], "unknown config key 'trian'"),
    (["method=simclear"], "unknown method 'simclear' (did you mean 'simclr'?); valid choices:"),
    (["optim.name=adam"], "optim.name must be one of sgd, lars, adamw"),
    (["train.precision=fp8"], "train.precision must be one of fp32, bf16, fp16"),
    (["train.epochs=many"], "train.epochs must be an integer"),
    (["data.dataset=imagenet"], "unknown dataset 'imagenet'"),
    (["views.policy=randaug"], "unknown view policy 'randaug'"),
    (["target.branch=teacher"], "target.branch must be one of none, stopgrad, ema"),
    (["train.epochs=0"], "train.epochs must be at least 1"),
    (["optim.lr"], "is not of the form key.sub=value"),
])
def test_bad_config_is_one_clear_sentence(override, fragment):
    with pytest.raises(ConfigError) as e:
        resolve_config(overrides=override)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(str(bad))


def test_all_nine_presets_resolve():
    from visrep.methods import METHODS

    names = set(METHODS.names())
    assert {"simclr", "moco_v2", "moco_v3", "byol", "simsiam", "barlow_twins", "vicreg", "dino", "swav"} <= names
    for n in names:
        cfg = resolve_config(overrides=[f"method={n}"])
        assert isinstance(cfg, RunConfig)


def test_scientific_notation_is_a_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim: {weight_decay: 1e-4}\nobjective: {name: vicreg, params: {eps: 1e-4}}\n")
    cfg = resolve_config(str(p), ["optim.lr=5e-1"])
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.lr == 0.5 and cfg.objective.params["eps"] == 1e-4
