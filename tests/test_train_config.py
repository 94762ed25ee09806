"""Training config: TOML/YAML loading, --set overrides, unknown keys and bad values named in the error, which is a
``UsageError`` that names the file or the ``--set`` it comes from."""

from __future__ import annotations

import re

import pytest
from _train_helpers import TINY

from semanticgen.errors import UsageError
from semanticgen.train.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
    read_config_file,
)


def test_tiny_config_loads():
    cfg = load_config(TINY)
    assert isinstance(cfg, TrainConfig)
    assert cfg.stage == "both" and cfg.stage_list() == ["latent", "semantic"]
    assert cfg.model["latent_generator"]["patch"] == [1, 2, 2]
    assert cfg.latent.optim.lr == pytest.approx(1e-3)


def test_yaml_equals_toml(tmp_path):
    import yaml

    raw = read_config_file(TINY)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path) == load_config(TINY)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"latent": {"optim": {"lrr": 1.0}}}, "latent.optim.lrr"),
        ({"dataa": {}}, "dataa"),
        ({"data": {"heigth": 3}}, "data.heigth"),
        ({"model": {"vae": {}}}, "model.vae"),
        ({"encoders": {"video": {}}}, "encoders.video"),
    ],
)
def test_unknown_key_is_named(data, key):
    with pytest.raises(UsageError, match=f"'{key}'"):
        config_from_dict(data)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"stage": "both_stages"}, "stage must be one of"),
        ({"latent": {"steps": "ten"}}, "'latent.steps' must be an integer"),
        ({"latent": {"optim": {"lr": True}}}, "'latent.optim.lr' must be a number"),
        ({"data": {"kind": "video_folder"}}, "data.path is required"),
        ({"parallel": {"mixed_precision": "fp8"}}, "parallel.mixed_precision"),
        ({"semantic": {"optim": {"grad_accum": 0}}}, "grad_accum must be >= 1"),
        ({"latent": {"optim": {"betas": [0.9]}}}, "'latent.optim.betas' must be a list of 2"),
    ],
)
def test_bad_values_are_named(data, match):
    with pytest.raises(UsageError, match=match):
        config_from_dict(data)


def test_overrides_use_toml_values():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    assert parse_override("stage=latent") == (["stage"], "latent")
    assert parse_override('stage="semantic"') == (["stage"], "semantic")
    assert parse_override("parallel.compile=true") == (["parallel", "compile"], True)
    assert parse_override("model.latent_generator.patch=[1, 2, 2]") == (
        ["model", "latent_generator", "patch"],
        [1, 2, 2],
    )
    with pytest.raises(UsageError, match="key=value"):
        parse_override("no-equals-sign")
    data = apply_overrides({"latent": {"steps": 3}}, ["latent.steps=7", "latent.optim.lr=0.5"])
    assert data == {"latent": {"steps": 7, "optim": {"lr": 0.5}}}
    with pytest.raises(UsageError, match="not a table"):
        apply_overrides({"stage": "latent"}, ["stage.x=1"])


def test_cli_override_reaches_config():
    cfg = load_config(TINY, ["latent.steps=5", "data.micro_batch_size=3"])
    assert cfg.latent.steps == 5 and cfg.data.micro_batch_size == 3
    with pytest.raises(ValueError, match="'latent.stepz'"):
        load_config(TINY, ["latent.stepz=5"])


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(UsageError, match="config file not found: .*nope.toml"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "cfg.json"
    bad.write_text("{}")
    with pytest.raises(UsageError, match=r"\.toml, \.yaml or \.yml"):
        load_config(bad)


@pytest.mark.parametrize("name, text", [("broken.toml", 'stage = "latent"\n[data\n'), ("broken.yaml", "a: [1, 2\n")])
def test_a_broken_config_file_is_named_in_the_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError, match=f"{name}: not valid (TOML|YAML)"):
        load_config(path)


def _write(tmp_path, text: str, name: str = "x.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ('seed = "x"\n', "config key 'seed' must be an integer, got 'x'"),
        ("[latent]\nstepz = 3\n", "unknown config key 'latent.stepz'"),
        ('stage = "both_stages"\n', "stage must be one of ('latent', 'semantic', 'both'), got 'both_stages'"),
        ("seed: x\n", "config key 'seed' must be an integer, got 'x'"),
    ],
    ids=["bad-type", "unknown-key", "bad-value", "yaml"],
)
def test_an_error_in_the_file_names_the_file(tmp_path, text, message):
    path = _write(tmp_path, text, "x.yaml" if ":" in text else "x.toml")
    with pytest.raises(UsageError, match=f"^{re.escape(f'{path}: {message}')}"):
        load_config(path)
    # Still the file's mistake when an unrelated override is given too.
    with pytest.raises(UsageError, match=f"^{re.escape(f'{path}: {message}')}"):
        load_config(path, ["latent.steps=3"])


def test_an_error_from_an_override_names_the_override(tmp_path):
    with pytest.raises(UsageError, match=f"^{re.escape('--set seed=x: config key')} 'seed' must be an integer"):
        load_config(TINY, ["latent.steps=3", "seed=x", "semantic.steps=2"])
    with pytest.raises(UsageError, match=r"^--set latent\.stepz=5: unknown config key 'latent\.stepz'"):
        load_config(TINY, ["latent.stepz=5"])
    # Valid on its own, the override clashes with the file's stage = "semantic": the override made the error.
    path = _write(tmp_path, 'stage = "semantic"\n')
    with pytest.raises(UsageError, match=r"^--set latent\.semantic_tokens=false: latent\.semantic_tokens = false"):
        load_config(path, ["latent.semantic_tokens=false"])


def test_an_override_can_complete_the_file(tmp_path):
    """Only the config with every override applied is checked: a file that needs an override is no error."""
    path = _write(tmp_path, '[data]\nkind = "video_folder"\n')
    with pytest.raises(UsageError, match=f"^{re.escape(str(path))}: data.path is required"):
        load_config(path)
    assert load_config(path, ["data.path=/videos"]).data.path == "/videos"
    # A later override fixing an earlier one's mistake is no error either.
    assert load_config(TINY, ["seed=x", "seed=3"]).seed == 3
