"""Semantic compressor: encoder features -> low-dimensional Gaussian (mean, log-variance) with a KL term."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ._validation import check_config, check_tensor
from .init import init_weights


class CompressorOutput(NamedTuple):
    """What :meth:`SemanticCompressor.forward` returns.

    Attributes:
        z: ``[B, Ts, Ss, dim]`` sample ``mean + exp(logvar / 2) * eps`` (or ``mean`` when not sampling).
        mean: ``[B, Ts, Ss, dim]``.
        logvar: ``[B, Ts, Ss, dim]`` (clamped, see :class:`SemanticCompressor.Config`).
        kl: 0-d tensor, KL(N(mean, exp(logvar)) || N(0, I)) summed over ``dim``, averaged over tokens.
    """

    z: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor
    kl: torch.Tensor


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-token ``KL(N(mean, exp(logvar)) || N(0, I)) = 0.5 * sum(mean^2 + exp(logvar) - 1 - logvar)``.

    ``mean, logvar``: ``[..., dim]`` -> ``[...]`` in float32 (or float64 for float64 input).
    """
    acc = torch.promote_types(mean.dtype, torch.float32)
    m, lv = mean.to(acc), logvar.to(acc)
    return 0.5 * (m.square() + lv.exp() - 1.0 - lv).sum(dim=-1)


@dataclass(frozen=True)
class SemanticNorm:
    """Per-channel mean and std of the compressor's posterior means over a run's training data.

    Stage 1 learns ``normalize(mean)``: unit-scale targets for a flow that starts from unit noise, whatever scale
    and offset the KL weight left the compressed space at (the tiny run's channels had means up to 1.5 and stds
    from 0.26 to 0.88). The pipeline maps stage 1's samples back with :meth:`denormalize` before stage 2, which
    was trained on the raw posterior samples. ``mean``/``std``: ``dim`` floats; every ``std`` positive.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if not mean or len(mean) != len(std):
            raise ValueError(f"SemanticNorm: mean and std must be equally long and non-empty, got {mean}, {std}")
        if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
            raise ValueError(f"SemanticNorm: mean must be finite and std positive and finite, got {mean}, {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def from_dict(cls, values: dict) -> SemanticNorm:
        """From :meth:`to_dict`'s ``{"mean": [...], "std": [...]}`` (run metadata)."""
        if not isinstance(values, dict) or set(values) != {"mean", "std"}:
            raise ValueError(f"SemanticNorm: expected a dict with keys 'mean' and 'std', got {values!r}")
        return cls(tuple(values["mean"]), tuple(values["std"]))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def _tables(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.shape[-1] != len(self.mean):
            raise ValueError(f"SemanticNorm: tokens have {z.shape[-1]} channels, the statistics {len(self.mean)}")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=z.device)
        return mean, torch.tensor(self.std, dtype=torch.float32, device=z.device)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """``(z - mean) / std`` per channel; ``z [..., dim]``, float32 out."""
        mean, std = self._tables(z)
        return (z.float() - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """``z * std + mean`` per channel (inverse of :meth:`normalize`); ``z [..., dim]``, float32 out."""
        mean, std = self._tables(z)
        return z.float() * std + mean


class SemanticCompressor(nn.Module):
    """MLP from semantic-encoder features to a small Gaussian latent (the paper's 8-dim semantic space).

    ``LayerNorm(in_dim) -> [Linear -> GELU] x depth -> Linear(hidden, 2 * dim)`` gives mean and
    log-variance; :meth:`forward` samples with the reparameterisation trick and returns the KL term that
    is trained jointly with the stage-2 loss. The input LayerNorm makes the MLP independent of the feature
    scale of the encoder checkpoint (vision-tower outputs are not normalised), which would otherwise set the
    initial KL and sample scale.

    Example:
        >>> comp = SemanticCompressor(SemanticCompressor.Config(in_dim=32, dim=8, hidden=64))
        >>> out = comp(torch.randn(2, 3, 4, 32))
        >>> out.z.shape, out.kl.shape
        (torch.Size([2, 3, 4, 8]), torch.Size([]))
    """

    @dataclass
    class Config:
        in_dim: int = 2048
        """Width of the semantic-encoder features (Qwen2.5-VL vision tower: 2048 for 3B; 8192 for 72B)."""
        dim: int = 8
        """Width of the compressed semantic tokens (8 was best in the paper's ablation)."""
        hidden: int = 1024
        depth: int = 1
        """Hidden layers of the MLP."""
        logvar_min: float = -30.0
        logvar_max: float = 20.0
        """Clamp of the predicted log-variance: keeps ``exp`` finite in fp16/bf16."""

        @classmethod
        def tiny(cls) -> SemanticCompressor.Config:
            return cls(in_dim=32, dim=4, hidden=32, depth=1)

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        check_config(
            "SemanticCompressor",
            config,
            positive_ints=("in_dim", "dim", "hidden", "depth"),
            numbers=("logvar_min", "logvar_max"),
        )
        if config.logvar_min >= config.logvar_max:
            raise ValueError(
                "SemanticCompressor: logvar_min must be below logvar_max, "
                f"got {config.logvar_min} >= {config.logvar_max}"
            )
        layers: list[nn.Module] = [nn.LayerNorm(config.in_dim)]
        width = config.in_dim
        for _ in range(config.depth):
            layers += [nn.Linear(width, config.hidden), nn.GELU(approximate="tanh")]
            width = config.hidden
        layers.append(nn.Linear(width, 2 * config.dim))
        self.mlp = nn.Sequential(*layers)

    def init_weights(self) -> None:
        """Re-initialise every parameter (e.g. after ``to_empty`` on a model built on the meta device)."""
        init_weights(self)

    def _moments(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor("SemanticCompressor: features", features, 4, "[B, Ts, Ss, in_dim]")
        if features.shape[-1] != self.config.in_dim:
            raise ValueError(
                f"SemanticCompressor: features must have in_dim={self.config.in_dim} channels, "
                f"got shape {tuple(features.shape)}"
            )
        mean, logvar = self.mlp(features).chunk(2, dim=-1)
        return mean, logvar.clamp(self.config.logvar_min, self.config.logvar_max)

    def forward(
        self, features: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> CompressorOutput:
        """Compress ``features [B, Ts, Ss, in_dim]``.

        Args:
            features: semantic-encoder output.
            sample: draw ``z`` with the reparameterisation trick; ``False`` returns ``z = mean``.
            generator: RNG for the sample.

        Returns:
            :class:`CompressorOutput` with ``z/mean/logvar [B, Ts, Ss, dim]`` and the 0-d ``kl``.
        """
        mean, logvar = self._moments(features)
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        else:
            z = mean
        return CompressorOutput(z, mean, logvar, gaussian_kl(mean, logvar).mean())

    def encode_mean(self, features: torch.Tensor) -> torch.Tensor:
        """Deterministic compression: the posterior mean ``[B, Ts, Ss, dim]``."""
        return self._moments(features)[0]
