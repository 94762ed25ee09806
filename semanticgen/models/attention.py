"""Self-attention (full or interleaved shifted-window) and masked cross-attention to text.

Heads are kept as ``[B, N, H, D]``, the layout ``semanticgen.ops.swin_attention`` takes directly; full
attention transposes to the ``[B, H, N, D]`` that ``scaled_dot_product_attention`` wants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semanticgen.ops import WindowLayout, swin_attention

from .rope import apply_rope


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm over the head dim whose gain follows the input dtype (fused kernel under autocast too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H * D]`` -> ``[B, N, H, D]``."""
    return x.unflatten(-1, (heads, -1))


class SelfAttention(nn.Module):
    """Multi-head self-attention with per-head RMS-normalised q/k and 3-D RoPE.

    ``layout=None`` attends over the whole sequence; a :class:`~semanticgen.ops.WindowLayout` restricts
    every token to its time window through ``swin_attention`` (``shifted`` picks the window parity).

    Args:
        hidden: model width ``C`` (``heads * head_dim``).
        heads: number of heads ``H``.
        qk_norm: RMS-normalise q and k per head (keeps logits bounded in long bf16 runs).
        swin_backend: ``backend=`` passed to ``swin_attention`` (``None``: fastest for the device).
    """

    def __init__(self, hidden: int, heads: int, *, qk_norm: bool = True, swin_backend: str | None = None) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"SelfAttention: hidden={hidden} must be divisible by heads={heads}")
        self.heads = heads
        self.head_dim = hidden // heads
        self.swin_backend = swin_backend
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.q_norm = HeadRMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = HeadRMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden, hidden)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: WindowLayout | None = None,
        shifted: bool = False,
    ) -> torch.Tensor:
        """``x [B, N, C]``, RoPE tables ``cos/sin [N, D/2]`` -> ``[B, N, C]``."""
        q, k, v = _split_heads(self.qkv(x), 3 * self.heads).chunk(3, dim=2)  # each [B, N, H, D]
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        if layout is None:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2)
        else:
            out = swin_attention(q, k, v, layout, shifted=shifted, backend=self.swin_backend)
        return self.proj(out.flatten(2))


class CrossAttention(nn.Module):
    """Cross-attention from the sequence to (masked) text states, with a learned null token.

    A learned null key/value pair is appended to every text sequence and is never masked. A prompt whose
    mask is all False (the empty prompt used for classifier-free guidance) then attends to the null token
    alone: a well-defined, trainable "no text" output instead of a softmax over nothing (NaN).

    Args:
        hidden: model width ``C``; text must already be projected to ``C``.
        heads: number of heads.
        qk_norm: RMS-normalise q and k per head.
    """

    def __init__(self, hidden: int, heads: int, *, qk_norm: bool = True) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"CrossAttention: hidden={hidden} must be divisible by heads={heads}")
        self.heads = heads
        self.head_dim = hidden // heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.null_kv = nn.Parameter(torch.empty(2, hidden))
        self.q_norm = HeadRMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = HeadRMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden, hidden)
        self._init_special()

    @torch.no_grad()
    def _init_special(self) -> None:
        nn.init.normal_(self.null_kv, std=0.02)  # the scale of a projected text token at initialisation

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """``x [B, N, C]``, ``text [B, L, C]``, ``text_mask [B, L]`` bool (True = real token) -> ``[B, N, C]``."""
        b = x.shape[0]
        kv = torch.cat([self.kv(text), self.null_kv.to(text.dtype).reshape(1, 1, -1).expand(b, 1, -1)], dim=1)
        k, v = _split_heads(kv, 2 * self.heads).chunk(2, dim=2)  # each [B, L + 1, H, D]
        q = self.q_norm(_split_heads(self.q(x), self.heads))
        k = self.k_norm(k)
        mask = torch.cat([text_mask, text_mask.new_ones(b, 1)], dim=1)[:, None, None, :]  # [B, 1, 1, L + 1]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.proj(out.transpose(1, 2).flatten(2))
