"""Window-parallel context parallelism on CPU (gloo): one stage-2 forward+backward of a long clip, CP 1 vs CP 2.

Each configuration runs in fresh processes (spawned, one per rank, gloo over a file store): the latent generator
(``attention="swin"``) runs :meth:`~semanticgen.models.LatentGenerator.forward_context_parallel` on its ranks'
windows and back-propagates the training loss (each rank's squared error over its tokens). Per configuration:

* ``step_ms``: median wall time of one forward+backward step (the slowest rank; a barrier starts every step);
* ``peak_rss_mb``: peak resident memory of the busiest rank's process (``VmHWM``: the process's lifetime peak,
  model and interpreter included), and ``step_rss_mb``: how far the steps raised it above what the process held
  after building the model and the inputs (activations, attention scores, gradients);
* ``bytes_sent_per_rank``: halo bytes each rank sends per step, counted at the point-to-point calls
  (:data:`~semanticgen.parallel.COMM_COUNTER`), next to ``halo_formula_bytes`` from the plan
  (:meth:`~semanticgen.parallel.ContextPlan.handover`): they must agree;
* CP > 1 only: ``step_ms`` is the default path, the halo exchange overlapped with the interior windows
  (``ContextGroup.overlap``); ``step_ms_blocking`` the same step waiting for the halo before each layer, timed in
  the same processes between two runs of the overlapped steps (so linear drift falls on both); ``overlap_speedup``
  is ``step_ms_blocking / step_ms`` (above 1: the overlap helps). Memory and bytes are the overlapped path's.
* CP > 1 only, the training path: the same processes then shard the model as training does
  (:func:`~semanticgen.train.sharding.shard_model`: ``fully_shard`` per block, fp32, over both ranks) and time
  the step again, overlapped and blocking: ``fsdp_step_ms``, ``fsdp_step_ms_blocking``, ``fsdp_overlap_speedup``,
  and ``fsdp_all_gathers`` / ``fsdp_all_gathers_blocking``, FSDP's parameter all-gathers per step on each path
  (equal: an overlapped block is one FSDP call, ``forward_split``).

Rows: CP 1 with 1 thread, CP 1 with 2 threads (the same cores as CP 2) and CP 2 with 1 thread per rank. On a
2-core machine CP 2 can at best halve the 1-thread time: the time gain is bounded by the cores, the memory gain is
the point. The overlap can only hide the transfer of one block per layer, a small part of a step on one machine,
and both ranks share the 2 cores with gloo's I/O threads. GPU numbers are in ``semanticgen plan
--context-parallel`` (estimates, not measurements).

Run alone: ``python -m semanticgen.benchmarks.context_parallel [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from semanticgen._procstatus import proc_status_field
from semanticgen.timing import NullProgress


@dataclass(frozen=True)
class Case:
    """A clip ``[B, C, T, H, W]`` of latents (patch ``(1, 2, 2)``) with ``Ts x Ss`` semantic tokens, and a model."""

    name: str
    hidden: int
    heads: int
    depth: int
    frames: int  # latent frames T
    height: int  # latent H (tokens per frame: H/2 * W/2)
    width: int
    sem_frames: int
    sem_tokens: int
    window: int  # latent frames per window
    batch: int = 1
    steps: int = 3  # timed steps after one warm-up step

    @property
    def vae_tokens(self) -> int:
        return self.frames * (self.height // 2) * (self.width // 2)


# Windows of 8 frames x 128 tokens (+ semantic tokens) with a narrow model: attention is most of the FLOPs and of
# the memory (the CPU backend materialises each window's [heads, L, L] scores).
QUICK_CASE = Case("quick", hidden=64, heads=2, depth=2, frames=16, height=16, width=32, sem_frames=4,
                  sem_tokens=32, window=8, steps=2)  # fmt: skip
FULL_CASE = Case("full", hidden=128, heads=4, depth=4, frames=32, height=16, width=32, sem_frames=8,
                 sem_tokens=32, window=8)  # fmt: skip
CONFIGS = ((1, 1), (1, 2), (2, 1))  # (context_parallel, threads per rank)


def _model_and_inputs(case: Case):
    from semanticgen.models import LatentGenerator

    torch.manual_seed(0)
    cfg = dataclasses.replace(
        LatentGenerator.Config.tiny(),
        hidden=case.hidden,
        heads=case.heads,
        depth=case.depth,
        attention="swin",
        window=case.window,
    )
    model = LatentGenerator(cfg)
    with torch.no_grad():  # non-zero output layers and modulation: time the real computation paths
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    b, c = case.batch, cfg.in_channels
    x = torch.randn(b, c, case.frames, case.height, case.width, generator=g)
    z_sem = torch.randn(b, case.sem_frames, case.sem_tokens, cfg.sem_dim, generator=g)
    text = torch.randn(b, 8, cfg.text_dim, generator=g)
    mask = torch.ones(b, 8, dtype=torch.bool)
    t = torch.rand(b, generator=g)
    target = torch.randn_like(x)
    return model, (x, t, text, mask, z_sem), target


def halo_bytes(case: Case, size: int, rank: int) -> int:
    """Bytes rank ``rank`` of ``size`` sends per forward+backward by the plan: its handed-over block (and the one it
    returns) at every change of window parity and on the way back, forward and backward, fp32."""
    from semanticgen.models import LatentGenerator
    from semanticgen.parallel import ContextPlan

    if size == 1:
        return 0
    cfg = dataclasses.replace(LatentGenerator.Config.tiny(), attention="swin", window=case.window)
    layout = LatentGenerator(cfg).window_layout(
        case.frames, (case.height // 2) * (case.width // 2), case.sem_frames, case.sem_tokens
    )
    plan = ContextPlan.build(layout, size)
    transitions = case.depth - 1 + (case.depth % 2 == 0)
    return transitions * sum(plan.handover(rank)) * case.batch * case.hidden * 4


def _max_rss_mb() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` of ``/proc/self/status`` on Linux, else ``ru_maxrss``.

    Not ``ru_maxrss`` on Linux: a spawned rank is forked from the benchmark process before it execs, and Linux
    carries the parent's peak across fork and exec into ``ru_maxrss``, so inside ``semanticgen bench`` every rank
    reported the parent's peak (about 2 GB after the attention suites) and the steps appeared to add nothing.
    ``VmHWM`` belongs to the process's own address space, which exec replaces.
    """
    peak = proc_status_field("VmHWM")  # "123456 kB"
    if peak is not None:
        return int(peak.split()[0]) / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _worker(rank: int, size: int, threads: int, store_path: str, case: Case, results) -> None:
    import torch.distributed as dist

    from semanticgen.models import patchify
    from semanticgen.parallel import COMM_COUNTER, ContextGroup

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if size > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, size), rank=rank, world_size=size)
    try:
        cp = ContextGroup.from_group() if size > 1 else ContextGroup(0, 1)
        model, inputs, target = _model_and_inputs(case)
        goal_all = patchify(target, model.patch)
        rss_before = _max_rss_mb()

        def step(overlap: bool, net=None) -> int:
            cp.overlap = overlap
            if net is None:
                pred, index = model.forward_context_parallel(*inputs, cp)
                loss = (pred - goal_all.index_select(1, index)).square().sum() / target.numel()
            else:
                loss, index = net(inputs, cp)
            loss.backward()
            (net or model).zero_grad(set_to_none=True)
            return index.numel()

        def timed(overlap: bool, net=None) -> list[float]:
            times = []
            for _ in range(case.steps):
                if size > 1:
                    dist.barrier()
                t0 = time.perf_counter()
                step(overlap, net)
                if size > 1:
                    dist.barrier()  # the step ends when the slowest rank is done
                times.append((time.perf_counter() - t0) * 1e3)
            return times

        local_tokens = step(True)  # warm-up (layouts, plans, allocator)
        COMM_COUNTER.reset()
        times = timed(True)
        sent = COMM_COUNTER.bytes_sent // case.steps
        # Memory of the default (overlapped) path alone: running the other path in the same process raised the
        # lifetime peak by about 100 MB more (allocator reuse), though both save the same tensors within 0.5 MB.
        peak_rss, step_rss = _max_rss_mb(), _max_rss_mb() - rss_before
        blocking = None
        fsdp = {}
        if size > 1:  # only CP > 1 has a halo to overlap
            step(False)  # warm-up
            blocking = timed(False)
            times += timed(True)  # overlapped, blocking, overlapped: linear drift falls on both
            fsdp = _fsdp_timings(model, inputs, goal_all, target.numel(), cp, timed_fn=timed, step_fn=step)
        results[rank] = {
            **fsdp,
            "ms": statistics.median(times),
            "ms_blocking": statistics.median(blocking) if blocking else None,
            "bytes": sent,
            "peak_rss_mb": peak_rss,
            "step_rss_mb": step_rss,
            "local_vae_tokens": local_tokens,
        }
    finally:
        if size > 1:
            dist.destroy_process_group()


class _LossStage(torch.nn.Module):
    """What a training stage is to FSDP: the root unit, whose forward calls the generator's CP entry point and
    returns this rank's share of the loss and its VAE token indices."""

    def __init__(self, generator, goal: torch.Tensor, numel: int) -> None:
        super().__init__()
        self.latent_generator = generator
        self.goal, self.numel = goal, numel  # plain attributes: not parameters or buffers

    def forward(self, inputs, cp):
        pred, index = self.latent_generator.forward_context_parallel(*inputs, cp)
        return (pred - self.goal.index_select(1, index)).square().sum() / self.numel, index


def _fsdp_timings(model, inputs, goal, numel: int, cp, *, timed_fn, step_fn) -> dict:
    """Shard ``model`` in place as training does and time its step, overlapped and blocking (see module docstring)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from semanticgen.train.config import ParallelConfig
    from semanticgen.train.sharding import shard_model

    net = _LossStage(model, goal, numel)
    shard_model(net, init_device_mesh("cpu", (cp.size,)), ParallelConfig(), torch.device("cpu"))
    gathers = []
    all_gather_single = dist.all_gather_single

    def counted(*args, **kwargs):  # FSDP2's parameter all-gather (torch 2.14)
        gathers.append(1)
        return all_gather_single(*args, **kwargs)

    dist.all_gather_single = counted
    try:
        counts = {}
        for overlap in (True, False):  # also the warm-up of each path (FSDP's lazy initialisation on the first)
            gathers.clear()
            step_fn(overlap, net)
            counts[overlap] = len(gathers)
        times = timed_fn(True, net)
        blocking = timed_fn(False, net)
        times += timed_fn(True, net)  # overlapped, blocking, overlapped, as for the unsharded step
    finally:
        dist.all_gather_single = all_gather_single
    return {
        "fsdp_ms": statistics.median(times),
        "fsdp_ms_blocking": statistics.median(blocking),
        "fsdp_all_gathers": counts[True],
        "fsdp_all_gathers_blocking": counts[False],
    }


def measure_config(case: Case, size: int, threads: int) -> dict:
    """Run one configuration in ``size`` fresh processes; one row."""
    import torch.multiprocessing as mp

    manager = mp.Manager()
    try:
        results = manager.dict()
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(size, threads, os.path.join(tmp, "store"), case, results), nprocs=size, join=True)
        per_rank = [dict(results[r]) for r in range(size)]
    finally:
        manager.shutdown()
    blocking = max(r["ms_blocking"] for r in per_rank) if size > 1 else None
    step_ms = max(r["ms"] for r in per_rank)
    fsdp = {}
    if size > 1:
        fsdp_ms = max(r["fsdp_ms"] for r in per_rank)
        fsdp_blocking = max(r["fsdp_ms_blocking"] for r in per_rank)
        fsdp = {
            "fsdp_step_ms": fsdp_ms,
            "fsdp_step_ms_blocking": fsdp_blocking,
            "fsdp_overlap_speedup": fsdp_blocking / fsdp_ms,
            "fsdp_all_gathers": max(r["fsdp_all_gathers"] for r in per_rank),
            "fsdp_all_gathers_blocking": max(r["fsdp_all_gathers_blocking"] for r in per_rank),
        }
    return {
        "suite": "cp",
        "case": case.name,
        "context_parallel": size,
        "threads_per_rank": threads,
        "vae_tokens": case.vae_tokens,
        "vae_tokens_per_rank": max(r["local_vae_tokens"] for r in per_rank),
        "step_ms": step_ms,
        "step_ms_blocking": blocking,
        "overlap_speedup": blocking / step_ms if blocking is not None else None,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in per_rank),
        "step_rss_mb": max(r["step_rss_mb"] for r in per_rank),
        "bytes_sent_per_rank": max(r["bytes"] for r in per_rank),
        "halo_formula_bytes": max(halo_bytes(case, size, r) for r in range(size)),
        **fsdp,
    }


def steps(quick: bool = False) -> int:
    """How many progress steps :func:`run` reports."""
    return len(CONFIGS)


def skip_reason(device: str) -> str | None:
    """A CPU (gloo) suite: skipped when the run is on CUDA (GPU figures: ``semanticgen plan --context-parallel``)."""
    if not device.startswith("cpu"):
        return "a CPU/gloo suite: run it with --device cpu"
    return None


def run(quick: bool = False, device: str = "cpu", progress=None) -> list[dict]:
    """Rows for CP 1 (1 and 2 threads) and CP 2 (1 thread per rank; overlapped and blocking halo, unsharded and
    FSDP-sharded) on one clip."""
    reason = skip_reason(device)
    if reason is not None:
        print(f"context_parallel: {reason}")
        return []
    progress = progress or NullProgress()
    case = QUICK_CASE if quick else FULL_CASE
    rows = []
    for size, threads in CONFIGS:
        rows.append(measure_config(case, size, threads))
        progress.advance(f"cp: CP {size}, {threads} thread(s) per rank")
    base = rows[0]
    for row in rows:
        row["speedup_vs_cp1_1thread"] = base["step_ms"] / row["step_ms"]
        row["step_rss_vs_cp1"] = row["step_rss_mb"] / base["step_rss_mb"] if base["step_rss_mb"] > 0 else None
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller clip and model")
    args = parser.parse_args(argv)
    for row in run(quick=args.quick):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
