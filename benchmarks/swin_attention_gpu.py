"""Interleaved shifted-window attention on the GPU: the Triton backend against what a user would otherwise run.

Implementations, each timed forward and forward+backward, both window parities per call:

* ``triton_swin``: ``swin_attention(..., backend="triton")``, in place on ``[B, N, H, D]``;
* ``full_flash`` (flash-attn installed) or ``full_sdpa``: full attention over all ``N`` tokens;
* ``flex_block_mask``: FlexAttention with a block mask of the same windows (mask built once per
  layout, outside the timing, as the index map is);
* ``gather_varlen_flash``: gather into window-major order, ``flash_attn_varlen_func``, scatter back
  (flash-attn installed only).

Per row: milliseconds per call, useful TFLOP/s (in-window FLOPs for windowed methods, ``N^2`` for full
attention; backward counted as 2.5x forward, flash-attn's convention), the speedup over full attention
and ``flop_rate_vs_dense``: useful TFLOP/s over the dense full-attention TFLOP/s in the same run, the
"per useful FLOP" efficiency against dense FlashAttention.

The full case is the paper's minute of 480p video: 360 latent frames of 1,560 tokens plus 48
semantic frames of 64 tokens (564,672 tokens) in 8 windows. ``--quick`` runs 32 latent frames.

Run alone: ``python -m semanticgen.benchmarks.swin_attention_gpu [--quick]``. Without a GPU it prints
why it cannot run and returns no rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch
import torch.nn.functional as F

from semanticgen.ops import WindowLayout, swin_attention
from semanticgen.ops.swin_attention import triton_backend

from ._timing import NullProgress, measure_interleaved

HEADS, HEAD_DIMS, DTYPE = 12, (64, 128), torch.bfloat16
SV, SS = 1560, 64  # Wan-style 480p latent frame (30 x 52 patches); compressed semantic tokens per frame
# (Tv, Ts, Tw): 8 windows each. 360 latent frames = 60 s at 24 fps with 4x temporal compression.
FULL_CASES = ((64, 8, 8), (360, 48, 45))
QUICK_CASES = ((32, 4, 4),)
BWD_FLOP_FACTOR = 2.5  # backward FLOPs relative to forward (five matmuls against two)
PASSES = ("fwd", "fwd+bwd")


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def skip_reason(device: str) -> str | None:
    """Why this suite cannot run on ``device`` (``None`` when it can)."""
    if not device.startswith("cuda"):
        return f"needs a CUDA device, got device={device!r}"
    if not torch.cuda.is_available():
        return "no CUDA device is available on this machine"
    return triton_backend.triton_unavailable()


def _cases(quick: bool):
    return QUICK_CASES if quick else FULL_CASES


def steps(quick: bool = False) -> int:
    """Progress steps :func:`run` reports: one per case, head dim and pass."""
    return len(_cases(quick)) * len(HEAD_DIMS) * len(PASSES)


# ------------------------------------------------------------------------------ implementations
def _full_attention():
    """``(name, fn(q, k, v) -> out)`` for dense attention on ``[B, N, H, D]``."""
    if _have("flash_attn"):
        from flash_attn import flash_attn_func

        return "full_flash", lambda q, k, v: flash_attn_func(q, k, v)

    def sdpa(q, k, v):
        # SDPA wants [B, H, N, D]; transposed views, on bf16 CUDA it dispatches to its flash kernel.
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return "full_sdpa", sdpa


def _flex_attention(layout: WindowLayout, device: str):
    """FlexAttention with a block mask of the layout's windows, per parity; ``None`` if unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    flex = torch.compile(flex_attention, dynamic=False)
    masks = {}
    n = layout.num_tokens
    for shifted in (False, True):
        ids = layout.window_ids(shifted).to(device)

        def same_window(b, h, q_idx, kv_idx, ids=ids):
            return ids[q_idx] == ids[kv_idx]

        # _compile=True builds the block mask blockwise; the eager path would materialise an N x N
        # boolean mask (320 GB at N = 565K).
        masks[shifted] = create_block_mask(same_window, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device, _compile=True)

    def run(q, k, v, shifted):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=masks[shifted])
        return out.transpose(1, 2)

    return run


def _gather_varlen(layout: WindowLayout, device: str):
    """Gather to window-major order, ``flash_attn_varlen_func``, scatter back; ``None`` without flash-attn."""
    if not _have("flash_attn"):
        return None
    from flash_attn import flash_attn_varlen_func

    maps = {s: layout.index_map(s, device) for s in (False, True)}

    def run(q, k, v, shifted):
        index = maps[shifted]
        perm = index.perm.long()
        qw, kw, vw = (t[0].index_select(0, perm) for t in (q, k, v))  # batch 1: [N, H, D] window-major
        ow = flash_attn_varlen_func(qw, kw, vw, index.cu_seqlens, index.cu_seqlens, index.max_seqlen, index.max_seqlen)
        out = torch.empty_like(ow)
        out.index_copy_(0, perm, ow)
        return out.unsqueeze(0)

    return run


# ------------------------------------------------------------------------------------- benchmark
def _bench_case(tv: int, ts: int, tw: int, head_dim: int, quick: bool, device: str, progress) -> list[dict]:
    layout = WindowLayout(vae_frames=tv, vae_tokens_per_frame=SV, sem_frames=ts, sem_tokens_per_frame=SS, window=tw)
    n = layout.num_tokens
    q, k, v = (torch.randn(1, n, HEADS, head_dim, device=device, dtype=DTYPE, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    win_flops = (
        layout.attention_flops(head_dim, HEADS, shifted=False) + layout.attention_flops(head_dim, HEADS, shifted=True)
    ) / 2
    full_flops = layout.full_attention_flops(head_dim, HEADS)

    full_name, full_fn = _full_attention()
    windowed = {"triton_swin": lambda q, k, v, s: swin_attention(q, k, v, layout, shifted=s, backend="triton")}
    flex = _flex_attention(layout, device)
    if flex is not None:
        windowed["flex_block_mask"] = flex
    varlen = _gather_varlen(layout, device)
    if varlen is not None:
        windowed["gather_varlen_flash"] = varlen

    def forward_only(fn):
        def call():
            with torch.no_grad():
                fn(q, k, v, False)
                fn(q, k, v, True)

        return call

    def forward_backward(fn):
        def call():
            for shifted in (False, True):
                torch.autograd.grad(fn(q, k, v, shifted), (q, k, v), grad)

        return call

    full_both = lambda q, k, v, shifted: full_fn(q, k, v)  # noqa: E731  (same call shape as the windowed ones)
    # Dense attention at 0.5M tokens takes seconds per call: fewer repeats there.
    repeats = 3 if quick or n > 200_000 else 10
    rows = []
    for pass_name in PASSES:
        progress.advance(f"attention-gpu N={n} D={head_dim} {pass_name}")
        wrap = forward_only if pass_name == "fwd" else forward_backward
        fns = {name: wrap(fn) for name, fn in windowed.items()}
        fns[full_name] = wrap(full_both)
        timed = measure_interleaved(fns, device=device, warmup=1, repeats=repeats)
        factor = 1.0 if pass_name == "fwd" else 1.0 + BWD_FLOP_FACTOR
        full_ms = timed[full_name]["ms"] / 2  # two calls (both parities) per timed run
        full_tflops = factor * full_flops / (full_ms * 1e-3) / 1e12
        base = dict(
            suite="attention-gpu",
            device=torch.cuda.get_device_name(device),
            tokens=n,
            windows=layout.num_windows(False),
            heads=HEADS,
            head_dim=head_dim,
            dtype=str(DTYPE).removeprefix("torch."),
            **{"pass": pass_name},
        )
        for name, t in timed.items():
            ms = t["ms"] / 2
            useful = full_flops if name == full_name else win_flops
            tflops = factor * useful / (ms * 1e-3) / 1e12
            rows.append(
                {
                    **base,
                    "impl": name,
                    "ms": ms,
                    "tflops": tflops,
                    "speedup_vs_full": full_ms / ms,
                    "flop_rate_vs_dense": tflops / full_tflops,
                }
            )
    return rows


def run(quick: bool = False, device: str = "cuda", progress=None) -> list[dict]:
    """Benchmark rows (one per implementation, case, head dim and pass); ``[]`` when it cannot run here.

    The reason it cannot run is given by :func:`skip_reason` (and printed by ``python -m``).
    """
    if skip_reason(device) is not None:
        return []
    progress = progress or NullProgress()
    rows = []
    for tv, ts, tw in _cases(quick):
        for head_dim in HEAD_DIMS:
            rows += _bench_case(tv, ts, tw, head_dim, quick, device, progress)
            torch.cuda.empty_cache()  # the 0.5M-token case needs the previous case's memory back
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small case (32 latent frames)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    reason = skip_reason(args.device)
    if reason is not None:
        print(f"swin_attention_gpu: skipped: {reason}", file=sys.stderr)
        return 0
    for row in run(quick=args.quick, device=args.device):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
