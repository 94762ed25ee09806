"""Mistakes in the ``[model.*]`` tables name the config file or the ``--set`` that made them, as every other config
mistake does, although they are found only once the encoders fix the widths (after the config is loaded)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from _train_helpers import REPO, TINY, child_env

from semanticgen.errors import EXIT_USAGE, UsageError
from semanticgen.train import loop
from semanticgen.train.config import ConfigSources, load_config
from semanticgen.train.loop import check_model_tables
from semanticgen.train.stages import DataWidths

WIDTHS = DataWidths(sem_features=32, latent_channels=4, text=32)


def _tiny_with(tmp_path, key: str, value: str):
    """The tiny config with ``key = value`` in its ``[model.latent_generator]`` table, written to a file."""
    lines, table, done = [], None, False
    for line in TINY.read_text().splitlines():
        if line.startswith("["):
            table = line.split("#")[0].strip()
        elif table == "[model.latent_generator]" and line.split("=")[0].strip() == key:
            line, done = f"{key} = {value}", True
        lines.append(line)
    assert done, f"configs/tiny.toml sets no {key} in [model.latent_generator]"
    path = tmp_path / "bad.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _check(sources: ConfigSources) -> None:
    sources.check(lambda raw: check_model_tables(raw, WIDTHS))


@pytest.mark.parametrize("case", ["file", "set"])
def test_training_names_the_file_or_the_set_in_one_line(tmp_path, case):
    """The whole way, as a user runs it; before this, both said ``[model]: ...`` and nothing of where."""
    run_dir = tmp_path / "run"
    if case == "file":
        config = _tiny_with(tmp_path, "hidden", '"x"')
        extra = []
        expected = f"{config}: [model.latent_generator]: LatentGenerator: hidden must be a positive int, got 'x' (str)"
    else:
        config = TINY
        extra = ["--set", "model.latent_generator.depth=0"]
        expected = (
            "--set model.latent_generator.depth=0: [model.latent_generator]: "
            "LatentGenerator: depth must be a positive int, got 0"
        )
    cmd = [sys.executable, "-m", "semanticgen.train", str(config), "--run-dir", str(run_dir), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300, cwd=REPO)
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [f"semanticgen.train: error: {expected}"]
    assert not run_dir.exists()


def test_a_later_set_is_named_even_with_an_earlier_unrelated_one(tmp_path):
    sources = ConfigSources.read(TINY, ["seed=3", "model.compressor.hidden=-1", "latent.steps=2"])
    with pytest.raises(UsageError, match=r"^--set model\.compressor\.hidden=-1: \[model\.compressor\]: "):
        _check(sources)


def test_the_file_stays_at_fault_after_an_unrelated_set(tmp_path):
    config = _tiny_with(tmp_path, "heads", "5")  # hidden 128 is not divisible by 5
    with pytest.raises(UsageError, match=rf"^{re.escape(str(config))}: \[model\.latent_generator\]: .*divisible"):
        _check(ConfigSources.read(config, ["latent.steps=2"]))


def test_a_set_can_repair_the_file(tmp_path):
    config = _tiny_with(tmp_path, "hidden", '"x"')
    _check(ConfigSources.read(config, ["model.latent_generator.hidden=64"]))


def test_unknown_key_and_init_from_name_the_set():
    with pytest.raises(UsageError, match=r"^--set model\.latent_generator\.hiden=3: unknown config key "):
        _check(ConfigSources.read(TINY, ["model.latent_generator.hiden=3"]))
    with pytest.raises(UsageError, match=r"^--set model\.latent_generator\.init_from=/nowhere: \[model\]: from_wan"):
        _check(ConfigSources.read(TINY, ["model.latent_generator.init_from=/nowhere"]))


def test_a_model_entry_that_is_no_table_is_a_usage_error():
    """It used to pass the config's checks and fail in the model code with an AttributeError traceback."""
    with pytest.raises(UsageError, match=r"^--set model\.latent_generator=3: config key 'model\.latent_generator'"):
        load_config(TINY, ["model.latent_generator=3"])


def test_a_config_built_in_code_names_no_source():
    cfg = load_config(TINY, ["model.latent_generator.depth=0"])
    with pytest.raises(UsageError, match=r"^\[model\.latent_generator\]: LatentGenerator: depth must be"):
        _check(ConfigSources.of(cfg))


def test_each_model_is_built_once(monkeypatch):
    built = []

    def counting(name, cls):
        def build(config):
            built.append(name)
            return cls(config)

        return build

    monkeypatch.setattr(loop, "MODELS", {name: counting(name, cls) for name, cls in loop.MODELS.items()})
    check_model_tables(load_config(TINY).to_dict(), WIDTHS)
    assert sorted(built) == ["compressor", "latent_generator", "semantic_generator"]
