"""Interleaved shifted-window attention vs full attention on CPU.

Baseline: ``torch.nn.functional.scaled_dot_product_attention`` over all ``N`` tokens, the attention a
user would otherwise call. The windowed op runs on the same tokens in both orders of
:class:`~semanticgen.ops.WindowLayout`: ``swin_attention`` (streams order, windows of two ranges) and
``swin_attention_blocked`` (blocked order, every window one contiguous range). Reports milliseconds,
effective GFLOP/s (in-window FLOPs only for the windowed op, ``N^2`` FLOPs for full attention), the
speedup and the per-FLOP rate ratio, for forward and forward+backward, plus how time grows with
sequence length at a fixed window (``time_vs_half_n``).

Each time comes with its spread over the repeats (``ms_min``, ``ms_max``). The ``noise`` column flags a
row whose max/min exceeds ``semanticgen.timing.SPREAD_BOUND``, or whose time at N is below its time at N/2: more
tokens in windows of a fixed size cannot take less time, so such a row measured the machine's load.

Run alone: ``python -m semanticgen.benchmarks.swin_attention_cpu [--quick | --long]``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from semanticgen.ops import WindowLayout, swin_attention
from semanticgen.timing import NullProgress, add_noise, measure_interleaved, spread_fields

# The reference case: 8,704 tokens in 8 windows.
HEADS, HEAD_DIM = 8, 64
SV, SS, TW = 256, 128, 4
# Latent frames swept at a fixed window; Ts = Tv / 8 keeps the paper's ~1:16 semantic ratio per frame.
# The default sweep stops at 8,704 tokens: full attention at 17,408 tokens (LONG_TV) costs about 3 minutes
# of a 2-core CPU by itself (15 s per forward+backward call), which would double `semanticgen bench`.
SWEEP_TV = (8, 16, 32)
LONG_TV = (*SWEEP_TV, 64)
QUICK_TV = (8, 16)

# FLOPs of a backward pass relative to the forward (flash-attn's convention: 2.5x).
BWD_FLOP_FACTOR = 2.5


def layout_for(tv: int) -> WindowLayout:
    return WindowLayout(vae_frames=tv, vae_tokens_per_frame=SV, sem_frames=tv // 8, sem_tokens_per_frame=SS, window=TW)


def _sdpa(q, k, v):
    # [B, N, H, D] -> SDPA's [B, H, N, D] as views, the same memory the windowed op reads.
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _bench_case(tv: int, quick: bool, device: str, progress) -> list[dict]:
    streams = layout_for(tv)
    blocked = streams.with_order("blocked")
    n = streams.num_tokens
    q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM, device=device, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    # The same tokens in blocked order: a permutation changes no FLOP count, only the memory walk.
    qb, kb, vb = (streams.to_blocked(t.detach()).requires_grad_() for t in (q, k, v))
    grad_b = streams.to_blocked(grad)
    # Average of both parities: models alternate them layer by layer.
    win_flops = (
        streams.attention_flops(HEAD_DIM, HEADS, shifted=False) + streams.attention_flops(HEAD_DIM, HEADS, shifted=True)
    ) / 2
    full_flops = streams.full_attention_flops(HEAD_DIM, HEADS)

    def swin_fwd(layout, q, k, v):
        def run():
            with torch.no_grad():
                swin_attention(q, k, v, layout, shifted=False)
                swin_attention(q, k, v, layout, shifted=True)

        return run

    def swin_fwdbwd(layout, q, k, v, grad):
        def run():
            for shifted in (False, True):
                out = swin_attention(q, k, v, layout, shifted=shifted)
                torch.autograd.grad(out, (q, k, v), grad)

        return run

    def full_fwd():
        with torch.no_grad():
            _sdpa(q, k, v)
            _sdpa(q, k, v)

    def full_fwdbwd():
        for _ in range(2):
            torch.autograd.grad(_sdpa(q, k, v), (q, k, v), grad)

    # Full attention at the top of the sweep takes seconds per call: fewer repeats keep the suite in minutes.
    repeats = 3 if quick or n > 10_000 else 5
    rows = []
    for pass_name, fns, factor in (
        (
            "fwd",
            {
                "swin_attention": swin_fwd(streams, q, k, v),
                "swin_attention_blocked": swin_fwd(blocked, qb, kb, vb),
                "sdpa_full": full_fwd,
            },
            1.0,
        ),
        (
            "fwd+bwd",
            {
                "swin_attention": swin_fwdbwd(streams, q, k, v, grad),
                "swin_attention_blocked": swin_fwdbwd(blocked, qb, kb, vb, grad_b),
                "sdpa_full": full_fwdbwd,
            },
            1.0 + BWD_FLOP_FACTOR,
        ),
    ):
        progress.advance(f"attention N={n} {pass_name}")
        timed = measure_interleaved(fns, device=device, repeats=repeats)
        # Each timed call runs two layers (both parities): halve to report per-call figures.
        full_ms = timed["sdpa_full"]["ms"] / 2
        full_gflops = factor * full_flops / (full_ms * 1e-3) / 1e9
        base = dict(
            suite="attention",
            device=device,
            tokens=n,
            windows=streams.num_windows(False),
            heads=HEADS,
            head_dim=HEAD_DIM,
            dtype="float32",
            **{"pass": pass_name},
        )
        for impl, order in (("swin_attention", "streams"), ("swin_attention_blocked", "blocked")):
            ms = timed[impl]["ms"] / 2
            gflops = factor * win_flops / (ms * 1e-3) / 1e9
            rows.append(
                {
                    **base,
                    "impl": impl,
                    "order": order,
                    **spread_fields(timed[impl], scale=0.5),
                    "gflops": gflops,
                    "speedup_vs_full": full_ms / ms,
                    "flop_rate_vs_full": gflops / full_gflops,
                    "vs_streams": timed["swin_attention"]["ms"] / timed[impl]["ms"],
                }
            )
        rows.append(
            {
                **base,
                "impl": "sdpa_full",
                "order": None,
                **spread_fields(timed["sdpa_full"], scale=0.5),
                "gflops": full_gflops,
                "speedup_vs_full": 1.0,
                "flop_rate_vs_full": 1.0,
                "vs_streams": None,
            }
        )
    return rows


def _sweep(quick: bool, long: bool) -> tuple[int, ...]:
    return QUICK_TV if quick else LONG_TV if long else SWEEP_TV


def run(quick: bool = False, device: str = "cpu", progress=None, long: bool = False) -> list[dict]:
    """Benchmark rows (one per implementation, pass and sequence length); ``long`` adds 17,408 tokens."""
    if not device.startswith("cpu"):
        return []  # the GPU comparison lives in swin_attention_gpu
    progress = progress or NullProgress()
    rows = []
    for tv in _sweep(quick, long):
        rows += _bench_case(tv, quick, device, progress)
    _add_growth(rows)
    return rows


def _add_growth(rows: list[dict]) -> None:
    """``time_vs_half_n``: time at N over time at N/2 (same impl and pass); ~2 is linear, ~4 quadratic.

    Below 1 is impossible for either (twice the tokens, same window): the row's ``noise`` says so.
    """
    by_key = {(r["impl"], r["pass"], r["tokens"]): r["ms"] for r in rows}
    for r in rows:
        half = by_key.get((r["impl"], r["pass"], r["tokens"] // 2))
        r["time_vs_half_n"] = r["ms"] / half if half else None
        if half and r["time_vs_half_n"] < 1.0:
            add_noise(r, f"time fell as N doubled ({r['time_vs_half_n']:.2f}x)")


def steps(quick: bool = False, long: bool = False) -> int:
    """How many progress steps :func:`run` reports."""
    return 2 * len(_sweep(quick, long))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--long", action="store_true", help="add 17,408 tokens (about 3 more minutes)")
    args = parser.parse_args()
    for row in run(quick=args.quick, long=args.long):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
