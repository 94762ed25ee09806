"""Encoder tables that point at local checkpoints: a missing path, or a directory without the files its loader
reads, is one usage line naming the config key and the path, before training starts. It used to be a traceback
from inside ``transformers``, ``diffusers`` or safetensors (for a run on raw videos, after the data was built)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from _train_helpers import REPO, TINY, child_env
from conftest import require_dev_extra

from semanticgen.encoders import build_semantic_encoder, build_text_encoder, build_vae, check_encoder_paths
from semanticgen.errors import EXIT_USAGE, UsageError
from semanticgen.train import loop
from semanticgen.train import main as train_main

# table, kind, builder, what its loader needs in a directory (in the order it is checked)
KINDS = {
    "wan": ("vae", build_vae, ["config.json", "diffusion_pytorch_model.safetensors"]),
    "learned": ("vae", build_vae, ["vae.safetensors"]),
    "qwen": ("semantic", build_semantic_encoder, ["config.json", "model.safetensors"]),
    "hf": ("text", build_text_encoder, ["config.json", "model.safetensors", "tokenizer.json"]),
}


def _nothing_there(kind: str) -> str:
    """What the error says of a path where there is nothing."""
    if kind == "learned":  # a file, or a run directory holding one
        return "no such file (a run's autoencoder stage writes RUN_DIR/vae.safetensors)"
    return "no such directory"


def _layout(root, files: list[str]):
    """A directory holding empty files of these names (only names are checked up front)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        (root / name).write_text("{}" if name.endswith(".json") else "")
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_path_names_the_key_and_the_path(tmp_path, kind):
    table, build, _ = KINDS[kind]
    path = tmp_path / "absent"
    expected = re.escape(f"encoders.{table}.path = '{path}': {_nothing_there(kind)}")
    with pytest.raises(UsageError, match=f"^{expected}$"):
        build({"kind": kind, "path": str(path)})
    with pytest.raises(UsageError, match=f"^{expected}$"):
        check_encoder_paths({table: {"kind": kind, "path": str(path)}})


@pytest.mark.parametrize("kind", KINDS)
def test_each_missing_file_is_named(tmp_path, kind):
    """An empty directory lacks the first file; with it, the next; with all of them the check passes (whether they
    hold the right model is the loader's to say)."""
    table, _, needed = KINDS[kind]
    for count, name in enumerate(needed):
        root = _layout(tmp_path / f"has{count}", needed[:count])
        with pytest.raises(
            UsageError, match=f"^encoders\\.{table}\\.path = '{re.escape(str(root))}': no .*{re.escape(name)}"
        ):
            check_encoder_paths({table: {"kind": kind, "path": str(root)}})
    check_encoder_paths({table: {"kind": kind, "path": str(_layout(tmp_path / "all", needed))}})


def test_a_file_where_a_directory_belongs(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(UsageError, match=f"^encoders\\.semantic\\.path = '{re.escape(str(path))}': not a directory$"):
        build_semantic_encoder({"kind": "qwen", "path": str(path)})


def test_a_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        UsageError,
        match=f"^encoders\\.text\\.path = 'ckpt/umt5' \\(under {re.escape(str(tmp_path))}\\): no such directory$",
    ):
        build_text_encoder({"kind": "hf", "path": "ckpt/umt5"})


def test_a_path_that_is_no_string(tmp_path):
    with pytest.raises(UsageError, match=r"^encoders\.vae\.path must be a path \(a non-empty string\), got 3"):
        build_vae({"kind": "wan", "path": 3})


def test_wan_pipeline_folders(tmp_path):
    """A pipeline's directory is found through its vae/; its transformer/ is refused for what it is."""
    pipeline = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    _layout(pipeline / "vae", KINDS["wan"][2])
    check_encoder_paths({"vae": {"kind": "wan", "path": str(pipeline)}})
    check_encoder_paths({"vae": {"kind": "wan", "path": str(pipeline), "subfolder": "vae"}})
    with pytest.raises(UsageError, match="no config.json in its transformer/ folder"):
        check_encoder_paths({"vae": {"kind": "wan", "path": str(pipeline), "subfolder": "transformer"}})
    _layout(pipeline / "transformer", KINDS["wan"][2])
    (pipeline / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(UsageError, match="is a WanTransformer3DModel's, not an AutoencoderKLWan's"):
        check_encoder_paths({"vae": {"kind": "wan", "path": str(pipeline / "transformer")}})


def test_what_save_pretrained_writes_passes(tmp_path):
    """The check is no stricter than the loaders: real (tiny) checkpoints as the libraries save them load."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    text_dir = tmp_path / "t5"
    T5EncoderModel(T5Config(vocab_size=4, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)).save_pretrained(
        text_dir
    )
    tokenizer = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>").save_pretrained(text_dir)
    assert build_text_encoder({"kind": "hf", "path": str(text_dir), "max_len": 4}).dim == 8

    diffusers = require_dev_extra("diffusers")
    vae_dir = tmp_path / "wan"
    kwargs = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    diffusers.AutoencoderKLWan(**kwargs, latents_mean=[0.0] * 4, latents_std=[1.0] * 4).save_pretrained(vae_dir / "vae")
    assert build_vae({"kind": "wan", "path": str(vae_dir)}).latent_channels == 4


def test_a_loader_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the inputs are checked: what a loader raises on a checkpoint that passes is not rewrapped."""
    from semanticgen.encoders import QwenVisionEncoder

    def broken(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(QwenVisionEncoder, "from_pretrained", broken)
    root = _layout(tmp_path / "qwen", KINDS["qwen"][2])
    with pytest.raises(KeyError, match="an internal bug"):
        build_semantic_encoder({"kind": "qwen", "path": str(root)})


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", KINDS)
def test_training_refuses_in_one_line_naming_the_set_the_key_and_the_path(tmp_path, kind):
    """The whole way, as a user runs it: ``python -m semanticgen.train CONFIG --set encoders.<table>={...}``."""
    table = KINDS[kind][0]
    path = tmp_path / "absent"
    override = f"encoders.{table}={{kind = {json.dumps(kind)}, path = {json.dumps(str(path))}}}"
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "semanticgen.train", str(TINY), "--run-dir", str(run_dir), "--set", override]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300, cwd=REPO)
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    expected = f"encoders.{table}.path = '{path}': {_nothing_there(kind)}"
    assert errors == [f"semanticgen.train: error: --set {override}: {expected}"]
    assert not run_dir.exists()


def _no_rank_work(monkeypatch):
    def joined(*args, **kwargs):
        raise AssertionError("a rank began work (joined the process group) before the encoder paths were checked")

    monkeypatch.setattr(loop, "join_process_group", joined)
    monkeypatch.setattr(loop, "build_dataset", joined)


def test_training_checks_before_any_rank_does_work(tmp_path, monkeypatch, capsys):
    _no_rank_work(monkeypatch)
    argv = [
        str(TINY),
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f'encoders.text={{kind = "hf", path = "{tmp_path}"}}',
    ]
    assert train_main(argv) == EXIT_USAGE
    assert f"encoders.text.path = '{tmp_path}': no config.json in {tmp_path}" in capsys.readouterr().err


def test_a_run_on_shards_loads_no_encoder_and_checks_none(tmp_path, monkeypatch, capsys):
    """Pre-encoded shards hold what the encoders made: a machine without the checkpoints can train on them."""

    def reached(*args, **kwargs):
        raise UsageError("reached the data")

    monkeypatch.setattr(loop, "build_dataset", reached)
    argv = [str(TINY), "--run-dir", str(tmp_path / "run"), "--set", "data.kind=shards", "--set", "data.path=/shards"]
    argv += ["--set", 'encoders.text={kind = "hf", path = "/nowhere"}']
    assert train_main(argv) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == "semanticgen.train: error: reached the data"


def test_preencode_names_the_set_the_key_and_the_path_before_encoding(tmp_path, monkeypatch, capsys):
    """``preencode`` loads the same encoders: the same one line, naming where the path came from, before any clip
    is built or encoded."""
    from semanticgen.train import preencode

    def reached(*args, **kwargs):
        raise AssertionError("the data was built before the encoder paths were checked")

    monkeypatch.setattr(preencode, "build_dataset", reached)
    override = f'encoders.semantic={{kind = "qwen", path = "{tmp_path / "absent"}"}}'
    argv = ["preencode", str(TINY), "--out", str(tmp_path / "shards"), "--set", override]
    assert train_main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    expected = f"--set {override}: encoders.semantic.path = '{tmp_path / 'absent'}': no such directory"
    assert err == f"python -m semanticgen.train preencode: error: {expected}"
    assert not (tmp_path / "shards").exists()
