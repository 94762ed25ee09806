"""FSDP2 wrapping: ``fully_shard`` per transformer block, then the root, under a mixed-precision policy."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .config import ParallelConfig


def mixed_precision_policy(setting: str, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters with fp32 gradient reduction on CUDA; plain fp32 on CPU (``"auto"``)."""
    if setting == "auto":
        setting = "bf16" if device.type == "cuda" else "fp32"
    if setting == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if setting == "fp32":
        return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=None)
    raise ValueError(f"mixed precision must be 'auto', 'bf16' or 'fp32', got {setting!r}")


def _wrap_block(block: nn.Module, parallel: ParallelConfig) -> nn.Module:
    """Optional activation checkpointing and ``torch.compile`` for one block (before sharding)."""
    if parallel.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        block = checkpoint_wrapper(block, preserve_rng_state=True)
    if parallel.compile:
        block.compile()
    return block


def shard_model(model: nn.Module, mesh: DeviceMesh, parallel: ParallelConfig, device: torch.device) -> nn.Module:
    """Shard ``model`` in place and return it.

    Every submodule that has a ``.blocks`` ``nn.ModuleList`` gets ``fully_shard`` on each block; ``model`` itself is
    sharded last, so the parameters outside any block (embeddings, heads, small models such as the compressor) form
    the root group, gathered once per forward. Parameters are moved to ``device`` first.
    """
    mp = mixed_precision_policy(parallel.mixed_precision, device)
    model.to(device)
    owners = [m for m in model.modules() if isinstance(getattr(m, "blocks", None), nn.ModuleList)]
    for owner in owners:
        for i, block in enumerate(owner.blocks):
            block = _wrap_block(block, parallel)
            owner.blocks[i] = block
            # The last block's parameters are needed again at once by the backward pass: keep them unsharded.
            reshard = parallel.reshard_after_forward and i < len(owner.blocks) - 1
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=parallel.reshard_after_forward)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip (``False``) or do (``True``) the gradient reduce-scatter of the next backward (gradient accumulation)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled, recurse=True)
