"""Models of the SemanticGen method: compressor, diffusion-transformer blocks and the two generators.

* :class:`SemanticCompressor`: encoder features -> small Gaussian latent with a KL term.
* :class:`SemanticGenerator` (stage 1): text -> compressed semantic tokens, full attention.
* :class:`LatentGenerator` (stage 2): text + semantic tokens in context -> VAE latents, full or
  interleaved shifted-window attention.
* :class:`DiTBlock`: the adaLN transformer block both generators stack (``model.blocks``).
* :mod:`.wan`: the ``flavor="wan"`` layers (:class:`WanBlock`, :class:`WanFinalLayer`) that make both generators
  weight-compatible with Wan 2.1 (``LatentGenerator.from_wan``, ``SemanticGenerator.from_wan``).
"""

from __future__ import annotations

from .attention import CrossAttention, SelfAttention
from .blocks import DiTBlock, FinalLayer, TimestepModulation
from .compressor import CompressorOutput, SemanticCompressor, SemanticNorm, gaussian_kl
from .embeddings import TextProjection, TimestepEmbedder, patchify, sinusoidal_embedding, unpatchify
from .init import init_weights
from .latent_generator import LatentGenerator
from .rope import apply_rope, grid_positions, rope_axis_dims, rope_tables, sincos_position_embedding, token_grid
from .semantic_generator import SemanticGenerator
from .wan import WAN_TEXT_LEN, WanBlock, WanFinalLayer, wan_text_states

__all__ = [
    "SemanticCompressor",
    "SemanticNorm",
    "CompressorOutput",
    "gaussian_kl",
    "SemanticGenerator",
    "LatentGenerator",
    "DiTBlock",
    "FinalLayer",
    "TimestepModulation",
    "SelfAttention",
    "CrossAttention",
    "TimestepEmbedder",
    "TextProjection",
    "patchify",
    "unpatchify",
    "sinusoidal_embedding",
    "apply_rope",
    "rope_tables",
    "rope_axis_dims",
    "sincos_position_embedding",
    "grid_positions",
    "token_grid",
    "init_weights",
    "WanBlock",
    "WanFinalLayer",
    "wan_text_states",
    "WAN_TEXT_LEN",
]
