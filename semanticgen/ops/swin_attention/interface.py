"""Public entry point ``swin_attention`` and its backend registry."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from semanticgen._checks import check_bool, check_number

from .layout import WindowLayout, WindowShard

# A backend runs the op: fn(q, k, v, layout, shifted, scale) -> out.
BackendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, WindowLayout | WindowShard, bool, float], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    """One implementation of ``swin_attention``.

    Attributes:
        name: what ``backend=`` selects it with.
        fn: the implementation.
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
        dtypes: input dtypes it accepts.
        priority: higher wins when ``backend=None`` picks for a device.
        unavailable: ``() -> str | None``: why it cannot run on this machine (``None`` if it can).
        accepts: ``(q) -> str | None``: why it cannot run these inputs (``q`` is ``[B, N, H, D]``), ``None``
            if it can; ``None`` for a backend that takes whatever its ``devices`` and ``dtypes`` allow.
            ``backend=None`` skips backends that refuse the inputs, so a faster backend with a narrower
            envelope (FlashAttention's dtypes and head dims) falls back to a general one.
        describe: ``() -> str``: which kernel it runs on this machine, for ``semanticgen info``.
    """

    name: str
    fn: BackendFn
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    priority: int
    unavailable: Callable[[], str | None] = lambda: None
    accepts: Callable[[torch.Tensor], str | None] | None = None
    describe: Callable[[], str] | None = None

    def rejects(self, q: torch.Tensor) -> str | None:
        """Why this backend cannot run ``q`` (dtype, then its ``accepts`` predicate), or ``None``."""
        if q.dtype not in self.dtypes:
            return f"supports dtypes {[str(d) for d in self.dtypes]}, got {q.dtype}"
        return None if self.accepts is None else self.accepts(q)


_BACKENDS: dict[str, Backend] = {}
KNOWN_BACKENDS = ("reference", "cpu", "triton", "varlen", "cuda")
# Why a known name has no implementation registered.
_MISSING_REASON = {
    "cuda": "no CUDA C++ attention kernel in this release: CUDA tensors use backend='varlen' or 'triton'",
    "triton": "triton is not installed",
    "varlen": "the varlen backend module failed to import",
}
# Backends whose modules register themselves on import, loaded only when something may need them:
# importing the Triton backend pulls in triton and torch's higher-order ops (1-3 s), which plain CPU
# users never need.
_LAZY_BACKEND_MODULES = {
    "triton": "semanticgen.ops.swin_attention.triton_backend",
    "varlen": "semanticgen.ops.swin_attention.varlen_backend",
}


def _load_lazy_backends() -> None:
    for name, module in list(_LAZY_BACKEND_MODULES.items()):
        if name not in _BACKENDS:
            # A backend whose module fails to import stays unregistered and reports why (_MISSING_REASON),
            # instead of taking every other backend down with it.
            try:
                importlib.import_module(module)
            except Exception as exc:
                _MISSING_REASON[name] = f"{module} failed to import: {type(exc).__name__}: {exc}"
        _LAZY_BACKEND_MODULES.pop(name, None)


def _may_need_lazy(name: str | None, device: torch.device) -> bool:
    if name is not None:
        return name in _LAZY_BACKEND_MODULES
    return device.type != "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    if backend.name not in KNOWN_BACKENDS:
        raise ValueError(f"unknown swin_attention backend name {backend.name!r}; expected one of {KNOWN_BACKENDS}")
    _BACKENDS[backend.name] = backend


def available_backends(device: torch.device | str | None = None) -> dict[str, str | None]:
    """Every known backend name -> ``None`` if usable (on ``device`` when given) or the reason it is not."""
    _load_lazy_backends()
    device_type = None if device is None else torch.device(device).type
    report: dict[str, str | None] = {}
    for name in KNOWN_BACKENDS:
        backend = _BACKENDS.get(name)
        if backend is None:
            report[name] = _MISSING_REASON.get(name, "not registered")
            continue
        reason = backend.unavailable()
        if reason is None and device_type is not None and device_type not in backend.devices:
            reason = f"runs on {'/'.join(backend.devices)} tensors, not {device_type}"
        report[name] = reason
    return report


def registered_backends() -> dict[str, Backend]:
    """The registered backends by name (lazy ones loaded first); read-only use."""
    _load_lazy_backends()
    return dict(_BACKENDS)


def backend_descriptions() -> dict[str, str]:
    """Backend name -> which kernel it runs on this machine, for backends that say (``semanticgen info``)."""
    out = {}
    for name, backend in registered_backends().items():
        if backend.describe is not None:
            try:
                out[name] = backend.describe()
            except Exception as exc:  # a description must never break `semanticgen info`
                out[name] = f"unknown ({type(exc).__name__}: {exc})"
    return out


def _select_backend(name: str | None, q: torch.Tensor) -> Backend:
    """The backend ``backend=name`` runs ``q`` (``[B, N, H, D]``) with; ``None`` picks by priority.

    ``None`` takes the highest-priority backend that runs on ``q``'s device, is available here and takes
    ``q`` (its dtypes and ``accepts``); when none does, the error lists every backend's reason
    (``TypeError`` when they all refuse the dtype).
    """
    device = q.device
    if _LAZY_BACKEND_MODULES and _may_need_lazy(name, device):
        _load_lazy_backends()
    if name is None:
        on_device = [
            b
            for b in _BACKENDS.values()
            if device.type in b.devices and b.name != "reference" and b.unavailable() is None
        ]
        if not on_device:
            raise ValueError(f"swin_attention: no backend is available for {device.type} tensors")
        reasons = {b.name: b.rejects(q) for b in on_device}
        accepting = [b for b in on_device if reasons[b.name] is None]
        if not accepting:
            # TypeError when the dtype is what every backend refuses, as for an explicit backend.
            error = TypeError if all(q.dtype not in b.dtypes for b in on_device) else ValueError
            detail = "; ".join(f"{n}: {r}" for n, r in reasons.items())
            raise error(f"swin_attention: no {device.type} backend takes these inputs ({detail})")
        return max(accepting, key=lambda b: b.priority)
    if not isinstance(name, str):
        raise TypeError(f"swin_attention: backend must be a str or None, got {type(name).__name__}")
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"swin_attention: unknown backend {name!r}; expected one of {KNOWN_BACKENDS} or None")
    backend = _BACKENDS.get(name)
    reason = _MISSING_REASON.get(name, "not registered") if backend is None else backend.unavailable()
    if reason is not None:
        raise ValueError(f"swin_attention: backend {name!r} is unavailable: {reason}")
    if device.type not in backend.devices:
        raise ValueError(
            f"swin_attention: backend {name!r} runs on {'/'.join(backend.devices)} tensors, got {device.type} tensors"
        )
    if q.dtype in backend.dtypes and backend.accepts is not None:
        reason = backend.accepts(q)
        if reason is not None:
            raise ValueError(f"swin_attention: backend {name!r} cannot run these inputs: {reason}")
    return backend


def _check_inputs(q, k, v, layout) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"swin_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(layout, (WindowLayout, WindowShard)):
        raise TypeError(f"swin_attention: layout must be a WindowLayout or WindowShard, got {type(layout).__name__}")
    if q.dim() != 4:
        raise ValueError(f"swin_attention: q must be [B, N, H, D] (4-D), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"swin_attention: {name} must have the same shape as q {tuple(q.shape)}, got {tuple(t.shape)}"
            )
        if t.dtype != q.dtype:
            raise TypeError(f"swin_attention: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"swin_attention: {name} must be on q's device {q.device}, got {t.device}")
    if q.shape[1] != layout.num_tokens:
        raise ValueError(
            f"swin_attention: q has N={q.shape[1]} tokens but the layout describes "
            f"num_tokens={layout.num_tokens} ({layout})"
        )
    if q.shape[0] == 0 or q.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"swin_attention: B, H and D must be positive, got shape {tuple(q.shape)}")


def swin_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: WindowLayout | WindowShard,
    *,
    shifted: bool = False,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Interleaved (shifted-)window attention over VAE and semantic tokens.

    A token attends to exactly the tokens, of either stream, in its own time window
    (``layout.window_ids(shifted)``). Models alternate ``shifted=False`` / ``shifted=True`` by layer.

    Args:
        q, k, v: ``[B, N, H, D]`` with ``N == layout.num_tokens``, same dtype and device.
        layout: the sequence's :class:`WindowLayout`, or a :class:`WindowShard` of one (the whole windows of
            one parity that a context-parallel rank holds; then ``shifted`` must be the shard's parity).
        shifted: use windows shifted by ``layout.window // 2`` latent frames.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"reference"``, ``"cpu"``, ``"triton"``, ``"varlen"``, ``"cuda"`` or ``None`` (the
            fastest backend available for the tensors' device that accepts them: on CUDA ``"varlen"``
            for bf16/fp16 with a FlashAttention head dim, else ``"triton"``; on CPU ``"cpu"``).

    Returns:
        ``[B, N, H, D]`` in the caller's token order, dtype of ``q``.

    Example:
        >>> layout = WindowLayout(vae_frames=8, vae_tokens_per_frame=16,
        ...                       sem_frames=2, sem_tokens_per_frame=4, window=4)
        >>> q = k = v = torch.randn(1, layout.num_tokens, 2, 32)
        >>> swin_attention(q, k, v, layout, shifted=True).shape
        torch.Size([1, 136, 2, 32])
    """
    _check_inputs(q, k, v, layout)
    check_bool("shifted", shifted, who="swin_attention")
    scale = check_number("scale", scale, positive=True, finite=True, allow_none=True, who="swin_attention")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    impl = _select_backend(backend, q)
    if q.dtype not in impl.dtypes:
        raise TypeError(
            f"swin_attention: backend {impl.name!r} supports dtypes {[str(d) for d in impl.dtypes]}, got {q.dtype}"
        )
    return impl.fn(q, k, v, layout, shifted, scale)
