"""Public ops of semanticgen.

* :func:`swin_attention` with :class:`WindowLayout`: interleaved shifted-window attention.
"""

from __future__ import annotations

from .swin_attention import WindowLayout, available_backends, swin_attention, swin_attention_reference

__all__ = ["WindowLayout", "swin_attention", "swin_attention_reference", "available_backends"]
