"""Timing helpers shared by the benchmarks (``semanticgen bench``) and ``semanticgen selftest``.

They live in the package, not in ``benchmarks/``, so the selftest runs from a source checkout whose extension
failed to build (``semanticgen.benchmarks`` exists only once the package is installed).

Wall-clock medians over repeats after warm-up: this machine is noisy, so every figure a benchmark
reports is also given as a ratio against a baseline measured in the same run, with its spread across
repeats (min, median, max). :func:`noise_flag` marks a figure whose max/min exceeds :data:`SPREAD_BOUND`,
so a table never shows a noisy number as if it were a measurement. GPU benchmarks use
:func:`cuda_event_times` (CUDA events, L2 flushed between calls) and :func:`summarize`;
:func:`time_candidates` picks that or the CPU's round-robin by device. :func:`flag_slow_layouts` marks a
layout of the same op that is slower than the best one beyond both rows' spread (a shape cliff).
"""

from __future__ import annotations

import glob
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
    """Median/min/max wall time of ``fn()`` in milliseconds (:func:`summarize`'s dict).

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
    return summarize(times)


def measure_interleaved(
    fns: dict[str, Callable[[], object]], *, device: str = "cpu", warmup: int = 1, repeats: int = 5
) -> dict[str, dict[str, float]]:
    """Time several functions round-robin; per function, :func:`summarize`'s median/min/max in milliseconds.

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
    return {name: summarize(ts) for name, ts in times.items()}


def summarize(times_ms: list[float]) -> dict[str, float]:
    """``{"ms": median, "ms_min", "ms_max", "repeats"}`` of per-call times in milliseconds."""
    if not times_ms:
        raise ValueError("summarize: no timings")
    return {
        "ms": statistics.median(times_ms),
        "ms_min": min(times_ms),
        "ms_max": max(times_ms),
        "repeats": len(times_ms),
    }


# A figure whose slowest repeat took more than this many times its fastest is flagged as noisy: on a
# quiet machine repeats of these benchmarks agree within ~10-20 %, so 1.5x means something else ran.
SPREAD_BOUND = 1.5


def noise_flag(timing: dict[str, float], bound: float = SPREAD_BOUND) -> str | None:
    """``"spread 2.1x > 1.5x"`` when ``ms_max / ms_min`` of a :func:`summarize` dict exceeds ``bound``, else None."""
    spread = timing["ms_max"] / timing["ms_min"] if timing["ms_min"] > 0 else float("inf")
    return f"spread {spread:.2f}x > {bound:g}x" if spread > bound else None


def spread_fields(timing: dict[str, float], scale: float = 1.0) -> dict[str, object]:
    """Row fields of one timed figure: ``ms`` (median), ``ms_min``, ``ms_max`` (all times ``scale``),
    ``repeats``, ``spread`` (max/min) and ``noise`` (:func:`noise_flag`, None when within the bound)."""
    return {
        "ms": timing["ms"] * scale,
        "ms_min": timing["ms_min"] * scale,
        "ms_max": timing["ms_max"] * scale,
        "repeats": timing["repeats"],
        "spread": timing["ms_max"] / timing["ms_min"] if timing["ms_min"] > 0 else float("inf"),
        "noise": noise_flag(timing),
    }


def add_noise(row: dict, reason: str) -> None:
    """Append ``reason`` to ``row["noise"]`` (``"; "``-separated), the one field flagged rows carry."""
    row["noise"] = f"{row['noise']}; {reason}" if row.get("noise") else reason


def last_level_cache_bytes(device: str = "cpu", sysfs: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """Size of the last-level cache in bytes: the GPU's L2 on CUDA, else the largest CPU cache level.

    Read from ``<sysfs>/index*/`` (level, type and size); 32 MiB when that is
    unreadable, a generous guess so buffers sized from it stay out of cache on most servers.
    """
    if device.startswith("cuda"):
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    best = (0, 0)
    for index in glob.glob(f"{sysfs}/index*"):
        try:
            with open(f"{index}/level") as f:
                level = int(f.read())
            with open(f"{index}/size") as f:
                text = f.read().strip()
            with open(f"{index}/type") as f:
                if f.read().strip() == "Instruction":
                    continue
        except (OSError, ValueError):
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
        size = int(text.rstrip("KMGkmg")) * unit
        best = max(best, (level, size))
    return best[1] or 32 * 2**20


_L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H200: 50 MB)
_flush_buffers: dict[str, torch.Tensor] = {}


def cuda_event_times(
    fn: Callable[[], object],
    *,
    device: str = "cuda",
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 20,
    min_seconds: float = 1.0,
    flush_l2: bool = True,
) -> list[float]:
    """GPU time of ``fn()`` per call in milliseconds, from CUDA events, one entry per timed call.

    Runs ``warmup`` untimed calls, then timed calls until there are at least ``min_repeats`` and either
    ``min_seconds`` of wall time have passed or there are ``max_repeats``: long kernels (a second per call)
    get a few repeats, short ones enough for a stable median, and the run's total time stays bounded.
    With ``flush_l2`` a 256 MB buffer is zeroed before each call (outside the timed span), so no call
    starts with its inputs in L2, as in ``triton.testing.do_bench``.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    flush = None
    if flush_l2:
        flush = _flush_buffers.get(device)
        if flush is None:
            flush = _flush_buffers.setdefault(device, torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device))
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < min_repeats or (len(times) < max_repeats and time.perf_counter() - start_all < min_seconds):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()  # per call: the stopping rule needs wall time, and calls here are >= milliseconds
        times.append(start.elapsed_time(end))
    return times


def time_candidates(
    fns: dict[str, Callable[[], object]],
    *,
    device: str,
    repeats: int,
    warmup: int = 1,
    cuda_warmup: int | None = None,
    cuda_min_seconds: float = 0.3,
) -> dict[str, dict[str, float]]:
    """Per candidate, :func:`summarize`'s median/min/max milliseconds, timed the fair way for ``device``.

    CUDA: each candidate on its own with :func:`cuda_event_times` (CUDA events, L2 flushed before every call)
    after ``cuda_warmup`` untimed calls (default ``warmup``; Triton and ``torch.compile`` compile in those), at
    least ``repeats`` calls and up to ``4 * repeats`` while under ``cuda_min_seconds``. Elsewhere
    :func:`measure_interleaved` with ``warmup`` and ``repeats``: round-robin, so background load on a shared CPU
    hits every candidate alike.
    """
    if device.startswith("cuda"):
        warmup = warmup if cuda_warmup is None else cuda_warmup
        return {
            name: summarize(
                cuda_event_times(
                    fn,
                    device=device,
                    warmup=warmup,
                    min_repeats=repeats,
                    max_repeats=4 * repeats,
                    min_seconds=cuda_min_seconds,
                )
            )
            for name, fn in fns.items()
        }
    return measure_interleaved(fns, device=device, warmup=warmup, repeats=repeats)


# A layout of the same op on the same data is a shape cliff when even its fastest repeat took more than this
# many times the best layout's slowest: issue 14's 1-D cfg_euler_step took 8.5x its (1, N) layout, while
# layouts that run the same loop agree within the repeats' spread. Comparing min against max means noise
# alone (one slow repeat, a busy neighbour) cannot flag a row; only a gap wider than both spreads can.
LAYOUT_BOUND = 1.5


def flag_slow_layouts(
    rows: list[dict], group: tuple[str, ...] = ("op", "impl", "dtype"), bound: float = LAYOUT_BOUND
) -> None:
    """Compare rows that time the same work in different layouts (one row per ``shape`` within each ``group``).

    Sets on every row ``vs_best_layout`` (its median over the fastest layout's median) and ``slow_layout``: None,
    or ``"2.10x (1, 16384): min 2.1 ms > 1.5 x max 0.95 ms"`` (that layout's name and the figures) when the row's
    ``ms_min`` exceeds ``bound`` times the fastest layout's ``ms_max``.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in group), []).append(row)
    for members in groups.values():
        best = min(members, key=lambda r: r["ms"])
        for row in members:
            row["vs_best_layout"] = row["ms"] / best["ms"] if best["ms"] > 0 else float("inf")
            slow = row["ms_min"] > bound * best["ms_max"]
            row["slow_layout"] = (
                f"{row['vs_best_layout']:.2f}x {best['shape']}: min {row['ms_min']:.3g} ms > "
                f"{bound:g} x max {best['ms_max']:.3g} ms"
                if slow
                else None
            )


class NullProgress:
    """Progress sink used when the caller passes none: ``advance(label)`` does nothing."""

    def advance(self, label: str = "") -> None:  # noqa: D401 - protocol method
        pass
