"""The Wan 2.1 video VAE (``diffusers``' ``AutoencoderKLWan``) as a :class:`~semanticgen.encoders.VideoVAE`.

Needs the optional ``diffusers`` dependency (``pip install 'semanticgen[vae]'``). Latents are normalised
per channel with the checkpoint config's ``latents_mean`` / ``latents_std``, as Wan's text-to-video
pipeline does, so the generators see roughly unit-variance latents.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from semanticgen._checks import as_dtype

from .checkpoint_files import directory_problem, missing_one_of
from .protocols import check_video

__all__ = ["WanVAE"]

_CLASS_NAME = "AutoencoderKLWan"
# What diffusers' from_pretrained reads without a `variant`: one file, or an index of shards.
_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
)


def _config_subfolder(path: str, subfolder: str | None) -> str | None:
    """Where under ``path`` the VAE's ``config.json`` is: ``subfolder`` when given, else ``""`` (the VAE's own
    directory) or ``"vae"`` (a pipeline's); ``None`` when it is not there."""
    for candidate in (subfolder,) if subfolder is not None else ("", "vae"):
        if os.path.isfile(os.path.join(path, candidate, "config.json")):
            return candidate
    return None


class WanVAE(nn.Module):
    """``encode(video [B, F, 3, H, W] in [0, 1]) -> latents [B, z_dim, 1 + (F - 1) / 4, H / 8, W / 8]``, and back.

    The VAE is causal in time: ``F = 1 + temporal_factor * k`` frames (e.g. 17, 81) give ``1 + k`` latent
    frames, and ``H``, ``W`` must be multiples of ``spatial_factor``. ``encode`` returns the posterior mode
    (deterministic) unless ``sample=True``.

    Args:
        vae: a ``diffusers.AutoencoderKLWan``.
        sample: draw from the posterior instead of taking its mode.
    """

    def __init__(self, vae: nn.Module, *, sample: bool = False) -> None:
        super().__init__()
        cfg = vae.config
        self.vae = vae.eval().requires_grad_(False)
        self.latent_channels = int(cfg.z_dim)
        self.temporal_factor = int(getattr(cfg, "scale_factor_temporal", None) or 4)
        self.spatial_factor = int(getattr(cfg, "scale_factor_spatial", None) or 8)
        self.sample = bool(sample)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32)
        if mean.numel() != self.latent_channels or std.numel() != self.latent_channels:
            raise ValueError(
                f"WanVAE: latents_mean/latents_std have {mean.numel()}/{std.numel()} entries, "
                f"z_dim is {self.latent_channels}"
            )
        self.register_buffer("latents_mean", mean.view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", std.view(1, -1, 1, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        sample: bool = False,
    ) -> WanVAE:
        """Load from a local directory: the VAE's own (``config.json`` + weights), or a pipeline's with a ``vae/``.

        Never downloads (``local_files_only=True``).
        """
        try:
            from diffusers import AutoencoderKLWan
        except ImportError as exc:
            raise ImportError("WanVAE needs diffusers: pip install 'semanticgen[vae]'") from exc
        path = os.fspath(path)
        problem = cls.checkpoint_problem(path, subfolder=subfolder)
        if problem is not None:
            raise FileNotFoundError(f"WanVAE.from_pretrained: {path!r}: {problem}")
        dtype = as_dtype("dtype", dtype, who="WanVAE.from_pretrained")
        vae = AutoencoderKLWan.from_pretrained(
            path, subfolder=_config_subfolder(path, subfolder) or None, torch_dtype=dtype, local_files_only=True
        )
        return cls(vae.to(device), sample=sample)

    @staticmethod
    def checkpoint_problem(path: str | os.PathLike, *, subfolder: str | None = None) -> str | None:
        """What keeps :meth:`from_pretrained` from loading ``path`` (``"no config.json in it or its vae/
        folder"``), or ``None``: a directory whose ``config.json`` (in ``subfolder``, or found as there) is an
        ``AutoencoderKLWan``'s, with the weights next to it. Reads that one small file, nothing else."""
        path = os.fspath(path)
        problem = directory_problem(path)
        if problem is not None:
            return problem
        found = _config_subfolder(path, subfolder)
        if found is None:
            where = f"its {subfolder}/ folder" if subfolder is not None else "it or its vae/ folder"
            return f"no config.json in {where} (expected a diffusers {_CLASS_NAME} directory, or a pipeline's)"
        folder = os.path.join(path, found)
        config_file = os.path.join(folder, "config.json")
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            config = None
        if not isinstance(config, dict):
            return f"{config_file} is not a diffusers config (a JSON object)"
        class_name = config.get("_class_name", _CLASS_NAME)
        if class_name != _CLASS_NAME:  # e.g. a pipeline's transformer/ folder
            return f"{config_file} is a {class_name}'s, not an {_CLASS_NAME}'s"
        return missing_one_of(folder, _WEIGHTS, "weights")

    @property
    def device(self) -> torch.device:
        return self.latents_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames produced from ``num_frames`` (``1 + k * temporal_factor``) video frames."""
        if num_frames < 1 or (num_frames - 1) % self.temporal_factor:
            raise ValueError(f"WanVAE: num_frames must be 1 + k * {self.temporal_factor}, got {num_frames}")
        return 1 + (num_frames - 1) // self.temporal_factor

    def video_frames(self, latent_frames: int) -> int:
        """Video frames decoded from ``latent_frames`` latent frames."""
        if latent_frames < 1:
            raise ValueError(f"WanVAE: latent_frames must be >= 1, got {latent_frames}")
        return 1 + (latent_frames - 1) * self.temporal_factor

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``video [B, F, 3, H, W]`` in ``[0, 1]`` -> normalised latents ``[B, z_dim, T', H / 8, W / 8]`` float32."""
        check_video(
            video,
            "WanVAE.encode",
            frame_multiple=self.temporal_factor,
            frame_offset=1,
            spatial_multiple=self.spatial_factor,
        )
        x = (video.to(self.device, self.dtype) * 2.0 - 1.0).permute(0, 2, 1, 3, 4)  # [B, 3, F, H, W] in [-1, 1]
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator) if self.sample else posterior.mode()
        return (z.float() - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised ``latents [B, z_dim, T', h, w]`` -> ``video [B, 1 + 4 (T' - 1), 3, 8h, 8w]`` float32 in [0, 1]."""
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError("WanVAE.decode: latents must be a floating-point torch.Tensor [B, C, T', h, w]")
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"WanVAE.decode: expected latents [B, {self.latent_channels}, T', h, w], got {tuple(latents.shape)}"
            )
        z = latents.to(self.device).float() * self.latents_std + self.latents_mean
        x = self.vae.decode(z.to(self.dtype)).sample  # [B, 3, F, H, W] in [-1, 1]
        return ((x.float() + 1.0) * 0.5).clamp(0.0, 1.0).permute(0, 2, 1, 3, 4).contiguous()

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.encode(video)
