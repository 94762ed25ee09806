"""Forward Triton kernel of interleaved shifted-window attention, in place on ``[B, N, H, D]`` tensors.

One program computes ``BLOCK_M`` rows of one window for one ``(batch, head)``. A window is at most two
contiguous token ranges of the caller's order (VAE tokens then semantic tokens in ``"streams"`` order,
one range in ``"blocked"`` order), so nothing is read through a per-token index map:

* the tile table row ``(start0, end0, start1, end1, first_row)`` gives the program its window's ranges;
  its query rows' tokens are computed in registers (a tile may straddle the two ranges);
* the key/value loop runs over range 0 and then range 1, each an affine run of rows
  (``base + arange``) whose addresses depend on no load, so Triton's software pipeline can prefetch
  ``num_stages - 1`` blocks ahead. Full blocks load without masks; only the one ragged tail block of a
  range masks its columns (``PEEL_TAIL``; sm_80 and fp32 launches keep one loop with every block
  masked, since a peeled tail made Triton choose layouts that spilled there);
* online softmax (FlashAttention-2): running max and sum in fp32, ``exp2`` with the softmax scale
  folded into its argument (``qk_scale = scale * log2(e)``, applied as one FMA per score, never a
  separate multiply of the score block);
* on Hopper with bf16/fp16 and TMA-compatible strides (``TMA``), full key/value blocks come through
  device-side tensor descriptors (``cp.async.bulk.tensor``); the tail block and every other case use
  pointer loads (at D = 128 on sm_90 with 64-key blocks, see ``FWD_CONFIGS.variant_entries``).

The output and the natural-log log-sum-exp go straight back to the caller's token positions; no copy
of q, k, v or o is ever permuted. Ragged and half windows cost only their own tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_utils import (
    LOG2E,
    ConfigTable,
    KernelConfig,
    cast_to,
    device_arch_class,
    dot_acc,
    load_rows,
    store_rows,
    tile_rows,
)

__all__ = ["swin_attn_fwd_kernel", "swin_attn_fwd_kernel_tuned", "FWD_CONFIGS", "LOG2E"]

_C = KernelConfig.make
# Tile BLOCK_M and key block BLOCK_N are fixed per (arch, head dim, dtype class); only warps and stages
# are autotuned (bitwise-identical results whichever wins). The first config is the default, chosen so
# every default compiles without spills (see `semanticgen kernels`).
FWD_CONFIGS = ConfigTable(
    kernel="swin_attn_fwd",
    tile_name="BLOCK_M",
    entries={
        ("sm90", 64): (128, (_C(8, 3, BLOCK_N=128), _C(8, 2, BLOCK_N=128), _C(8, 4, BLOCK_N=128))),
        ("sm90", 128): (128, (_C(8, 3, BLOCK_N=128), _C(8, 2, BLOCK_N=128))),
        ("sm80", 64): (128, (_C(8, 3, BLOCK_N=64), _C(8, 2, BLOCK_N=64))),  # 4 warps spilled 64 bytes
        ("sm80", 128): (128, (_C(8, 3, BLOCK_N=32), _C(8, 2, BLOCK_N=32))),
        ("interpreter", 128): (32, (_C(4, 1, BLOCK_N=32),)),
    },
    fp32_entries={
        64: (32, (_C(8, 2, BLOCK_N=16), _C(8, 1, BLOCK_N=16))),
        128: (32, (_C(8, 1, BLOCK_N=16),)),
    },
    # Pointer loads of 128 x 128 key blocks at D = 128 need more than 255 registers (40-byte spills):
    # without TMA (odd strides, Triton < 3.4, SEMANTICGEN_TRITON_TMA=0) sm_90 streams 64-key blocks.
    variant_entries={
        ("pointer", "sm90", 128): (128, (_C(8, 3, BLOCK_N=64), _C(8, 2, BLOCK_N=64))),
    },
)


@triton.jit
def _fwd_block(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    k_desc,
    v_desc,
    col_start,
    col_end,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    qk_scale,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One key block ``[col_start, col_start + BLOCK_N)`` of the online softmax; returns ``acc, m_i, l_i``.

    ``MASKED``: the ragged tail of a range (columns at or past ``col_end`` are dropped); otherwise the
    block is full and needs no predicate. ``TMA``: full blocks load through the descriptors.
    """
    # Block-relative rows on top of a 64-bit block base: row * stride stays small in 32 bits, and
    # col_start * stride (which can pass 2**31 on long sequences) is formed once, in 64 bits.
    offs_n = tl.arange(0, BLOCK_N)
    col_ok = col_start + offs_n < col_end
    k_base = k_base + tl.cast(col_start, tl.int64) * stride_kn
    v_base = v_base + tl.cast(col_start, tl.int64) * stride_vn
    if TMA and not MASKED:
        kt = tl.trans(k_desc.load([col_start, 0]))
    else:
        kt = load_rows(k_base, offs_n, col_ok, stride_kn, stride_kd, offs_d, HEAD_DIM, BLOCK_D, MASKED, True)
    s = dot_acc(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
    if MASKED:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    # Every block has a valid column, so m_new is finite; the scale rides in the exp2 FMA below.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if TMA and not MASKED:
        v = v_desc.load([col_start, 0])
    else:
        v = load_rows(v_base, offs_n, col_ok, stride_vn, stride_vd, offs_d, HEAD_DIM, BLOCK_D, MASKED, False)
    acc = dot_acc(cast_to(p, v.dtype, UPCAST), v, acc, PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _fwd_range(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    k_desc,
    v_desc,
    lo,
    hi,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    qk_scale,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TMA: tl.constexpr,
    PEEL_TAIL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Keys ``[lo, hi)`` (one affine range): full blocks in a pipelined loop, then the masked tail.

    ``PEEL_TAIL=False`` masks every block of one loop instead. The launcher peels only where dots run on
    wgmma (bf16/fp16 on sm_90): with register-operand MMAs (sm_80) or FMA dots (fp32) the peeled tail
    block made Triton pick register-hungry layouts for the whole kernel (255 registers and spills).
    """
    if not PEEL_TAIL:
        for col_start in tl.range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_block(
                acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, col_start, hi,
                stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, offs_d,
                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, False, PRECISION, UPCAST,
            )  # fmt: skip
    else:
        full_end = lo + (hi - lo) // BLOCK_N * BLOCK_N
        for col_start in tl.range(lo, full_end, BLOCK_N):
            acc, m_i, l_i = _fwd_block(
                acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, col_start, hi,
                stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, offs_d,
                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, TMA, PRECISION, UPCAST,
            )  # fmt: skip
        if full_end < hi:
            acc, m_i, l_i = _fwd_block(
                acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, full_end, hi,
                stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, offs_d,
                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, TMA, PRECISION, UPCAST,
            )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def swin_attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    TILES,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_on,
    stride_oh,
    stride_od,
    num_heads,
    num_tokens,
    qk_scale,
    window_bucket,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TMA: tl.constexpr,
    PEEL_TAIL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program ``(tile, b * H + h)``.

    Q, K, V, Out: ``[B, N, H, D]`` (any strides; ``TMA`` needs ``stride_*d == 1`` and 16-byte aligned
    other strides); LSE: ``float32[B, H, N]`` contiguous, natural log; TILES: ``int32[num_tiles, 5]``
    (see :func:`tile_rows`). ``qk_scale`` is ``softmax_scale * log2(e)``. ``PEEL_TAIL``: see
    ``_fwd_range``. ``window_bucket`` is unused by the body: it is the autotuner's key for the window length.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)

    start0, end0, start1, end1, row_ok, tok_q = tile_rows(TILES, tile, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    q = load_rows(
        Q + b * stride_qb + h * stride_qh, tok_q, row_ok, stride_qn, stride_qd, offs_d, HEAD_DIM, BLOCK_D, True, False
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if TMA:
        # One (b, h) slice is a [N, D] matrix with row stride stride_*n; columns past D read as zero.
        k_desc = tl.make_tensor_descriptor(k_base, [num_tokens, HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, [num_tokens, HEAD_DIM], [stride_vn, 1], [BLOCK_N, BLOCK_D])
    else:
        k_desc = k_base
        v_desc = v_base
    acc, m_i, l_i = _fwd_range(
        acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, start0, end0,
        stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, offs_d,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, TMA, PEEL_TAIL, PRECISION, UPCAST,
    )  # fmt: skip
    acc, m_i, l_i = _fwd_range(
        acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, start1, end1,
        stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, offs_d,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, TMA, PEEL_TAIL, PRECISION, UPCAST,
    )  # fmt: skip

    acc = acc / l_i[:, None]
    store_rows(
        Out + b * stride_ob + h * stride_oh, tok_q, row_ok, stride_on, stride_od, offs_d,
        cast_to(acc, Out.dtype.element_ty, UPCAST), HEAD_DIM,
    )  # fmt: skip
    # Natural-log LSE of the scaled scores: (m + log2 l) / log2(e).
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * num_tokens + tok_q, lse, mask=row_ok)


def _select_fwd(named_args, kwargs):
    q = named_args["Q"]
    arch, fp32 = device_arch_class(q.device), q.element_size() == 4
    variant = None if kwargs.get("TMA", True) else "pointer"
    return FWD_CONFIGS.lookup(arch, kwargs["BLOCK_D"], fp32=fp32, variant=variant)[1]


swin_attn_fwd_kernel_tuned = triton.autotune(
    configs=FWD_CONFIGS.all_triton_configs(),
    # TMA is in the key: the pointer path has its own configs, and a cached choice must not cross over.
    key=["HEAD_DIM", "BLOCK_M", "window_bucket", "TMA"],
    prune_configs_by={"early_config_prune": FWD_CONFIGS.pruner(_select_fwd)},
)(swin_attn_fwd_kernel)
