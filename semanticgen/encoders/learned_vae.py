"""A small learned video autoencoder: :class:`LearnedVideoAE`, trained per run on its own clips.

It takes :class:`~semanticgen.encoders.PixelVAE`'s place in small runs (the tiny demo) with the same tensor shapes and
the same causal time axis as the Wan VAE, but decodes sharp shapes and smooth motion instead of pooled colours.
A run trains it as its first stage (``semanticgen.train.autoencoder``) and writes ``RUN_DIR/vae.safetensors``:
the weights, with the architecture and the latents' per-channel statistics as JSON under the ``semanticgen``
metadata key (the convention of every semanticgen export). :func:`run_vae_spec` points a ``kind = "learned"``
``[encoders.vae]`` table at that file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semanticgen._checks import check_int, is_real
from semanticgen._files import META_KEY, save_safetensors_atomic

from .pixel import PixelVAE
from .protocols import check_video

__all__ = ["LearnedVAEConfig", "LearnedVideoAE", "VAE_FILE", "run_vae_spec"]

VAE_FILE = "vae.safetensors"  # the learned VAE's file in a run directory
FORMAT = "semanticgen.learned_vae"  # the metadata's "format": tells a VAE file from a model export
_WRITTEN_BY = f"a run's autoencoder stage writes RUN_DIR/{VAE_FILE}"  # where the file comes from, for errors


@dataclass
class LearnedVAEConfig:
    """Architecture of a :class:`LearnedVideoAE`.

    ``spatial_factor`` must be a power of 2 (one stride-2 level per factor of 2). ``hidden``: channels at the
    latent resolution; each finer level has half as many, at least 16.
    """

    latent_channels: int = 4
    spatial_factor: int = 4
    temporal_factor: int = 4
    hidden: int = 64

    def __post_init__(self) -> None:
        for name in ("latent_channels", "spatial_factor", "temporal_factor", "hidden"):
            check_int(name, getattr(self, name), minimum=1, who="LearnedVideoAE")
        if self.spatial_factor & (self.spatial_factor - 1):
            raise ValueError(f"LearnedVideoAE: spatial_factor must be a power of 2, got {self.spatial_factor}")

    @property
    def levels(self) -> int:
        return self.spatial_factor.bit_length() - 1

    def widths(self) -> list[int]:
        """Channels per resolution level, full resolution first: e.g. ``hidden=64, s=4 -> [16, 32, 64]``."""
        return [max(self.hidden >> (self.levels - i), 16) for i in range(self.levels + 1)]


class _Res2d(nn.Module):
    """``x + conv(silu(conv(silu(x))))``; the second conv starts at zero, so the block starts as the identity."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = _zero(nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


def _zero(conv: nn.Module) -> nn.Module:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class LearnedVideoAE(nn.Module):
    """Convolutional video autoencoder with Wan's causal time axis, learned as a correction of :class:`PixelVAE`.

    Both maps are the :class:`~semanticgen.encoders.PixelVAE`'s plus a learned residual whose last layer starts at
    zero, so training starts from the pooled-colour latents and the interpolating decode and only learns what
    pooling loses (edges, shape, motion inside a frame group). Measured on the synthetic shapes (32x32, 17 frames,
    batch 8): a plain conv AE of the same size was still below the PixelVAE's PSNR (19.7 vs 22.3 dB) after 300
    steps, spending them on colours and background; this one starts at 22.3 dB and reached 27 dB in as many.

    Encoder residual: the first frame is repeated ``temporal_factor - 1`` times in front (Wan's causal padding), the
    frames are cut into groups of ``temporal_factor`` and each group, its frames stacked as channels, goes through
    a 2-D conv net with ``log2(spatial_factor)`` stride-2 levels down to ``latent_channels``. Decoder residual: a
    3x3x3 conv over the latents (time padded by repetition) mixes each latent frame with its neighbours, so the
    frames inside a group can follow the motion between groups; the mirror 2-D net (nearest x2 up-sampling + conv
    per level) meets the PixelVAE decode of the group at full resolution and returns a correction of its
    ``temporal_factor`` frames; the padding frames are dropped.

    Encoding is deterministic: a plain AE, not a KL-VAE. The fixed pooled path already pins the latents' scale,
    which is what a KL term would be for; training instead adds noise to the latents before decoding (so the
    decoder tolerates generated latents that are a little off) and penalises the residual's size (so the latents
    stay near the pooled colours, which the tiny generators learn well); see ``semanticgen.train.autoencoder``.
    ``latents_mean`` / ``latents_std`` (measured on the training clips after training) normalise the latents as
    for :class:`~semanticgen.encoders.PixelVAE` and the Wan VAE: ``encode`` returns ``(z - mean) / std`` and
    ``decode`` undoes it first.

    Shapes: ``encode(video [B, 1 + tf * k, 3, H, W] in [0, 1]) -> float32 [B, C, 1 + k, H / s, W / s]``;
    ``decode`` is the inverse, float32 in ``[0, 1]``. ``H`` and ``W`` must be multiples of ``s``.

    Example::

        ae = LearnedVideoAE(LearnedVAEConfig(latent_channels=4, spatial_factor=4, temporal_factor=4))
        z = ae.encode(torch.rand(2, 17, 3, 32, 32))  # [2, 4, 5, 8, 8]
        video = ae.decode(z)  # [2, 17, 3, 32, 32]
    """

    def __init__(
        self,
        config: LearnedVAEConfig | None = None,
        *,
        latents_mean: float | Sequence[float] = 0.0,
        latents_std: float | Sequence[float] = 1.0,
    ) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else LearnedVAEConfig()
        self.latent_channels = cfg.latent_channels
        self.temporal_factor = tf = cfg.temporal_factor
        self.spatial_factor = cfg.spatial_factor
        self.base = PixelVAE(tf, cfg.spatial_factor, cfg.latent_channels, decode_mode="linear")  # no weights
        w, n = cfg.widths(), cfg.levels
        self.enc_in = nn.Conv2d(3 * tf, w[0], 3, padding=1)
        self.enc_levels = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1), _Res2d(w[i + 1]))
            for i in range(n)
        )
        self.enc_out = _zero(nn.Conv2d(w[n], cfg.latent_channels, 3, padding=1))
        self.dec_in = nn.Conv3d(cfg.latent_channels, w[n], 3, padding=(0, 1, 1))
        self.dec_mid = _Res2d(w[n])
        self.dec_levels = nn.ModuleList(
            nn.Sequential(
                nn.SiLU(),
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(w[i + 1], w[i], 3, padding=1),
                _Res2d(w[i]) if i else nn.Identity(),  # full resolution: one block after the merge is enough
            )
            for i in reversed(range(n))
        )
        self.dec_merge = nn.Conv2d(w[0] + 3 * tf, w[0], 3, padding=1)  # features + the PixelVAE decode
        self.dec_full = _Res2d(w[0])
        self.dec_out = _zero(nn.Conv2d(w[0], 3 * tf, 3, padding=1))
        mean = _per_channel("latents_mean", latents_mean, cfg.latent_channels, positive=False)
        std = _per_channel("latents_std", latents_std, cfg.latent_channels, positive=True)
        self.register_buffer("latents_mean", mean.view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", std.view(1, -1, 1, 1, 1), persistent=False)

    # --------------------------------------------------------------------------- frame counts
    def latent_frames(self, num_frames: int) -> int:
        """Latent frames ``T'`` produced from ``num_frames = 1 + k * temporal_factor`` video frames."""
        tf = self.temporal_factor
        if num_frames < 1 or (num_frames - 1) % tf:
            raise ValueError(f"LearnedVideoAE: num_frames must be 1 + k * {tf} (k >= 0), got {num_frames}")
        return 1 + (num_frames - 1) // tf

    def video_frames(self, latent_frames: int) -> int:
        """Video frames ``F`` decoded from ``latent_frames`` latent frames."""
        if latent_frames < 1:
            raise ValueError(f"LearnedVideoAE: latent_frames must be >= 1, got {latent_frames}")
        return 1 + (latent_frames - 1) * self.temporal_factor

    # ------------------------------------------------------------------------- raw (trainable) maps
    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, F, 3, H, W] -> [B * T', tf * 3, H, W]``: causal padding, then each group's frames as channels."""
        tf = self.temporal_factor
        x = torch.cat([x[:, :1].expand(-1, tf - 1, -1, -1, -1), x], dim=1)
        b, f, _, h, w = x.shape
        return x.reshape(b * (f // tf), tf * 3, h, w)

    def encode_parts(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised latents with gradients and their learned part: ``video [B, F, 3, H, W]`` in ``[0, 1]`` ->
        ``(z, residual)``, both ``[B, C, T', h, w]``; ``z = pooled colours + residual``."""
        check_video(
            video,
            "LearnedVideoAE.encode",
            frame_multiple=self.temporal_factor,
            frame_offset=1,
            spatial_multiple=self.spatial_factor,
        )
        video = video.to(self.enc_in.weight.device, self.enc_in.weight.dtype)
        pooled = self.base.encode(video)  # [B, C, T', h, w]
        x = self.enc_in(self._groups(video * 2.0 - 1.0))
        for level in self.enc_levels:
            x = level(x)
        residual = self.enc_out(F.silu(x))  # [B * T', C, h, w]
        b, _, t, h, w = pooled.shape
        residual = residual.reshape(b, t, -1, h, w).transpose(1, 2)
        return pooled + residual, residual

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised latents ``[B, C, T', h, w]`` -> unclamped video ``[B, F, 3, h * s, w * s]`` (about [0, 1])."""
        b, _, t, h, w = z.shape
        z = z.to(self.dec_in.weight.dtype)
        base = self._groups(self.base.decode_unclamped(z))  # [B * T', tf * 3, H, W] in about [-1, 1]
        x = F.silu(self.dec_in(F.pad(z, (0, 0, 0, 0, 1, 1), mode="replicate")))  # [B, width, T', h, w]
        x = self.dec_mid(x.transpose(1, 2).reshape(b * t, -1, h, w))
        for level in self.dec_levels:
            x = level(x)
        x = self.dec_full(self.dec_merge(torch.cat([F.silu(x), base], dim=1)))
        x = base + self.dec_out(F.silu(x))
        tf = self.temporal_factor
        x = x.reshape(b, t * tf, 3, *x.shape[-2:])[:, tf - 1 :]  # drop the causal padding frames
        return (x + 1.0) * 0.5

    # ------------------------------------------------------------------------------- encode/decode
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``video [B, F, 3, H, W]`` in ``[0, 1]`` -> normalised latents ``float32 [B, C, T', H / s, W / s]``."""
        z = self.encode_parts(video)[0].float()
        return (z - self.latents_mean.to(z.device)) / self.latents_std.to(z.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised ``latents [B, C, T', h, w]`` -> ``video float32 [B, 1 + tf (T' - 1), 3, h s, w s]`` in [0, 1]."""
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError("LearnedVideoAE.decode: latents must be a floating-point torch.Tensor [B, C, T', h, w]")
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels or 0 in latents.shape:
            raise ValueError(
                f"LearnedVideoAE.decode: expected latents [B, {self.latent_channels}, T', h, w], "
                f"got {tuple(latents.shape)}"
            )
        device = self.latents_std.device
        z = latents.to(device).float() * self.latents_std + self.latents_mean
        return self.decode_raw(z).float().clamp(0.0, 1.0)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.encode(video)

    # ------------------------------------------------------------------------------------ files
    def set_latent_stats(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> None:
        """Set the per-channel normalisation (``latents_mean`` / ``latents_std``, one value per latent channel)."""
        c = self.latent_channels
        mean = mean.tolist() if isinstance(mean, torch.Tensor) else mean
        std = std.tolist() if isinstance(std, torch.Tensor) else std
        self.latents_mean.copy_(_per_channel("latents_mean", mean, c, positive=False).view(1, -1, 1, 1, 1))
        self.latents_std.copy_(_per_channel("latents_std", std, c, positive=True).view(1, -1, 1, 1, 1))

    def save(self, path: str | os.PathLike, extra_meta: Mapping[str, Any] | None = None) -> Path:
        """Write weights + config + latent statistics to ``path`` atomically (temporary file, then rename)."""
        meta = {
            **(extra_meta or {}),
            "format": FORMAT,
            "config": dataclasses.asdict(self.config),
            "latents_mean": self.latents_mean.flatten().tolist(),
            "latents_std": self.latents_std.flatten().tolist(),
        }
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        return save_safetensors_atomic(tensors, path, meta)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        latent_channels: int | None = None,
        spatial_factor: int | None = None,
        temporal_factor: int | None = None,
        hidden: int | None = None,
    ) -> LearnedVideoAE:
        """Load a file written by :meth:`save` (or a run directory holding ``vae.safetensors``), on the CPU.

        The architecture comes from the file; any of ``latent_channels`` ... ``hidden`` given (the keys of a
        ``[encoders.vae]`` table) must match it, so a config that changed since the VAE was trained is refused.

        Raises:
            FileNotFoundError: nothing at ``path``.
            ValueError: not a safetensors file, not a learned VAE's, or an architecture other than the one asked.
        """
        path = _vae_file(path)
        if not path.is_file():
            raise FileNotFoundError(f"LearnedVideoAE: {str(path)!r} not found ({_WRITTEN_BY})")
        tensors, meta = _read(path)
        try:
            config = LearnedVAEConfig(**meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"LearnedVideoAE: {str(path)!r} has an unreadable config ({exc})") from None
        asked = {"latent_channels": latent_channels, "spatial_factor": spatial_factor}
        asked |= {"temporal_factor": temporal_factor, "hidden": hidden}
        for key, value in asked.items():
            if value is not None and value != getattr(config, key):
                raise ValueError(
                    f"LearnedVideoAE: {str(path)!r} holds a VAE with {key} = {getattr(config, key)}, "
                    f"the config asks for {value}"
                )
        ae = cls(config, latents_mean=meta["latents_mean"], latents_std=meta["latents_std"])
        missing, unexpected = ae.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"LearnedVideoAE: {str(path)!r} does not match its config: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )
        return ae.eval().requires_grad_(False)

    @staticmethod
    def checkpoint_problem(path: str | os.PathLike) -> str | None:
        """What keeps :meth:`from_pretrained` from loading ``path``, or ``None``: a file, or a directory holding
        ``vae.safetensors``. Whether the file is a learned VAE's is :meth:`from_pretrained`'s to say."""
        file = _vae_file(path)
        if file.is_file():
            return None
        return f"no {VAE_FILE} in it ({_WRITTEN_BY})" if Path(path).is_dir() else f"no such file ({_WRITTEN_BY})"


def _vae_file(path: str | os.PathLike) -> Path:
    """The file a learned VAE is read from: ``path``, or ``path/vae.safetensors`` when it is a directory."""
    path = Path(path)
    return path / VAE_FILE if path.is_dir() else path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a learned VAE file, or ``ValueError`` naming ``path`` and what it is instead."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            meta = json.loads(raw) if raw else {}
            if meta.get("format") != FORMAT:
                what = "a semanticgen file of another kind" if raw else f"no '{META_KEY}' metadata"
                raise ValueError(f"LearnedVideoAE: {str(path)!r} is not a learned VAE file ({what})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error type for a bad header
        raise ValueError(f"LearnedVideoAE: {str(path)!r} is not a safetensors file ({exc})") from None
    return tensors, meta


def _per_channel(name: str, value: object, channels: int, *, positive: bool) -> torch.Tensor:
    """``float32 [channels]`` from one finite float or ``channels`` of them (``> 0`` if ``positive``)."""
    values = [value] * channels if is_real(value) else value
    ok = isinstance(values, Sequence) and not isinstance(values, str) and len(values) == channels
    ok = ok and all(is_real(v) for v in values)
    if not ok or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        what = "positive finite" if positive else "finite"
        raise ValueError(f"LearnedVideoAE: {name} must be one {what} float or {channels} of them, got {value!r}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def run_vae_spec(vae_spec: Mapping[str, Any], run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``[encoders.vae]`` table a run's VAE is rebuilt from: a ``kind = "learned"`` table without ``path``
    gets ``path = RUN_DIR/vae.safetensors`` (what the run's autoencoder stage trained); other tables are returned
    as they are. ``run_dir`` may also be a file inside the run directory (e.g. its ``model.safetensors``)."""
    spec = dict(vae_spec)
    if spec.get("kind") != "learned" or spec.get("path"):
        return spec
    run_dir = Path(run_dir)
    if run_dir.is_file() or run_dir.suffix == ".safetensors":
        run_dir = run_dir.parent
    spec["path"] = str(run_dir / VAE_FILE)
    return spec
