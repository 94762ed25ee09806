"""Shifted-window attention on one GPU: the varlen and Triton backends against FlexAttention and dense flash.

Geometry is the plan's (``semanticgen plan --seconds S --height 480 --width 832``): 1,560 VAE tokens per
latent frame, 510 semantic tokens per semantic frame, windows of ``Tw = 20`` latent frames. Cases:

* ``60s``: 586,080 tokens, 18 windows (19 shifted), 4 heads (fewer than Wan 1.3B's 12 to fit the run in
  about two minutes: at this size one forward+backward of 12 heads takes seconds; per-FLOP rates and the
  speedup over full attention do not depend on the head count once the GPU is full, and 18 windows x 4
  heads x 256 query tiles fill it). Every implementation runs here.
* ``10s`` (97,680 tokens) and ``20s`` (195,360 tokens) at 12 heads: varlen and Triton in blocked order.
  Dense full attention is measured at ``10s``, the largest size where it takes well under a second.

Head dim 128, bf16, batch 1. Implementations:

* ``varlen``: ``swin_attention(backend="varlen")`` (FlashAttention varlen; the row names the kernel), in
  blocked order (a view) and in streams order (gather into blocked order and scatter back included);
* ``triton``: ``swin_attention(backend="triton")``, blocked and streams order;
* ``flex_attention``: compiled FlexAttention with a block mask of the same windows (blocked order; the
  mask is built once per parity, outside the timing, as the backends' tables are);
* ``dense_flash``: full attention through SDPA's flash backend, the baseline.

Every call averages both window parities (models alternate them by layer). Times are CUDA events with
L2 flushed before each call; per row: median ms with min/max, useful TFLOP/s (in-window FLOPs; full
attention counts ``N^2``; backward = 2.5x forward), ``flop_rate_vs_dense`` (useful TFLOP/s over the dense
flash TFLOP/s of this run), the speedup over full attention (measured where dense ran at the same size and
heads, otherwise extrapolated from the dense rate, marked ``extrapolated``), and the issue's targets, met
or missed. ``bwd`` rows are derived: ``fwd+bwd`` minus ``fwd``. Forward calls run with autograd on, as in
training (one compiled graph for FlexAttention).

Correctness first: on a small case each backend (and dense flash) is compared with an fp32 reference,
forward and gradients; at each timed size every implementation's outputs and gradients are compared with
those of the varlen backend. An implementation that fails gets an ``error`` row and no timing.

Run alone: ``python -m semanticgen.benchmarks.swin_attention_gpu [--quick] [--out FILE.json]``. Without a
GPU it prints why and returns no rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from semanticgen.ops import WindowLayout, swin_attention, swin_attention_reference
from semanticgen.planning import plan
from semanticgen.timing import NullProgress, cuda_event_times, summarize

SUITE = "attention-gpu"
HEIGHT, WIDTH = 480, 832
HEAD_DIM, DTYPE = 128, torch.bfloat16
BWD_FLOP_FACTOR = 2.5  # backward FLOPs relative to forward (five matmuls against two)
PASS_FACTORS = {"fwd": 1.0, "bwd": BWD_FLOP_FACTOR, "fwd+bwd": 1.0 + BWD_FLOP_FACTOR}
TIMED_PASSES = ("fwd", "fwd+bwd")
WINDOWED = ("varlen", "triton", "flex_attention")
DENSE = "dense_flash"
# Relative RMS error allowed against the reference: bf16 rounding gives ~0.4%; a kernel that mixes up
# windows, parities or the scale is off by tens of percent.
CHECK_TOLERANCE = {"out": 0.02, "grad": 0.04}
# The run must end within ~3 minutes on an H200 including compiles: an implementation starts only if the
# time spent plus its expected cost (cold compile included) stays within the budget. FlexAttention's first
# forward+backward compiles two Inductor templates (tens of seconds on a fresh machine); the backends'
# kernels compile during the small-case check.
DEFAULT_BUDGET_S = 165.0
EXPECTED_S = {"flex_attention": 60.0}
DEFAULT_EXPECTED_S = 10.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed size: the plan's geometry for ``seconds`` of 480p video, in blocked token order."""

    name: str
    seconds: float
    heads: int
    layout: WindowLayout
    impls: tuple[tuple[str, str], ...]  # (implementation, token order)
    dense: bool  # measure dense full attention at this size

    @property
    def tokens(self) -> int:
        return self.layout.num_tokens


ALL_IMPLS = (
    ("varlen", "blocked"),
    ("varlen", "streams"),
    ("triton", "blocked"),
    ("triton", "streams"),
    ("flex_attention", "blocked"),
)
BACKENDS_BLOCKED = (("varlen", "blocked"), ("triton", "blocked"))


def plan_layout(seconds: float, height: int = HEIGHT, width: int = WIDTH) -> WindowLayout:
    """The plan's stage-2 layout for ``seconds`` of ``height x width`` video, in blocked order."""
    p = plan(seconds, height, width)
    return WindowLayout(
        vae_frames=p.latent_frames,
        vae_tokens_per_frame=p.vae_tokens_per_frame,
        sem_frames=p.sem_frames,
        sem_tokens_per_frame=p.sem_tokens_per_frame if p.sem_frames else 1,
        window=p.window,
        order="blocked",
    )


def cases(quick: bool = False) -> list[Case]:
    """Cases in the order they run: dense's size first (its rate is every ratio's denominator)."""
    if quick:
        return [Case("5s", 5.0, 4, plan_layout(5.0), ALL_IMPLS, dense=True)]
    return [
        Case("10s", 10.0, 12, plan_layout(10.0), BACKENDS_BLOCKED, dense=True),
        Case("60s", 60.0, 4, plan_layout(60.0), ALL_IMPLS, dense=False),
        Case("20s", 20.0, 12, plan_layout(20.0), BACKENDS_BLOCKED, dense=False),
    ]


def steps(quick: bool = False) -> int:
    """Progress steps :func:`run` reports: the correctness check, then one per case and implementation."""
    return 1 + sum(len(c.impls) + int(c.dense) for c in cases(quick))


# ------------------------------------------------------------------------------------- FLOPs
def useful_flops(layout: WindowLayout, heads: int, pass_name: str, head_dim: int = HEAD_DIM) -> float:
    """In-window FLOPs of one call of ``pass_name``, averaged over both parities (batch 1)."""
    per_parity = [layout.attention_flops(head_dim, heads, shifted=shifted) for shifted in (False, True)]
    fwd = sum(per_parity) / 2
    return PASS_FACTORS[pass_name] * fwd


def full_flops(layout: WindowLayout, heads: int, pass_name: str, head_dim: int = HEAD_DIM) -> float:
    """FLOPs of one call of ``pass_name`` of full attention over the same ``N`` tokens (batch 1)."""
    return PASS_FACTORS[pass_name] * layout.full_attention_flops(head_dim, heads)


# ------------------------------------------------------------------------------------ targets
@dataclasses.dataclass(frozen=True)
class Target:
    """An issue target: ``metric >= minimum`` on rows of ``impl`` (blocked order) for ``passes``."""

    impl: str
    passes: tuple[str, ...]
    metric: str
    minimum: float
    tokens: int | None = None  # only rows of this size

    def applies(self, row: dict) -> bool:
        return (
            row.get("impl") == self.impl
            and row.get("order") == "blocked"
            and row.get("pass") in self.passes
            and (self.tokens is None or row.get("tokens") == self.tokens)
        )

    def label(self) -> str:
        size = f" at {self.tokens:,} tokens" if self.tokens else ""
        return f"{self.impl} {'/'.join(self.passes)} {self.metric} >= {self.minimum:g}{size}"


PLAN_60S_TOKENS = 586_080
TARGETS = (
    Target("varlen", ("fwd",), "flop_rate_vs_dense", 0.90),
    Target("varlen", ("bwd",), "flop_rate_vs_dense", 0.90),
    Target("triton", ("fwd",), "flop_rate_vs_dense", 0.70),
    Target("triton", ("bwd",), "flop_rate_vs_dense", 0.60),
    Target("varlen", ("fwd", "fwd+bwd"), "speedup_vs_full", 15.0, PLAN_60S_TOKENS),
    Target("triton", ("fwd", "fwd+bwd"), "speedup_vs_full", 15.0, PLAN_60S_TOKENS),
)


def apply_targets(rows: list[dict], targets: Sequence[Target] = TARGETS) -> list[str]:
    """Mark rows with the targets that apply (``target``, ``target_met``); one summary line per target.

    A target with no measured row is reported as not measured, never dropped.
    """
    lines = []
    for target in targets:
        hits = [r for r in rows if target.applies(r) and r.get(target.metric) is not None]
        for row in hits:
            met = row[target.metric] >= target.minimum
            row["target"] = "; ".join(filter(None, [row.get("target"), f"{target.metric} >= {target.minimum:g}"]))
            row["target_met"] = met and row.get("target_met", True)
        if not hits:
            lines.append(f"NOT MEASURED  {target.label()}")
            continue
        for row in hits:
            status = "MET   " if row[target.metric] >= target.minimum else "MISSED"
            lines.append(
                f"{status}        {target.label()}: {row[target.metric]:.3g} ({row['case']}, {row['pass']}"
                f"{', extrapolated' if target.metric == 'speedup_vs_full' and row.get('speedup_extrapolated') else ''})"
            )
    return lines


# --------------------------------------------------------------------------------------- rows
@dataclasses.dataclass(frozen=True)
class DenseRate:
    """Dense flash attention measured in this run: TFLOP/s per pass and where it was measured."""

    tflops: dict[str, float]
    case: str
    tokens: int
    heads: int

    def describe(self) -> str:
        rates = ", ".join(f"{p} {self.tflops[p]:.0f}" for p in ("fwd", "bwd", "fwd+bwd") if p in self.tflops)
        return (
            f"dense flash (SDPA) measured at N={self.tokens:,}, {self.heads} heads ({self.case}): {rates} TFLOP/s; "
            "every flop_rate_vs_dense and every extrapolated speedup uses these rates"
        )


def with_derived_bwd(timings: dict[str, dict]) -> dict[str, dict]:
    """Add a ``bwd`` entry (median ``fwd+bwd`` minus median ``fwd``) to per-pass timings."""
    out = dict(timings)
    if "fwd" in timings and "fwd+bwd" in timings:
        out["bwd"] = {
            "ms": timings["fwd+bwd"]["ms"] - timings["fwd"]["ms"],
            "ms_min": None,
            "ms_max": None,
            "repeats": None,
            "derived": "fwd+bwd - fwd",
        }
    return out


def dense_rate(case: Case, timings: dict[str, dict]) -> DenseRate:
    """Dense TFLOP/s per pass from dense flash timings at ``case``."""
    timings = with_derived_bwd(timings)
    rates = {
        p: full_flops(case.layout, case.heads, p) / (t["ms"] * 1e-3) / 1e12 for p, t in timings.items() if t["ms"] > 0
    }
    return DenseRate(rates, case.name, case.tokens, case.heads)


def build_rows(
    case: Case,
    impl: str,
    order: str,
    timings: dict[str, dict],
    dense: DenseRate | None,
    *,
    dense_here: dict[str, dict] | None = None,
    base: dict | None = None,
) -> list[dict]:
    """One row per pass (``fwd``, ``fwd+bwd``, derived ``bwd``) of one implementation at one case.

    Args:
        timings: pass -> :func:`summarize` dict for one call (per-parity average).
        dense: this run's dense rates (``None``: no ratios, no speedups).
        dense_here: dense flash timings at this very case and head count: speedups are then measured.
        base: fields every row carries (device, versions, ...).
    """
    rows = []
    dense_here = with_derived_bwd(dense_here) if dense_here else None
    for pass_name, t in with_derived_bwd(timings).items():
        is_dense = impl == DENSE
        flops = (full_flops if is_dense else useful_flops)(case.layout, case.heads, pass_name)
        ms = t["ms"]
        tflops = flops / (ms * 1e-3) / 1e12 if ms > 0 else None
        row = {
            **(base or {}),
            "suite": SUITE,
            "case": case.name,
            "seconds": case.seconds,
            "tokens": case.tokens,
            "windows": case.layout.num_windows(False),
            "windows_shifted": case.layout.num_windows(True),
            "heads": case.heads,
            "head_dim": HEAD_DIM,
            "dtype": str(DTYPE).removeprefix("torch."),
            "impl": impl,
            "order": order,
            "pass": pass_name,
            "ms": ms,
            "ms_min": t.get("ms_min"),
            "ms_max": t.get("ms_max"),
            "repeats": t.get("repeats"),
            "derived": t.get("derived"),
            "tflops": tflops,
            "flop_rate_vs_dense": None,
            "speedup_vs_full": None,
            "speedup_extrapolated": None,
        }
        if dense is not None and tflops is not None and pass_name in dense.tflops:
            row["flop_rate_vs_dense"] = tflops / dense.tflops[pass_name]
            row["dense_tflops"] = dense.tflops[pass_name]  # the denominator, measured at dense.case
            if dense_here is not None and pass_name in dense_here:
                row["speedup_vs_full"] = dense_here[pass_name]["ms"] / ms
                row["speedup_extrapolated"] = False
            else:
                full_ms = full_flops(case.layout, case.heads, pass_name) / (dense.tflops[pass_name] * 1e12) * 1e3
                row["speedup_vs_full"] = full_ms / ms
                row["speedup_extrapolated"] = True
        rows.append(row)
    return rows


def add_gather_overhead(rows: list[dict]) -> None:
    """``gather_ms`` on streams-order rows: their ms minus the same implementation's blocked-order ms."""
    blocked = {(r["case"], r["impl"], r["pass"]): r["ms"] for r in rows if r.get("order") == "blocked" and "ms" in r}
    for r in rows:
        key = (r.get("case"), r.get("impl"), r.get("pass"))
        if r.get("order") == "streams" and r.get("ms") is not None and key in blocked:
            r["gather_ms"] = r["ms"] - blocked[key]


def error_row(case: Case, impl: str, order: str, error: str, base: dict | None = None) -> dict:
    """A row that posts no number: the implementation failed its check, raised, or was skipped."""
    return {
        **(base or {}),
        "suite": SUITE,
        "case": case.name,
        "tokens": case.tokens,
        "heads": case.heads,
        "impl": impl,
        "order": order,
        "pass": None,
        "error": error,
    }


def format_rows(rows: Sequence[dict]) -> str:
    """A fixed-width table of the rows, for the terminal."""
    header = (
        f"{'case':<5} {'impl':<15} {'order':<8} {'pass':<8} {'ms':>9} {'min-max':>17} {'TFLOP/s':>8} "
        f"{'vs dense':>8} {'speedup':>13}  target"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['case']:<5} {r['impl']:<15} {r['order']:<8} {'-':<8} ERROR: {r['error']}")
            continue
        spread = "derived" if r.get("derived") else f"{r['ms_min']:.2f}-{r['ms_max']:.2f}"
        ratio = "-" if r.get("flop_rate_vs_dense") is None else f"{r['flop_rate_vs_dense']:.2f}"
        speed = "-"
        if r.get("speedup_vs_full") is not None and r["impl"] != DENSE:
            speed = f"{r['speedup_vs_full']:.1f}x" + (" extr" if r.get("speedup_extrapolated") else " meas")
        target = ""
        if r.get("target"):
            target = f"{r['target']}: {'MET' if r['target_met'] else 'MISSED'}"
        tflops = "-" if r.get("tflops") is None else f"{r['tflops']:.0f}"
        lines.append(
            f"{r['case']:<5} {r['impl']:<15} {r['order']:<8} {r['pass']:<8} {r['ms']:>9.2f} {spread:>17} "
            f"{tflops:>8} {ratio:>8} {speed:>13}  {target}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ GPU: implementations
def skip_reason(device: str) -> str | None:
    """Why this suite cannot run on ``device`` (``None`` when it can)."""
    if not device.startswith("cuda"):
        return f"needs a CUDA device, got device={device!r}"
    if not torch.cuda.is_available():
        return "no CUDA device is available on this machine"
    return None


AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _backend_fn(name: str, layout: WindowLayout) -> AttnFn:
    def run(q, k, v, shifted):
        return swin_attention(q, k, v, layout, shifted=shifted, backend=name)

    return run


def _flex_fn(layout: WindowLayout, device: str) -> AttnFn:
    """Compiled FlexAttention with a block mask of the layout's windows per parity (built here, once)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    n = layout.num_tokens
    masks = {}
    for shifted in (False, True):
        ids = layout.window_ids(shifted).to(device)

        def same_window(b, h, q_idx, kv_idx, ids=ids):
            return ids[q_idx] == ids[kv_idx]

        # _compile=True builds the mask block by block; eagerly it would materialise N x N booleans.
        masks[shifted] = create_block_mask(same_window, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device, _compile=True)

    def run(q, k, v, shifted):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=masks[shifted])
        return out.transpose(1, 2)

    return run


def _dense_fn(q, k, v, shifted=False):
    """Full attention over all N tokens, SDPA's flash kernel ([B, N, H, D] read in place via transposes)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _impl_fn(impl: str, layout: WindowLayout, device: str) -> AttnFn:
    if impl == "flex_attention":
        return _flex_fn(layout, device)
    if impl == DENSE:
        return _dense_fn
    return _backend_fn(impl, layout)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error ``||a - b|| / ||b||`` in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _outputs(fn: AttnFn, q, k, v, grad, parities=(False, True)) -> list[torch.Tensor]:
    """Output and (dq, dk, dv) of each parity: ``[out0, dq0, dk0, dv0, out1, ...]``."""
    results = []
    for shifted in parities:
        out = fn(q, k, v, shifted)
        results += [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]
    return results


def _compare(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> str | None:
    """``None`` if every tensor is within tolerance of the reference, else what is off."""
    worst = []
    for i, (a, b) in enumerate(zip(ours, ref)):
        kind = "out" if i % 4 == 0 else "grad"
        err = _rel_err(a, b)
        if not math.isfinite(err) or err > CHECK_TOLERANCE[kind]:
            name = ("out", "dq", "dk", "dv")[i % 4] + ("(shifted)" if i >= 4 else "")
            worst.append(f"{name} rel err {err:.3g} > {CHECK_TOLERANCE[kind]}")
    return "; ".join(worst) or None


def window_spot_check(outs: list[torch.Tensor], q, k, v, layout: WindowLayout) -> str | None:
    """The last window of each parity (largest token offsets) of blocked-order outputs vs plain SDPA on it.

    An independent check of the implementation whose outputs the others are compared with at a timed size.
    """
    for p, shifted in enumerate((False, True)):
        seg = layout.segments(shifted)[-1]
        a, b = seg.start0, seg.end0
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(*(t[:, a:b].transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        err = _rel_err(outs[4 * p][:, a:b], ref)
        if not math.isfinite(err) or err > CHECK_TOLERANCE["out"]:
            return f"last {'shifted' if shifted else 'unshifted'} window vs SDPA: rel err {err:.3g}"
    return None


def small_case_check(device: str) -> dict[str, str | None]:
    """Each backend (both orders) and dense flash vs an fp32 reference on a small ragged case, fwd + grads.

    Returns ``"impl/order" -> None`` (passed) or what failed. FlexAttention is checked at the timed size
    instead (a small case would cost one more compile).
    """
    blocked = WindowLayout(
        vae_frames=10, vae_tokens_per_frame=96, sem_frames=3, sem_tokens_per_frame=40, window=4, order="blocked"
    )
    torch.manual_seed(0)
    shape = (2, blocked.num_tokens, 2, HEAD_DIM)
    q32, k32, v32 = (torch.randn(shape, device=device) for _ in range(3))
    grad32 = torch.randn(shape, device=device)
    results: dict[str, str | None] = {}
    for impl, order in (*BACKENDS_BLOCKED, ("varlen", "streams"), ("triton", "streams"), (DENSE, "-")):
        layout = blocked.with_order(order) if order != "-" else blocked
        inputs = [t if order != "streams" else blocked.from_blocked(t, dim=1) for t in (q32, k32, v32, grad32)]
        ref_in = [t.clone().requires_grad_() for t in inputs[:3]]
        if impl == DENSE:

            def reference(q, k, v, shifted):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                return out.transpose(1, 2)

            parities = (False,)
        else:

            def reference(q, k, v, shifted, layout=layout):
                return swin_attention_reference(q, k, v, layout, shifted=shifted)

            parities = (False, True)
        key = f"{impl}/{order}"
        try:
            ref = _outputs(reference, *ref_in, inputs[3], parities)
            low_in = [t.to(DTYPE).requires_grad_() for t in inputs[:3]]
            ours = _outputs(_impl_fn(impl, layout, device), *low_in, inputs[3].to(DTYPE), parities)
            results[key] = _compare(ours, ref)
        except Exception as exc:  # a backend that cannot run reports why instead of stopping the suite
            results[key] = f"{type(exc).__name__}: {exc}"
    return results


def _time_impl(fn: AttnFn, q, k, v, grad, *, both_parities: bool = True) -> dict[str, dict]:
    parities = (False, True) if both_parities else (False,)

    def forward():
        for shifted in parities:
            fn(q, k, v, shifted)

    def forward_backward():
        for shifted in parities:
            torch.autograd.grad(fn(q, k, v, shifted), (q, k, v), grad)

    timings = {}
    for pass_name, call in (("fwd", forward), ("fwd+bwd", forward_backward)):
        # Warm-up already happened in the correctness check (compiles, autotuning), so no untimed call here.
        times = cuda_event_times(call, warmup=0, min_repeats=3, max_repeats=15, min_seconds=1.0)
        timings[pass_name] = summarize([t / len(parities) for t in times])
    return timings


def environment(device: str) -> dict:
    """Device and versions stamped on every row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }
    try:
        from semanticgen.ops.swin_attention.varlen_backend import varlen_kernel_name

        env["varlen_kernel"] = varlen_kernel_name(torch.device(device))
    except Exception as exc:  # informative only
        env["varlen_kernel"] = f"unknown ({type(exc).__name__}: {exc})"
    return env


def run(
    quick: bool = False,
    device: str = "cuda",
    progress=None,
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    report: dict | None = None,
) -> list[dict]:
    """Benchmark rows (one per case, implementation, order and pass); ``[]`` when it cannot run here.

    Args:
        budget_s: an implementation starts only if the seconds spent plus its expected cost stay within this
            (otherwise its row says it was skipped).
        report: filled with ``summary`` (target lines), ``dense`` and ``checks`` when given.
    """
    if skip_reason(device) is not None:
        return []
    progress = progress or NullProgress()
    start = time.perf_counter()
    base = environment(device)
    rows: list[dict] = []
    progress.advance(f"{SUITE}: correctness check")
    checks = small_case_check(device)
    dense: DenseRate | None = None
    for case in cases(quick):
        torch.manual_seed(0)
        shape = (1, case.tokens, case.heads, HEAD_DIM)
        q, k, v = (torch.randn(shape, device=device, dtype=DTYPE, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, device=device, dtype=DTYPE)
        dense_here = None
        if case.dense:
            progress.advance(f"{SUITE} {case.name} {DENSE}")
            if checks.get(f"{DENSE}/-") is not None:
                rows.append(error_row(case, DENSE, "-", f"failed the small-case check: {checks[f'{DENSE}/-']}", base))
            else:
                try:
                    _outputs(_dense_fn, q, k, v, grad, (False,))  # warm-up
                    dense_here = _time_impl(_dense_fn, q, k, v, grad, both_parities=False)
                    dense = dense_rate(case, dense_here)
                    rows += build_rows(case, DENSE, "-", dense_here, dense, dense_here=dense_here, base=base)
                except Exception as exc:
                    rows.append(error_row(case, DENSE, "-", f"{type(exc).__name__}: {exc}", base))
        # (name, outputs and gradients) of the first implementation at this size, which every other must match.
        reference: tuple[str, list[torch.Tensor]] | None = None
        for impl, order in case.impls:
            progress.advance(f"{SUITE} {case.name} {impl} {order}")
            elapsed = time.perf_counter() - start
            expected = EXPECTED_S.get(impl, DEFAULT_EXPECTED_S)
            if elapsed + expected > budget_s:
                reason = f"skipped: {elapsed:.0f} s spent + ~{expected:.0f} s expected > time budget {budget_s:.0f} s"
                rows.append(error_row(case, impl, order, reason, base))
                continue
            failed = checks.get(f"{impl}/{order}")
            if failed is not None:
                rows.append(error_row(case, impl, order, f"failed the small-case check: {failed}", base))
                continue
            layout = case.layout.with_order(order)
            ins = [t if order == "blocked" else case.layout.from_blocked(t.detach(), dim=1) for t in (q, k, v, grad)]
            ins[:3] = [t.detach().requires_grad_() for t in ins[:3]]
            try:
                fn = _impl_fn(impl, layout, device)
                outs = _outputs(fn, *ins)  # also the warm-up: compiles and autotuning happen here
                if order == "streams":
                    outs = [layout.to_blocked(t, dim=1) for t in outs]
                if reference is None:  # the first implementation here: checked window by window against SDPA
                    mismatch = window_spot_check(outs, q, k, v, case.layout)
                    if mismatch is not None:
                        rows.append(error_row(case, impl, order, f"wrong result: {mismatch}", base))
                        continue
                    reference = (f"{impl}/{order}", outs)
                else:
                    mismatch = _compare(outs, reference[1])
                    del outs
                    if mismatch is not None:
                        rows.append(error_row(case, impl, order, f"wrong result vs {reference[0]}: {mismatch}", base))
                        continue
                timings = _time_impl(fn, *ins)
                rows += build_rows(case, impl, order, timings, dense, dense_here=dense_here, base=base)
            except Exception as exc:  # one failing implementation must not hide the others' numbers
                rows.append(error_row(case, impl, order, f"{type(exc).__name__}: {exc}", base))
            finally:
                torch.cuda.empty_cache()
        del q, k, v, grad, reference
        torch.cuda.empty_cache()
    add_gather_overhead(rows)
    summary = apply_targets(rows)
    if report is not None:
        report["summary"] = summary
        report["dense"] = dense.describe() if dense else "dense flash attention was not measured"
        report["checks"] = {key: reason or "ok" for key, reason in checks.items()}
        report["seconds"] = time.perf_counter() - start
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small case (5 s of video, 48,840 tokens)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", help="write rows, summary and environment to this JSON file")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="start an implementation only if the time spent plus its expected cost stays within this",
    )
    args = parser.parse_args(argv)
    reason = skip_reason(args.device)
    if reason is not None:
        print(f"swin_attention_gpu: skipped: {reason}", file=sys.stderr)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"skipped": reason, "rows": []}, f, indent=2)
        return 0
    report: dict = {}
    rows = run(quick=args.quick, device=args.device, budget_s=args.budget_s, report=report)
    env = rows[0] if rows else {}
    print(
        f"{env.get('device', '?')}  torch {env.get('torch')}  triton {env.get('triton')}  "
        f"varlen kernel: {env.get('varlen_kernel')}"
    )
    print("small-case checks:", ", ".join(f"{k} {v}" for k, v in report["checks"].items()))
    print(report["dense"])
    print(format_rows(rows))
    print("targets:")
    print("\n".join(f"  {line}" for line in report["summary"]))
    print(f"total {report['seconds']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, **report}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
