"""Pre-encoding to safetensors shards, reading them back, and training from them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from _train_helpers import REPO, SMALL, TINY, child_env, losses, shared_vae_override

from semanticgen.data import Encoders, ShardDataset, ShardWriter, build_dataset, collate
from semanticgen.train.config import load_config
from semanticgen.train.preencode import main as preencode_main


@pytest.fixture(scope="module")
def vae_path() -> str:
    """``encoders.vae.path=...``: the tiny config's learned VAE, trained first (``--steps 0``), as a user trains it
    before pre-encoding (pre-encoding needs its weights)."""
    return shared_vae_override().removeprefix("--set=")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, vae_path):
    out = tmp_path_factory.mktemp("shards")
    args = [str(TINY), "--out", str(out), "--shard-size", "5", "--batch-size", "4", "--no-progress"]
    assert preencode_main([*args, "--set", "data.num_samples=12", "--set", vae_path]) == 0
    return out


def test_preencode_matches_on_the_fly_encoding(shard_dir, vae_path):
    cfg = load_config(TINY, ["data.num_samples=12", vae_path])
    index = json.loads((shard_dir / "index.json").read_text())
    assert index["num_samples"] == 12 and [s["num_samples"] for s in index["shards"]] == [5, 5, 2]
    ds = ShardDataset(shard_dir)
    raw = build_dataset(cfg.data, seed=cfg.seed)
    enc = Encoders.from_specs(cfg.encoders)
    for i in (0, 4, 5, 11):  # first/last of a shard, the short last shard
        ref = enc.encode_batch(collate([raw[i]]), torch.device("cpu"))
        item = ds[i]
        assert item["caption"] == raw[i]["caption"]
        for key in ("latents", "sem_features", "text"):
            torch.testing.assert_close(item[key], ref[key][0], rtol=0, atol=0)
        assert item["text_mask"].dtype == torch.bool and torch.equal(item["text_mask"], ref["text_mask"][0])
    null = ds.null_text()
    ref_null = enc.null_text(torch.device("cpu"))
    assert torch.equal(null[0], ref_null[0]) and torch.equal(null[1], ref_null[1])
    with pytest.raises(IndexError):
        ds[12]


def test_writer_rejects_mixed_shapes(tmp_path):
    w = ShardWriter(tmp_path, shard_size=4)
    batch = {
        "latents": torch.zeros(2, 4, 2, 2, 2),
        "sem_features": torch.zeros(2, 1, 4, 8),
        "text": torch.zeros(2, 3, 8),
        "text_mask": torch.ones(2, 3, dtype=torch.bool),
        "caption": ["a", "b"],
    }
    w.add(batch)
    with pytest.raises(ValueError, match="same shapes"):
        w.add({**batch, "latents": torch.zeros(2, 4, 3, 2, 2)})


def test_missing_index_is_actionable(tmp_path):
    with pytest.raises(FileNotFoundError, match="preencode"):
        ShardDataset(tmp_path)


def test_train_from_shards_without_torchrun(shard_dir, vae_path, tmp_path):
    """Plain ``python -m semanticgen.train`` (one process, no torchrun) on pre-encoded shards."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "semanticgen.train",
        str(TINY),
        "--run-dir",
        str(run_dir),
        *SMALL,
        "--set=data.kind=shards",
        f"--set=data.path={json.dumps(str(shard_dir))}",
        f"--set={vae_path}",
        "--set=latent.steps=2",
        "--set=semantic.steps=2",
    ]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    assert (run_dir / "model.safetensors").is_file()


def test_preencode_video_folder_keeps_each_readable_video_once(tmp_path, vae_path):
    from semanticgen.data import SyntheticShapes
    from semanticgen.video import save_video

    root = tmp_path / "videos"
    shapes = SyntheticShapes(3, height=32, width=32, vae_frames=60, vae_fps=24.0, sem_frames=1)
    for i in range(3):
        save_video(shapes.render(i, torch.arange(60, dtype=torch.float64) / 24.0), root / f"v{i}.mp4", fps=24.0)
        (root / f"v{i}.txt").write_text(shapes.caption(i))
    (root / "v1b_broken.mp4").write_bytes(b"not a video")  # sorts between v1 and v2
    (root / "v1b_broken.txt").write_text("broken")
    out = tmp_path / "shards"
    args = [str(TINY), "--out", str(out), "--batch-size", "2", "--no-progress", "--set", vae_path]
    overrides = ["--set", "data.kind=video_folder", "--set", f"data.path={json.dumps(str(root))}"]
    overrides += ["--set", "data.vae_fps=24.0"]
    assert preencode_main([*args, *overrides]) == 0
    ds = ShardDataset(out)
    assert len(ds) == 3  # the broken file's slot is filled by v2.mp4, which is kept once
    assert sorted(ds[i]["caption"] for i in range(3)) == sorted(shapes.caption(i) for i in range(3))
