"""Dense-mask reference of interleaved shifted-window attention.

O(N^2) time and memory: it builds the full ``N x N`` window mask. For tests and for checking other
backends only; use :func:`semanticgen.ops.swin_attention` for real work.
"""

from __future__ import annotations

import math

import torch

from .layout import WindowLayout


def swin_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: WindowLayout,
    *,
    shifted: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Windowed attention by masking full attention.

    Args:
        q, k, v: ``[B, N, H, D]`` with ``N == layout.num_tokens``.
    Returns:
        ``[B, N, H, D]``, computed in the inputs' dtype (pass float64 for a reference).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ids = layout.window_ids(shifted).to(q.device)
    allowed = ids[:, None] == ids[None, :]  # [N, N]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)
