"""Triton backend of ``swin_attention``: launchers, ``torch.library`` ops, autograd and registration.

Layers (kernels in ``semanticgen.kernels.swin_attention_fwd`` / ``swin_attention_bwd``):

* :func:`_launch_fwd` / :func:`_launch_bwd` allocate outputs (inputs are checked by the interface) and launch the
  kernels on ``[B, N, H, D]`` tensors with their own strides, through the layout's window-major
  index map (``perm``, ``cu_seqlens``) and tile tables, so no permuted copy is made.
* Ops ``semanticgen::swin_attention_triton_fwd(q, k, v, perm, cu_seqlens, fwd_tiles, dq_tiles,
  dkdv_tiles, scale, fwd_block, dq_block, dkdv_block) -> (out, lse)`` and
  ``semanticgen::swin_attention_triton_bwd(...) -> (dq, dk, dv)``, registered with
  ``torch.library.triton_op`` so ``torch.compile`` sees the kernels. The forward takes the
  backward's tile tables too, because autograd saves only op inputs and outputs.
* Under ``TRITON_INTERPRET=1`` (CPU tensors, used by the tests) the same launchers are registered as
  ``torch.library.custom_op`` ops named ``..._interp_fwd`` / ``..._interp_bwd`` with explicit fake
  implementations instead: ``wrap_triton`` hands interpreted kernels back unwrapped, so a
  ``triton_op`` would run the interpreter on fake tensors while tracing and fail.

Tile tables (``int32[num_tiles, 2]``: window, first window-major row) are built once per layout,
parity, device and tile size and cached in ``layout._cache`` next to the index map.

The backward is deterministic by construction (no atomics; see ``swin_attention_bwd``).
"""

from __future__ import annotations

import importlib.util

import torch

from .interface import Backend, register_backend
from .layout import WindowLayout

__all__ = ["SUPPORTED_DTYPES", "MAX_HEAD_DIM", "triton_unavailable", "swin_attention_triton", "tile_table"]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 128
MAX_GRID_Y = 65535  # programs along grid axis 1 (batch * heads)
_TRITON_FOUND = importlib.util.find_spec("triton") is not None

if _TRITON_FOUND:
    from torch.library import wrap_triton  # passes interpreted kernels through unwrapped

    from semanticgen.kernels._triton_utils import device_arch_class, interpreter_enabled, padded_head_dim
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


# ------------------------------------------------------------------------------------ tile tables
def tile_table(layout: WindowLayout, shifted: bool, device: torch.device, block: int) -> torch.Tensor:
    """``int32[num_tiles, 2]``: ``(window, first window-major row)`` of every ``block``-row tile.

    A window of ``L`` tokens gets ``ceil(L / block)`` tiles, so work follows the real window
    lengths. Cached on the layout per ``(parity, device, block)``.
    """
    device = torch.device(device)
    key = ("triton_tiles", bool(shifted), str(device), int(block))
    cached = layout._cache.get(key)
    if cached is not None:
        return cached
    rows: list[tuple[int, int]] = []
    start = 0
    for window, length in enumerate(layout.window_lengths(shifted)):
        rows.extend((window, start + r) for r in range(0, length, block))
        start += length
    table = torch.tensor(rows, dtype=torch.int32).reshape(-1, 2).to(device)
    # Two threads racing here build equal tables; keeping either is fine.
    return layout._cache.setdefault(key, table)


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


# -------------------------------------------------------------------------------------- launchers
def _launch_fwd(q, k, v, perm, cu_seqlens, fwd_tiles, scale, fwd_block):
    batch, num_tokens, heads, head_dim = q.shape
    out = torch.empty((batch, num_tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, num_tokens), dtype=torch.float32, device=q.device)
    grid = (fwd_tiles.shape[0], batch * heads)
    wrap_triton(swin_attn_fwd_kernel_tuned)[grid](
        q,
        k,
        v,
        out,
        lse,
        perm,
        cu_seqlens,
        fwd_tiles,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        heads,
        num_tokens,
        scale * LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim),
        BLOCK_M=fwd_block,
        PRECISION=_precision(q.dtype),
        UPCAST=_upcast_dots(),
    )
    return out, lse


def _launch_bwd(grad_out, q, k, v, out, lse, perm, cu_seqlens, dq_tiles, dkdv_tiles, scale, dq_block, dkdv_block):
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
    dq = torch.empty(shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(shape, dtype=q.dtype, device=q.device)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, PRECISION=_precision(q.dtype), UPCAST=_upcast_dots())
    wrap_triton(swin_attn_bwd_dkdv_kernel_tuned)[(dkdv_tiles.shape[0], batch * heads)](
        q,
        k,
        v,
        grad_out,
        dk,
        dv,
        lse,
        delta,
        perm,
        cu_seqlens,
        dkdv_tiles,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(grad_out),
        *_strides(dk),
        *_strides(dv),
        heads,
        num_tokens,
        scale * LOG2E,
        scale,
        BLOCK_N=dkdv_block,
        **common,
    )
    wrap_triton(swin_attn_bwd_dq_kernel_tuned)[(dq_tiles.shape[0], batch * heads)](
        q,
        k,
        v,
        grad_out,
        dq,
        lse,
        delta,
        perm,
        cu_seqlens,
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
        BLOCK_M=dq_block,
        **common,
    )
    return dq, dk, dv


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------- ops
def _fwd_body(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    cu_seqlens: torch.Tensor,
    fwd_tiles: torch.Tensor,
    dq_tiles: torch.Tensor,
    dkdv_tiles: torch.Tensor,
    scale: float,
    fwd_block: int,
    dq_block: int,
    dkdv_block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``out [B, N, H, D]`` (q's dtype) and ``lse float32[B, H, N]`` (natural log), caller order."""
    return _launch_fwd(q, k, v, perm, cu_seqlens, fwd_tiles, scale, fwd_block)


def _bwd_body(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    perm: torch.Tensor,
    cu_seqlens: torch.Tensor,
    dq_tiles: torch.Tensor,
    dkdv_tiles: torch.Tensor,
    scale: float,
    dq_block: int,
    dkdv_block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``dq, dk, dv`` (``[B, N, H, D]``, contiguous) from ``out`` and ``lse`` of the forward."""
    return _launch_bwd(grad_out, q, k, v, out, lse, perm, cu_seqlens, dq_tiles, dkdv_tiles, scale, dq_block, dkdv_block)


def _fake_fwd(q, k, v, perm, cu_seqlens, fwd_tiles, dq_tiles, dkdv_tiles, scale, fwd_block, dq_block, dkdv_block):
    batch, num_tokens, heads, head_dim = q.shape
    return q.new_empty((batch, num_tokens, heads, head_dim)), q.new_empty(
        (batch, heads, num_tokens), dtype=torch.float32
    )


def _fake_bwd(grad_out, q, k, v, out, lse, perm, cu_seqlens, dq_tiles, dkdv_tiles, scale, dq_block, dkdv_block):
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
    q, k, v, perm, cu_seqlens, _, dq_tiles, dkdv_tiles, scale, _, dq_block, dkdv_block = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, perm, cu_seqlens, dq_tiles, dkdv_tiles)
    ctx.scale, ctx.dq_block, ctx.dkdv_block = scale, dq_block, dkdv_block


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, perm, cu_seqlens, dq_tiles, dkdv_tiles = ctx.saved_tensors
    dq, dk, dv = bwd_op(
        grad_out, q, k, v, out, lse, perm, cu_seqlens, dq_tiles, dkdv_tiles, ctx.scale, ctx.dq_block, ctx.dkdv_block
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------- public entry
def swin_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, shifted: bool, scale: float
) -> torch.Tensor:
    """Backend function: ``[B, N, H, D]`` in and out, caller token order (inputs checked by the interface).

    Raises:
        ValueError: head dim above :data:`MAX_HEAD_DIM`, or ``B * H`` above :data:`MAX_GRID_Y`.
        TypeError: dtype not in :data:`SUPPORTED_DTYPES`.
    """
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"swin_attention(backend='triton'): head dim must be <= {MAX_HEAD_DIM}, got D={head_dim}; "
            "use backend='reference' for larger heads"
        )
    if q.shape[0] * q.shape[2] > MAX_GRID_Y:
        raise ValueError(
            f"swin_attention(backend='triton'): batch * heads must be <= {MAX_GRID_Y} (the CUDA grid's "
            f"y limit), got {q.shape[0]} * {q.shape[2]}"
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"swin_attention(backend='triton'): dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, "
            f"got {q.dtype}"
        )
    device = q.device
    block_d = padded_head_dim(head_dim)
    arch = device_arch_class(device)
    fp32 = q.dtype == torch.float32
    fwd_block = FWD_CONFIGS.lookup(arch, block_d, fp32=fp32)[0]
    dq_block = DQ_CONFIGS.lookup(arch, block_d, fp32=fp32)[0]
    dkdv_block = DKDV_CONFIGS.lookup(arch, block_d, fp32=fp32)[0]
    index = layout.index_map(shifted, device)
    out, _ = fwd_op(
        q,
        k,
        v,
        index.perm,
        index.cu_seqlens,
        tile_table(layout, shifted, device, fwd_block),
        tile_table(layout, shifted, device, dq_block),
        tile_table(layout, shifted, device, dkdv_block),
        scale,
        fwd_block,
        dq_block,
        dkdv_block,
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
    )
)
