"""FSDP2 wrapping: ``fully_shard`` per transformer block, then the root, under a mixed-precision policy."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .config import ParallelConfig

# FSDP2 warns when a non-root unit (a generator) returns a view, because an in-place op on it would skip the
# pre-backward hook. The stages only read generator outputs out of place (in the loss), so the warning is noise.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


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

    Units, innermost first: every block of every submodule's ``.blocks`` ``nn.ModuleList``; then every direct child
    of ``model`` that holds parameters (the generators, the compressor), so their embeddings and heads form one
    group each and FSDP casts their floating inputs to the policy's parameter dtype; then ``model`` itself.
    Parameters are moved to ``device`` first.
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
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh, mp_policy=mp, reshard_after_forward=parallel.reshard_after_forward)
    # The root receives the data batch: keep it in fp32 (latents, noise targets); the children cast what they get.
    root_mp = dataclasses.replace(mp, cast_forward_inputs=False)
    fully_shard(model, mesh=mesh, mp_policy=root_mp, reshard_after_forward=parallel.reshard_after_forward)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip (``False``) or do (``True``) the gradient reduce-scatter of the next backward (gradient accumulation)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled, recurse=True)
