"""Backward Triton kernels of interleaved shifted-window attention, in place on ``[B, N, H, D]`` tensors.

Three launches, all reading and writing caller token order through ``perm``:

1. :func:`swin_attn_bwd_preprocess_kernel`: ``delta = rowsum(dO * O)``, ``float32[B, H, N]``.
2. :func:`swin_attn_bwd_dkdv_kernel`: one program per key tile of a window; it loops over the
   window's query blocks, recomputes ``P = exp(S - lse)`` and accumulates ``dV = P^T dO`` and
   ``dK = scale * dS^T Q`` with ``dS = P * (dP - delta)`` in registers.
3. :func:`swin_attn_bwd_dq_kernel`: one program per query tile; it loops over the window's key
   blocks and accumulates ``dQ = scale * dS K``.

Every output element is written by exactly one program with a fixed loop order, so there are no
atomics and the gradients are bitwise deterministic run to run (the only mode).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_utils import ConfigTable, KernelConfig, cast_to, device_arch_class, dot_acc, tile_rows

__all__ = [
    "swin_attn_bwd_preprocess_kernel",
    "swin_attn_bwd_dkdv_kernel",
    "swin_attn_bwd_dq_kernel",
    "swin_attn_bwd_dkdv_kernel_tuned",
    "swin_attn_bwd_dq_kernel_tuned",
    "PREPROCESS_CONFIGS",
    "DKDV_CONFIGS",
    "DQ_CONFIGS",
]

_C = KernelConfig.make

# The preprocess is a memory-bound row reduction: tile = rows per program, nothing to autotune.
PREPROCESS_CONFIGS = ConfigTable(
    kernel="swin_attn_bwd_preprocess",
    tile_name="BLOCK_M",
    entries={
        ("sm90", 128): (64, (_C(4, 1),)),
        ("sm80", 128): (64, (_C(4, 1),)),
        ("interpreter", 128): (64, (_C(4, 1),)),
    },
)
# dK/dV: tile BLOCK_N (key rows per program) fixed; inner query block BLOCK_M autotuned.
DKDV_CONFIGS = ConfigTable(
    kernel="swin_attn_bwd_dkdv",
    tile_name="BLOCK_N",
    entries={
        ("sm90", 64): (128, (_C(8, 2, BLOCK_M=64), _C(8, 3, BLOCK_M=32), _C(8, 1, BLOCK_M=64))),
        ("sm90", 128): (128, (_C(8, 2, BLOCK_M=32), _C(8, 1, BLOCK_M=64), _C(8, 3, BLOCK_M=32))),
        ("sm80", 64): (128, (_C(8, 2, BLOCK_M=32), _C(8, 3, BLOCK_M=32))),
        ("sm80", 128): (64, (_C(8, 2, BLOCK_M=64), _C(8, 2, BLOCK_M=32), _C(8, 3, BLOCK_M=32))),
        ("interpreter", 128): (32, (_C(4, 1, BLOCK_M=32),)),
    },
    fp32_entries={
        64: (32, (_C(4, 2, BLOCK_M=16), _C(8, 1, BLOCK_M=32))),
        128: (32, (_C(4, 2, BLOCK_M=16),)),
    },
)
# dQ: tile BLOCK_M (query rows per program) fixed; inner key block BLOCK_N autotuned.
DQ_CONFIGS = ConfigTable(
    kernel="swin_attn_bwd_dq",
    tile_name="BLOCK_M",
    entries={
        ("sm90", 64): (128, (_C(8, 2, BLOCK_N=64), _C(8, 3, BLOCK_N=32), _C(4, 2, BLOCK_N=32))),
        ("sm90", 128): (128, (_C(8, 2, BLOCK_N=32), _C(8, 2, BLOCK_N=64), _C(8, 1, BLOCK_N=64))),
        ("sm80", 64): (128, (_C(8, 2, BLOCK_N=32), _C(8, 3, BLOCK_N=32), _C(8, 1, BLOCK_N=64))),
        ("sm80", 128): (64, (_C(4, 2, BLOCK_N=32), _C(8, 2, BLOCK_N=64), _C(8, 3, BLOCK_N=32), _C(8, 3, BLOCK_N=64))),
        ("interpreter", 128): (32, (_C(4, 1, BLOCK_N=32),)),
    },
    fp32_entries={
        64: (32, (_C(4, 2, BLOCK_N=16), _C(8, 1, BLOCK_N=32))),
        128: (32, (_C(4, 2, BLOCK_N=16),)),
    },
)


@triton.jit
def swin_attn_bwd_preprocess_kernel(
    Out,
    DO,
    DELTA,
    stride_ob,
    stride_on,
    stride_oh,
    stride_od,
    stride_dob,
    stride_don,
    stride_doh,
    stride_dod,
    num_heads,
    num_tokens,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Program ``(token block, b * H + h)``: ``DELTA[b, h, n] = sum_d O[b, n, h, d] * DO[b, n, h, d]`` in fp32."""
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_n = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_n < num_tokens)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_n[:, None] * stride_don + offs_d[None, :] * stride_dod,
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * num_tokens + offs_n, delta, mask=offs_n < num_tokens)


@triton.jit
def swin_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
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
    stride_dob,
    stride_don,
    stride_doh,
    stride_dod,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    stride_dkd,
    stride_dvb,
    stride_dvn,
    stride_dvh,
    stride_dvd,
    num_heads,
    num_tokens,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program ``(key tile, b * H + h)``: dK and dV of ``BLOCK_N`` window-major key rows.

    Works in the transposed orientation (keys on rows) so dK and dV accumulate without a transpose
    of the accumulators. LSE and DELTA: ``float32[B, H, N]`` contiguous, caller order.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)

    win_start, win_end, offs_n, col_ok, tok_k = tile_rows(TILES, CU_SEQLENS, PERM, tile, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K + b * stride_kb + h * stride_kh + tok_k[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + tok_k[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    stat_base = bh.to(tl.int64) * num_tokens
    for row_start in tl.range(win_start, win_end, BLOCK_M):
        offs_m = row_start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < win_end
        tok_q = tl.load(PERM + offs_m, mask=row_ok, other=0).to(tl.int64)
        qt = tl.load(
            q_base + tok_q[None, :] * stride_qn + offs_d[:, None] * stride_qd,
            mask=row_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        # Natural-log LSE -> log2 domain, matching exp2 of scores scaled by log2(e) * scale.
        lse2 = tl.load(LSE + stat_base + tok_q, mask=row_ok, other=0.0) * 1.4426950408889634
        st = dot_acc(k, qt, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PRECISION, UPCAST) * qk_scale
        pt = tl.math.exp2(st - lse2[None, :])
        pt = tl.where(row_ok[None, :] & col_ok[:, None], pt, 0.0)
        do = tl.load(
            do_base + tok_q[:, None] * stride_don + offs_d[None, :] * stride_dod,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        dv = dot_acc(cast_to(pt, do.dtype, UPCAST), do, dv, PRECISION, UPCAST)
        delta = tl.load(DELTA + stat_base + tok_q, mask=row_ok, other=0.0)
        dpt = dot_acc(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PRECISION, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk = dot_acc(cast_to(dst, qt.dtype, UPCAST), tl.trans(qt), dk, PRECISION, UPCAST)

    dk = dk * sm_scale
    tl.store(
        DK + b * stride_dkb + h * stride_dkh + tok_k[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
        cast_to(dk, DK.dtype.element_ty, UPCAST),
        mask=kv_mask,
    )
    tl.store(
        DV + b * stride_dvb + h * stride_dvh + tok_k[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
        cast_to(dv, DV.dtype.element_ty, UPCAST),
        mask=kv_mask,
    )


@triton.jit
def swin_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
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
    stride_dob,
    stride_don,
    stride_doh,
    stride_dod,
    stride_dqb,
    stride_dqn,
    stride_dqh,
    stride_dqd,
    num_heads,
    num_tokens,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program ``(query tile, b * H + h)``: dQ of ``BLOCK_M`` window-major query rows."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)

    win_start, win_end, offs_m, row_ok, tok_q = tile_rows(TILES, CU_SEQLENS, PERM, tile, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + tok_q[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=q_mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + tok_q[:, None] * stride_don + offs_d[None, :] * stride_dod,
        mask=q_mask,
        other=0.0,
    )
    stat_base = bh.to(tl.int64) * num_tokens
    lse2 = tl.load(LSE + stat_base + tok_q, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + stat_base + tok_q, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for col_start in tl.range(win_start, win_end, BLOCK_N):
        offs_n = col_start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < win_end
        tok_k = tl.load(PERM + offs_n, mask=col_ok, other=0).to(tl.int64)
        kt_mask = col_ok[None, :] & d_ok[:, None]
        kt = tl.load(k_base + tok_k[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=kt_mask, other=0.0)
        vt = tl.load(v_base + tok_k[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=kt_mask, other=0.0)
        s = dot_acc(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        dp = dot_acc(do, vt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = dot_acc(cast_to(ds, kt.dtype, UPCAST), tl.trans(kt), dq, PRECISION, UPCAST)

    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + tok_q[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
        cast_to(dq, DQ.dtype.element_ty, UPCAST),
        mask=q_mask,
    )


def _select(table: ConfigTable):
    def select(named_args, kwargs):
        q = named_args["Q"]
        return table.lookup(device_arch_class(q.device), kwargs["BLOCK_D"], fp32=q.element_size() == 4)[1]

    return select


def _tuned(fn, table: ConfigTable):
    return triton.autotune(
        configs=table.all_triton_configs(),
        key=["HEAD_DIM", table.tile_name],
        prune_configs_by={"early_config_prune": table.pruner(_select(table))},
    )(fn)


swin_attn_bwd_dkdv_kernel_tuned = _tuned(swin_attn_bwd_dkdv_kernel, DKDV_CONFIGS)
swin_attn_bwd_dq_kernel_tuned = _tuned(swin_attn_bwd_dq_kernel, DQ_CONFIGS)
