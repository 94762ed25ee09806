"""One stage-2 diffusion-transformer block: full attention vs interleaved shifted-window attention.

Times a :class:`~semanticgen.models.DiTBlock` (adaLN self-attention with 3-D RoPE, cross-attention to
text, MLP) forward and forward+backward on a ``[VAE tokens, semantic tokens]`` sequence, with full
self-attention (``scaled_dot_product_attention``) and with ``swin_attention`` windows of ``TW`` latent
frames. Every timed call runs the block at both window parities (what alternating layers see) and is
halved. Reports milliseconds, tokens/s, achieved GFLOP/s of the whole block (model FLOPs: in-window
attention FLOPs only for the windowed block), the share of the block's FLOPs spent in self-attention,
and the windowed block's speedup over the full-attention block measured in the same run. Each time
carries its spread over the repeats (``ms_min``, ``ms_max``) and a ``noise`` flag above
``semanticgen.timing.SPREAD_BOUND``. On CPU both attentions are timed round-robin (wall clock); on CUDA each is timed
with CUDA events after warm-up, with L2 flushed before every call (``semanticgen.timing.time_candidates``).

Run alone: ``python -m semanticgen.benchmarks.dit_block [--quick] [--device cpu]``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from semanticgen.models import DiTBlock, LatentGenerator, rope_tables
from semanticgen.ops import WindowLayout
from semanticgen.timing import NullProgress, spread_fields, time_candidates

TEXT_TOKENS = 64
TW = 4  # window in latent frames
# Backward FLOPs relative to forward: 2x for matmuls, 2.5x for attention (flash-attn's convention).
BWD_FACTOR_LINEAR = 2.0
BWD_FACTOR_ATTN = 2.5


@dataclass(frozen=True)
class Case:
    hidden: int
    heads: int
    vae_frames: int
    vae_tokens_per_frame: int  # (H/p) * (W/p), laid out as rows x cols below
    rows: int
    sem_frames: int
    sem_tokens_per_frame: int

    @property
    def layout(self) -> WindowLayout:
        return WindowLayout(self.vae_frames, self.vae_tokens_per_frame, self.sem_frames, self.sem_tokens_per_frame, TW)


# Semantic tokens ~1/16 of the VAE tokens per unit of time, as in the paper (Ts = Tv / 4, Ss = Sv / 4).
QUICK_CASES = (Case(256, 4, 8, 64, 8, 2, 16),)
FULL_CASES = (
    Case(512, 8, 16, 128, 8, 4, 32),
    Case(512, 8, 32, 128, 8, 8, 32),
)
MLP_RATIO = 4.0


def block_flops(case: Case, attention: str) -> tuple[float, float]:
    """``(matmul FLOPs, self-attention FLOPs)`` of one block forward at batch 1 (both parities averaged)."""
    layout, c, n, length = case.layout, case.hidden, case.layout.num_tokens, TEXT_TOKENS
    # qkv 3C^2, out 1, cross q 1, cross out 1, MLP 2 * ratio; text k/v 2C^2 per text token.
    linear = 2 * n * c * c * (6 + 2 * MLP_RATIO) + 2 * length * c * 2 * c
    cross = 4 * n * (length + 1) * c
    head_dim = c // case.heads
    if attention == "full":
        self_attn = layout.full_attention_flops(head_dim, case.heads)
    else:
        self_attn = (
            layout.attention_flops(head_dim, case.heads, shifted=False)
            + layout.attention_flops(head_dim, case.heads, shifted=True)
        ) / 2
    return float(linear), float(self_attn + cross)


def _bench_case(case: Case, quick: bool, device: str, dtype: torch.dtype, progress) -> list[dict]:
    torch.manual_seed(0)
    block = DiTBlock(DiTBlock.Config(case.hidden, case.heads, MLP_RATIO)).to(device=device, dtype=dtype)
    with torch.no_grad():  # non-zero adaLN and cross-attention output: time the real computation paths
        for p in block.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    layout = case.layout
    n = layout.num_tokens
    cols = case.vae_tokens_per_frame // case.rows
    positions = LatentGenerator.token_positions(
        case.vae_frames, case.rows, cols, case.sem_frames, case.sem_tokens_per_frame, device=device
    )
    cos, sin = rope_tables(positions, case.hidden // case.heads)
    x = torch.randn(1, n, case.hidden, device=device, dtype=dtype, requires_grad=True)
    time_mod = torch.randn(1, 6, case.hidden, device=device, dtype=dtype)
    text = torch.randn(1, TEXT_TOKENS, case.hidden, device=device, dtype=dtype)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device)
    grad = torch.randn_like(x)

    def forward(win: WindowLayout | None):
        return [block(x, time_mod, text, mask, cos, sin, win, shifted) for shifted in (False, True)]

    def fwd(win):
        with torch.no_grad():
            forward(win)

    def fwdbwd(win):
        for out in forward(win):
            out.backward(grad)
        block.zero_grad(set_to_none=True)
        x.grad = None

    repeats = 2 if quick else 3
    rows = []
    for pass_name, fn in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
        progress.advance(f"DiT block N={n} {pass_name}")
        # CPU: round-robin wall clock, as before; CUDA: events with an L2 flush before every call, after two
        # warm-up calls (the Triton kernels compile in the first).
        timed = time_candidates(
            {"full": lambda fn=fn: fn(None), "swin": lambda fn=fn: fn(layout)},
            device=device,
            repeats=repeats,
            warmup=1,
            cuda_warmup=2,
        )
        full_ms = timed["full"]["ms"] / 2
        for impl in ("full", "swin"):
            ms = timed[impl]["ms"] / 2  # two block calls (both parities) per timed call
            linear, attn = block_flops(case, impl)
            if pass_name == "fwd+bwd":
                linear, attn = linear * (1 + BWD_FACTOR_LINEAR), attn * (1 + BWD_FACTOR_ATTN)
            rows.append(
                {
                    "suite": "dit_block",
                    "impl": impl,
                    "pass": pass_name,
                    "device": device,
                    "dtype": str(dtype).removeprefix("torch."),
                    "hidden": case.hidden,
                    "heads": case.heads,
                    "tokens": n,
                    "vae_tokens": layout.num_vae_tokens,
                    "sem_tokens": layout.num_sem_tokens,
                    "text_tokens": TEXT_TOKENS,
                    "window": TW,
                    "windows": layout.num_windows(False),
                    **spread_fields(timed[impl], scale=0.5),  # two block calls per timed call
                    "tokens_per_s": n / (ms * 1e-3),
                    "gflops": (linear + attn) / (ms * 1e-3) / 1e9,
                    "attention_flop_share": attn / (linear + attn),
                    "speedup_vs_full": full_ms / ms,
                }
            )
    return rows


def steps(quick: bool = False) -> int:
    """How many progress steps :func:`run` reports."""
    return 2 * len(QUICK_CASES if quick else FULL_CASES)


def skip_reason(device: str) -> str | None:
    """Why the benchmark cannot run on ``device`` here (``None`` if it can)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device visible"
    return None


def run(quick: bool = False, device: str = "cpu", progress=None) -> list[dict]:
    """Benchmark rows: one per case, pass (``fwd``, ``fwd+bwd``) and attention (``full``, ``swin``).

    ``progress`` is any object with ``advance(label)`` (called once per timed pass), or ``None``.
    Returns no rows when ``device`` is a CUDA device and none is visible.
    """
    reason = skip_reason(device)
    if reason is not None:
        print(f"dit_block: {reason}; nothing to run on {device}")
        return []
    dtype = torch.float32 if device.startswith("cpu") else torch.bfloat16
    progress = progress or NullProgress()
    rows = []
    for case in QUICK_CASES if quick else FULL_CASES:
        rows += _bench_case(case, quick, device, dtype, progress)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small case, fewer repeats")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    for row in run(quick=args.quick, device=args.device):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
