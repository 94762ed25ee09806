"""Stage 1: a diffusion transformer that generates compressed semantic tokens from text."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._validation import check_conditioning, check_config, check_tensor
from .blocks import DiTBlock, FinalLayer, TimestepModulation
from .embeddings import TextProjection, TimestepEmbedder
from .init import init_weights
from .rope import grid_positions, rope_tables, sincos_position_embedding, token_grid
from .wan import WanBlock, WanFinalLayer, build_from_wan, check_flavor


class SemanticGenerator(nn.Module):
    """Velocity model over semantic tokens ``[B, Ts, Ss, dim]`` with full self-attention.

    Semantic tokens are few (the paper's 60 s clip has ~16x fewer than VAE tokens), so every layer
    attends globally: this is what keeps characters and scenes consistent over a long clip.

    RoPE positions: semantic frame ``j`` at time ``j``; the ``Ss`` tokens of a frame on a
    ``token_grid(Ss, config.grid_aspect)`` raster (rows x cols, integer positions).

    Example:
        >>> model = SemanticGenerator(SemanticGenerator.Config.tiny())
        >>> x = torch.randn(2, 3, 4, model.config.dim)
        >>> text, mask = torch.randn(2, 5, model.config.text_dim), torch.ones(2, 5, dtype=torch.bool)
        >>> model(x, torch.rand(2), text, mask).shape
        torch.Size([2, 3, 4, 4])
    """

    # How Wan weights load (semanticgen.models.wan.load_wan): blocks, embedders and the output table; Wan's patch
    # embedding and output projection are replaced by the semantic-token projections.
    _WAN_LOAD = {
        "new": ("x_embed.", "final.linear."),
        "replaced": ("patch_embedding.", "proj_out."),
        "stem": False,
        "output": False,
    }

    @dataclass
    class Config:
        dim: int = 8
        """Channels of a semantic token (the compressor's ``dim``)."""
        hidden: int = 1024
        depth: int = 24
        heads: int = 16
        mlp_ratio: float = 4.0
        text_dim: int = 4096
        """Width of the text-encoder states (umT5-XXL: 4096)."""
        qk_norm: bool = True
        rope_theta: float = 10000.0
        grid_aspect: float = 9 / 16
        """Height / width of the frames the semantic tokens come from, used to lay ``Ss`` on a grid."""
        flavor: str = "semanticgen"
        """``"semanticgen"`` (our blocks) or ``"wan"`` (Wan 2.1's blocks; see :meth:`from_wan`). The Wan flavour
        attends to every text token with no mask, as Wan does: feed it umT5 states zero-padded to 512 tokens
        (:func:`~semanticgen.models.wan.wan_text_states`)."""
        ffn_dim: int | None = None
        """MLP width; ``None``: ``round(hidden * mlp_ratio)``."""
        cross_attn_norm: bool = True
        """Affine LayerNorm on the cross-attention input (only ``"wan"`` may turn it off)."""
        abs_pos: bool | None = None
        """Add a fixed sin/cos embedding of each token's ``(time, row, column)`` to its input embedding. ``None``:
        on for ``"semanticgen"``, off for ``"wan"`` (Wan has RoPE only). Why: RoPE scores depend on relative
        positions only, so from pure noise (``t = 1``, where stage 1 must lay out the clip) every token sees the
        same distribution and the model cannot make its output depend on where the token is, e.g. put the shape
        on the left in the first frame and on the right in the last. With RoPE only, the tiny demo's stage 1
        learned motion direction only after ~3000 steps; with this embedding it did after ~1000."""

        @classmethod
        def tiny(cls) -> SemanticGenerator.Config:
            return cls(dim=4, hidden=32, depth=2, heads=2, mlp_ratio=2.0, text_dim=16, grid_aspect=1.0)

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        check_config(
            "SemanticGenerator",
            config,
            positive_ints=("dim", "hidden", "depth", "heads", "text_dim", "ffn_dim"),
            positive_numbers=("mlp_ratio", "rope_theta", "grid_aspect"),
            bools=("qk_norm", "cross_attn_norm", "abs_pos"),
            optional=("ffn_dim", "abs_pos"),
        )
        if config.hidden % config.heads:
            raise ValueError(f"SemanticGenerator: hidden={config.hidden} must be divisible by heads={config.heads}")
        check_flavor("SemanticGenerator", config.flavor, config.qk_norm, config.cross_attn_norm)
        self.head_dim = config.hidden // config.heads
        self.x_embed = nn.Linear(config.dim, config.hidden)
        self.abs_pos = config.abs_pos if config.abs_pos is not None else config.flavor != "wan"
        if self.abs_pos and config.hidden % 2:
            raise ValueError(f"SemanticGenerator: abs_pos needs an even hidden width, got {config.hidden}")
        self.t_embed = TimestepEmbedder(config.hidden)
        self.t_mod = TimestepModulation(config.hidden)
        self.text_embed = TextProjection(config.text_dim, config.hidden)
        block_cfg = DiTBlock.Config(
            config.hidden,
            config.heads,
            config.mlp_ratio,
            config.qk_norm,
            ffn_dim=config.ffn_dim,
            cross_attn_norm=config.cross_attn_norm,
        )
        if config.flavor == "wan":
            self.blocks = nn.ModuleList(WanBlock(block_cfg) for _ in range(config.depth))
            self.final = WanFinalLayer(config.hidden, config.dim)
        else:
            self.blocks = nn.ModuleList(DiTBlock(block_cfg) for _ in range(config.depth))
            self.final = FinalLayer(config.hidden, config.dim)

    def init_weights(self) -> None:
        """Re-initialise every parameter (e.g. after ``to_empty`` on a model built on the meta device)."""
        init_weights(self)

    @classmethod
    def from_wan(
        cls,
        source,
        *,
        sem_dim: int = 8,
        grid_aspect: float = 9 / 16,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> SemanticGenerator:
        """A ``flavor="wan"`` stage-1 generator whose blocks and condition embedders are a Wan 2.1 transformer's.

        Loaded from Wan: every block, the timestep embedder and shared modulation, the text projection and the
        output layer's ``[2, C]`` modulation table. New (Wan has no semantic tokens): the input projection
        ``x_embed`` and the output projection ``final.linear``, initialised as in a fresh model (the output
        projection at zero, so the initial velocity is 0). Wan's patch embedding and ``proj_out`` are not used.
        Wan's text convention applies: no text mask, umT5 states zero-padded to 512 tokens.

        Args:
            source: a local diffusers-format ``WanTransformer3DModel`` directory or module (text-to-video).
            sem_dim: channels of a semantic token (the compressor's ``dim``).
            grid_aspect: height / width of the frames the semantic tokens come from.
            dtype, device: of the parameters (default: the default dtype, CPU).

        Raises:
            ValueError: the source is not a text-to-video Wan transformer (the first missing, unexpected or
                mis-shaped tensor is named).
        """
        return build_from_wan(cls, source, {"dim": sem_dim, "grid_aspect": grid_aspect}, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            x: ``[B, Ts, Ss, dim]`` noisy semantic tokens ``z_t``.
            t: ``[B]`` flow times in ``[0, 1]``.
            text: ``[B, L, text_dim]`` text-encoder states.
            text_mask: ``[B, L]`` bool, True for real tokens (all False = empty prompt).

        Returns:
            ``[B, Ts, Ss, dim]`` velocity.
        """
        check_tensor("SemanticGenerator: x", x, 4, "[B, Ts, Ss, dim]")
        b, ts, ss, dim = x.shape
        if dim != self.config.dim:
            raise ValueError(f"SemanticGenerator: x must have dim={self.config.dim} channels, got {tuple(x.shape)}")
        check_conditioning("SemanticGenerator", b, t, text, text_mask, self.config.text_dim)
        rows, cols = token_grid(ss, self.config.grid_aspect)
        positions = grid_positions(ts, rows, cols, device=x.device)
        cos, sin = rope_tables(positions, self.head_dim, theta=self.config.rope_theta)
        h = self.x_embed(x.reshape(b, ts * ss, dim))
        if self.abs_pos:
            pos = sincos_position_embedding(positions, self.config.hidden, theta=self.config.rope_theta)
            h = h + pos.to(h.dtype)
        cond = self.t_embed(t)
        time_mod = self.t_mod(cond)
        txt = self.text_embed(text)
        for block in self.blocks:
            h = block(h, time_mod, txt, text_mask, cos, sin)
        return self.final(h, cond).reshape(b, ts, ss, dim)
