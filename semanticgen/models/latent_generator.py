"""Stage 2: a diffusion transformer that generates VAE latents with semantic tokens in context."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from semanticgen._checks import is_int
from semanticgen.ops import WindowLayout, WindowShard
from semanticgen.parallel import ContextGroup, HaloSplit, gather_tokens, shift_ownership, shift_ownership_overlapped

from ._validation import check_conditioning, check_config, check_tensor
from .blocks import DiTBlock, FinalLayer, TimestepModulation
from .embeddings import TextProjection, TimestepEmbedder, patchify, unpatchify
from .init import init_weights
from .rope import grid_positions, rope_tables, sincos_position_embedding, token_grid
from .wan import WanBlock, WanFinalLayer, build_from_wan, check_flavor, check_window

ATTENTION_MODES = ("full", "swin")


class LatentGenerator(nn.Module):
    """Velocity model over VAE latents ``[B, C, T, H, W]``, conditioned in context on ``z_sem [B, Ts, Ss, dim]``.

    The sequence is ``[VAE tokens, semantic tokens]``: latents cut into ``(pt, ph, pw)`` patches, frame-major
    (``Tv = T / pt`` token frames of ``Sv = (H / ph) * (W / pw)`` tokens), then ``z_sem`` projected to the
    model width, frame-major. That is exactly the token order of :class:`~semanticgen.ops.WindowLayout`.
    Only the VAE tokens are decoded back to a velocity.

    RoPE positions put both streams on one frame:

    * VAE token ``(i, r, c)`` at ``(i, r, c)``;
    * semantic frame ``j`` at time ``j * Tv / Ts``, its ``Ss`` tokens on the ``token_grid(Ss, H' / W')`` raster
      (the factorisation closest to the latent grid's aspect) stretched over the ``H' x W'`` VAE grid, each
      semantic token at the centre of the VAE patches it covers.

    Attention: ``"full"`` attends over the whole sequence in every layer (short clips); ``"swin"`` restricts
    each token to the VAE and semantic tokens of its ``window``-frame time span through ``swin_attention``,
    windows shifted by ``window // 2`` on odd layers (long clips). In ``"swin"`` mode the blocks run on the
    sequence in the layout's blocked order (time blocks of VAE then semantic tokens, see
    :class:`~semanticgen.ops.WindowLayout`): the tokens are permuted once after embedding and back once before
    the final layer.

    Example:
        >>> model = LatentGenerator(LatentGenerator.Config.tiny())
        >>> cfg = model.config
        >>> x = torch.randn(1, cfg.in_channels, 4, 8, 8)
        >>> z_sem = torch.randn(1, 2, 4, cfg.sem_dim)
        >>> text, mask = torch.randn(1, 5, cfg.text_dim), torch.ones(1, 5, dtype=torch.bool)
        >>> model(x, torch.rand(1), text, mask, z_sem).shape
        torch.Size([1, 4, 4, 8, 8])
    """

    # How Wan weights load (semanticgen.models.wan.load_wan): all but the semantic-token embedding.
    _WAN_LOAD = {"new": ("sem_embed.",), "replaced": (), "stem": True, "output": True}

    @dataclass
    class Config:
        in_channels: int = 16
        """Latent channels of the VAE (Wan 2.1 VAE: 16)."""
        patch: tuple[int, int, int] = (1, 2, 2)
        """``(pt, ph, pw)`` patch size over (time, height, width) of the latents."""
        sem_dim: int = 8
        """Channels of the semantic tokens ``z_sem``."""
        hidden: int = 1536
        depth: int = 30
        heads: int = 12
        mlp_ratio: float = 4.0
        text_dim: int = 4096
        qk_norm: bool = True
        rope_theta: float = 10000.0
        attention: str = "full"
        """``"full"`` or ``"swin"`` (interleaved shifted windows)."""
        window: int = 8
        """Window length ``Tw`` in latent frames (a multiple of ``pt``) for ``attention="swin"``."""
        swin_backend: str | None = None
        """``backend=`` for ``swin_attention`` (``None``: fastest available for the device)."""
        flavor: str = "semanticgen"
        """``"semanticgen"`` (our blocks) or ``"wan"`` (Wan 2.1's blocks, weight-compatible; see
        :meth:`from_wan`). The Wan flavour attends to every text token with no mask, as Wan does: feed it umT5
        states zero-padded to 512 tokens (:func:`~semanticgen.models.wan.wan_text_states`)."""
        ffn_dim: int | None = None
        """MLP width; ``None``: ``round(hidden * mlp_ratio)``."""
        cross_attn_norm: bool = True
        """Affine LayerNorm on the cross-attention input (Wan's ``cross_attn_norm``; only ``"wan"`` may turn it off)."""
        abs_pos: bool = False
        """Add a fixed sin/cos embedding of each token's RoPE position to its input embedding (as the semantic
        generator does by default). Off by default: with semantic tokens in context, their content tells every VAE
        token where it is; the one-stage text-to-latent baseline (no semantic tokens) has only RoPE's relative
        positions without it, so from pure noise it cannot place anything (see ``SemanticGenerator.Config``)."""

        @classmethod
        def tiny(cls) -> LatentGenerator.Config:
            return cls(
                in_channels=4,
                patch=(1, 2, 2),
                sem_dim=4,
                hidden=32,
                depth=2,
                heads=2,
                mlp_ratio=2.0,
                text_dim=16,
                window=2,
            )

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        check_config(
            "LatentGenerator",
            config,
            positive_ints=("in_channels", "sem_dim", "hidden", "depth", "heads", "text_dim", "window", "ffn_dim"),
            positive_numbers=("mlp_ratio", "rope_theta"),
            bools=("qk_norm", "cross_attn_norm", "abs_pos"),
            optional=("ffn_dim",),
        )
        if config.attention not in ATTENTION_MODES:
            raise ValueError(f"LatentGenerator: attention must be one of {ATTENTION_MODES}, got {config.attention!r}")
        if config.hidden % config.heads:
            raise ValueError(f"LatentGenerator: hidden={config.hidden} must be divisible by heads={config.heads}")
        if config.abs_pos and config.hidden % 2:
            raise ValueError(f"LatentGenerator: abs_pos needs an even hidden width, got {config.hidden}")
        patch = tuple(config.patch)
        if len(patch) != 3 or any(not is_int(p) or p < 1 for p in patch):
            raise ValueError(f"LatentGenerator: patch must be three positive ints (pt, ph, pw), got {config.patch!r}")
        if config.window < 1 or config.window % patch[0]:
            raise ValueError(
                f"LatentGenerator: window must be a positive multiple of the temporal patch {patch[0]}, "
                f"got {config.window}"
            )
        check_flavor("LatentGenerator", config.flavor, config.qk_norm, config.cross_attn_norm)
        self.patch = patch
        self.config = dataclasses.replace(config, patch=patch)  # a list from JSON/TOML becomes the tuple it means
        self.head_dim = config.hidden // config.heads
        patch_features = config.in_channels * patch[0] * patch[1] * patch[2]
        self.x_embed = nn.Linear(patch_features, config.hidden)
        self.sem_embed = nn.Linear(config.sem_dim, config.hidden)
        self.t_embed = TimestepEmbedder(config.hidden)
        self.t_mod = TimestepModulation(config.hidden)
        self.text_embed = TextProjection(config.text_dim, config.hidden)
        block_cfg = DiTBlock.Config(
            config.hidden,
            config.heads,
            config.mlp_ratio,
            config.qk_norm,
            swin_backend=config.swin_backend,
            ffn_dim=config.ffn_dim,
            cross_attn_norm=config.cross_attn_norm,
        )
        if config.flavor == "wan":
            self.blocks = nn.ModuleList(WanBlock(block_cfg) for _ in range(config.depth))
            self.final = WanFinalLayer(config.hidden, patch_features, patch)
        else:
            self.blocks = nn.ModuleList(DiTBlock(block_cfg) for _ in range(config.depth))
            self.final = FinalLayer(config.hidden, patch_features)
        self._layouts: dict[tuple[int, int, int, int], WindowLayout] = {}

    def init_weights(self) -> None:
        """Re-initialise every parameter (e.g. after ``to_empty`` on a model built on the meta device)."""
        init_weights(self)

    @classmethod
    def from_wan(
        cls,
        source,
        *,
        sem_dim: int = 8,
        attention: str = "full",
        window: int | None = None,
        swin_backend: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LatentGenerator:
        """A ``flavor="wan"`` stage-2 generator holding a Wan 2.1 text-to-video transformer's weights.

        With no semantic frames (``z_sem [B, 0, Ss, sem_dim]``) the model computes exactly Wan's
        ``transformer(hidden_states=x, timestep=1000 * t, encoder_hidden_states=text)``: Wan's timestep is
        ``1000 * t`` for our ``t`` in [0, 1] and its velocity (``eps - x0``) is ours. The text mask is not used
        (Wan attends to its 512 zero-padded umT5 tokens; see :func:`~semanticgen.models.wan.wan_text_states`).
        The semantic-token embedding ``sem_embed`` is new, initialised as in a fresh model; every other
        parameter is Wan's.

        Args:
            source: a local diffusers-format ``WanTransformer3DModel`` directory (``config.json`` plus
                ``diffusion_pytorch_model.safetensors``, single or sharded with its ``.index.json``), or such a
                module. Image-to-video Wan transformers are refused.
            sem_dim: channels of the semantic tokens.
            attention: ``"full"`` or ``"swin"``; ``window``: the swin window in latent frames (``None``: the
                config default). A pretrained Wan was trained with full attention: swin needs fine-tuning.
            swin_backend: ``backend=`` for ``swin_attention``.
            dtype, device: of the parameters (default: the default dtype, CPU); the model is built on the meta
                device and materialised once.

        Raises:
            ValueError: the source is not a text-to-video Wan transformer (its ``_class_name``, a missing,
                unexpected or mis-shaped tensor, named), or ``window`` is not a positive int.
        """
        check_window(window)
        fields = {"sem_dim": sem_dim, "attention": attention, "swin_backend": swin_backend}
        if window is not None:
            fields["window"] = window
        return build_from_wan(cls, source, fields, dtype=dtype, device=device)

    def window_layout(self, vae_frames: int, vae_tokens: int, sem_frames: int, sem_tokens: int) -> WindowLayout:
        """The (cached) :class:`WindowLayout` of a sequence shape; its index maps are reused across calls.

        Under ``torch.compile`` a cached layout is a constant of the graph; building a new one (a shape not
        seen in eager mode yet) happens outside the graph, so ``fullgraph=True`` needs one eager forward (or a
        call to this method) per sequence shape first.
        """
        layout = self._layouts.get((vae_frames, vae_tokens, sem_frames, sem_tokens))
        if layout is None:
            layout = self._build_layout(vae_frames, vae_tokens, sem_frames, sem_tokens)
        return layout

    @torch.compiler.disable
    def _build_layout(self, vae_frames: int, vae_tokens: int, sem_frames: int, sem_tokens: int) -> WindowLayout:
        if len(self._layouts) >= 16:  # a training run sees a handful of shapes; bound it anyway
            self._layouts.clear()
        layout = WindowLayout(
            vae_frames, vae_tokens, sem_frames, sem_tokens, self.config.window // self.patch[0], order="blocked"
        )
        self._layouts[(vae_frames, vae_tokens, sem_frames, sem_tokens)] = layout
        return layout

    @staticmethod
    def token_positions(
        vae_frames: int, rows: int, cols: int, sem_frames: int, sem_tokens: int, *, device=None
    ) -> torch.Tensor:
        """RoPE positions ``float32 [Tv * H' * W' + Ts * Ss, 3]`` of the ``[VAE tokens, semantic tokens]`` sequence.

        VAE token ``(i, r, c)`` sits at ``(i, r, c)``; semantic frame ``j`` at time ``j * Tv / Ts`` with its
        tokens on a ``token_grid(Ss, H' / W')`` raster stretched over the ``H' x W'`` grid (cell centres).
        """
        vae_pos = grid_positions(vae_frames, rows, cols, device=device)
        if sem_frames == 0:
            return vae_pos
        sem_rows, sem_cols = token_grid(sem_tokens, rows / cols)
        sem_pos = grid_positions(
            sem_frames, sem_rows, sem_cols, time_scale=vae_frames / sem_frames, span=(rows, cols), device=device
        )
        return torch.cat([vae_pos, sem_pos])

    def _position_embedding(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[N, hidden]`` sin/cos embedding of ``positions [N, 3]`` (``config.abs_pos``)."""
        return sincos_position_embedding(positions, self.config.hidden, theta=self.config.rope_theta).to(dtype)

    def _check(self, x, t, text, text_mask, z_sem) -> None:
        check_tensor("LatentGenerator: x", x, 5, "[B, C, T, H, W]")
        b, c, t_len, h, w = x.shape
        if c != self.config.in_channels:
            raise ValueError(
                f"LatentGenerator: x must have in_channels={self.config.in_channels} channels, got {tuple(x.shape)}"
            )
        pt, ph, pw = self.patch
        if t_len % pt or h % ph or w % pw:
            raise ValueError(
                f"LatentGenerator: x's [T, H, W] = {[t_len, h, w]} must be divisible by patch {self.patch}"
            )
        check_tensor("LatentGenerator: z_sem", z_sem, 4, "[B, Ts, Ss, sem_dim]")
        if z_sem.shape[0] != b or z_sem.shape[3] != self.config.sem_dim or z_sem.shape[2] < 1:
            raise ValueError(
                f"LatentGenerator: z_sem must be [B={b}, Ts, Ss >= 1, sem_dim={self.config.sem_dim}], "
                f"got {tuple(z_sem.shape)}"
            )
        check_conditioning("LatentGenerator", b, t, text, text_mask, self.config.text_dim)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        z_sem: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the flow velocity of the VAE latents.

        Args:
            x: ``[B, C, T, H, W]`` noisy latents ``z_t``.
            t: ``[B]`` flow times in ``[0, 1]``.
            text: ``[B, L, text_dim]``; ``text_mask``: ``[B, L]`` bool (all False = empty prompt).
            z_sem: ``[B, Ts, Ss, sem_dim]`` (noise-augmented) compressed semantic tokens.

        Returns:
            ``[B, C, T, H, W]`` velocity.
        """
        self._check(x, t, text, text_mask, z_sem)
        b, c, t_len, h, w = x.shape
        pt, ph, pw = self.patch
        tv, hv, wv = t_len // pt, h // ph, w // pw
        _, ts, ss, _ = z_sem.shape

        positions = self.token_positions(tv, hv, wv, ts, ss, device=x.device)
        tokens = torch.cat(
            [self.x_embed(patchify(x, self.patch)), self.sem_embed(z_sem.reshape(b, ts * ss, self.config.sem_dim))], 1
        )
        if self.config.abs_pos:
            tokens = tokens + self._position_embedding(positions, tokens.dtype)
        layout = self.window_layout(tv, hv * wv, ts, ss) if self.config.attention == "swin" else None
        blocked = layout is not None and layout.order == "blocked"
        if blocked:
            # Blocked order once for the whole stack: every window of both parities is then one contiguous
            # range (no gather inside attention). Tokens carry their RoPE positions with them; every other
            # op of a block is per token, so the model's output is unchanged.
            tokens = layout.to_blocked(tokens, dim=1)
            positions = layout.to_blocked(positions, dim=0)
        cos, sin = rope_tables(positions, self.head_dim, theta=self.config.rope_theta)
        cond = self.t_embed(t)
        time_mod = self.t_mod(cond)
        txt = self.text_embed(text)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, time_mod, txt, text_mask, cos, sin, layout, i % 2 == 1)
        if blocked:
            tokens = layout.from_blocked(tokens, dim=1)
        out = self.final(tokens[:, : tv * hv * wv], cond)
        return unpatchify(out, self.patch, (c, t_len, h, w))

    # ------------------------------------------------------------------------------ context parallel
    def forward_context_parallel(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        z_sem: torch.Tensor,
        cp: ContextGroup,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This CP rank's share of the velocity: the clip split over ``cp`` by whole windows (swin mode only).

        Every rank gets the same (input-sized) ``x``, ``z_sem`` and conditioning, embeds only the tokens it owns
        (:class:`~semanticgen.parallel.ContextPlan`) and runs every block on them; between layers of different
        window parity one block of hidden states moves to the neighbouring rank
        (:func:`~semanticgen.parallel.shift_ownership`). No rank holds the whole clip's activations.

        With ``cp.overlap`` (the default) each block after a parity change runs first on the windows that need
        no moved block, while the block is in flight, then on the boundary window
        (:func:`~semanticgen.parallel.shift_ownership_overlapped`; in backward the reverse). Both parts are one
        call, :meth:`~semanticgen.models.blocks.SplitForward.forward_split`, for plain and FSDP-unit blocks alike:
        :func:`~semanticgen.train.sharding.shard_model` registers it as an FSDP forward method, so a sharded block
        is gathered once per layer, as in the blocking path (two calls gathered it twice, forward and backward).
        ``cp.overlap=False`` waits for the halo first; both paths give the same values and send the same bytes.

        Args:
            x, t, text, text_mask, z_sem: as :meth:`forward`, identical on every rank of ``cp``.
            cp: this process's :class:`~semanticgen.parallel.ContextGroup`.

        Returns:
            ``(velocity, index)``: ``velocity [B, n_r, C * pt * ph * pw]`` is the patchified velocity of this
            rank's VAE tokens, which are tokens ``index`` (``LongTensor[n_r]``) of :func:`patchify`'s sequence.
            The loss of the whole clip is the sum over ranks of each rank's squared error summed over its tokens
            and divided by the clip's total (see :func:`~semanticgen.models.patchify`).
        """
        if self.config.attention != "swin":
            raise ValueError("LatentGenerator: context parallelism needs attention='swin' (full attention is global)")
        if not isinstance(cp, ContextGroup):
            raise TypeError(f"LatentGenerator: cp must be a ContextGroup, got {type(cp).__name__}")
        self._check(x, t, text, text_mask, z_sem)
        b, _, t_len, h, w = x.shape
        pt, ph, pw = self.patch
        tv, hv, wv = t_len // pt, h // ph, w // pw
        _, ts, ss, _ = z_sem.shape
        num_vae = tv * hv * wv
        layout = self.window_layout(tv, hv * wv, ts, ss)
        plan = cp.plan(layout)
        positions = self.token_positions(tv, hv, wv, ts, ss, device=x.device)

        def owned(shifted: bool) -> torch.Tensor:
            start, end = plan.token_range(cp.rank, shifted)
            return layout.permutation[start:end].to(x.device)  # streams-order indices, in blocked order

        index = owned(False)
        tables = {
            s: rope_tables(positions.index_select(0, owned(s)), self.head_dim, theta=self.config.rope_theta)
            for s in (False, True)
        }
        is_vae = index < num_vae
        vae_index, sem_index = index[is_vae], index[~is_vae] - num_vae
        embedded = torch.cat(
            [
                self.x_embed(patchify(x, self.patch).index_select(1, vae_index)),
                self.sem_embed(z_sem.reshape(b, ts * ss, self.config.sem_dim).index_select(1, sem_index)),
            ],
            1,
        )
        # Back from [VAE tokens, semantic tokens] to this rank's blocked order.
        position_in_cat = torch.where(is_vae, torch.cumsum(is_vae, 0) - 1, is_vae.sum() + torch.cumsum(~is_vae, 0) - 1)
        tokens = embedded.index_select(1, position_in_cat)
        if self.config.abs_pos:
            tokens = tokens + self._position_embedding(positions.index_select(0, index), tokens.dtype)
        cond = self.t_embed(t)
        time_mod = self.t_mod(cond)
        txt = self.text_embed(text)
        shifted = False
        for i, block in enumerate(self.blocks):
            run = _BlockOnWindows(block, time_mod, txt, text_mask, tables[i % 2 == 1], i % 2 == 1)
            if (i % 2 == 1) == shifted:
                tokens = run(tokens, plan.shard(cp.rank, shifted))
                continue
            shifted = not shifted
            if cp.overlap:
                tokens = shift_ownership_overlapped(
                    tokens, plan, cp.rank, to_shifted=shifted, compute=run.split, group=cp.group
                )
            else:
                tokens = shift_ownership(tokens, plan, cp.rank, to_shifted=shifted, group=cp.group)
                tokens = run(tokens, plan.shard(cp.rank, shifted))
        if shifted:
            tokens = shift_ownership(tokens, plan, cp.rank, to_shifted=False, group=cp.group)
        return self.final(tokens[:, is_vae], cond), vae_index

    @torch.no_grad()
    def forward_gathered(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        z_sem: torch.Tensor,
        cp: ContextGroup,
    ) -> torch.Tensor:
        """Sampling under CP: :meth:`forward_context_parallel`, then every rank gathers the whole velocity.

        Returns ``[B, C, T, H, W]`` (as :meth:`forward`) on every rank of ``cp``; the gathered velocity is
        ``O(latent size)``, not activation-sized.
        """
        local, index = self.forward_context_parallel(x, t, text, text_mask, z_sem, cp)
        b, c, t_len, h, w = x.shape
        pt, ph, pw = self.patch
        full = gather_tokens(local, index, (t_len // pt) * (h // ph) * (w // pw), cp)
        return unpatchify(full, self.patch, (c, t_len, h, w))


@dataclasses.dataclass
class _BlockOnWindows:
    """One block of :meth:`LatentGenerator.forward_context_parallel` on a rank's ownership of one parity: all of it
    (``__call__``), or its interior and boundary windows in one call (:meth:`split`, the overlapped exchange)."""

    block: nn.Module
    time_mod: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    tables: tuple[torch.Tensor, torch.Tensor]  # cos, sin [n_r, D / 2] of the rank's ownership in this parity
    shifted: bool

    def __call__(self, tokens: torch.Tensor, shard: WindowShard) -> torch.Tensor:
        """``tokens [B, n_r, C]``: all of the rank's tokens (whole windows of ``shard``) -> ``[B, n_r, C]``."""
        return self.block(tokens, self.time_mod, self.text, self.text_mask, *self.tables, shard, self.shifted)

    def split(self, interior, boundary, split: HaloSplit):
        """The ``compute`` of :func:`~semanticgen.parallel.shift_ownership_overlapped`: the RoPE rows of each part's
        local token range, then the block's ``forward_split`` (one FSDP unshard for both parts)."""
        rope = tuple(
            tuple(table[start:end] for table in self.tables) if end > start else None
            for start, end in (split.interior, split.boundary)
        )
        shards = (split.interior_shard, split.boundary_shard)
        return self.block.forward_split(
            interior, boundary, self.time_mod, self.text, self.text_mask, rope, shards, self.shifted
        )
