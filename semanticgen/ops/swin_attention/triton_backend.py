"""Triton backend of ``swin_attention``: launchers, ``torch.library`` ops, autograd and registration.

Layers (kernels in ``semanticgen.kernels.swin_attention_fwd`` / ``swin_attention_bwd``):

* :func:`_launch_fwd` / :func:`_launch_bwd` allocate outputs (inputs are checked by the interface) and launch the
  kernels on ``[B, N, H, D]`` tensors with their own strides, in the layout's token order. Windows are
  described by tile tables only (:func:`tile_table`: each program's window as two token ranges plus its
  first row), so no index map and no permuted copy exist.
* Ops ``semanticgen::swin_attention_triton_fwd(q, k, v, fwd_tiles, dq_tiles, dkdv_tiles, scale, fwd_block,
  dq_block, dkdv_block, window_bucket, atomic_dq) -> (out, lse)`` and
  ``semanticgen::swin_attention_triton_bwd(...) -> (dq, dk, dv)``, registered with
  ``torch.library.triton_op`` so ``torch.compile`` sees the kernels. The forward takes the
  backward's tile tables and options too, because autograd saves only op inputs and outputs.
* Under ``TRITON_INTERPRET=1`` (CPU tensors, used by the tests) the same launchers are registered as
  ``torch.library.custom_op`` ops named ``..._interp_fwd`` / ``..._interp_bwd`` with explicit fake
  implementations instead: ``wrap_triton`` hands interpreted kernels back unwrapped, so a
  ``triton_op`` would run the interpreter on fake tensors while tracing and fail.

Tile tables are built once per layout, parity, device and tile size and cached in ``layout._cache``.

TMA: on compute capability 9.x with bf16/fp16 inputs whose key/value strides allow it (contiguous head
dim, 16-byte aligned strides and offset) the forward and the dQ kernel load full key/value blocks
through device-side tensor descriptors; ``SEMANTICGEN_TRITON_TMA=0`` forces the pointer path.
Everywhere else (sm_80, fp32, odd strides, Triton without ``tl.make_tensor_descriptor``, the
interpreter) the pointer path runs.
Device-side descriptors need Triton's global scratch allocator, which lives in a ``ContextVar``: the
launcher installs one (``ensure_tma_allocator``) in the launching thread unless the user set one. Code
that launches the compiled forward from a thread where no eager launch ran (e.g. a compiled graph
recomputing the forward on the autograd thread) needs ``triton.set_allocator`` there, or
``SEMANTICGEN_TRITON_TMA=0``.

Backward determinism: by default the backward has no atomics (a dK/dV kernel and a separate dQ kernel,
every output element written by one program in a fixed order), so gradients are bitwise reproducible.
``SEMANTICGEN_SWIN_ATOMIC_DQ=1`` opts into a faster, **non-deterministic** backward: dQ is accumulated
inside the dK/dV kernel with fp32 ``atomic_add`` (5 GEMMs per block instead of 7, one launch fewer), so
its summation order varies run to run. It is refused with a ``RuntimeError`` while
``torch.use_deterministic_algorithms(True)`` is in effect.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from semanticgen._checks import check_int

from .interface import Backend, register_backend
from .layout import WindowLayout

__all__ = [
    "SUPPORTED_DTYPES",
    "MAX_HEAD_DIM",
    "ATOMIC_DQ_ENV",
    "triton_unavailable",
    "triton_rejects",
    "swin_attention_triton",
    "tile_table",
    "atomic_dq_requested",
]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 128
MAX_GRID_Y = 65535  # programs along grid axis 1 (batch * heads)
ATOMIC_DQ_ENV = "SEMANTICGEN_SWIN_ATOMIC_DQ"
_TRITON_FOUND = importlib.util.find_spec("triton") is not None
# Tests flip this to run the tensor-descriptor path in the interpreter (which implements descriptors).
_TMA_UNDER_INTERPRETER = False

if _TRITON_FOUND:
    from torch.library import wrap_triton  # passes interpreted kernels through unwrapped

    from semanticgen.kernels._triton_utils import (
        device_arch_class,
        ensure_tma_allocator,
        interpreter_enabled,
        padded_head_dim,
        tma_enabled,
        window_bucket,
    )
    from semanticgen.kernels.swin_attention_bwd import (
        DKDV_CONFIGS,
        DQ_CONFIGS,
        PREPROCESS_CONFIGS,
        swin_attn_bwd_dkdv_kernel_tuned,
        swin_attn_bwd_dq_kernel_tuned,
        swin_attn_bwd_preprocess_kernel,
    )
    from semanticgen.kernels.swin_attention_fwd import FWD_CONFIGS, LOG2E, swin_attn_fwd_kernel_tuned

    _INTERPRET = interpreter_enabled()
else:  # pragma: no cover - triton ships with CUDA builds of torch
    _INTERPRET = False


def triton_unavailable() -> str | None:
    """Why the Triton backend cannot run here, or ``None``."""
    if not _TRITON_FOUND:
        return "triton is not installed (pip install triton)"
    if not _INTERPRET and not torch.cuda.is_available():
        return "no CUDA device is available (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
    return None


def triton_rejects(q: torch.Tensor) -> str | None:
    """The registry's ``accepts`` predicate: why ``q`` (``[B, N, H, D]``) is outside the kernels' limits, or ``None``.

    Declared here rather than only raised by :func:`swin_attention_triton`, so callers (``backend=None``, the
    selftest) can ask before calling, and an error raised after the backend accepted inputs is a bug.
    """
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        return f"head dim must be <= {MAX_HEAD_DIM}, got D={head_dim}; use backend='reference' for larger heads"
    if q.shape[0] * q.shape[2] > MAX_GRID_Y:
        return f"batch * heads must be <= {MAX_GRID_Y} (the CUDA grid's y limit), got {q.shape[0]} * {q.shape[2]}"
    return None


# ------------------------------------------------------------------------------------ tile tables
def tile_table(layout: WindowLayout, shifted: bool, device: torch.device | str, block: int) -> torch.Tensor:
    """``int32[num_tiles, 5]``: ``(start0, end0, start1, end1, first_row)`` of every ``block``-row tile.

    A window of ``L`` tokens, ``[start0, end0) + [start1, end1)`` in ``layout.order`` (see
    ``WindowLayout.segments``), gets ``ceil(L / block)`` tiles of window rows ``first_row + [0, block)``
    (rows count through range 0 and then range 1, so a tile may straddle them), so work follows the
    real window lengths. Cached on the layout per ``(order, parity, device, block)``.
    """
    check_int("block", block, minimum=1, who="tile_table")
    device = torch.device(device)
    key = ("triton_tiles", layout.order, bool(shifted), str(device), block)
    cached = layout._cache.get(key)
    if cached is not None:
        return cached
    rows = [(*seg, first) for seg in layout.segments(shifted) for first in range(0, seg.length, block)]
    if layout.num_tokens >= 2**31:
        raise ValueError(f"tile_table: {layout.num_tokens} tokens do not fit the int32 tile table")
    table = torch.tensor(rows, dtype=torch.int32).reshape(-1, 5).to(device)
    # Two threads racing here build equal tables; keeping either is fine.
    return layout._cache.setdefault(key, table)


def atomic_dq_requested() -> bool:
    """Whether ``SEMANTICGEN_SWIN_ATOMIC_DQ`` asks for the non-deterministic atomic-dQ backward.

    Raises:
        ValueError: the variable holds something other than 0/1/true/false/yes/no/on/off.
    """
    raw = os.environ.get(ATOMIC_DQ_ENV, "0").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{ATOMIC_DQ_ENV} must be 0 or 1, got {os.environ[ATOMIC_DQ_ENV]!r}")


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul TF32 switch (off by default), so fp32 attention is fp32-accurate
    # unless the user opted into TF32 for matmuls.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast_dots() -> bool:
    # The interpreter's bf16 tl.dot is wrong (see kernels._triton_utils.dot_acc); fp32 is exact there.
    return _INTERPRET


def _tma_strides_ok(t: torch.Tensor) -> bool:
    # A TMA descriptor over one (b, h) slice [N, D]: contiguous head dim, base and row stride 16-byte
    # aligned. The storage itself is assumed 16-byte aligned (torch's allocators give 256 / 64 bytes).
    size = t.element_size()
    return t.stride(3) == 1 and all((x * size) % 16 == 0 for x in (*t.stride()[:3], t.storage_offset()))


def _peel_tail(q: torch.Tensor) -> bool:
    # Unmasked full blocks plus one peeled masked tail pay off where dots run on wgmma (bf16/fp16 on
    # 9.x); sm_80 and fp32 keep one masked loop (see kernels.swin_attention_fwd._fwd_range). The
    # interpreter follows the 9.x choice so both forms are tested.
    return q.dtype != torch.float32 and device_arch_class(q.device) in ("sm90", "interpreter")


def _use_tma(k: torch.Tensor, v: torch.Tensor) -> bool:
    if k.dtype not in (torch.bfloat16, torch.float16) or not tma_enabled():
        return False
    if k.device.type == "cuda":
        if _INTERPRET or torch.cuda.get_device_capability(k.device)[0] != 9:
            return False
    elif not (_INTERPRET and _TMA_UNDER_INTERPRETER):
        return False
    return _tma_strides_ok(k) and _tma_strides_ok(v)


# -------------------------------------------------------------------------------------- launchers
def _kernel(tuned, forced):
    """``(kernel, launch options)``: the autotuned kernel, or with ``forced`` (a ``KernelConfig``) the plain
    kernel with that config's blocks, warps and stages (tests use it to compare configs bitwise)."""
    if forced is None:
        return wrap_triton(tuned), {}
    return wrap_triton(tuned.fn), {**forced.kwargs, "num_warps": forced.num_warps, "num_stages": forced.num_stages}


def _launch_fwd(q, k, v, fwd_tiles, scale, fwd_block, bucket, forced=None):
    batch, num_tokens, heads, head_dim = q.shape
    out = torch.empty((batch, num_tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, num_tokens), dtype=torch.float32, device=q.device)
    tma = _use_tma(k, v)
    if tma and not _INTERPRET:
        ensure_tma_allocator()
    grid = (fwd_tiles.shape[0], batch * heads)
    kernel, options = _kernel(swin_attn_fwd_kernel_tuned, forced)
    kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        fwd_tiles,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        heads,
        num_tokens,
        scale * LOG2E,
        bucket,
        HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim),
        BLOCK_M=fwd_block,
        TMA=tma,
        PEEL_TAIL=_peel_tail(q),
        PRECISION=_precision(q.dtype),
        UPCAST=_upcast_dots(),
        **options,
    )
    return out, lse


def _launch_bwd(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    dq_tiles,
    dkdv_tiles,
    scale,
    dq_block,
    dkdv_block,
    bucket,
    atomic_dq,
    forced=(None, None),
):
    batch, num_tokens, heads, head_dim = q.shape
    block_d = padded_head_dim(head_dim)
    arch = device_arch_class(q.device)
    delta = torch.empty((batch, heads, num_tokens), dtype=torch.float32, device=q.device)
    pre_block, (pre_cfg, *_) = PREPROCESS_CONFIGS.lookup(arch, block_d)
    wrap_triton(swin_attn_bwd_preprocess_kernel)[(_cdiv(num_tokens, pre_block), batch * heads)](
        out,
        grad_out,
        delta,
        *_strides(out),
        *_strides(grad_out),
        heads,
        num_tokens,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=pre_block,
        num_warps=pre_cfg.num_warps,
        num_stages=pre_cfg.num_stages,
    )
    shape = (batch, num_tokens, heads, head_dim)
    dk = torch.empty(shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(shape, dtype=q.dtype, device=q.device)
    # The atomic path accumulates dQ in fp32 (zeroed); otherwise the kernel ignores DQ_ACC.
    dq_acc = torch.zeros(shape, dtype=torch.float32, device=q.device) if atomic_dq else delta
    dq_acc_strides = _strides(dq_acc) if atomic_dq else (0, 0, 0, 0)
    common = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PEEL_TAIL=_peel_tail(q),
        PRECISION=_precision(q.dtype),
        UPCAST=_upcast_dots(),
    )
    kernel, options = _kernel(swin_attn_bwd_dkdv_kernel_tuned, forced[0])
    kernel[(dkdv_tiles.shape[0], batch * heads)](
        q,
        k,
        v,
        grad_out,
        dk,
        dv,
        dq_acc,
        lse,
        delta,
        dkdv_tiles,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(grad_out),
        *_strides(dk),
        *_strides(dv),
        *dq_acc_strides,
        heads,
        num_tokens,
        scale * LOG2E,
        scale,
        bucket,
        BLOCK_N=dkdv_block,
        ATOMIC_DQ=atomic_dq,
        **common,
        **options,
    )
    if atomic_dq:
        return dq_acc.to(q.dtype), dk, dv
    dq = torch.empty(shape, dtype=q.dtype, device=q.device)
    tma = _use_tma(k, v)
    if tma and not _INTERPRET:
        ensure_tma_allocator()
    kernel, options = _kernel(swin_attn_bwd_dq_kernel_tuned, forced[1])
    kernel[(dq_tiles.shape[0], batch * heads)](
        q,
        k,
        v,
        grad_out,
        dq,
        lse,
        delta,
        dq_tiles,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(grad_out),
        *_strides(dq),
        heads,
        num_tokens,
        scale * LOG2E,
        scale,
        bucket,
        BLOCK_M=dq_block,
        TMA=tma,
        **common,
        **options,
    )
    return dq, dk, dv


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------- ops
def _fwd_body(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fwd_tiles: torch.Tensor,
    dq_tiles: torch.Tensor,
    dkdv_tiles: torch.Tensor,
    scale: float,
    fwd_block: int,
    dq_block: int,
    dkdv_block: int,
    window_bucket: int,
    atomic_dq: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``out [B, N, H, D]`` (q's dtype) and ``lse float32[B, H, N]`` (natural log), caller order.

    ``*_tiles``: :func:`tile_table` of each kernel's tile size (``*_block``); ``window_bucket``: the
    autotuning key (``kernels._triton_utils.window_bucket``); ``atomic_dq``: backward mode, saved for it.
    """
    return _launch_fwd(q, k, v, fwd_tiles, scale, fwd_block, window_bucket)


def _bwd_body(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dq_tiles: torch.Tensor,
    dkdv_tiles: torch.Tensor,
    scale: float,
    dq_block: int,
    dkdv_block: int,
    window_bucket: int,
    atomic_dq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``dq, dk, dv`` (``[B, N, H, D]``, contiguous) from ``out`` and ``lse`` of the forward."""
    return _launch_bwd(
        grad_out, q, k, v, out, lse, dq_tiles, dkdv_tiles, scale, dq_block, dkdv_block, window_bucket, atomic_dq
    )


def _fake_fwd(q, k, v, fwd_tiles, dq_tiles, dkdv_tiles, scale, fwd_block, dq_block, dkdv_block, bucket, atomic_dq):
    batch, num_tokens, heads, head_dim = q.shape
    return q.new_empty((batch, num_tokens, heads, head_dim)), q.new_empty(
        (batch, heads, num_tokens), dtype=torch.float32
    )


def _fake_bwd(grad_out, q, k, v, out, lse, dq_tiles, dkdv_tiles, scale, dq_block, dkdv_block, bucket, atomic_dq):
    return tuple(q.new_empty(q.shape) for _ in range(3))


if _TRITON_FOUND and not _INTERPRET:
    fwd_op = torch.library.triton_op("semanticgen::swin_attention_triton_fwd", _fwd_body, mutates_args=())
    bwd_op = torch.library.triton_op("semanticgen::swin_attention_triton_bwd", _bwd_body, mutates_args=())
else:
    fwd_op = torch.library.custom_op("semanticgen::swin_attention_triton_interp_fwd", _fwd_body, mutates_args=())
    bwd_op = torch.library.custom_op("semanticgen::swin_attention_triton_interp_bwd", _bwd_body, mutates_args=())
    fwd_op.register_fake(_fake_fwd)
    bwd_op.register_fake(_fake_bwd)


def _setup_context(ctx, inputs, output):
    q, k, v, _, dq_tiles, dkdv_tiles, scale, _, dq_block, dkdv_block, bucket, atomic_dq = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, dq_tiles, dkdv_tiles)
    ctx.options = (scale, dq_block, dkdv_block, bucket, atomic_dq)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, dq_tiles, dkdv_tiles = ctx.saved_tensors
    dq, dk, dv = bwd_op(grad_out, q, k, v, out, lse, dq_tiles, dkdv_tiles, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------- public entry
def swin_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, shifted: bool, scale: float
) -> torch.Tensor:
    """Backend function: ``[B, N, H, D]`` in and out, in ``layout.order`` (inputs checked by the interface).

    Raises:
        ValueError: head dim above :data:`MAX_HEAD_DIM`, ``B * H`` above :data:`MAX_GRID_Y`, or a bad
            ``SEMANTICGEN_SWIN_ATOMIC_DQ`` value.
        TypeError: dtype not in :data:`SUPPORTED_DTYPES`.
        RuntimeError: ``SEMANTICGEN_SWIN_ATOMIC_DQ=1`` while deterministic algorithms are enforced.
    """
    head_dim = q.shape[-1]
    reason = triton_rejects(q)  # the interface asks first; a direct call still gets the same ValueError
    if reason is not None:
        raise ValueError(f"swin_attention(backend='triton'): {reason}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"swin_attention(backend='triton'): dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, "
            f"got {q.dtype}"
        )
    atomic_dq = atomic_dq_requested()
    if atomic_dq and torch.are_deterministic_algorithms_enabled():
        raise RuntimeError(
            f"swin_attention(backend='triton'): {ATOMIC_DQ_ENV}=1 selects a non-deterministic backward "
            "(fp32 atomics for dQ), but torch.use_deterministic_algorithms(True) is in effect; unset "
            f"{ATOMIC_DQ_ENV} or turn deterministic algorithms off"
        )
    device = q.device
    block_d = padded_head_dim(head_dim)
    arch = device_arch_class(device)
    fp32 = q.dtype == torch.float32
    fwd_block = FWD_CONFIGS.lookup(arch, block_d, fp32=fp32, variant=None if _use_tma(k, v) else "pointer")[0]
    dq_block = DQ_CONFIGS.lookup(arch, block_d, fp32=fp32)[0]
    dkdv_block = DKDV_CONFIGS.lookup(arch, block_d, fp32=fp32, variant="atomic_dq" if atomic_dq else None)[0]
    out, _ = fwd_op(
        q,
        k,
        v,
        tile_table(layout, shifted, device, fwd_block),
        tile_table(layout, shifted, device, dq_block),
        tile_table(layout, shifted, device, dkdv_block),
        scale,
        fwd_block,
        dq_block,
        dkdv_block,
        window_bucket(layout.max_window_length(shifted)),
        atomic_dq,
    )
    return out


def _devices() -> tuple[str, ...]:
    # CPU only under the interpreter: plain CPU users keep the "cpu" backend.
    return ("cuda", "cpu") if _INTERPRET else ("cuda",)


register_backend(
    Backend(
        "triton",
        swin_attention_triton,
        _devices(),
        SUPPORTED_DTYPES,
        priority=20,
        unavailable=triton_unavailable,
        accepts=triton_rejects,
    )
)
