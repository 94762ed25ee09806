"""Backward Triton kernels of interleaved shifted-window attention, in place on ``[B, N, H, D]`` tensors.

Windows are addressed as in the forward (see ``swin_attention_fwd``): a tile table row gives a
program its window's two token ranges, tile rows are computed in registers, and every inner loop walks
range 0 then range 1 as affine runs of rows, full blocks unmasked and one masked tail per range. The
softmax scale rides in the ``exp2`` argument (``qk_scale = scale * log2(e)``, one FMA per score).

Default (deterministic) backward, three launches:

1. :func:`swin_attn_bwd_preprocess_kernel`: ``delta = rowsum(dO * O)``, ``float32[B, H, N]``.
2. :func:`swin_attn_bwd_dkdv_kernel`: one program per key tile of a window; it loops over the
   window's query blocks, recomputes ``P = exp(S - lse)`` and accumulates ``dV = P^T dO`` and
   ``dK = scale * dS^T Q`` with ``dS = P * (dP - delta)`` in registers (4 GEMMs per block).
3. :func:`swin_attn_bwd_dq_kernel`: one program per query tile; it loops over the window's key
   blocks and accumulates ``dQ = scale * dS K`` (3 GEMMs per block, recomputing ``S`` and ``dP``).

Every output element is written by exactly one program with a fixed loop order, so there are no
atomics and the gradients are bitwise deterministic run to run.

Opt-in fast path (``ATOMIC_DQ``, selected by ``SEMANTICGEN_SWIN_ATOMIC_DQ=1`` in the backend): the
dK/dV kernel also computes ``dQ += scale * dS K`` for each query block (a fifth GEMM) and adds it to an
fp32 ``[B, N, H, D]`` buffer with ``tl.atomic_add``; the dQ kernel is skipped. The summation order of
dQ then depends on scheduling, so it is **non-deterministic** (run-to-run differences at fp32
rounding level); the backend refuses it under ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_utils import (
    ConfigTable,
    KernelConfig,
    cast_to,
    device_arch_class,
    dot_acc,
    load_rows,
    store_rows,
    tile_rows,
)

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
# dK/dV: tile BLOCK_N (key rows per program) and inner query block BLOCK_M fixed per (arch, head dim,
# dtype class); alternatives differ only in warps and stages, so results do not depend on the winner.
DKDV_CONFIGS = ConfigTable(
    kernel="swin_attn_bwd_dkdv",
    tile_name="BLOCK_N",
    entries={
        ("sm90", 64): (128, (_C(8, 3, BLOCK_M=64), _C(8, 2, BLOCK_M=64), _C(8, 4, BLOCK_M=64))),
        ("sm90", 128): (128, (_C(8, 3, BLOCK_M=32), _C(8, 2, BLOCK_M=32), _C(8, 4, BLOCK_M=32))),
        ("sm80", 64): (128, (_C(8, 2, BLOCK_M=32), _C(8, 3, BLOCK_M=32))),
        ("sm80", 128): (64, (_C(8, 2, BLOCK_M=64),)),  # 4 warps spilled 628 bytes
        ("interpreter", 128): (32, (_C(4, 1, BLOCK_M=32),)),
    },
    fp32_entries={
        64: (32, (_C(8, 2, BLOCK_M=16), _C(8, 1, BLOCK_M=16))),  # 4 warps spilled 12 bytes on sm_80
        # 4 warps: 255 registers and ~700 bytes of spills at D = 128; 8 warps, 1 stage: 122, none.
        128: (32, (_C(8, 1, BLOCK_M=16),)),
    },
    # The atomic-dQ build holds a [BLOCK_M, D] dQ tile on top of dK, dV, K and V: at D = 128 the plain
    # tiles spill 8-32 bytes, so it streams 16-query blocks (and fp32 uses 16-key tiles).
    variant_entries={
        ("atomic_dq", "sm90", 128): (128, (_C(8, 3, BLOCK_M=16), _C(8, 4, BLOCK_M=16))),
        ("atomic_dq", "sm80", 128): (64, (_C(8, 2, BLOCK_M=16),)),
        ("atomic_dq", "fp32", 128): (16, (_C(4, 1, BLOCK_M=16),)),
    },
)
# dQ: tile BLOCK_M (query rows per program) and inner key block BLOCK_N fixed, as above.
DQ_CONFIGS = ConfigTable(
    kernel="swin_attn_bwd_dq",
    tile_name="BLOCK_M",
    entries={
        ("sm90", 64): (128, (_C(8, 3, BLOCK_N=64), _C(8, 2, BLOCK_N=64), _C(8, 4, BLOCK_N=64))),
        ("sm90", 128): (128, (_C(8, 3, BLOCK_N=64), _C(8, 2, BLOCK_N=64))),
        ("sm80", 64): (128, (_C(8, 2, BLOCK_N=32), _C(8, 3, BLOCK_N=32))),
        ("sm80", 128): (64, (_C(4, 2, BLOCK_N=32), _C(8, 3, BLOCK_N=32))),
        ("interpreter", 128): (32, (_C(4, 1, BLOCK_N=32),)),
    },
    fp32_entries={
        64: (32, (_C(4, 2, BLOCK_N=16), _C(8, 2, BLOCK_N=16))),
        128: (32, (_C(8, 2, BLOCK_N=16), _C(8, 1, BLOCK_N=16))),
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
def _dkdv_block(
    dk,
    dv,
    k,
    v,
    key_ok,
    q_base,
    do_base,
    lse_base,
    delta_base,
    dq_base,
    row_start,
    row_end,
    stride_qn,
    stride_qd,
    stride_don,
    stride_dod,
    stride_dqn,
    stride_dqd,
    qk_scale,
    sm_scale,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One query block ``[row_start, row_start + BLOCK_M)`` of the dK/dV loop; returns ``dk, dv``.

    ``MASKED``: the ragged tail of a range (rows at or past ``row_end`` contribute nothing).
    ``ATOMIC_DQ``: also add this block's ``scale * dS K`` to the fp32 dQ buffer with atomics.
    """
    # Block-relative rows on a 64-bit block base (row_start * stride can pass 2**31; see the forward).
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = row_start + offs_m < row_end
    q_base = q_base + tl.cast(row_start, tl.int64) * stride_qn
    do_base = do_base + tl.cast(row_start, tl.int64) * stride_don
    dq_base = dq_base + tl.cast(row_start, tl.int64) * stride_dqn
    lse_base = lse_base + row_start
    delta_base = delta_base + row_start
    qt = load_rows(q_base, offs_m, row_ok, stride_qn, stride_qd, offs_d, HEAD_DIM, BLOCK_D, MASKED, True)
    if MASKED:
        lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    else:
        lse2 = tl.load(lse_base + offs_m) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m)
    # Natural-log LSE -> log2 domain; the scale rides in the exp2 FMA (no separate multiply of S^T).
    st = dot_acc(k, qt, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PRECISION, UPCAST)
    pt = tl.math.exp2(st * qk_scale - lse2[None, :])
    if MASKED:
        pt = tl.where(row_ok[None, :], pt, 0.0)
    if ATOMIC_DQ:
        # Key rows past the window's end (zero K) can overflow exp2; dQ sums over keys, so drop them.
        pt = tl.where(key_ok[:, None], pt, 0.0)
    do = load_rows(do_base, offs_m, row_ok, stride_don, stride_dod, offs_d, HEAD_DIM, BLOCK_D, MASKED, False)
    dv = dot_acc(cast_to(pt, do.dtype, UPCAST), do, dv, PRECISION, UPCAST)
    dpt = dot_acc(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PRECISION, UPCAST)
    dst = cast_to(pt * (dpt - delta[None, :]), qt.dtype, UPCAST)
    dk = dot_acc(dst, tl.trans(qt), dk, PRECISION, UPCAST)
    if ATOMIC_DQ:
        dq = dot_acc(tl.trans(dst), k, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), PRECISION, UPCAST)
        ptrs = dq_base + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd
        tl.atomic_add(ptrs, dq * sm_scale, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_range(
    dk,
    dv,
    k,
    v,
    key_ok,
    q_base,
    do_base,
    lse_base,
    delta_base,
    dq_base,
    lo,
    hi,
    stride_qn,
    stride_qd,
    stride_don,
    stride_dod,
    stride_dqn,
    stride_dqd,
    qk_scale,
    sm_scale,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    PEEL_TAIL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Queries ``[lo, hi)`` (one affine range): full blocks in a pipelined loop, then the masked tail.

    ``PEEL_TAIL=False`` (sm_80, fp32) masks every block of one loop instead, as in the forward's ``_fwd_range``.
    """
    if not PEEL_TAIL:
        for row_start in tl.range(lo, hi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, key_ok, q_base, do_base, lse_base, delta_base, dq_base, row_start, hi,
                stride_qn, stride_qd, stride_don, stride_dod, stride_dqn, stride_dqd, qk_scale, sm_scale, offs_d,
                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, ATOMIC_DQ, PRECISION, UPCAST,
            )  # fmt: skip
    else:
        full_end = lo + (hi - lo) // BLOCK_M * BLOCK_M
        for row_start in tl.range(lo, full_end, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, key_ok, q_base, do_base, lse_base, delta_base, dq_base, row_start, hi,
                stride_qn, stride_qd, stride_don, stride_dod, stride_dqn, stride_dqd, qk_scale, sm_scale, offs_d,
                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, ATOMIC_DQ, PRECISION, UPCAST,
            )  # fmt: skip
        if full_end < hi:
            dk, dv = _dkdv_block(
                dk, dv, k, v, key_ok, q_base, do_base, lse_base, delta_base, dq_base, full_end, hi,
                stride_qn, stride_qd, stride_don, stride_dod, stride_dqn, stride_dqd, qk_scale, sm_scale, offs_d,
                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, ATOMIC_DQ, PRECISION, UPCAST,
            )  # fmt: skip
    return dk, dv


@triton.jit
def swin_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    DQ_ACC,
    LSE,
    DELTA,
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
    stride_dqb,
    stride_dqn,
    stride_dqh,
    stride_dqd,
    num_heads,
    num_tokens,
    qk_scale,
    sm_scale,
    window_bucket,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    PEEL_TAIL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program ``(key tile, b * H + h)``: dK and dV of ``BLOCK_N`` key rows of one window.

    Works in the transposed orientation (keys on rows) so dK and dV accumulate without a transpose
    of the accumulators. LSE and DELTA: ``float32[B, H, N]`` contiguous, caller order; TILES:
    ``int32[num_tiles, 5]`` (see :func:`tile_rows`). ``ATOMIC_DQ``: DQ_ACC is an fp32 ``[B, N, H, D]``
    buffer, zeroed by the caller, that receives ``scale * dS K`` with atomics (non-deterministic
    summation order); otherwise DQ_ACC and its strides are ignored.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)

    start0, end0, start1, end1, key_ok, tok_k = tile_rows(TILES, tile, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_rows(
        K + b * stride_kb + h * stride_kh, tok_k, key_ok, stride_kn, stride_kd, offs_d, HEAD_DIM, BLOCK_D, True, False
    )
    v = load_rows(
        V + b * stride_vb + h * stride_vh, tok_k, key_ok, stride_vn, stride_vd, offs_d, HEAD_DIM, BLOCK_D, True, False
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    dq_base = DQ_ACC + b * stride_dqb + h * stride_dqh
    lse_base = LSE + bh.to(tl.int64) * num_tokens
    delta_base = DELTA + bh.to(tl.int64) * num_tokens
    dk, dv = _dkdv_range(
        dk, dv, k, v, key_ok, q_base, do_base, lse_base, delta_base, dq_base, start0, end0,
        stride_qn, stride_qd, stride_don, stride_dod, stride_dqn, stride_dqd, qk_scale, sm_scale, offs_d,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ATOMIC_DQ, PEEL_TAIL, PRECISION, UPCAST,
    )  # fmt: skip
    dk, dv = _dkdv_range(
        dk, dv, k, v, key_ok, q_base, do_base, lse_base, delta_base, dq_base, start1, end1,
        stride_qn, stride_qd, stride_don, stride_dod, stride_dqn, stride_dqd, qk_scale, sm_scale, offs_d,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ATOMIC_DQ, PEEL_TAIL, PRECISION, UPCAST,
    )  # fmt: skip

    store_rows(
        DK + b * stride_dkb + h * stride_dkh, tok_k, key_ok, stride_dkn, stride_dkd, offs_d,
        cast_to(dk * sm_scale, DK.dtype.element_ty, UPCAST), HEAD_DIM,
    )  # fmt: skip
    store_rows(
        DV + b * stride_dvb + h * stride_dvh, tok_k, key_ok, stride_dvn, stride_dvd, offs_d,
        cast_to(dv, DV.dtype.element_ty, UPCAST), HEAD_DIM,
    )  # fmt: skip


@triton.jit
def _dq_block(
    dq,
    q,
    do,
    lse2,
    delta,
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
    """One key block of the dQ loop; ``MASKED`` drops columns at or past ``col_end``. Returns ``dq``.

    ``TMA``: full blocks load through the tensor descriptors (absolute row ``col_start``).
    """
    offs_n = tl.arange(0, BLOCK_N)  # block-relative, on a 64-bit block base (see the forward)
    col_ok = col_start + offs_n < col_end
    k_base = k_base + tl.cast(col_start, tl.int64) * stride_kn
    v_base = v_base + tl.cast(col_start, tl.int64) * stride_vn
    if TMA and not MASKED:
        kt = tl.trans(k_desc.load([col_start, 0]))
        vt = tl.trans(v_desc.load([col_start, 0]))
    else:
        kt = load_rows(k_base, offs_n, col_ok, stride_kn, stride_kd, offs_d, HEAD_DIM, BLOCK_D, MASKED, True)
        vt = load_rows(v_base, offs_n, col_ok, stride_vn, stride_vd, offs_d, HEAD_DIM, BLOCK_D, MASKED, True)
    s = dot_acc(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(col_ok[None, :], p, 0.0)
    dp = dot_acc(do, vt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
    ds = p * (dp - delta[:, None])
    return dot_acc(cast_to(ds, kt.dtype, UPCAST), tl.trans(kt), dq, PRECISION, UPCAST)


@triton.jit
def _dq_range(
    dq,
    q,
    do,
    lse2,
    delta,
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

    ``PEEL_TAIL=False`` (sm_80, fp32) masks every block of one loop instead, as in the forward's ``_fwd_range``.
    """
    if not PEEL_TAIL:
        for col_start in tl.range(lo, hi, BLOCK_N):
            dq = _dq_block(
                dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, col_start, hi, stride_kn, stride_kd, stride_vn,
                stride_vd, qk_scale, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, False, PRECISION, UPCAST,
            )  # fmt: skip
    else:
        full_end = lo + (hi - lo) // BLOCK_N * BLOCK_N
        for col_start in tl.range(lo, full_end, BLOCK_N):
            dq = _dq_block(
                dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, col_start, hi, stride_kn, stride_kd, stride_vn,
                stride_vd, qk_scale, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, TMA, PRECISION, UPCAST,
            )  # fmt: skip
        if full_end < hi:
            dq = _dq_block(
                dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, full_end, hi, stride_kn, stride_kd, stride_vn,
                stride_vd, qk_scale, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, TMA, PRECISION, UPCAST,
            )  # fmt: skip
    return dq


@triton.jit
def swin_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
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
    """Program ``(query tile, b * H + h)``: dQ of ``BLOCK_M`` query rows of one window.

    ``TMA``: full key/value blocks load through device-side tensor descriptors (as in the forward).
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
    do = load_rows(
        DO + b * stride_dob + h * stride_doh, tok_q, row_ok, stride_don, stride_dod, offs_d, HEAD_DIM, BLOCK_D,
        True, False,
    )  # fmt: skip
    stat_base = bh.to(tl.int64) * num_tokens
    lse2 = tl.load(LSE + stat_base + tok_q, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + stat_base + tok_q, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if TMA:
        k_desc = tl.make_tensor_descriptor(k_base, [num_tokens, HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, [num_tokens, HEAD_DIM], [stride_vn, 1], [BLOCK_N, BLOCK_D])
    else:
        k_desc = k_base
        v_desc = v_base
    dq = _dq_range(
        dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, start0, end0, stride_kn, stride_kd, stride_vn,
        stride_vd, qk_scale, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, TMA, PEEL_TAIL,
        PRECISION, UPCAST,
    )  # fmt: skip
    dq = _dq_range(
        dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, start1, end1, stride_kn, stride_kd, stride_vn,
        stride_vd, qk_scale, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, TMA, PEEL_TAIL,
        PRECISION, UPCAST,
    )  # fmt: skip
    store_rows(
        DQ + b * stride_dqb + h * stride_dqh, tok_q, row_ok, stride_dqn, stride_dqd, offs_d,
        cast_to(dq * sm_scale, DQ.dtype.element_ty, UPCAST), HEAD_DIM,
    )  # fmt: skip


def _select(table: ConfigTable):
    def select(named_args, kwargs):
        q = named_args["Q"]
        variant = "atomic_dq" if kwargs.get("ATOMIC_DQ", False) else None
        variant = "pointer" if kwargs.get("TMA", True) is False else variant
        return table.lookup(
            device_arch_class(q.device), kwargs["BLOCK_D"], fp32=q.element_size() == 4, variant=variant
        )[1]

    return select


def _tuned(fn, table: ConfigTable, *variant_args: str):
    # Variant flags (ATOMIC_DQ) are in the key: each variant has its own configs, and a cached choice
    # must not cross over.
    return triton.autotune(
        configs=table.all_triton_configs(),
        key=["HEAD_DIM", table.tile_name, "window_bucket", *variant_args],
        prune_configs_by={"early_config_prune": table.pruner(_select(table))},
    )(fn)


swin_attn_bwd_dkdv_kernel_tuned = _tuned(swin_attn_bwd_dkdv_kernel, DKDV_CONFIGS, "ATOMIC_DQ")
swin_attn_bwd_dq_kernel_tuned = _tuned(swin_attn_bwd_dq_kernel, DQ_CONFIGS, "TMA")
