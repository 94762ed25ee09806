"""FSDP2 wrapping: ``fully_shard`` per transformer block, then the root, under a mixed-precision policy; and
materialising a model built on the meta device shard by shard.

Models are built on the meta device (no storage), sharded, then ``to_empty`` gives each rank storage for its own
shards only. Initial values come from :func:`materialize`: one *init unit* at a time (each transformer block, then
the rest of each model) is built in full on the CPU from a generator seeded by ``(seed, unit name)``, initialised
with :func:`~semanticgen.models.init_weights`, and each rank copies its shard out of it. So the initial parameters do
not depend on the number of ranks or the mesh, and the transient full-size memory is one block, not one model
(a 14B model in fp32 is 56 GB; one of its 40 blocks is 1.4 GB).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
import zlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from semanticgen.models import init_weights

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
    """Optional ``torch.compile`` and activation checkpointing for one block (before sharding).

    ``compile`` compiles the block's ``forward`` (:meth:`~semanticgen.models.blocks.SplitForward.compile_forward`),
    which ``__call__`` and both parts of ``forward_split`` (overlapped context parallelism) run. Checkpointing
    covers ``forward_split`` as well as ``__call__``, and recomputes through the compiled ``forward``.
    """
    if parallel.compile:
        # Inside the checkpoint, not around it (torchtitan compiles the checkpointed block): forward_split waits
        # for the halo between its two parts, which no graph can hold, so only forward can be compiled on that
        # path, and both paths compile the same thing.
        block.compile_forward()
    if parallel.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        inner = block
        block = checkpoint_wrapper(block, preserve_rng_state=True)
        if hasattr(inner, "forward_split"):
            # The wrapper hands unknown attributes to the block, so forward_split would keep its activations.
            # Recomputation calls its halo wait again, which then returns the block already received (no resend).
            block.forward_split = functools.partial(block.checkpoint_fn, inner.forward_split)
    return block


def shard_model(model: nn.Module, mesh: DeviceMesh, parallel: ParallelConfig, device: torch.device) -> nn.Module:
    """Shard ``model`` in place and return it.

    Units, innermost first: every block of every submodule's ``.blocks`` ``nn.ModuleList`` (with its
    ``forward_split``, if any, registered as an FSDP forward method: one unshard per call); then every direct child
    of ``model`` that holds parameters (the generators, the compressor), so their embeddings and heads form one
    group each and FSDP casts their floating inputs to the policy's parameter dtype; then ``model`` itself.
    Parameters are moved to ``device`` first.
    """
    mp = mixed_precision_policy(parallel.mixed_precision, device)
    if any(p.is_meta for p in model.parameters()):
        # Built on the meta device: parameters get storage after sharding (materialize); move the buffers only.
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and not buf.is_meta:
                    setattr(module, name, buf.to(device))
    else:
        model.to(device)
    owners = [m for m in model.modules() if isinstance(getattr(m, "blocks", None), nn.ModuleList)]
    for owner in owners:
        for i, block in enumerate(owner.blocks):
            block = _wrap_block(block, parallel)
            owner.blocks[i] = block
            # The last block's parameters are needed again at once by the backward pass: keep them unsharded.
            reshard = parallel.reshard_after_forward and i < len(owner.blocks) - 1
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
            if hasattr(block, "forward_split"):
                # Overlapped CP runs a block on its interior and boundary windows in this one call; FSDP hooks only
                # __call__, and two calls would gather the parameters twice in forward and twice in backward.
                register_fsdp_forward_method(block, "forward_split")
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh, mp_policy=mp, reshard_after_forward=parallel.reshard_after_forward)
            if hasattr(child, "forward_context_parallel"):
                # FSDP hooks only __call__: this entry point must gather the generator's own parameters too.
                register_fsdp_forward_method(child, "forward_context_parallel")
    # The root receives the data batch: keep it in fp32 (latents, noise targets); the children cast what they get.
    root_mp = dataclasses.replace(mp, cast_forward_inputs=False)
    fully_shard(model, mesh=mesh, mp_policy=root_mp, reshard_after_forward=parallel.reshard_after_forward)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip (``False``) or do (``True``) the gradient reduce-scatter of the next backward (gradient accumulation)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled, recurse=True)


# ------------------------------------------------------------------------------------------ meta build
@dataclasses.dataclass
class InitUnit:
    """One piece of a model initialised at once: ``template`` (a meta-device copy, unsharded) and ``module`` (the
    real module whose parameters it fills, minus those in ``exclude``: the blocks, which are units of their own)."""

    name: str
    template: nn.Module
    module: nn.Module
    exclude: tuple[nn.Module, ...] = ()


def init_units(models: dict[str, nn.Module]) -> list[InitUnit]:
    """The init units of meta-device ``models`` (call before sharding): every block of every ``.blocks``
    ``nn.ModuleList`` (named ``<model>.blocks.<i>``), then the rest of each model (named ``<model>``)."""
    units = []
    for name, model in models.items():
        if not all(p.is_meta for p in model.parameters()):
            raise ValueError(f"init_units: model {name!r} must be built on the meta device")
        template = copy.deepcopy(model)  # meta: no storage is copied
        blocks = getattr(model, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for i, block in enumerate(blocks):
                units.append(InitUnit(f"{name}.blocks.{i}", template.blocks[i], block))
            template.blocks = nn.ModuleList()
            units.append(InitUnit(name, template, model, tuple(blocks)))
        else:
            units.append(InitUnit(name, template, model))
    return units


def unit_seed(seed: int, name: str) -> int:
    """Seed of init unit ``name``: a stable hash (not Python's salted ``hash``) of ``(seed, name)``."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _owned_parameters(module: nn.Module, exclude: tuple[nn.Module, ...]) -> dict[str, nn.Parameter]:
    """``module``'s parameters by name, without those of the ``exclude`` submodules."""
    skip = {id(p) for m in exclude for p in m.parameters()}
    return {n: p for n, p in module.named_parameters() if id(p) not in skip}


@torch.no_grad()
def copy_full_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the full (unsharded) ``value`` into ``param``, keeping only this rank's shard if it is a DTensor.

    Every rank holds the same ``value``, so each cuts its own shard locally (``src_data_rank=None``: no
    communication), exactly as ``fully_shard`` cut the parameter.
    """
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"copy_full_into: parameter of shape {tuple(param.shape)} got a value of {tuple(value.shape)}")
    if isinstance(param, DTensor):
        local = param.to_local()
        shard = distribute_tensor(
            value.to(local.device, local.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
        local.copy_(shard.to_local())
    else:
        param.copy_(value.to(param.device, param.dtype))


@torch.no_grad()
def materialize(
    root: nn.Module, units: list[InitUnit], device: torch.device, seed: int, *, loaded: frozenset[str] = frozenset()
) -> None:
    """Give the meta-built, sharded ``root`` storage on ``device`` and initialise every unit (see module docstring).

    Units named in ``loaded`` are about to be overwritten (by a pretrained checkpoint or a resumed one): building
    and initialising their full copies would be wasted (for a 14B model that is 14B random draws on every rank), so
    their shards are filled with NaN instead, which makes any parameter the load misses impossible to overlook.
    Buffers that already hold values (e.g. a stage's empty-prompt embedding) keep them.

    Raises:
        ValueError: ``loaded`` names a unit that does not exist.
    """
    unknown = set(loaded) - {unit.name for unit in units}
    if unknown:
        raise ValueError(f"materialize: loaded names unknown init units {sorted(unknown)}")
    kept = {(id(m), n): b.clone() for m in root.modules() for n, b in m.named_buffers(recurse=False) if not b.is_meta}
    root.to_empty(device=device)
    for m in root.modules():
        for n, b in m.named_buffers(recurse=False):
            if (id(m), n) in kept:
                b.copy_(kept[(id(m), n)])
    for unit in units:
        targets = _owned_parameters(unit.module, unit.exclude)
        if unit.name in loaded:
            for param in targets.values():
                (param.to_local() if isinstance(param, DTensor) else param).fill_(float("nan"))
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(unit_seed(seed, unit.name))
            full = init_weights(unit.template.to_empty(device="cpu"))
        values = dict(full.named_parameters())
        if values.keys() != targets.keys():
            raise ValueError(f"materialize: unit {unit.name!r} template and module parameters differ")
        for name, value in values.items():
            copy_full_into(targets[name], value)
        unit.template.to_empty(device="meta")  # drop the full copy now, not when the unit list goes


@torch.no_grad()
def check_loaded(root: nn.Module) -> None:
    """Raise if a parameter of ``root`` still holds the NaN :func:`materialize` put in units it was told are loaded.

    Each rank checks its own shards, so a missing value is reported by the ranks that hold it.

    Raises:
        RuntimeError: naming the first such parameter.
    """
    for name, param in root.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if local.is_floating_point() and local.numel() and bool(torch.isnan(local).all()):
            raise RuntimeError(f"{name} is all NaN after loading: no checkpoint filled it, or the checkpoint holds NaN")


@torch.no_grad()
def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict (e.g. from an export) into a possibly sharded ``module``; keys must match."""
    params = dict(module.named_parameters())
    if params.keys() != state.keys():
        missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        raise ValueError(f"load_full_state: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for name, value in state.items():
        copy_full_into(params[name], value)
