"""``semanticgen eval``: one-line errors for runs it cannot judge, and eval.json / eval.png from a tiny trained run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _train_helpers import run_train

from semanticgen.cli import main
from semanticgen.evaluation import VOCABULARY, sample_prompts
from semanticgen.exports import read_export, write_safetensors

KINDS = ("generated", "stage2_ceiling", "detector_real", "detector_vae_roundtrip")
ASPECTS = ("colour", "shape", "direction", "all")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """Both stages of the tiny config, 2 steps each, on one process (about 15 s)."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    run_train(1, run_dir, "--set=latent.steps=2", "--set=semantic.steps=2")
    return run_dir


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip()]


def test_bad_checkpoint_path_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "semanticgen.cli", "eval", "--checkpoint", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"semanticgen eval: error: --checkpoint: no such run directory or file: {tmp_path / 'nope'}"
    ]


def test_a_directory_that_is_no_run_is_one_line(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "no export and no complete checkpoint" in lines[0]


def test_a_run_not_on_the_synthetic_data_is_refused(tiny_run, tmp_path, capsys):
    tensors, meta = read_export(tiny_run / "model.safetensors")
    meta["config"]["data"].update(kind="video_folder", path="/videos")
    write_safetensors(tensors, meta, tmp_path / "other" / "model.safetensors")
    assert main(["eval", "--checkpoint", str(tmp_path / "other")]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "'video_folder'" in lines[0] and "synthetic shapes only" in lines[0]


def test_a_run_without_its_semantic_stage_is_refused(tiny_run, tmp_path, capsys):
    (tmp_path / "latent_only").mkdir()
    shutil.copy(tiny_run / "latent.safetensors", tmp_path / "latent_only")
    assert main(["eval", "--checkpoint", str(tmp_path / "latent_only"), "--no-progress"]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "no trained semantic_generator" in lines[0]


@pytest.mark.parametrize("n", ["0", "85", "-3"])
def test_prompts_out_of_range_is_one_line(tmp_path, capsys, n):
    assert main(["eval", "--checkpoint", str(tmp_path), "--prompts", n]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and f"--prompts must be an int in [1, 84], got {n}" in lines[0]


def test_prompt_sample_is_seeded_and_covers_the_vocabulary():
    assert sample_prompts(None, 0) == list(VOCABULARY) and len(set(VOCABULARY)) == 84
    assert sample_prompts(84, 5) == list(VOCABULARY)
    five = sample_prompts(5, 1)
    assert five == sample_prompts(5, 1) and five != sample_prompts(5, 2)
    assert five == sorted(five, key=VOCABULARY.index) and set(five) <= set(VOCABULARY)


def test_eval_writes_json_and_contact_sheet(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    # Seed 1 draws two captions among the run's 64 training clips and one found past them.
    args = ["eval", "--checkpoint", str(tiny_run), "--prompts", "3", "--steps", "2", "--seed", "1", "--out", str(out)]
    assert main([*args, "--batch-size", "2", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "generated" in table and "stage2 ceiling" in table and "per generated clip" in table

    payload = json.loads((out / "eval.json").read_text())
    assert payload["run"] == str(tiny_run.resolve())
    settings = payload["settings"]
    assert settings["prompts"] == sample_prompts(3, 1) and settings["num_prompts"] == 3
    assert (settings["steps"], settings["guidance"], settings["seed"]) == (2, 3.0, 1)  # guidance: generate's default
    for kind in KINDS:
        assert set(payload["accuracy"][kind]) == set(ASPECTS)
        assert all(0.0 <= v <= 1.0 for v in payload["accuracy"][kind].values())
    # Real clips of three prompts: the detector's ceiling is exact on them.
    assert payload["accuracy"]["detector_real"] == dict.fromkeys(ASPECTS, 1.0)
    assert payload["timing"]["seconds_per_generated_clip"] > 0
    assert [e["prompt"] for e in payload["per_prompt"]] == settings["prompts"]
    assert [e["real_in_training_set"] for e in payload["per_prompt"]] == [False, True, True]
    for entry in payload["per_prompt"]:
        for kind in KINDS:
            record = entry[kind]
            assert set(record) >= {"colour", "shape", "direction", "label", "correct"}
            assert set(record["correct"]) == set(ASPECTS)
            assert record["correct"]["all"] == all(record["correct"][a] for a in ASPECTS[:3])
    for png in ("eval.png", "eval_stage2_ceiling.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.png", "eval_stage2_ceiling.png"]
