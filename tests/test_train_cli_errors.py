"""``python -m semanticgen.train`` and its ``export`` and ``preencode`` commands: a user mistake is one line and exit
code 2; anything else (a bug) keeps its traceback. One ``UsageError`` class serves the whole package."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _train_helpers import TINY, child_env

import semanticgen
from semanticgen.errors import EXIT_USAGE, UsageError
from semanticgen.train import main as train_main


def _error_line(err: str, prog: str) -> str:
    """The one stderr line of a usage error; fails if there are more lines or a traceback."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0][len(f"{prog}: error: ") :]


@pytest.fixture
def bad_seed_config(tmp_path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text('seed = "x"\n')
    return path


def test_one_usage_error_class_in_the_package():
    """``train`` used to define and catch its own ``UsageError``: one raised elsewhere (``semanticgen.errors``')
    was then a traceback in training, and the other way round in the CLI."""
    defined = [
        str(path.relative_to(semanticgen.__path__[0]))
        for path in sorted(Path(semanticgen.__path__[0]).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.name == "UsageError"
    ]
    assert defined == ["errors.py"]
    from semanticgen.train import config, distributed, loop

    assert config.UsageError is distributed.UsageError is loop.UsageError is UsageError
    assert issubclass(UsageError, ValueError)  # programmatic callers that catch ValueError keep working


# ------------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("kind", ["empty", "missing", "file"])
def test_export_of_a_directory_that_is_no_run_is_one_line(tmp_path, capsys, kind):
    run_dir = tmp_path / "run"
    if kind == "empty":
        run_dir.mkdir()
    elif kind == "file":
        run_dir.write_text("not a run\n")
    assert train_main(["export", str(run_dir)]) == EXIT_USAGE
    message = _error_line(capsys.readouterr().err, "python -m semanticgen.train export")
    expected = {
        "empty": "no stage export (<stage>.safetensors) and no complete checkpoint",
        "missing": "no such directory",
        "file": "not a directory",
    }[kind]
    assert message.startswith(f"{run_dir}: ") and expected in message
    assert not (run_dir / "model.safetensors").exists()


def test_export_bug_keeps_its_traceback(tmp_path, monkeypatch):
    from semanticgen.train import export

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(export, "export_run", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        train_main(["export", str(tmp_path)])


def test_export_command_line_exits_2_without_traceback(tmp_path):
    """The whole way, as a user runs it: ``python -m semanticgen.train export EMPTY_DIR``."""
    cmd = [sys.executable, "-m", "semanticgen.train", "export", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == EXIT_USAGE
    assert "no complete checkpoint" in _error_line(proc.stderr, "python -m semanticgen.train export")


# --------------------------------------------------------------------------------------------- preencode


def test_preencode_bad_config_is_one_line_naming_the_file(tmp_path, capsys, bad_seed_config):
    assert train_main(["preencode", str(bad_seed_config), "--out", str(tmp_path / "shards")]) == EXIT_USAGE
    message = _error_line(capsys.readouterr().err, "python -m semanticgen.train preencode")
    assert message == f"{bad_seed_config}: config key 'seed' must be an integer, got 'x'"
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize(
    "config, extra, expected",
    [
        (TINY, ["--set", "data.kind=shards", "--set", "data.path=/somewhere"], "data.kind is already 'shards'"),
        (TINY, ["--shard-size", "0"], "--shard-size must be a positive int, got 0"),
        (TINY, ["--batch-size", "-1"], "--batch-size must be a positive int, got -1"),
        (TINY, ["--set", "seed"], "--set expects key=value, got 'seed'"),
        (Path("/nonexistent/config.toml"), [], "config file not found: /nonexistent/config.toml"),
    ],
    ids=["already-shards", "shard-size-0", "batch-size-negative", "set-without-value", "missing-config"],
)
def test_preencode_user_mistakes_are_one_line(tmp_path, capsys, config, extra, expected):
    assert train_main(["preencode", str(config), "--out", str(tmp_path / "shards"), *extra]) == EXIT_USAGE
    assert expected in _error_line(capsys.readouterr().err, "python -m semanticgen.train preencode")


def test_preencode_bug_keeps_its_traceback(tmp_path, monkeypatch):
    from semanticgen.train import preencode

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(preencode, "build_dataset", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        train_main(["preencode", str(TINY), "--out", str(tmp_path / "shards")])


# ----------------------------------------------------------------------------------------------- training


def test_training_bad_config_is_one_line_naming_the_file(tmp_path, capsys, bad_seed_config):
    assert train_main([str(bad_seed_config), "--run-dir", str(tmp_path / "run")]) == EXIT_USAGE
    message = _error_line(capsys.readouterr().err, "semanticgen.train")
    assert message == f"{bad_seed_config}: config key 'seed' must be an integer, got 'x'"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--set", "latent.steps=ten"], "--set latent.steps=ten: config key 'latent.steps' must be an integer"),
        (["--save-every", "0"], "--save-every must be a positive int, got 0"),
        (["--context-parallel", "0"], "--context-parallel must be a positive int, got 0"),
        (["--steps", "-1"], "--steps must be an int >= 0, got -1"),
    ],
    ids=["set", "save-every", "context-parallel", "steps"],
)
def test_training_flag_mistakes_name_the_flag(tmp_path, capsys, flags, expected):
    assert train_main([str(TINY), "--run-dir", str(tmp_path / "run"), *flags]) == EXIT_USAGE
    assert _error_line(capsys.readouterr().err, "semanticgen.train").startswith(expected)


def test_training_config_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """A ``ValueError`` from checking the config that is not a ``UsageError`` is a bug: it used to become exit 2."""
    from semanticgen.train import config

    def broken(data):
        raise ValueError("an internal bug")

    monkeypatch.setattr(config, "config_from_dict", broken)
    with pytest.raises(ValueError, match=re.escape("an internal bug")):
        train_main([str(TINY), "--run-dir", str(tmp_path / "run")])


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "model.latent_generator.window=2.5",
            "--set model.latent_generator.window=2.5: [model.latent_generator]: "
            "LatentGenerator: window must be a positive int, got 2.5",
        ),
        (
            "model.semantic_generator.qk_norm=1",
            "--set model.semantic_generator.qk_norm=1: [model.semantic_generator]: "
            "SemanticGenerator: qk_norm must be a bool, got 1",
        ),
        ("encoders.vae.hidden=-3", "[encoders]: LearnedVideoAE: hidden must be a positive int, got -3"),
    ],
    ids=["model-window", "model-bool", "encoders"],
)
def test_training_bad_model_or_encoder_values_are_one_line_before_anything_runs(tmp_path, capsys, override, expected):
    """Values the config loader passes through to the models and encoders: checked before the autoencoder stage
    trains (a bad window used to surface as a traceback after it had)."""
    run_dir = tmp_path / "run"
    argv = [str(TINY), "--run-dir", str(run_dir), "--set", override, "--set", "log.progress=false"]
    assert train_main(argv) == EXIT_USAGE
    assert _error_line(capsys.readouterr().err, "semanticgen.train").startswith(expected)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("semantic.optim.lr=-1", "--set semantic.optim.lr=-1: semantic.optim.lr must be a finite number >= 0"),
        (
            "latent.timestep_shift=0",
            "--set latent.timestep_shift=0: latent.timestep_shift must be a positive finite number",
        ),
        ("latent.kl_weight=-1", "--set latent.kl_weight=-1: latent.kl_weight must be a finite number >= 0"),
        ("latent.optim.warmup_steps=-5", "latent.optim.warmup_steps must be a finite number >= 0, got -5"),
        ("latent.optim.betas=[0.9, 1.5]", "latent.optim.betas must be two numbers in [0, 1)"),
        ("data.num_samples=0", "--set data.num_samples=0: data.num_samples must be >= 1, got 0"),
        ("data.vae_frames=2", "data.vae_frames: LearnedVideoAE: num_frames must be 1 + k * 4"),
    ],
    ids=["lr", "shift", "kl", "warmup", "betas", "num_samples", "vae_frames"],
)
def test_training_bad_stage_or_data_values_are_one_line_before_anything_runs(tmp_path, capsys, override, expected):
    """A negative semantic-stage learning rate used to surface as torch's traceback after the autoencoder and the
    whole latent stage had trained; a zero num_samples or an odd clip length as a dataset or VAE traceback."""
    run_dir = tmp_path / "run"
    argv = [str(TINY), "--run-dir", str(run_dir), "--set", override, "--set", "log.progress=false"]
    assert train_main(argv) == EXIT_USAGE
    assert expected in _error_line(capsys.readouterr().err, "semanticgen.train")
    assert not run_dir.exists()
