"""Weight-free video encoders: :class:`PixelVAE` and :class:`PixelSemanticEncoder`.

Both need no checkpoint and no download. They let the whole two-stage pipeline, its training loop and
its tests run anywhere, with the same tensor shapes as the real encoders (Wan VAE, Qwen2.5-VL vision tower).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semanticgen._checks import check_bool, check_int, is_real

from .protocols import check_video

__all__ = ["PixelVAE", "PixelSemanticEncoder", "object_descriptors"]

DECODE_MODES = ("linear", "nearest")

# ITU-R BT.601 YCbCr rows on centred RGB in [-1, 1]: an invertible, decorrelating colour map, so that
# the first three latent channels are luminance and two colour differences.
_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)


def _colour_map(channels: int, seed: int) -> torch.Tensor:
    """``[channels, 3]`` map from centred RGB to latent channels: YCbCr rows, then seeded unit-norm mixtures."""
    rows = torch.tensor(_YCBCR, dtype=torch.float64)[: min(channels, 3)]
    if channels > 3:
        gen = torch.Generator().manual_seed(seed)
        extra = torch.randn(channels - 3, 3, generator=gen, dtype=torch.float64)
        rows = torch.cat([rows, extra / extra.norm(dim=1, keepdim=True)])
    return rows


def _per_channel(name: str, value: object, channels: int, *, positive: bool) -> torch.Tensor:
    """``float32 [channels]`` from one finite float or a sequence of ``channels`` of them (``> 0`` if ``positive``)."""
    if is_real(value):
        values = [float(value)] * channels
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
        if len(values) != channels or not all(is_real(v) for v in values):
            raise ValueError(
                f"PixelVAE: {name} must be a float or {channels} floats (one per latent channel), got {value!r}"
            )
        values = [float(v) for v in values]
    else:
        raise TypeError(f"PixelVAE: {name} must be a float or a sequence of floats, got {type(value).__name__}")
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        what = "positive finite" if positive else "finite"
        raise ValueError(f"PixelVAE: {name} must be {what}, got {value!r}")
    return torch.tensor(values, dtype=torch.float32)


def _time_weights(latent_frames: int, tf: int, causal: bool) -> torch.Tensor:
    """``float32 [F, T']`` weights of the latent frames in each video frame: linear between latent frame centres.

    Centre of latent frame ``k`` (the mean of the frames it pooled): ``0`` then ``tf * k - (tf - 1) / 2`` when
    causal, ``tf * k + (tf - 1) / 2`` otherwise. Frames outside the first and last centres use the nearest
    segment's line (extrapolation), so the last group's frames keep moving instead of repeating one value.
    """
    if causal:
        centres = [0.0] + [tf * k - (tf - 1) / 2 for k in range(1, latent_frames)]
        frames = 1 + (latent_frames - 1) * tf
    else:
        centres = [tf * k + (tf - 1) / 2 for k in range(latent_frames)]
        frames = latent_frames * tf
    weights = torch.zeros(frames, latent_frames, dtype=torch.float64)
    if latent_frames == 1:
        return weights.add_(1.0).float()
    for f in range(frames):
        j = min(max(sum(c <= f for c in centres) - 1, 0), latent_frames - 2)  # segment [centres[j], centres[j+1]]
        a = (f - centres[j]) / (centres[j + 1] - centres[j])
        weights[f, j], weights[f, j + 1] = 1.0 - a, a
    return weights.float()


class PixelVAE(nn.Module):
    """Average-pool "VAE": latents are pooled colours, decoding interpolates them back.

    ``encode``: centre RGB to ``[-1, 1]``, average-pool space by ``spatial_factor`` and time by
    ``temporal_factor``, then map the 3 colours to ``latent_channels`` with a fixed linear map
    (YCbCr rows, then seeded unit-norm mixtures when ``latent_channels > 3``).
    ``decode``: apply the map's pseudo-inverse, bring the colours back to every frame and pixel, undo the
    centring and clamp to ``[0, 1]``. How, by ``decode_mode``:

    * ``"linear"`` (default): each latent value sits at the centre of the frames and pixels it averaged.
      Space is bilinear between block centres (``align_corners=False``, edges held); time is piecewise linear
      between latent frame centres (frame 0 for the causal first latent frame, then ``tf * k - (tf - 1) / 2``),
      continued linearly past the last centre (and, non-causal, before the first), so no two consecutive
      frames of a moving clip repeat. Re-encoding a decode is a fixed low-pass of the latents, not the
      identity: ``[1/8, 3/4, 1/8]`` along each spatial axis and along time between interior latent frames
      (edges: replicated in space; the last latent frame comes back exactly in time), so latents constant over
      space and time come back exactly, as long as the clamp does not cut the decoded colours.
    * ``"nearest"``: repeat each latent over its frames and pixels (stop-motion blocks). With
      ``latent_channels >= 3``, decoding a video's own latents returns its pooled version and re-encoding a
      decode returns the latents exactly (within the clamp).

    ``latents_mean`` / ``latents_std`` normalise the latents as the Wan VAE's config values do:
    ``encode`` returns ``(pooled - mean) / std`` and ``decode`` first undoes it. Each is one float for every
    channel or one per latent channel. Pooled colours of dark, mostly plain clips have a std far below 1
    (about 0.1-0.2 per channel on the synthetic shapes), while the rectified flow starts from unit Gaussian
    noise; setting them to the data's per-channel statistics gives the flow unit-scale latents. The defaults
    (0 and 1) leave the latents unnormalised.

    Time follows the Wan VAE when ``causal=True`` (default): the first frame has a latent frame of
    its own and every following ``temporal_factor`` frames share one, so ``F = 1 + temporal_factor * k``
    frames give ``1 + k`` latent frames (e.g. 17 -> 5, 81 -> 21). With ``causal=False``, ``F`` must be a
    multiple of ``temporal_factor`` and gives ``F / temporal_factor`` latent frames.

    Shapes: ``encode(video [B, F, 3, H, W]) -> [B, C, T', H / s, W / s]``; ``decode`` is the inverse.
    """

    def __init__(
        self,
        temporal_factor: int = 4,
        spatial_factor: int = 8,
        latent_channels: int = 4,
        *,
        causal: bool = True,
        seed: int = 0,
        latents_mean: float | Sequence[float] = 0.0,
        latents_std: float | Sequence[float] = 1.0,
        decode_mode: str = "linear",
    ) -> None:
        super().__init__()
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"PixelVAE: decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        for name, value in (
            ("temporal_factor", temporal_factor),
            ("spatial_factor", spatial_factor),
            ("latent_channels", latent_channels),
        ):
            check_int(name, value, minimum=1, who="PixelVAE")
        self.temporal_factor = temporal_factor
        self.spatial_factor = spatial_factor
        self.latent_channels = latent_channels
        self.causal = bool(causal)
        self.decode_mode = decode_mode
        colour = _colour_map(latent_channels, seed)
        self.register_buffer("colour_map", colour.float(), persistent=False)
        self.register_buffer("colour_unmap", torch.linalg.pinv(colour).float(), persistent=False)
        mean = _per_channel("latents_mean", latents_mean, latent_channels, positive=False)
        std = _per_channel("latents_std", latents_std, latent_channels, positive=True)
        self.register_buffer("latents_mean", mean.view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", std.view(1, -1, 1, 1, 1), persistent=False)

    # --------------------------------------------------------------------------- frame counts
    def latent_frames(self, num_frames: int) -> int:
        """Latent frames ``T'`` produced from ``num_frames`` video frames."""
        tf = self.temporal_factor
        if self.causal:
            if num_frames < 1 or (num_frames - 1) % tf:
                raise ValueError(f"PixelVAE: num_frames must be 1 + k * {tf} (k >= 0), got {num_frames}")
            return 1 + (num_frames - 1) // tf
        if num_frames < tf or num_frames % tf:
            raise ValueError(f"PixelVAE: num_frames must be a positive multiple of {tf}, got {num_frames}")
        return num_frames // tf

    def video_frames(self, latent_frames: int) -> int:
        """Video frames ``F`` decoded from ``latent_frames`` latent frames."""
        if latent_frames < 1:
            raise ValueError(f"PixelVAE: latent_frames must be >= 1, got {latent_frames}")
        if self.causal:
            return 1 + (latent_frames - 1) * self.temporal_factor
        return latent_frames * self.temporal_factor

    # ------------------------------------------------------------------------------- encode/decode
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``video [B, F, 3, H, W]`` in ``[0, 1]`` -> ``latents [B, C, T', H / s, W / s]``."""
        offset = 1 if self.causal else 0
        check_video(
            video,
            "PixelVAE.encode",
            frame_multiple=self.temporal_factor,
            frame_offset=offset,
            spatial_multiple=self.spatial_factor,
        )
        x = video.float() * 2.0 - 1.0
        b, f, _, h, w = x.shape
        s, tf = self.spatial_factor, self.temporal_factor
        x = F.avg_pool2d(x.reshape(b * f, 3, h, w), s).reshape(b, f, 3, h // s, w // s)
        groups = [x[:, :offset]] if offset else []
        rest = x[:, offset:]
        if rest.shape[1]:
            groups.append(rest.reshape(b, rest.shape[1] // tf, tf, 3, h // s, w // s).mean(dim=2))
        x = torch.cat(groups, dim=1)  # [B, T', 3, h, w]
        latents = torch.einsum("cd,btdhw->bcthw", self.colour_map.to(x.device), x)
        latents = (latents - self.latents_mean.to(x.device)) / self.latents_std.to(x.device)
        return latents.to(video.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents [B, C, T', h, w]`` -> ``video [B, F, 3, h * s, w * s]`` in ``[0, 1]``."""
        return ((self.decode_unclamped(latents) + 1.0) * 0.5).clamp(0.0, 1.0).to(latents.dtype)

    def decode_unclamped(self, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` before the clamp, in the centred range: float32 ``[B, F, 3, h * s, w * s]``, about [-1, 1].

        Linear in the latents, so gradients reach every latent (the learned VAE builds on it).
        """
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError("PixelVAE.decode: latents must be a floating-point torch.Tensor [B, C, T', h, w]")
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"PixelVAE.decode: expected latents [B, {self.latent_channels}, T', h, w], got {tuple(latents.shape)}"
            )
        z = latents.float() * self.latents_std.to(latents.device) + self.latents_mean.to(latents.device)
        x = torch.einsum("dc,bcthw->btdhw", self.colour_unmap.to(latents.device), z)
        s, tf = self.spatial_factor, self.temporal_factor
        if self.decode_mode == "nearest":
            x = x.repeat_interleave(s, dim=3).repeat_interleave(s, dim=4)
            if self.causal:
                x = torch.cat([x[:, :1], x[:, 1:].repeat_interleave(tf, dim=1)], dim=1)
            else:
                x = x.repeat_interleave(tf, dim=1)
        else:
            b, t, _, h, w = x.shape
            weights = _time_weights(t, tf, self.causal).to(x.device)  # [F, T']
            x = torch.einsum("ft,btdhw->bfdhw", weights, x)
            x = F.interpolate(x.reshape(-1, 3, h, w), size=(h * s, w * s), mode="bilinear", align_corners=False)
            x = x.reshape(b, weights.shape[0], 3, h * s, w * s)
        return x

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.encode(video)


def object_descriptors(video: torch.Tensor, *, threshold: float = 0.25) -> torch.Tensor:
    """Two shape descriptors of each frame's foreground object: ``video [B, F, 3, H, W]`` in [0, 1] -> ``[B, F, 2]``.

    The foreground is what differs from the frame's median colour (the background, for an object covering under
    half the frame): its weight is the largest channel difference over ``threshold``, clamped to [0, 1].

    * fill ratio: the foreground's mass over the area of its bounding box (rows x columns holding a pixel of weight
      over 0.5): 1 for an axis-aligned square, about 0.79 for a disc, about 0.5 for a triangle;
    * vertical asymmetry: how far below the middle of its rows the foreground's mass lies, per row of height:
      positive for a shape wider at the bottom (an upward triangle), 0 for a symmetric one.

    A frame with no foreground gives 0 for both.
    """
    bg = video.flatten(-2).median(dim=-1).values[..., None, None]  # [B, F, 3, 1, 1]
    weight = ((video - bg).abs().amax(dim=2) / threshold).clamp(0.0, 1.0)  # [B, F, H, W]
    solid = weight > 0.5
    rows = solid.any(dim=-1)  # [B, F, H]
    n_rows = rows.sum(dim=-1).to(weight.dtype)
    n_cols = solid.any(dim=-2).sum(dim=-1).to(weight.dtype)
    fill = torch.where(n_rows > 0, weight.sum(dim=(-2, -1)) / (n_rows * n_cols).clamp(min=1.0), 0.0)
    row_mass = weight.sum(dim=-1)  # [B, F, H]
    r = torch.arange(weight.shape[-2], dtype=weight.dtype, device=weight.device)
    middle = (rows * r).sum(dim=-1) / n_rows.clamp(min=1.0)
    centroid = (row_mass * r).sum(dim=-1) / row_mass.sum(dim=-1).clamp(min=1e-6)
    asymmetry = torch.where(n_rows > 0, (centroid - middle) / n_rows.clamp(min=1.0), 0.0)
    return torch.stack([fill, asymmetry], dim=-1)


class PixelSemanticEncoder(nn.Module):
    """Weight-free semantic features with the Qwen2.5-VL token layout.

    Each output token summarises one ``patch x patch`` square (default 28) over a pair of frames
    (``temporal_factor`` frames): mean colour of its four quadrants (12), mean absolute horizontal and
    vertical gradients per channel (6), the mean frame-to-frame difference per channel (3) and the
    per-channel standard deviation (3). These 24 numbers are centred and projected to ``out_dim``
    by a fixed random matrix drawn from ``seed`` (scaled so each output has about unit variance).

    ``object_context=True`` adds two frame-wide numbers to every token, before the projection: the fill ratio
    of the foreground's bounding box and the vertical asymmetry of its row widths (:func:`object_descriptors`),
    averaged over the frame pair. A real vision tower's token carries the context of the object it belongs to;
    a cell-local statistic does not, and an object that straddles cells loses most of its shape. Tokens are then
    no longer local: an edit anywhere in a frame pair can change every token of that pair.

    Shapes: ``encode(video [B, F, 3, H, W]) -> [B, F / 2, (H / 28) * (W / 28), out_dim]``, tokens of one
    output frame in raster order. ``F`` must be a multiple of ``temporal_factor`` and ``H``, ``W`` of
    ``patch``, as for :class:`~semanticgen.encoders.QwenVisionEncoder`.
    """

    LOCAL_FEATURES = 24
    CONTEXT_FEATURES = 2

    def __init__(
        self,
        out_dim: int = 64,
        *,
        patch: int = 28,
        temporal_factor: int = 2,
        object_context: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("out_dim", out_dim, 1),
            ("patch", patch, 2),
            ("temporal_factor", temporal_factor, 1),
        ):
            check_int(name, value, minimum=minimum, who="PixelSemanticEncoder")
        if patch % 2:
            raise ValueError(f"PixelSemanticEncoder: patch must be even (quadrant means), got {patch}")
        check_bool("object_context", object_context, who="PixelSemanticEncoder")
        self.out_dim = out_dim
        self.object_context = object_context
        self.raw_features = self.LOCAL_FEATURES + (self.CONTEXT_FEATURES if object_context else 0)
        self.spatial_factor = patch
        self.temporal_factor = temporal_factor
        gen = torch.Generator().manual_seed(seed)
        proj = torch.randn(self.raw_features, out_dim, generator=gen) * (2.0 / math.sqrt(self.raw_features))
        self.register_buffer("projection", proj, persistent=False)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``video [B, F, 3, H, W]`` in ``[0, 1]`` -> ``[B, F / tf, (H / p) * (W / p), out_dim]``."""
        tf, p = self.temporal_factor, self.spatial_factor
        check_video(video, "PixelSemanticEncoder.encode", frame_multiple=tf, spatial_multiple=p)
        x = video.float() * 2.0 - 1.0
        b, f, _, h, w = x.shape
        t2, gh, gw = f // tf, h // p, w // p
        # [B, T2, tf, 3, gh, p, gw, p] -> [B, T2, gh, gw, tf, 3, p, p]
        cells = x.reshape(b, t2, tf, 3, gh, p, gw, p).permute(0, 1, 4, 6, 2, 3, 5, 7)
        half = p // 2
        quads = cells.reshape(*cells.shape[:6], 2, half, 2, half).mean(dim=(4, 7, 9))  # [..., 3, 2, 2]
        grad_x = (cells[..., :, 1:] - cells[..., :, :-1]).abs().mean(dim=(4, 6, 7))  # [..., 3]
        grad_y = (cells[..., 1:, :] - cells[..., :-1, :]).abs().mean(dim=(4, 6, 7))
        if tf > 1:
            motion = (cells[:, :, :, :, 1:] - cells[:, :, :, :, :-1]).abs().mean(dim=(4, 6, 7))
        else:
            motion = torch.zeros_like(grad_x)
        spread = cells.std(dim=(4, 6, 7), unbiased=False)
        raw = torch.cat([quads.flatten(-3), grad_x, grad_y, motion, spread], dim=-1)  # [B, T2, gh, gw, 24]
        if self.object_context:
            context = object_descriptors(video.float()).reshape(b, t2, tf, self.CONTEXT_FEATURES).mean(dim=2)
            # Centred and scaled to the local features' spread (fill 0.5-1, asymmetry 0-0.16 on the moving shapes).
            context = (context - context.new_tensor([0.75, 0.05])) * context.new_tensor([4.0, 8.0])
            raw = torch.cat([raw, context[:, :, None, None, :].expand(b, t2, gh, gw, -1)], dim=-1)
        out = raw.reshape(b, t2, gh * gw, self.raw_features) @ self.projection.to(raw.device)
        return out.to(video.dtype)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.encode(video)
