"""Process-group setup for ``torchrun`` (multi-process, multi-node) and plain ``python`` (one process).

Multi-node runs use ``torchrun``'s own rendezvous, e.g. on each of 2 nodes with 8 GPUs::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        -m semanticgen.train configs/my.toml --run-dir /shared/run1

NCCL is used when CUDA is available, gloo otherwise (CPU training).

Each process sets its intra-op threads when it joins the group (:func:`semanticgen.threads.configure_threads`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from semanticgen._checks import check_int
from semanticgen.errors import UsageError
from semanticgen.threads import configure_threads


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run.

    ``mesh``: the mesh FSDP2 shards parameters over (all ranks: ``dp x cp`` flattened). ``dp_rank``/``dp_size``:
    which clip stream this rank reads (the ``C`` ranks of a context-parallel group read the same clips).
    ``cp_rank``/``cp_size``/``cp_group``: the context-parallel group (size 1 and no group without CP).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    cp_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_process_group() -> None:
    """Join (or create) the default process group, once: under ``torchrun`` from its environment, else a
    single-rank group in-process (NCCL with CUDA, gloo otherwise). Sets this process's threads first
    (:func:`~semanticgen.threads.configure_threads`)."""
    if dist.is_initialized():
        return
    configure_threads()
    use_cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    else:
        if use_cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)


def init_distributed(context_parallel: int = 1) -> DistInfo:
    """Join (or create) the default process group and the ``(dp, cp)`` device mesh over all ranks.

    Under ``torchrun`` the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) says where to
    connect; without it a single-rank group is made in-process so the same FSDP code path runs.

    With ``context_parallel = C`` the world forms a ``(world / C, C)`` mesh named ``("dp", "cp")``, consecutive
    ranks sharing a ``cp`` group (on one node, where the halo exchange is cheapest). FSDP2 shards over both dims
    flattened (``"dp_cp"``, as torchtitan's ``dp_shard_cp``), so gradients are averaged over every rank.

    Raises:
        UsageError: ``context_parallel`` does not divide the world size.
    """
    check_int("parallel.context_parallel", context_parallel, minimum=1, error=UsageError)
    use_cuda = torch.cuda.is_available()
    join_process_group()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size % context_parallel:
        raise UsageError(
            f"parallel.context_parallel = {context_parallel} must divide the world size {world_size} "
            f"(launch a multiple of {context_parallel} processes)"
        )
    if context_parallel == 1:
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
        return DistInfo(rank, world_size, local_rank, device, mesh, dp_rank=rank, dp_size=world_size)
    mesh_2d = init_device_mesh(
        device.type, (world_size // context_parallel, context_parallel), mesh_dim_names=("dp", "cp")
    )
    cp_mesh = mesh_2d["cp"]
    return DistInfo(
        rank,
        world_size,
        local_rank,
        device,
        mesh_2d["dp", "cp"]._flatten("dp_cp"),
        dp_rank=mesh_2d["dp"].get_local_rank(),
        dp_size=world_size // context_parallel,
        cp_rank=cp_mesh.get_local_rank(),
        cp_size=context_parallel,
        cp_group=cp_mesh.get_group(),
    )


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Average a dict of per-rank scalars (floats or 0-d tensors) over all ranks (same keys on every rank)."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))
