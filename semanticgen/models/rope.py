"""3-D rotary position embedding over (time, height, width), with fractional positions.

Each attention head of width ``D`` is split into three even parts, one per axis (:func:`rope_axis_dims`);
a token at position ``(p_t, p_h, p_w)`` rotates channel pair ``k`` of an axis by ``p * theta^(-2k / d_axis)``.
Positions are floats, so semantic frames can sit between VAE frames on the shared time axis
(``p_t = j * Tv / Ts``) and a coarse semantic grid can be stretched over the finer VAE grid.

The cos/sin tables are computed per forward from the positions (no buffers: nothing to shard, nothing
to go stale when the sequence shape changes); they cost ``O(N * D)``, negligible next to attention.
"""

from __future__ import annotations

import math

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis ``(time, height, width)``: height and width get ``2 * (D // 6)`` each, time the rest."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"RoPE needs an even head_dim >= 6 (two channels per axis at least), got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def token_grid(num_tokens: int, aspect: float = 1.0) -> tuple[int, int]:
    """Lay ``num_tokens`` on a ``rows x cols`` grid with ``rows * cols == num_tokens``.

    Picks the factorisation whose ``rows / cols`` is closest (in log ratio) to ``aspect`` (height over width).
    Semantic tokens arrive flattened (``[Ts, Ss]``) from the encoder's raster order, so the grid shape is
    recovered this way; for a raster-ordered encoder with the same aspect as the video it is exact.
    """
    if num_tokens < 1:
        raise ValueError(f"token_grid: num_tokens must be >= 1, got {num_tokens}")
    if not aspect > 0:
        raise ValueError(f"token_grid: aspect must be > 0, got {aspect}")
    best = (1, num_tokens)
    best_err = math.inf
    for rows in range(1, num_tokens + 1):
        if num_tokens % rows:
            continue
        cols = num_tokens // rows
        err = abs(math.log(rows / cols) - math.log(aspect))
        if err < best_err - 1e-12:
            best, best_err = (rows, cols), err
    return best


def grid_positions(
    frames: int,
    rows: int,
    cols: int,
    *,
    time_scale: float = 1.0,
    span: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Positions of a frame-major ``frames x rows x cols`` token block.

    Args:
        frames, rows, cols: block shape; tokens ordered (frame, row, column).
        time_scale: frame ``j`` sits at time ``j * time_scale`` (``Tv / Ts`` for semantic tokens in stage 2).
        span: ``(H', W')`` of a finer grid to stretch this one over: cell centres map to
            ``(r + 0.5) * H' / rows - 0.5``, so a semantic token sits at the centre of the VAE patches it
            summarises. ``None`` keeps integer positions ``0..rows-1``.

    Returns:
        ``float32 [frames * rows * cols, 3]`` of ``(time, height, width)``.
    """
    t = torch.arange(frames, dtype=torch.float32, device=device) * time_scale
    h = torch.arange(rows, dtype=torch.float32, device=device)
    w = torch.arange(cols, dtype=torch.float32, device=device)
    if span is not None:
        h = (h + 0.5) * (span[0] / rows) - 0.5
        w = (w + 0.5) * (span[1] / cols) - 0.5
    grid = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def rope_tables(positions: torch.Tensor, head_dim: int, *, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for :func:`apply_rope`.

    Args:
        positions: ``[N, 3]`` float ``(time, height, width)``.
        head_dim: ``D``.

    Returns:
        ``(cos, sin)``, each ``float32 [N, D / 2]``; channel pairs ordered time, height, width.
    """
    angles = []
    for axis, dim in enumerate(rope_axis_dims(head_dim)):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        angles.append(positions[:, axis, None].double() * freqs[None])
    # fp64 angles: in float32, p * f near p = 1000 resolves only to one ulp (6e-5 rad); fp64 keeps them exact to
    # ~1e-13 at any clip length for N * D / 2 values, negligible next to the attention.
    ang = torch.cat(angles, dim=-1)
    return torch.cos(ang).float(), torch.sin(ang).float()


def sincos_position_embedding(positions: torch.Tensor, dim: int, *, theta: float = 10000.0) -> torch.Tensor:
    """Absolute sin/cos embedding ``float32 [N, dim]`` of ``positions [N, 3]`` (time, height, width).

    The same angles as :func:`rope_tables` with ``head_dim = dim`` (channels split over the three axes by
    :func:`rope_axis_dims`), laid out as ``[cos, sin]`` pairs. Fixed, so it fits any clip length and grid.
    """
    if dim % 2:
        raise ValueError(f"sincos_position_embedding: dim must be even, got {dim}")
    cos, sin = rope_tables(positions, dim, theta=theta)
    return torch.stack((cos, sin), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x [B, N, H, D]`` by the angles in ``cos/sin [N, D/2]``.

    Computed in float32 and returned in ``x``'s dtype.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)
