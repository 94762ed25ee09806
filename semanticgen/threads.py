"""How many intra-op threads a process of this package runs: training, generation, evaluation alike.

``OMP_NUM_THREADS``, when set, decides each process's intra-op threads (``torchrun`` sets it to 1 for several
processes per node unless the user did). Otherwise :func:`configure_threads` gives each of the node's
``LOCAL_WORLD_SIZE`` processes an equal share of the usable CPUs (affinity mask, capped by a cgroup CPU quota)
after leaving one for everything else, at least one thread: 1 for one process on 2 CPUs, 15 on 16.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

__all__ = ["configure_threads", "intra_op_threads", "usable_cpus"]

logger = logging.getLogger(__name__)


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
