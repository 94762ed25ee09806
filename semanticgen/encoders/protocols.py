"""Protocols every semantic encoder, video VAE and text encoder satisfies, and shared input checks.

Video tensors everywhere are ``float [B, F, 3, H, W]`` with values in ``[0, 1]``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["SemanticEncoder", "VideoVAE", "TextEncoder", "check_video"]


@runtime_checkable
class SemanticEncoder(Protocol):
    """Maps a video to semantic tokens.

    ``encode(video [B, F, 3, H, W] in [0, 1]) -> [B, F / temporal_factor, (H / s) * (W / s), out_dim]``
    with ``s = spatial_factor``; tokens of one output frame are in raster order.
    """

    out_dim: int
    temporal_factor: int
    spatial_factor: int

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class VideoVAE(Protocol):
    """Maps a video to latents and back.

    ``encode(video [B, F, 3, H, W] in [0, 1]) -> latents [B, latent_channels, T', H / s, W / s]`` and
    ``decode(latents) -> video [B, F, 3, H, W] in [0, 1]``, with ``s = spatial_factor`` and ``T'`` set by
    ``temporal_factor`` (see each implementation for how it treats the first frame).
    """

    latent_channels: int
    temporal_factor: int
    spatial_factor: int

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TextEncoder(Protocol):
    """Maps prompts to token embeddings: ``encode(prompts) -> (emb [B, L, dim] float, mask [B, L] bool)``."""

    dim: int

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def check_video(
    video: object,
    who: str,
    *,
    frame_multiple: int = 1,
    frame_offset: int = 0,
    spatial_multiple: int = 1,
) -> torch.Tensor:
    """Validate a ``[B, F, 3, H, W]`` floating video and return it.

    Args:
        video: the tensor to check.
        who: name used in error messages (e.g. ``"PixelVAE.encode"``).
        frame_multiple: ``F - frame_offset`` must be a multiple of this (positive when ``frame_offset == 0``).
        frame_offset: frames outside the multiple (1 for causal VAEs that keep the first frame alone).
        spatial_multiple: ``H`` and ``W`` must be multiples of this.

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: wrong rank, channel count, frame count or spatial size.
    """
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{who}: video must be a torch.Tensor [B, F, 3, H, W], got {type(video).__name__}")
    if not video.is_floating_point():
        raise TypeError(f"{who}: video must be a floating-point tensor in [0, 1], got dtype {video.dtype}")
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"{who}: video must have shape [B, F, 3, H, W], got {tuple(video.shape)}")
    b, f, _, h, w = video.shape
    if b == 0:
        raise ValueError(f"{who}: empty batch, video shape {tuple(video.shape)}")
    usable = f - frame_offset
    if usable < (0 if frame_offset else frame_multiple) or usable % frame_multiple:
        if frame_offset:
            need = f"{frame_offset} + k * {frame_multiple} frames (k >= 0)"
        else:
            need = f"a positive multiple of {frame_multiple} frames"
        raise ValueError(f"{who}: expected {need}, got F={f}")
    if h % spatial_multiple or w % spatial_multiple or h == 0 or w == 0:
        raise ValueError(
            f"{who}: H and W must be positive multiples of {spatial_multiple} (no resizing is done), got H={h}, W={w}"
        )
    return video
