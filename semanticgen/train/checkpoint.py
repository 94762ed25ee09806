"""Atomic, reshardable checkpoints with ``torch.distributed.checkpoint`` (DCP): saving and loading.

The directory layout, and finding the complete checkpoints of a run, live in :mod:`semanticgen.checkpoint_layout`
(reading a run needs no training code). Every rank writes its shards into ``.tmp-step_N``; after a barrier rank 0
writes ``COMPLETE`` (JSON: step, stage, loader position, config) and renames the directory to ``step_N``. A rename
within one filesystem is atomic, so a crash at any moment leaves either no ``step_N`` or a complete one; loaders
consider only ``step_*`` directories that hold the marker. Model and optimizer states go through
``get_state_dict``/``set_state_dict``, which store fully-qualified, unsharded names, so a checkpoint written by 2
ranks loads on 1 (or 8) ranks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from semanticgen.checkpoint_layout import MARKER, list_checkpoints, read_checkpoint_meta, step_dir_name

from .distributed import barrier, broadcast_object


class RNGState(Stateful):
    """Per-rank RNG states (torch CPU, CUDA) stored under a rank-specific key so each rank restores its own."""

    def __init__(self, rank: int):
        self.rank = rank

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class TrainState(Stateful):
    """Model + optimizer + schedule + counters as one DCP-stateful object."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, counters: dict[str, int]):
        self.model, self.optimizer, self.scheduler, self.counters = model, optimizer, scheduler, counters

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.counters.update({k: int(v) for k, v in state["counters"].items()})


def _state(train_state: TrainState, rank: int, world_size: int) -> dict[str, Any]:
    # Each rank's RNG goes under its own key; a rank missing at load time (world size changed) keeps its seed.
    return {"train": train_state, f"rng_rank{rank}": RNGState(rank)}


def save_checkpoint(
    ckpt_root: str | Path, step: int, train_state: TrainState, meta: dict[str, Any], keep_last: int
) -> Path:
    """Write ``ckpt_root/step_N`` atomically (see module docstring) and delete all but the newest ``keep_last``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(ckpt_root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of a crash during a save or a delete: never loadable, only taking space.
        for stale in [*root.glob(".tmp-step_*"), *root.glob(".del-step_*")]:
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    state = _state(train_state, rank, world)
    # DCP merges the ranks' save plans: shared tensors are written once, each rank's own RNG key by that rank.
    dcp.save(state, checkpoint_id=str(tmp))
    barrier()
    if rank == 0:
        payload = dict(meta, step=step, world_size=world)
        with open(tmp / MARKER, "w") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving a step (e.g. after resuming from an earlier one): replace it
            _discard(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last]:
            _discard(old.path)
    barrier()
    return final


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: first rename it out of the ``step_*`` namespace (atomic), so a crash during the
    slow recursive delete never leaves a ``step_*`` directory with its marker but missing shards."""
    doomed = path.with_name(f".del-{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, train_state: TrainState) -> dict[str, Any]:
    """Load a complete checkpoint into ``train_state`` (resharding to the current world size); return its metadata."""
    path = Path(path)
    meta = broadcast_object(read_checkpoint_meta(path))
    if meta is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    rank = dist.get_rank()
    state: dict[str, Any] = {"train": train_state}
    if rank < int(meta.get("world_size", 1)):
        state[f"rng_rank{rank}"] = RNGState(rank)
    dcp.load(state, checkpoint_id=str(path))
    return meta
