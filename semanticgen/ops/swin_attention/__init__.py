"""Interleaved shifted-window attention: layout maths, public op, reference and backends.

Everything about ``swin_attention`` lives here: :mod:`.layout` (windows on the shared timeline),
:mod:`.interface` (the public function and backend registry), :mod:`.reference` (dense mask,
O(N^2)), :mod:`.cpu` (the CPU path) and the GPU backends, whose kernels are in
``semanticgen.kernels``.
"""

from __future__ import annotations

import torch

from . import cpu as _cpu
from .interface import (
    Backend,
    available_backends,
    backend_descriptions,
    register_backend,
    registered_backends,
    swin_attention,
)
from .layout import WindowIndexMap, WindowLayout, WindowSegment, WindowShard
from .reference import swin_attention_reference

__all__ = [
    "WindowLayout",
    "WindowShard",
    "WindowSegment",
    "WindowIndexMap",
    "swin_attention",
    "swin_attention_reference",
    "available_backends",
    "backend_descriptions",
    "registered_backends",
    "register_backend",
    "Backend",
]


def _flat_bounds(layout: WindowLayout, shifted: bool) -> list[int]:
    return [x for seg in layout.segments(shifted) for x in seg]


def _run_reference(q, k, v, layout, shifted, scale):
    return swin_attention_reference(q, k, v, layout, shifted=shifted, scale=scale)


def _run_cpu(q, k, v, layout, shifted, scale):
    out, _ = _cpu.swin_attention_cpu_fwd(q, k, v, _flat_bounds(layout, shifted), scale)
    return out


_ALL_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
register_backend(Backend("reference", _run_reference, ("cpu", "cuda"), _ALL_FLOAT, priority=0))
register_backend(Backend("cpu", _run_cpu, ("cpu",), _cpu.SUPPORTED_DTYPES, priority=10))
