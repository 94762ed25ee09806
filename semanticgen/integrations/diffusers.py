"""Interleaved shifted-window self-attention inside a diffusers ``WanTransformer3DModel``.

:func:`enable_swin_attention` swaps the self-attention processor of every Wan block (``block.attn1``, through
diffusers' ``set_processor``) for :class:`WanSwinAttnProcessor`: the same projections, q/k RMSNorm and RoPE as
diffusers' ``WanAttnProcessor``, then :func:`semanticgen.ops.swin_attention` instead of dense attention. Block ``i``
attends within windows of ``window`` latent token frames (frames after the temporal patch), unshifted when ``i``
is even and shifted by ``window // 2`` frames when it is odd, so information crosses window edges every other
block. Cross-attention to text is untouched.

Example:
    >>> handle = enable_swin_attention(transformer, window=8)  # doctest: +SKIP
    >>> video = pipe(prompt, num_frames=121).frames  # doctest: +SKIP
    >>> handle.remove()  # doctest: +SKIP

What it does not do: a pretrained Wan was trained with full attention, so windowed attention changes what every
block sees; expect degraded output until the model is fine-tuned with windows. It does not combine with diffusers'
own context parallelism or attention backends (``set_attention_backend``) for the swapped self-attention, and
image-to-video Wan is not tested with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from semanticgen._checks import check_int
from semanticgen.ops import WindowLayout, swin_attention

__all__ = ["enable_swin_attention", "SwinAttentionHandle", "WanSwinAttnProcessor"]


@dataclass
class _Grid:
    """The latent token grid of the transformer's current forward: ``(T', H' * W')``, set by a pre-hook."""

    frames: int | None = None
    tokens_per_frame: int | None = None
    layouts: dict[tuple[int, int], WindowLayout] = field(default_factory=dict)


def _wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on ``x [B, N, H, D]`` with diffusers' tables ``[1, N, 1, D]`` (each angle repeated per pair).

    Channel pair ``(2k, 2k + 1)`` is rotated by the angle whose cosine is ``freqs_cos[..., 2k]`` and sine
    ``freqs_sin[..., 2k + 1]``; the product runs in the tables' float32 and is cast back to ``x``'s dtype, which is
    what diffusers' ``WanAttnProcessor`` computes.
    """
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


class WanSwinAttnProcessor:
    """Self-attention processor for a ``WanAttention`` that attends within time windows via ``swin_attention``.

    Args:
        grid: shared with the handle's pre-hook, which records the latent grid of each forward.
        window: window length in latent token frames.
        shifted: use the windows shifted by ``window // 2`` frames.
        backend: ``backend=`` of :func:`~semanticgen.ops.swin_attention` (``None``: fastest for the device).
    """

    def __init__(self, grid: _Grid, window: int, shifted: bool, backend: str | None = None) -> None:
        self.grid = grid
        self.window = window
        self.shifted = shifted
        self.backend = backend

    def _layout(self, num_tokens: int) -> WindowLayout:
        frames, per_frame = self.grid.frames, self.grid.tokens_per_frame
        if frames is None or frames * per_frame != num_tokens:
            raise ValueError(
                f"WanSwinAttnProcessor: {num_tokens} tokens do not match the latent grid of the transformer's "
                f"input ({frames} frames x {per_frame} tokens); call the transformer itself, not a block"
            )
        layout = self.grid.layouts.get((frames, per_frame))
        if layout is None:
            layout = WindowLayout(frames, per_frame, 0, 0, self.window)
            self.grid.layouts[(frames, per_frame)] = layout
        return layout

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, N, C]`` (N = T' * H' * W', frame-major) -> ``[B, N, C]``."""
        if encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None:
            raise ValueError(
                "WanSwinAttnProcessor: handles Wan self-attention only (RoPE tables, no encoder states, no mask)"
            )
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # Wan normalises q and k across all heads, before splitting them.
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query, key = _wan_rope(query, *rotary_emb), _wan_rope(key, *rotary_emb)
        layout = self._layout(hidden_states.shape[1])
        out = swin_attention(query, key, value, layout, shifted=self.shifted, backend=self.backend)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class SwinAttentionHandle:
    """What :func:`enable_swin_attention` returns; :meth:`remove` restores the original processors."""

    def __init__(self, transformer: nn.Module, originals: list, hook) -> None:
        self._transformer = transformer
        self._originals = originals
        self._hook = hook

    @property
    def active(self) -> bool:
        return self._hook is not None

    def remove(self) -> None:
        """Put back every block's original self-attention processor and drop the grid hook (idempotent)."""
        if self._hook is None:
            return
        for block, processor in zip(self._transformer.blocks, self._originals):
            block.attn1.set_processor(processor)
        self._hook.remove()
        self._hook = None
        self._transformer._semanticgen_swin_handle = None


def enable_swin_attention(transformer: nn.Module, window: int, *, backend: str | None = None) -> SwinAttentionHandle:
    """Make a diffusers ``WanTransformer3DModel`` use interleaved shifted-window self-attention.

    Args:
        transformer: a ``diffusers.WanTransformer3DModel``.
        window: window length in latent token frames (frames of the latent grid after the temporal patch,
            ``num_frames // patch_size[0]``). A clip of ``T' <= window - window // 2`` token frames lies in one
            window of either parity, i.e. keeps full attention.
        backend: ``backend=`` for :func:`~semanticgen.ops.swin_attention` (any backend; ``None`` picks the
            fastest for the device and dtype).

    Returns:
        A :class:`SwinAttentionHandle`; ``handle.remove()`` restores the original processors.

    Raises:
        TypeError: ``transformer`` is not a ``WanTransformer3DModel``.
        ValueError: ``window`` is not a positive int, swin attention is already enabled on ``transformer``, or
            it runs under diffusers' context parallelism.
    """
    if type(transformer).__name__ != "WanTransformer3DModel" or not isinstance(
        getattr(transformer, "blocks", None), nn.ModuleList
    ):
        raise TypeError(
            f"enable_swin_attention: expected a diffusers WanTransformer3DModel, got {type(transformer).__name__}"
        )
    check_int("window", window, minimum=1, who="enable_swin_attention", note="latent token frames")
    previous = getattr(transformer, "_semanticgen_swin_handle", None)
    if previous is not None and previous.active:
        raise ValueError("enable_swin_attention: already enabled on this transformer; call handle.remove() first")
    if any(getattr(block.attn1.processor, "_parallel_config", None) is not None for block in transformer.blocks):
        raise ValueError(
            "enable_swin_attention: this transformer uses diffusers' context parallelism, which the windowed "
            "processor does not implement; expected a transformer without enable_parallelism"
        )
    p_t, p_h, p_w = transformer.config.patch_size
    grid = _Grid()

    def record_grid(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        _, _, frames, height, width = hidden_states.shape
        grid.frames, grid.tokens_per_frame = frames // p_t, (height // p_h) * (width // p_w)

    originals = [block.attn1.processor for block in transformer.blocks]
    for i, block in enumerate(transformer.blocks):
        block.attn1.set_processor(WanSwinAttnProcessor(grid, window, shifted=i % 2 == 1, backend=backend))
    hook = transformer.register_forward_pre_hook(record_grid, with_kwargs=True)
    handle = SwinAttentionHandle(transformer, originals, hook)
    transformer._semanticgen_swin_handle = handle
    return handle
