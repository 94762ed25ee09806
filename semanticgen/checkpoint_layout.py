"""Where a run directory keeps its training checkpoints, and how to find the complete ones (reading only).

Layout::

    RUN_DIR/checkpoints/step_0000100/        complete checkpoint (DCP shards + .metadata + COMPLETE)
    RUN_DIR/checkpoints/.tmp-step_0000200/   being written; never loaded

A checkpoint is complete once its directory is named ``step_N`` and holds the ``COMPLETE`` marker (JSON: step,
stage, loader position, config, model configs). :mod:`semanticgen.train.checkpoint` writes them that way
(atomically, by a rename); this module only lists them, so a reader of a finished run (``semanticgen generate``,
:mod:`semanticgen.exports`) needs nothing from the training code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MARKER",
    "CheckpointInfo",
    "latest_checkpoint",
    "list_checkpoints",
    "read_checkpoint_meta",
    "resolve_checkpoint",
    "step_dir_name",
]

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    """``step_0000100``: the directory name of the checkpoint of global step ``step``."""
    return f"step_{step:07d}"


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint: its directory, its global step and its marker's metadata."""

    path: Path
    step: int
    meta: dict[str, Any]


def read_checkpoint_meta(path: str | Path) -> dict[str, Any] | None:
    """The ``COMPLETE`` marker's JSON, or ``None`` if ``path`` is not a complete checkpoint."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def list_checkpoints(ckpt_root: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints under ``ckpt_root``, oldest first. ``.tmp-*`` and marker-less directories are ignored."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if not m or not child.is_dir():
            continue
        meta = read_checkpoint_meta(child)
        if meta is None:
            continue
        found.append(CheckpointInfo(child, int(m.group(1)), meta))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(ckpt_root: str | Path) -> CheckpointInfo | None:
    """The newest complete checkpoint under ``ckpt_root``, or ``None``."""
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> CheckpointInfo:
    """A complete checkpoint from a checkpoint directory, a ``checkpoints/`` directory or a run directory.

    Raises:
        FileNotFoundError: none of them holds a complete checkpoint.
    """
    path = Path(path)
    meta = read_checkpoint_meta(path)
    if meta is not None:
        m = _STEP_DIR.match(path.name)
        return CheckpointInfo(path, int(m.group(1)) if m else int(meta["step"]), meta)
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete checkpoint at {path} (looked for step_*/{MARKER})")
