"""Public ops of semanticgen.

* :func:`swin_attention` with :class:`WindowLayout`: interleaved shifted-window attention.
* Fused rectified-flow ops: :func:`euler_step`, :func:`euler_step_`, :func:`cfg_euler_step`,
  :func:`flow_noising`, :func:`flow_matching_loss` (compiled, in ``semanticgen._C``).
"""

from __future__ import annotations

from .flow import cfg_euler_step, euler_step, euler_step_, flow_matching_loss, flow_noising
from .swin_attention import WindowLayout, WindowShard, available_backends, swin_attention, swin_attention_reference

__all__ = [
    "WindowLayout",
    "WindowShard",
    "swin_attention",
    "swin_attention_reference",
    "available_backends",
    "euler_step",
    "euler_step_",
    "cfg_euler_step",
    "flow_noising",
    "flow_matching_loss",
]
