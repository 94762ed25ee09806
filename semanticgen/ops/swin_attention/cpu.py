"""CPU backend of ``swin_attention``: one fused attention call per window, never an N x N matrix.

Each window is at most two contiguous token ranges in the layout's order (its VAE frames and its
semantic frames in streams order, one range in blocked order; see :class:`~.layout.WindowSegment`).
A window with one range is a strided view of the inputs, with no gather or copy of q, k, v, dO or O in
either pass; a window with two is gathered with one ``cat`` (``O(L * H * D)`` bytes, small next to the
``O(L^2 * H * D)`` attention). Attention inside a window runs ATen's CPU flash-attention kernel
(blocked online softmax, fp32 accumulation for bf16/fp16), which keeps memory at O(N * window) and
returns the log-sum-exp that the backward needs. Ragged windows cost only their own length: there is
no padding to the longest window.

Ops (registered in the ``semanticgen`` namespace):

* ``semanticgen::swin_attention_cpu_fwd(q, k, v, bounds, scale) -> (out, lse)``
* ``semanticgen::swin_attention_cpu_bwd(grad_out, q, k, v, out, lse, bounds, scale) -> (dq, dk, dv)``

``bounds`` is the flattened ``[start0, end0, start1, end1]`` of every window; ``lse`` is
``float32[B, H, N]`` (float64 for float64 inputs) in caller token order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    # The kernel keeps the log-sum-exp in its accumulation type: fp64 for fp64, fp32 otherwise.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _windows(bounds: Sequence[int]) -> list[tuple[int, int, int, int]]:
    return [tuple(bounds[i : i + 4]) for i in range(0, len(bounds), 4)]


def _gather(x: torch.Tensor, a: int, b: int, c: int, d: int, dim: int = 1) -> torch.Tensor:
    """Tokens ``[a, b) + [c, d)`` of ``x`` along ``dim``; a view when one range is empty."""
    if c == d:
        return x.narrow(dim, a, b - a)
    if a == b:
        return x.narrow(dim, c, d - c)
    return torch.cat([x.narrow(dim, a, b - a), x.narrow(dim, c, d - c)], dim=dim)


def _scatter(dst: torch.Tensor, src: torch.Tensor, a: int, b: int, c: int, d: int, dim: int = 1) -> None:
    """Inverse of :func:`_gather`: write ``src`` into tokens ``[a, b) + [c, d)`` of ``dst``."""
    n_first = b - a
    if n_first:
        dst.narrow(dim, a, n_first).copy_(src.narrow(dim, 0, n_first))
    if d > c:
        dst.narrow(dim, c, d - c).copy_(src.narrow(dim, n_first, d - c))


@torch.library.custom_op("semanticgen::swin_attention_cpu_fwd", mutates_args=(), device_types="cpu")
def swin_attention_cpu_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward. ``q, k, v``: ``[B, N, H, D]``; returns ``out [B, N, H, D]``, ``lse float32[B, H, N]``."""
    batch, num_tokens, heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, heads, num_tokens, dtype=_lse_dtype(q.dtype), device=q.device)
    for a, b, c, d in _windows(bounds):
        # [B, L, H, D] -> [B, H, L, D] views: the kernel reads strided inputs directly.
        qw, kw, vw = (_gather(t, a, b, c, d).transpose(1, 2) for t in (q, k, v))
        out_w, lse_w = _flash_fwd(qw, kw, vw, 0.0, False, attn_mask=None, scale=scale)
        _scatter(out, out_w.transpose(1, 2), a, b, c, d)
        _scatter(lse, lse_w, a, b, c, d, dim=2)
    return out, lse


@swin_attention_cpu_fwd.register_fake
def _(q, k, v, bounds, scale):
    batch, num_tokens, heads, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (batch, heads, num_tokens), dtype=_lse_dtype(q.dtype)
    )


@torch.library.custom_op("semanticgen::swin_attention_cpu_bwd", mutates_args=(), device_types="cpu")
def swin_attention_cpu_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bounds: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``dq, dk, dv`` (``[B, N, H, D]``) from the forward's ``out`` and ``lse``."""
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    for a, b, c, d in _windows(bounds):
        # The kernel reads each operand through its own strides (checked against fp64 on mixed-stride
        # inputs in the tests), so a one-range window (every window in blocked order) is pure views.
        do_w, q_w, k_w, v_w, o_w = (_gather(t, a, b, c, d).transpose(1, 2) for t in (grad_out, q, k, v, out))
        lse_w = _gather(lse, a, b, c, d, dim=2)
        dq_w, dk_w, dv_w = _flash_bwd(do_w, q_w, k_w, v_w, o_w, lse_w, 0.0, False, attn_mask=None, scale=scale)
        for dst, src in zip(grads, (dq_w, dk_w, dv_w)):
            _scatter(dst, src.transpose(1, 2), a, b, c, d)
    return tuple(grads)


@swin_attention_cpu_bwd.register_fake
def _(grad_out, q, k, v, out, lse, bounds, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, bounds, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.bounds, ctx.scale = bounds, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = swin_attention_cpu_bwd(grad_out, q, k, v, out, lse, ctx.bounds, ctx.scale)
    return dq, dk, dv, None, None


swin_attention_cpu_fwd.register_autograd(_backward, setup_context=_setup_context)
