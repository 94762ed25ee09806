"""Process-group setup for ``torchrun`` (multi-process, multi-node) and plain ``python`` (one process).

Multi-node runs use ``torchrun``'s own rendezvous, e.g. on each of 2 nodes with 8 GPUs::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        -m semanticgen.train configs/my.toml --run-dir /shared/run1

NCCL is used when CUDA is available, gloo otherwise (CPU training).

Threads: ``OMP_NUM_THREADS``, when set, decides each process's intra-op threads (``torchrun`` sets it to 1 for
several processes per node unless the user did). Otherwise :func:`configure_threads` gives each of the node's
``LOCAL_WORLD_SIZE`` processes an equal share of the usable CPUs (affinity mask, capped by a cgroup CPU quota)
after leaving one for everything else, at least one thread: 1 for one process on 2 CPUs, 15 on 16.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from semanticgen._checks import check_int

logger = logging.getLogger(__name__)


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


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup quota allows (``docker --cpus=2``: 2.0), or None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # cgroup v1: -1 without a quota
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota.

    ``os.cpu_count()`` and torch's default count the host's CPUs, so a container limited to 2 of 64 would run
    64 threads on 2 CPUs' worth of time.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, cpus)


def intra_op_threads(cpus: int, local_world_size: int) -> int:
    """Threads per process: ``cpus`` minus one, split evenly between the node's processes, at least 1.

    One CPU is left for everything outside the compute threads (the OS, data-loader workers, other jobs). On
    the 2-CPU machines this project is tested on, with other jobs running, a 2-thread OpenMP team made the
    forward and backward pass of configs/tiny.toml's latent generator 23x slower than 1 thread (median of 21
    paired runs, 770 ms to 10.5 s against 66-370 ms): each parallel region waits until both threads run.
    """
    return max(1, (cpus - 1) // max(1, local_world_size))


def configure_threads() -> int:
    """Set torch's intra-op threads for this process (see the module docstring); returns the count.

    ``OMP_NUM_THREADS``, when set, is left as torch applied it (the user's or ``torchrun``'s choice).
    """
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cpus = usable_cpus()
    threads = intra_op_threads(cpus, local_world_size)
    torch.set_num_threads(threads)
    logger.info(
        "intra-op threads: %d per process (%d usable CPUs, %d process(es) on this node, one CPU left free; "
        "set OMP_NUM_THREADS to choose)",
        threads,
        cpus,
        local_world_size,
    )
    return threads


def join_process_group() -> None:
    """Join (or create) the default process group, once: under ``torchrun`` from its environment, else a
    single-rank group in-process (NCCL with CUDA, gloo otherwise). Sets this process's threads first
    (:func:`configure_threads`)."""
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
    from .config import UsageError

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
