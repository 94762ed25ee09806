"""Timing helpers shared by the benchmark modules.

Wall-clock medians over repeats after warm-up: this machine is noisy, so every figure a benchmark
reports is also given as a ratio against a baseline measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], object], *, device: str = "cpu", warmup: int = 1, repeats: int = 5, min_seconds: float = 0.0
) -> dict[str, float]:
    """Median/min wall time of ``fn()`` in milliseconds.

    Runs ``warmup`` untimed calls, then at least ``repeats`` timed calls (more while the total is
    under ``min_seconds``, for very short kernels).
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all) < min_seconds:
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        if len(times) >= 1000:
            break
    return {"ms": statistics.median(times), "ms_min": min(times), "repeats": len(times)}


def measure_interleaved(
    fns: dict[str, Callable[[], object]], *, device: str = "cpu", warmup: int = 1, repeats: int = 5
) -> dict[str, dict[str, float]]:
    """Time several functions round-robin; per function, the median/min in milliseconds.

    Interleaving puts every candidate under the same background load, so the ratios between them
    stay meaningful on a noisy machine even when absolute times drift.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"ms": statistics.median(ts), "ms_min": min(ts), "repeats": len(ts)} for name, ts in times.items()}


class NullProgress:
    """Progress sink used when the caller passes none: ``advance(label)`` does nothing."""

    def advance(self, label: str = "") -> None:  # noqa: D401 - protocol method
        pass
