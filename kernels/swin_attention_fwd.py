"""Forward Triton kernel of interleaved shifted-window attention, in place on ``[B, N, H, D]`` tensors.

One program computes ``BLOCK_M`` window-major rows of one window for one ``(batch, head)``: it
reads its row's tokens through ``perm`` (window-major row -> caller token), streams the window's
keys and values in ``BLOCK_N`` blocks with an online softmax (FlashAttention-2: running max and
sum in fp32, exp2 with the scale folded into ``log2(e) * scale``) and writes the output and the
log-sum-exp straight back to the caller's token positions. No copy of q, k, v or o is ever
permuted. A tile table ``[num_tiles, 2] = (window, first row)`` covers each window with
``ceil(L_w / BLOCK_M)`` tiles, so ragged and half windows cost only their own tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_utils import LOG2E, ConfigTable, KernelConfig, cast_to, device_arch_class, dot_acc, tile_rows

__all__ = ["swin_attn_fwd_kernel", "swin_attn_fwd_kernel_tuned", "FWD_CONFIGS", "LOG2E"]

_C = KernelConfig.make
# Tile BLOCK_M is fixed per (arch, head dim); BLOCK_N, warps and stages are autotuned. The first
# config is the default. Chosen so every default compiles without spills (see `semanticgen kernels`).
FWD_CONFIGS = ConfigTable(
    kernel="swin_attn_fwd",
    tile_name="BLOCK_M",
    entries={
        ("sm90", 64): (128, (_C(8, 3, BLOCK_N=64), _C(4, 3, BLOCK_N=64), _C(8, 4, BLOCK_N=128), _C(4, 4, BLOCK_N=32))),
        ("sm90", 128): (128, (_C(8, 3, BLOCK_N=64), _C(8, 2, BLOCK_N=64), _C(4, 3, BLOCK_N=32))),
        ("sm80", 64): (128, (_C(8, 3, BLOCK_N=64), _C(4, 4, BLOCK_N=32), _C(8, 2, BLOCK_N=32))),
        ("sm80", 128): (128, (_C(8, 2, BLOCK_N=64), _C(8, 3, BLOCK_N=32))),
        ("interpreter", 128): (32, (_C(4, 1, BLOCK_N=32),)),
    },
    fp32_entries={
        64: (32, (_C(8, 2, BLOCK_N=16), _C(8, 1, BLOCK_N=32))),
        128: (32, (_C(8, 1, BLOCK_N=16),)),
    },
)


@triton.jit
def swin_attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    PERM,
    CU_SEQLENS,
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
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program ``(tile, b * H + h)``.

    Q, K, V, Out: ``[B, N, H, D]`` (any strides); LSE: ``float32[B, H, N]`` contiguous, natural log;
    PERM: ``int32[N]``; CU_SEQLENS: ``int32[W + 1]``; TILES: ``int32[num_tiles, 2]``.
    ``qk_scale`` is ``softmax_scale * log2(e)``.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)

    win_start, win_end, offs_m, row_ok, tok_q = tile_rows(TILES, CU_SEQLENS, PERM, tile, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + h * stride_qh + tok_q[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for col_start in tl.range(win_start, win_end, BLOCK_N):
        offs_n = col_start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < win_end
        tok_k = tl.load(PERM + offs_n, mask=col_ok, other=0).to(tl.int64)
        kt = tl.load(
            k_base + tok_k[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        s = dot_acc(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        # Every block has at least one valid column (col_start < win_end), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(
            v_base + tok_k[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = dot_acc(cast_to(p, v.dtype, UPCAST), v, acc, PRECISION, UPCAST)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + tok_q[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, cast_to(acc, Out.dtype.element_ty, UPCAST), mask=row_ok[:, None] & d_ok[None, :])
    # Natural-log LSE of the scaled scores: (m + log2 l) / log2(e).
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
    tl.store(LSE + bh.to(tl.int64) * num_tokens + tok_q, lse, mask=row_ok)


def _select_fwd(named_args, kwargs):
    q = named_args["Q"]
    return FWD_CONFIGS.lookup(device_arch_class(q.device), kwargs["BLOCK_D"], fp32=q.element_size() == 4)[1]


swin_attn_fwd_kernel_tuned = triton.autotune(
    configs=FWD_CONFIGS.all_triton_configs(),
    key=["HEAD_DIM", "BLOCK_M"],
    prune_configs_by={"early_config_prune": FWD_CONFIGS.pruner(_select_fwd)},
)(swin_attn_fwd_kernel)
