"""Varlen backend of ``swin_attention``: every window is one sequence of a FlashAttention varlen call.

In blocked token order (``WindowLayout(..., order="blocked")``) every window of either parity is one
contiguous token range, so ``[B, N, H, D]`` inputs reshape (a view when contiguous) to the packed
``[B * N, H, D]`` layout of a varlen kernel, and the windows' ``cu_seqlens`` (repeated per sample with
offsets ``b * N``) are the kernel's sequence boundaries. Forward and backward are FlashAttention's own,
with no new dependency: by default ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.9), which runs
ATen's FlashAttention-2, or FlashAttention-3/4 when one is activated in torch's flash-attention registry
(``torch.nn.attention.activate_flash_attention_impl``). When the ``flash_attn_interface`` (FlashAttention-3)
or ``flash_attn`` package is installed and no registry impl is active, its ``flash_attn_varlen_func`` runs
instead. :func:`varlen_kernel_name` says which.

Streams-order inputs are gathered into blocked order and the output scattered back: one ``index_select``
each way through the layout's permutation tables (moved to the device once and cached on the layout).
The gather costs ``3 * B * N * H * D`` element copies in and out; use blocked order end to end to avoid it.

What runs here is FlashAttention's envelope: bf16/fp16, head dim a multiple of 8 and at most 256, compute
capability 8.0+, ``B * N < 2**31`` (int32 ``cu_seqlens``). :func:`varlen_rejects` says why inputs fall
outside it; ``swin_attention(backend=None)`` uses it to fall back to the Triton backend.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .interface import Backend, register_backend
from .layout import WindowLayout

__all__ = [
    "SUPPORTED_DTYPES",
    "MAX_HEAD_DIM",
    "VarlenFn",
    "varlen_unavailable",
    "varlen_unsupported",
    "varlen_rejects",
    "varlen_kernel_name",
    "varlen_segments",
    "varlen_swin_attention",
    "swin_attention_varlen",
]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256  # FlashAttention-2/3 kernels are instantiated for head dims up to 256
HEAD_DIM_MULTIPLE = 8  # 16-byte aligned rows for the kernels' vectorised loads
MIN_CAPABILITY = (8, 0)  # FlashAttention-2 in ATen is built for sm80 and newer
MAX_ROWS = 2**31 - 1  # cu_seqlens are int32

# fn(q, k, v, cu_seqlens, max_seqlen, scale) -> out: q, k, v, out are packed [T, H, D]; cu_seqlens int32 [S + 1].
VarlenFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


# ---------------------------------------------------------------------------------- capability
def varlen_unavailable() -> str | None:
    """Why the varlen backend cannot run on this machine, or ``None``."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch.nn.attention.varlen needs torch >= 2.9, this is torch {torch.__version__}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def varlen_unsupported(
    dtype: torch.dtype, head_dim: int, capability: tuple[int, int] | None, rows: int = 0
) -> str | None:
    """Why FlashAttention varlen cannot run these inputs, or ``None``; pure, so selection is testable anywhere.

    Args:
        dtype: dtype of q/k/v.
        head_dim: ``D``.
        capability: CUDA compute capability of the tensors' device, ``None`` for a non-CUDA device.
        rows: ``B * N``, the packed token count (must fit the int32 ``cu_seqlens``).
    """
    if capability is None:
        return "runs on CUDA tensors only"
    if tuple(capability) < MIN_CAPABILITY:
        return f"FlashAttention needs compute capability >= 8.0, the device has {capability[0]}.{capability[1]}"
    if dtype not in SUPPORTED_DTYPES:
        return f"FlashAttention takes dtypes {[str(d) for d in SUPPORTED_DTYPES]}, got {dtype}"
    if head_dim % HEAD_DIM_MULTIPLE or head_dim > MAX_HEAD_DIM:
        return f"FlashAttention takes head dims that are multiples of 8 and <= {MAX_HEAD_DIM}, got D={head_dim}"
    if rows > MAX_ROWS:
        return f"B * N must be < 2**31 (int32 cu_seqlens), got {rows}"
    return None


def _device_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def varlen_rejects(q: torch.Tensor) -> str | None:
    """The registry's ``accepts`` predicate: why ``q`` (``[B, N, H, D]``) cannot use this backend, or ``None``."""
    return varlen_unsupported(q.dtype, q.shape[-1], _device_capability(q.device), q.shape[0] * q.shape[1])


# -------------------------------------------------------------------------------------- kernels
@dataclass(frozen=True)
class _Kernel:
    name: str
    fn: VarlenFn


@functools.cache
def _torch_varlen_scale_kwarg() -> bool:
    # torch 2.9's varlen_attn(..., is_causal=False, return_aux=None) has no scale; 2.10+ takes scale=.
    from torch.nn.attention.varlen import varlen_attn

    return "scale" in inspect.signature(varlen_attn).parameters


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    from torch.nn.attention.varlen import varlen_attn

    if _torch_varlen_scale_kwarg():
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)
    # No scale argument: the kernel uses 1/sqrt(D), so fold the ratio into q (one elementwise pass).
    ratio = scale * math.sqrt(q.shape[-1])
    if ratio != 1.0:
        q = q * ratio
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def _package_varlen(module: str) -> VarlenFn:
    def run(q, k, v, cu_seqlens, max_seqlen, scale):
        func = importlib.import_module(module).flash_attn_varlen_func
        out = func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale)
        # Some FlashAttention-3 releases return (out, softmax_lse).
        return out[0] if isinstance(out, tuple) else out

    return run


def _registry_impl() -> str | None:
    current = getattr(torch.nn.attention, "current_flash_attention_impl", None)  # torch >= 2.10
    if current is None:
        return None
    try:
        return current()
    except Exception:  # a broken third-party registration must not break attention
        return None


@functools.cache
def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _torch_builtin_name(device: torch.device | None) -> str:
    # torch >= 2.12 sends varlen_attn to cuDNN attention on sm90/sm100 with cuDNN >= 9.18 (a private check).
    try:
        from torch.nn.attention import varlen as varlen_module

        use_cudnn = getattr(varlen_module, "_should_use_cudnn", None)
        if device is not None and device.type == "cuda" and use_cudnn is not None and use_cudnn(device.index or 0):
            return "torch varlen_attn -> cuDNN attention (FlashAttention-2 for short windows)"
    except Exception:  # the name is informative only
        pass
    return "torch varlen_attn -> ATen FlashAttention-2"


def _kernel_for(device: torch.device | None) -> _Kernel:
    impl = _registry_impl()
    if impl is not None:
        # torch's varlen_attn dispatches to the activated impl: keep the user's choice.
        return _Kernel(f"torch varlen_attn -> {impl} (torch flash-attention registry)", _torch_varlen)
    capability = None if device is None or device.type != "cuda" else _device_capability(device)
    # FlashAttention-3's kernels are Hopper (sm90) kernels.
    if _have("flash_attn_interface") and (capability is None or capability[0] == 9):
        fa3 = _package_varlen("flash_attn_interface")
        return _Kernel("flash_attn_interface.flash_attn_varlen_func (FlashAttention-3)", fa3)
    if _have("flash_attn"):
        return _Kernel("flash_attn.flash_attn_varlen_func (FlashAttention-2 package)", _package_varlen("flash_attn"))
    return _Kernel(_torch_builtin_name(device), _torch_varlen)


def varlen_kernel_name(device: torch.device | str | None = None) -> str:
    """Which varlen kernel ``backend="varlen"`` runs (on ``device``, default the current CUDA device)."""
    reason = varlen_unavailable()
    if reason is not None:
        return f"unavailable: {reason}"
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _kernel_for(torch.device(device)).name


# ------------------------------------------------------------------------------------ core
def varlen_segments(layout: WindowLayout, shifted: bool, batch: int, device: torch.device | str) -> torch.Tensor:
    """``int32[B * W + 1]``: windows of ``batch`` samples packed one after the other, in blocked order.

    Sample ``b``'s window ``w`` is packed rows ``cu[b * W + w] : cu[b * W + w + 1]``, i.e. the layout's
    ``cu_seqlens`` shifted by ``b * N``. Cached on the layout per ``(parity, batch, device)``.
    """
    device = torch.device(device)
    key = ("varlen_cu_seqlens", bool(shifted), int(batch), str(device))
    cached = layout._cache.get(key)
    if cached is not None:
        return cached
    # Window lengths are the same in either order, so the blocked boundaries are their running sum.
    lengths = torch.tensor(layout.window_lengths(shifted), dtype=torch.int64)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)[:-1]])
    n = layout.num_tokens
    offsets = torch.arange(batch, dtype=torch.int64)[:, None] * n
    cu = torch.cat([(offsets + starts).flatten(), torch.tensor([batch * n])])
    cu = layout._cache.setdefault(key, cu.to(torch.int32).to(device))
    return cu


def _packed(t: torch.Tensor) -> torch.Tensor:
    b, n, h, d = t.shape
    packed = t.reshape(b * n, h, d)  # a view for contiguous blocked-order inputs
    # FlashAttention needs unit stride along D; reshape of an exotic view may keep a strided last dim.
    return packed if packed.stride(-1) == 1 else packed.contiguous()


def varlen_swin_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: WindowLayout,
    shifted: bool,
    scale: float,
    attn: VarlenFn,
) -> torch.Tensor:
    """Windowed attention through any varlen attention function ``attn`` (device-agnostic core).

    Args:
        q, k, v: ``[B, N, H, D]`` in ``layout.order``.
        layout, shifted, scale: as in :func:`~.interface.swin_attention`; ``layout`` may also be a
            :class:`~.layout.WindowShard` (blocked order, local tokens): only ``order``, ``num_tokens``,
            ``window_lengths`` and ``max_window_length`` are read, plus ``_cache`` for the tables.
        attn: ``fn(q, k, v, cu_seqlens, max_seqlen, scale) -> out`` on packed ``[B * N, H, D]`` tensors,
            ``cu_seqlens`` from :func:`varlen_segments`; FlashAttention's varlen function on CUDA, any
            equivalent (e.g. a loop over SDPA) elsewhere.

    Returns:
        ``[B, N, H, D]`` in ``layout.order``.
    """
    b, n, h, d = q.shape
    streams = layout.order == "streams"
    if streams:
        q, k, v = (layout.to_blocked(t, dim=1) for t in (q, k, v))
    cu_seqlens = varlen_segments(layout, shifted, b, q.device)
    out = attn(_packed(q), _packed(k), _packed(v), cu_seqlens, layout.max_window_length(shifted), scale)
    out = out.reshape(b, n, h, d)
    return layout.from_blocked(out, dim=1) if streams else out


def swin_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, shifted: bool, scale: float
) -> torch.Tensor:
    """Backend function: ``[B, N, H, D]`` in and out, caller token order (shapes checked by the interface).

    Raises:
        TypeError: dtype other than bf16/fp16.
        ValueError: non-CUDA tensors, head dim outside FlashAttention's range, device below sm80.
    """
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"swin_attention(backend='varlen'): dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, "
            f"got {q.dtype}; use backend='triton' for float32"
        )
    reason = varlen_rejects(q)
    if reason is not None:
        raise ValueError(f"swin_attention(backend='varlen'): {reason}")
    return varlen_swin_attention(q, k, v, layout, shifted, scale, _kernel_for(q.device).fn)


register_backend(
    Backend(
        "varlen",
        swin_attention_varlen,
        ("cuda",),
        SUPPORTED_DTYPES,
        priority=30,
        unavailable=varlen_unavailable,
        accepts=varlen_rejects,
        describe=varlen_kernel_name,
    )
)
