"""Checkpoint discovery: only complete ``step_*`` directories with the marker are ever picked."""

from __future__ import annotations

import json

import pytest

from semanticgen.checkpoint_layout import MARKER, latest_checkpoint, list_checkpoints, resolve_checkpoint, step_dir_name


def _make(root, name, marker=True, meta=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(b"x")
    if marker:
        (d / MARKER).write_text(json.dumps(meta or {"step": int(name.split("_")[-1]), "stage": "latent"}))
    return d


def test_temporary_and_unmarked_directories_are_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    _make(root, step_dir_name(2))
    _make(root, f".tmp-{step_dir_name(9)}")  # a save that never finished (even with a marker written)
    _make(root, step_dir_name(7), marker=False)  # renamed by hand / marker lost
    _make(root, f".del-{step_dir_name(1)}")
    (root / step_dir_name(8)).write_text("not a directory")
    bad = _make(root, step_dir_name(6), marker=False)
    (bad / MARKER).write_text("{truncated")  # marker cut short: not valid JSON
    assert [c.step for c in list_checkpoints(root)] == [2]
    assert latest_checkpoint(root).step == 2
    assert resolve_checkpoint(tmp_path).path == root / step_dir_name(2)  # run dir
    assert resolve_checkpoint(root).step == 2  # checkpoints dir
    assert resolve_checkpoint(root / step_dir_name(2)).step == 2  # the checkpoint itself
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(root / step_dir_name(7))


def test_ordering_is_numeric(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 9, 100, 11):
        _make(root, step_dir_name(step))
    assert [c.step for c in list_checkpoints(root)] == [9, 10, 11, 100]
    assert list_checkpoints(tmp_path / "missing") == []
    assert latest_checkpoint(tmp_path / "missing") is None
