"""Diffusion-transformer block, its shared timestep modulation and the output layer.

Timestep conditioning follows adaLN-single (PixArt-alpha; also Wan 2.1): one :class:`TimestepModulation`
per model maps the timestep embedding to six ``[B, C]`` vectors (shift, scale, gate for attention and for
the MLP), and every block adds its own learned ``[6, C]`` table. Per-block ``Linear(C, 6C)`` projections
(DiT's adaLN-Zero) would cost ``6 C^2`` parameters a block: 425M of a 1.6B-parameter 30-block model at
``C = 1536``; PixArt-alpha reports comparable quality with the shared form.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from semanticgen.ops import WindowLayout, WindowShard

from .attention import CrossAttention, SelfAttention
from .init import init_weights

# Graphs one compiled block forward may hold (see SplitForward.compile_forward): a few clip shapes' worth, while a
# shape that changed every step would still stop compiling.
_RECOMPILE_LIMIT = 64


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample ``shift/scale [B, 1, C]``."""
    return x * (1 + scale) + shift


class TimestepModulation(nn.Module):
    """Timestep embedding ``[B, C]`` -> the six shared adaLN vectors ``[B, 6, C]`` (zero-initialised)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self._init_special()

    @torch.no_grad()
    def _init_special(self) -> None:
        nn.init.zeros_(self.proj[1].weight)
        nn.init.zeros_(self.proj[1].bias)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        return self.proj(t_emb).unflatten(-1, (6, -1))


class SplitForward:
    """``forward_split``: one block on two disjoint runs of whole windows in one call, and ``compile_forward``
    (mixed into the blocks).

    Window-parallel context parallelism (:func:`~semanticgen.parallel.shift_ownership_overlapped`) runs the block
    after a parity change on the *interior* windows while the halo block is in flight, then on the *boundary* window.
    Doing that as two ``block(...)`` calls made FSDP2 all-gather the block's parameters twice per layer in forward
    and twice in backward (counted on 2 gloo ranks: 7 all-gathers per step became 12 for 3 blocks called twice).
    :func:`~semanticgen.train.sharding.shard_model` registers this method with ``register_fsdp_forward_method``, so
    FSDP unshards once around both parts; on an unsharded block it is a plain method. The block must have
    :meth:`DiTBlock.forward`'s signature and act on each window independently.
    """

    def compile_forward(self, backend: str | Callable = "inductor") -> None:
        """``torch.compile`` the block's ``forward`` in place: ``__call__`` and both parts of :meth:`forward_split`
        then run the one compiled callable (its graphs shared by every block of the class: dynamo caches them on the
        function's code).

        ``nn.Module.compile`` compiles ``__call__`` instead, which ``forward_split`` never goes through (it calls
        ``forward`` directly so that FSDP unshards once for both parts): the context-parallel path ran uncompiled.

        Args:
            backend: ``torch.compile``'s backend.
        """
        # Static shapes (dynamic=False). The attention op takes the window bounds as Python ints and checks the token
        # count against the layout's, so a symbolic token count is specialised back to its value: dynamic=None traced
        # the same graphs symbolically first, and mark_dynamic raises ConstraintViolationError. Each (parity, token
        # count and stride, window bounds) is one graph; a CP rank meets a fixed set per clip shape (its whole
        # ownership and the interior and boundary windows, in each parity). Measured on 2 gloo ranks
        # (tests/test_train_compile.py): 4 graphs per rank for overlapped steps, all in the first step (7 to 11
        # before WindowShard built its window table eagerly: a traced first use that filled it failed that graph's
        # guard). A long clip or mixed clip shapes meet more, and past dynamo's default limit of 8 the block runs
        # uncompiled with only a logged warning, and under activation checkpointing a recomputation that ran
        # another graph than its forward raised CheckpointError.
        options = {}
        if "recompile_limit" in inspect.signature(torch.compile).parameters:  # a per-call limit in newer torch
            options["recompile_limit"] = _RECOMPILE_LIMIT
        else:  # older torch has only the process-wide limit: raise it, never lower it
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, _RECOMPILE_LIMIT)
        compiled = torch.compile(type(self).forward, backend=backend, dynamic=False, **options)
        # An instance attribute shadows the class's forward, and nn.Module.__call__ and forward_split both look
        # forward up on the instance. A bound method (not a closure over self) so that deepcopy rebinds the copy.
        self.forward = types.MethodType(compiled, self)

    def forward_split(
        self,
        interior: torch.Tensor | None,
        boundary: Callable[[], torch.Tensor] | None,
        time_mod: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        rope: tuple[tuple[torch.Tensor, torch.Tensor] | None, tuple[torch.Tensor, torch.Tensor] | None],
        shards: tuple[WindowShard | None, WindowShard | None],
        shifted: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``forward`` on the interior windows, then on the boundary window once ``boundary()`` has it.

        Args:
            interior: ``[B, n_i, C]``: the interior windows' tokens, or ``None`` (this rank has none).
            boundary: called after the interior part, returns the boundary window's tokens ``[B, n_b, C]`` (it
                waits for the halo block); ``None``: no boundary window.
            time_mod, text, text_mask: as :meth:`DiTBlock.forward` (per sample, shared by both parts).
            rope: ``(cos, sin)`` tables ``[n_i, D/2]`` of the interior tokens and ``[n_b, D/2]`` of the boundary's
                (``None`` where that part is absent).
            shards: the :class:`~semanticgen.ops.WindowShard` of each part (whole windows of parity ``shifted``).
            shifted: the windows' parity.

        Returns:
            ``(out_interior [B, n_i, C] | None, out_boundary [B, n_b, C] | None)``: each part as ``forward`` gives
            it, the same values as ``forward`` on both parts' tokens at once (windows do not interact).
        """
        out_interior = out_boundary = None
        if interior is not None:
            out_interior = self.forward(interior, time_mod, text, text_mask, *rope[0], shards[0], shifted)
        if boundary is not None:
            x = boundary()
            if interior is not None:
                # FSDP's mixed-precision policy casts the arguments; the boundary is made here, after that cast.
                x = x.to(interior.dtype)
            out_boundary = self.forward(x, time_mod, text, text_mask, *rope[1], shards[1], shifted)
        return out_interior, out_boundary


class DiTBlock(SplitForward, nn.Module):
    """adaLN self-attention, cross-attention to text, adaLN MLP; each a residual branch.

    The block's modulation table and the cross-attention output projection start at zero, so with the
    zero-initialised :class:`TimestepModulation` a fresh block is the identity map (adaLN-Zero): stacking
    many blocks does not perturb the signal at initialisation. The block holds all of its parameters
    (FSDP shards it as one unit) and no buffers. :meth:`~SplitForward.forward_split` runs it on two runs of
    windows in one call (overlapped context parallelism).
    """

    @dataclass
    class Config:
        hidden: int = 1024
        heads: int = 16
        mlp_ratio: float = 4.0
        qk_norm: bool = True
        swin_backend: str | None = None
        ffn_dim: int | None = None
        """MLP width; ``None``: ``round(hidden * mlp_ratio)``."""
        cross_attn_norm: bool = True
        """Affine LayerNorm before cross-attention (always on in :class:`DiTBlock`; optional in Wan's block)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        if not config.cross_attn_norm:
            raise ValueError("DiTBlock: cross_attn_norm=False is a Wan-flavour option (use WanBlock)")
        c = config.hidden
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(c, config.heads, qk_norm=config.qk_norm, swin_backend=config.swin_backend)
        self.norm2 = nn.LayerNorm(c, eps=1e-6)
        self.cross = CrossAttention(c, config.heads, qk_norm=config.qk_norm)
        self.norm3 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        mlp_hidden = config.ffn_dim if config.ffn_dim is not None else int(round(c * config.mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(c, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, c))
        # Learned offsets added to the shared timestep modulation: rows shift/scale/gate (attention), then MLP.
        self.modulation = nn.Parameter(torch.zeros(6, c))
        self._init_special()

    def init_weights(self) -> None:
        """Re-initialise every parameter of the block (see :func:`~semanticgen.models.init_weights`)."""
        init_weights(self)

    @torch.no_grad()
    def _init_special(self) -> None:
        nn.init.zeros_(self.modulation)
        nn.init.zeros_(self.cross.proj.weight)
        nn.init.zeros_(self.cross.proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        time_mod: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: WindowLayout | None = None,
        shifted: bool = False,
    ) -> torch.Tensor:
        """One block.

        Args:
            x: ``[B, N, C]`` tokens.
            time_mod: ``[B, 6, C]`` shared timestep modulation (:class:`TimestepModulation`).
            text: ``[B, L, C]`` projected text states; ``text_mask``: ``[B, L]`` bool.
            cos, sin: RoPE tables ``[N, D/2]``.
            layout: window layout for shifted-window self-attention, ``None`` for full attention.
            shifted: use the shifted windows (odd layers).

        Returns:
            ``[B, N, C]``.
        """
        mod = (time_mod + self.modulation.to(time_mod.dtype)).unsqueeze(2)  # [B, 6, 1, C]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin, layout, shifted)
        x = x + self.cross(self.norm2(x), text, text_mask)
        return x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a zero-initialised projection to the output channels (velocity starts at 0)."""

    def __init__(self, hidden: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_features)
        self._init_special()

    @torch.no_grad()
    def _init_special(self) -> None:
        for layer in (self.modulation[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x [B, N, C]``, ``cond [B, C]`` -> ``[B, N, out_features]``."""
        shift, scale = self.modulation(cond)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))
