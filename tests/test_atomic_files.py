"""Every safetensors file the package writes: atomic, and readable by whoever the umask says (not safetensors' 0600)."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors import safe_open

from semanticgen._files import META_KEY, default_file_mode, save_safetensors_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_default_file_mode_follows_the_umask():
    old = os.umask(0o027)
    try:
        assert default_file_mode() == 0o640
    finally:
        os.umask(old)
    assert os.umask(old) == old  # reading it put the previous umask back


def test_save_gives_the_umask_mode_and_round_trips_metadata(tmp_path, umask_022):
    path = save_safetensors_atomic({"a": torch.arange(6.0).view(2, 3).t()}, tmp_path / "d" / "x.safetensors", {"k": 1})
    assert _mode(path) == 0o644
    with safe_open(str(path), "pt") as f:
        assert f.metadata()[META_KEY] == '{"k": 1}'
        assert torch.equal(f.get_tensor("a"), torch.arange(6.0).view(2, 3).t())
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    import safetensors.torch

    path = save_safetensors_atomic({"a": torch.ones(3)}, tmp_path / "x.safetensors")

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a header")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_safetensors_atomic({"a": torch.zeros(3)}, path)
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_every_writer_of_the_package_gives_the_umask_mode(tmp_path, umask_022):
    from semanticgen.data.shards import ShardWriter
    from semanticgen.encoders.learned_vae import LearnedVideoAE
    from semanticgen.exports import write_safetensors
    from semanticgen.generate import save_latents

    shards = ShardWriter(tmp_path / "shards", shard_size=1)
    shards.add(
        {
            "latents": torch.zeros(1, 2, 1, 2, 2),
            "sem_features": torch.zeros(1, 4, 3),
            "text": torch.zeros(1, 5, 3),
            "text_mask": torch.ones(1, 5, dtype=torch.bool),
            "caption": ["a red square moving right"],
        }
    )
    shards.write_null_text(torch.zeros(5, 3), torch.ones(5, dtype=torch.bool))
    shards.close()
    written = [
        write_safetensors({"w": torch.zeros(2)}, {"format": "x"}, tmp_path / "export.safetensors"),
        save_latents(torch.zeros(1, 2, 1, 2, 2), tmp_path / "latents.safetensors", {"seed": 0}),
        LearnedVideoAE().save(tmp_path / "vae.safetensors"),
        *sorted((tmp_path / "shards").glob("*.safetensors")),
    ]
    assert len(written) == 5
    for path in written:
        assert _mode(path) == 0o644, path
