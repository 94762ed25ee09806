"""The context-parallel benchmark's parts: the bytes it counts equal the plan's halo formula, rows are complete."""

from __future__ import annotations

import pytest
from semanticgen.benchmarks import context_parallel as cpb

from semanticgen import bench

# Odd depth, 8 latent frames in windows of 2: 4 unshifted windows, 2 per rank.
TINY = cpb.Case("tiny", hidden=32, heads=2, depth=3, frames=8, height=4, width=8, sem_frames=2, sem_tokens=4,
                window=2, steps=1)  # fmt: skip


@pytest.mark.distributed
def test_two_ranks_send_the_formula_bytes_and_half_the_tokens():
    row = cpb.measure_config(TINY, 2, 1)
    # Bytes of the default (overlapped) steps; the blocking steps are timed for the ratio.
    assert row["bytes_sent_per_rank"] == row["halo_formula_bytes"] > 0
    assert row["vae_tokens_per_rank"] == TINY.vae_tokens // 2 == 32
    assert row["step_ms"] > 0 and row["peak_rss_mb"] > 0
    assert row["overlap_speedup"] == row["step_ms_blocking"] / row["step_ms"]
    one = cpb.measure_config(TINY, 1, 1)
    assert one["bytes_sent_per_rank"] == one["halo_formula_bytes"] == 0
    assert one["vae_tokens_per_rank"] == TINY.vae_tokens
    assert one["step_ms_blocking"] is None and one["overlap_speedup"] is None


def test_suite_is_registered_and_skips_cuda(monkeypatch):
    assert bench.SUITES["cp"] == "context_parallel"
    assert cpb.skip_reason("cuda") is not None and cpb.skip_reason("cpu") is None
    assert cpb.run(device="cuda") == []
    calls = []

    def fake(case, size, threads):
        calls.append((case.name, size, threads))
        return {"step_ms": 10.0 / size, "step_rss_mb": 8.0 / size}

    monkeypatch.setattr(cpb, "measure_config", fake)
    rows = cpb.run(quick=True)
    assert calls == [("quick", 1, 1), ("quick", 1, 2), ("quick", 2, 1)]
    assert [r["speedup_vs_cp1_1thread"] for r in rows] == [1.0, 1.0, 2.0]
    assert rows[2]["step_rss_vs_cp1"] == 0.5


def _child_peak(queue) -> None:
    queue.put(cpb._max_rss_mb())


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="VmHWM is Linux's")
def test_a_spawned_rank_does_not_report_its_parents_peak_memory():
    """Inside ``semanticgen bench`` the ranks are spawned from a process that already peaked at ~2 GB; Linux
    carries that peak into a forked-then-exec'd child's ``ru_maxrss``, so every rank reported it. ``VmHWM`` is
    the child's own."""
    import multiprocessing as mp

    import torch

    big = torch.ones(100_000_000)  # 400 MB resident in the parent
    big.add_(1)
    parent = cpb._max_rss_mb()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_peak, args=(queue,))
    child.start()
    peak = queue.get(timeout=120)
    child.join(timeout=60)
    assert parent > 400
    assert peak < parent - 300, (peak, parent)  # the child's own peak (an interpreter with torch), not the parent's
