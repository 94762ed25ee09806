"""Timestep embedding, text projection and 3-D patch embedding for the diffusion transformers."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, *, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of ``t * 1000``.

    Rectified-flow time lives in ``[0, 1]``; scaling by 1000 spreads it over the same frequency range as
    the integer timesteps these embeddings were designed for, so the low frequencies still vary.

    Args:
        t: ``[B]`` timesteps in ``[0, 1]``.
        dim: output width (even).

    Returns:
        ``float32 [B, dim]``: ``[cos(t f_k), sin(t f_k)]`` with ``f_k`` geometric from 1 to ``1/max_period``.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal_embedding: dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """``t [B]`` -> sinusoidal features -> MLP -> ``[B, hidden]`` conditioning vector."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class TextProjection(nn.Module):
    """Text-encoder states ``[B, L, text_dim]`` -> ``[B, L, hidden]`` (two-layer MLP)."""

    def __init__(self, text_dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.mlp(text)


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Cut ``[B, C, T, H, W]`` into non-overlapping ``(pt, ph, pw)`` patches, frame-major.

    Returns:
        ``[B, (T/pt) * (H/ph) * (W/pw), C * pt * ph * pw]``; token order is (time, row, column),
        features ordered (channel, pt, ph, pw).
    """
    b, c, t, h, w = x.shape
    pt, ph, pw = patch
    if t % pt or h % ph or w % pw:
        raise ValueError(f"patchify: [T, H, W] = {[t, h, w]} must be divisible by the patch {list(patch)}")
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # B, T', H', W', C, pt, ph, pw
    return x.reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, patch: tuple[int, int, int], shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Args:
        tokens: ``[B, N, C * pt * ph * pw]``.
        patch: ``(pt, ph, pw)``.
        shape: ``(C, T, H, W)`` of the output.

    Returns:
        ``[B, C, T, H, W]``.
    """
    c, t, h, w = shape
    pt, ph, pw = patch
    b = tokens.shape[0]
    x = tokens.reshape(b, t // pt, h // ph, w // pw, c, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # B, C, T', pt, H', ph, W', pw
    return x.reshape(b, c, t, h, w)
