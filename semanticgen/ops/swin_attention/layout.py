"""Token layout of one stage-2 sequence and its interleaved (shifted) attention windows.

A stage-2 sequence is the in-context concatenation ``[z_t, z_sem]``: first the VAE-latent tokens,
frame-major (``Tv * Sv`` tokens), then the semantic tokens, frame-major (``Ts * Ss`` tokens).
Both streams live on one timeline measured in VAE latent frames:

* VAE frame ``i`` sits at ``p = i``;
* semantic frame ``j`` sits at ``p = j * Tv / Ts``.

With ``shift = Tw // 2`` a frame belongs to window ``floor(p / Tw)`` on unshifted layers and to
``floor((p + shift) / Tw)`` on shifted layers. For semantic frames this is evaluated exactly in
integers, ``(j * Tv + shift * Ts) // (Tw * Ts)``: a float ``j * Tv / Ts`` lands one ulp below a
window edge for some ``(Tv, Ts)`` and would put the frame in the wrong window.

Because window indices grow monotonically with the frame index in each stream, every window is
at most two contiguous token ranges in streams order (a run of VAE frames and a run of semantic
frames) and exactly one in *blocked* order, where the timeline is cut at the window edges of both
parities and each time block carries its VAE tokens then its semantic tokens
(``WindowLayout(..., order="blocked")``). :meth:`WindowLayout.segments` gives the ranges in the
layout's order; :attr:`WindowLayout.permutation` converts between the orders.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from semanticgen._checks import check_bool, check_int, is_int

__all__ = ["WindowLayout", "WindowShard", "WindowSegment", "WindowIndexMap", "TimeBlock", "ORDERS"]


class WindowSegment(NamedTuple):
    """Token ranges of one window in ``layout.order``: ``[start0, end0) + [start1, end1)``.

    In ``"streams"`` order the first range is the window's VAE frames and the second its semantic
    frames (possibly empty). In ``"blocked"`` order a window is one contiguous range: the first
    range is the whole window and the second is empty (``start1 == end1 == end0``).
    """

    start0: int
    end0: int
    start1: int
    end1: int

    @property
    def length(self) -> int:
        return (self.end0 - self.start0) + (self.end1 - self.start1)


class TimeBlock(NamedTuple):
    """Frames of one time block: VAE frames ``[vae_start, vae_end)``, semantic ``[sem_start, sem_end)``.

    Blocks cut the timeline at every unshifted (``k * Tw``) and shifted (``k * Tw - Tw // 2``) window
    edge, so each block lies inside one window of either parity.
    """

    vae_start: int
    vae_end: int
    sem_start: int
    sem_end: int


class WindowIndexMap(NamedTuple):
    """Window-major view of a layout, on one device.

    Attributes:
        perm: ``int32[N]``; ``perm[r]`` is the caller-order token at window-major row ``r``.
        cu_seqlens: ``int32[W + 1]``; window ``w`` owns rows ``cu_seqlens[w]:cu_seqlens[w + 1]``.
        max_seqlen: the longest window, in tokens.
    """

    perm: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


ORDERS = ("streams", "blocked")


@dataclasses.dataclass(frozen=True)
class WindowLayout:
    """One stage-2 sequence of VAE and semantic tokens, split into time windows.

    Args:
        vae_frames: ``Tv``, latent frames of the VAE stream (>= 1).
        vae_tokens_per_frame: ``Sv``, tokens per latent frame (>= 1).
        sem_frames: ``Ts``, frames of the semantic stream (>= 0; 0 means no semantic tokens).
        sem_tokens_per_frame: ``Ss``, tokens per semantic frame (>= 1 when ``Ts > 0``).
        window: ``Tw``, window length in VAE latent frames (>= 1).
        order: token order of the sequence the layout describes:

            * ``"streams"`` (default): all VAE tokens (frame-major), then all semantic tokens;
            * ``"blocked"``: time blocks one after the other (see :meth:`blocks`), each holding its VAE
              tokens then its semantic tokens. Every window of either parity is then one contiguous
              range, which varlen kernels and context parallelism need.

    Every per-token table (:meth:`window_ids`, :meth:`segments`, :meth:`cu_seqlens`) describes tokens
    in ``order``. :attr:`permutation` maps between the two orders.

    Example:
        >>> layout = WindowLayout(vae_frames=32, vae_tokens_per_frame=256,
        ...                       sem_frames=4, sem_tokens_per_frame=128, window=4)
        >>> layout.num_tokens, layout.num_windows(shifted=False)
        (8704, 8)
        >>> blocked = layout.with_order("blocked")
        >>> blocked.segments(shifted=True)[1]
        WindowSegment(start0=512, end0=1600, start1=1600, end1=1600)
    """

    vae_frames: int
    vae_tokens_per_frame: int
    sem_frames: int
    sem_tokens_per_frame: int
    window: int
    order: str = "streams"
    # Per-(parity, device) tables, built once; excluded from equality and hashing.
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name, minimum in (("vae_frames", 1), ("vae_tokens_per_frame", 1), ("sem_frames", 0)):
            check_int(name, getattr(self, name), minimum=minimum, who="WindowLayout", type_error=TypeError)
        minimum = 1 if self.sem_frames > 0 else 0
        check_int(
            "sem_tokens_per_frame", self.sem_tokens_per_frame, minimum=minimum, who="WindowLayout", type_error=TypeError
        )
        check_int("window", self.window, minimum=1, who="WindowLayout", type_error=TypeError)
        if not isinstance(self.order, str) or self.order not in ORDERS:
            raise ValueError(f"WindowLayout: order must be one of {ORDERS}, got {self.order!r}")

    def with_order(self, order: str) -> WindowLayout:
        """The same sequence in another token order (``"streams"`` or ``"blocked"``)."""
        if order == self.order:
            return self
        return dataclasses.replace(self, order=order)

    # ----------------------------------------------------------------------------------- sizes
    @property
    def shift(self) -> int:
        """Offset of shifted windows, ``Tw // 2`` latent frames."""
        return self.window // 2

    @property
    def num_vae_tokens(self) -> int:
        return self.vae_frames * self.vae_tokens_per_frame

    @property
    def num_sem_tokens(self) -> int:
        return self.sem_frames * self.sem_tokens_per_frame

    @property
    def num_tokens(self) -> int:
        """``N = Tv * Sv + Ts * Ss``."""
        return self.num_vae_tokens + self.num_sem_tokens

    # ---------------------------------------------------------------------- window arithmetic
    def vae_frame_window(self, i: int, shifted: bool) -> int:
        """Window of VAE frame ``i``."""
        return (i + (self.shift if shifted else 0)) // self.window

    def sem_frame_window(self, j: int, shifted: bool) -> int:
        """Window of semantic frame ``j``, exact integer form of ``floor((j*Tv/Ts + shift) / Tw)``."""
        if self.sem_frames == 0:
            raise ValueError("WindowLayout has no semantic frames (sem_frames=0)")
        shift = self.shift if shifted else 0
        return (j * self.vae_frames + shift * self.sem_frames) // (self.window * self.sem_frames)

    def num_windows(self, shifted: bool) -> int:
        """Number of windows; VAE frames cover every window index from 0 to the last."""
        return self.vae_frame_window(self.vae_frames - 1, shifted) + 1

    def _frame_bounds(self, shifted: bool) -> tuple[list[int], list[int]]:
        """First VAE and first semantic frame of every window (then ``Tv`` / ``Ts``), ``[W + 1]`` each."""
        num_windows = self.num_windows(shifted)
        vae_bounds = [0] * (num_windows + 1)
        sem_bounds = [0] * (num_windows + 1)
        for i in range(self.vae_frames):
            vae_bounds[self.vae_frame_window(i, shifted) + 1] = i + 1
        for j in range(self.sem_frames):
            sem_bounds[self.sem_frame_window(j, shifted) + 1] = j + 1
        for w in range(1, num_windows + 1):  # windows without a semantic frame end where the last one did
            sem_bounds[w] = max(sem_bounds[w], sem_bounds[w - 1])
        return vae_bounds, sem_bounds

    # ---------------------------------------------------------------------------- time blocks
    def blocks(self) -> tuple[TimeBlock, ...]:
        """Time blocks in order: the timeline cut at every window edge of both parities.

        A frame's block is its pair ``(unshifted window, shifted window)``; both grow with time, so
        blocks are runs of consecutive frames in each stream. Every block holds at least one VAE frame
        (cuts fall on integer times and VAE frames sit on every integer), so ``Tv`` bounds their number.
        For even ``Tw`` an inner block is half a window.
        """
        cached = self._cache.get("blocks")
        if cached is not None:
            return cached

        def key_vae(i: int) -> tuple[int, int]:
            return self.vae_frame_window(i, False), self.vae_frame_window(i, True)

        keys = sorted({key_vae(i) for i in range(self.vae_frames)})
        index = {key: b for b, key in enumerate(keys)}
        vae_bounds = [0] * (len(keys) + 1)
        sem_bounds = [0] * (len(keys) + 1)
        for i in range(self.vae_frames):
            vae_bounds[index[key_vae(i)] + 1] = i + 1
        for j in range(self.sem_frames):
            key = (self.sem_frame_window(j, False), self.sem_frame_window(j, True))
            sem_bounds[index[key] + 1] = j + 1
        for b in range(1, len(keys) + 1):
            sem_bounds[b] = max(sem_bounds[b], sem_bounds[b - 1])
        blocks = tuple(
            TimeBlock(vae_bounds[b], vae_bounds[b + 1], sem_bounds[b], sem_bounds[b + 1]) for b in range(len(keys))
        )
        self._cache["blocks"] = blocks
        return blocks

    def block_token_offsets(self) -> list[int]:
        """``[num_blocks + 1]``: first blocked-order token of every block, then ``N``."""
        sv, ss = self.vae_tokens_per_frame, self.sem_tokens_per_frame
        offsets = [0]
        for blk in self.blocks():
            offsets.append(offsets[-1] + (blk.vae_end - blk.vae_start) * sv + (blk.sem_end - blk.sem_start) * ss)
        return offsets

    def window_blocks(self, shifted: bool) -> list[tuple[int, int]]:
        """``[W]``: the blocks ``[first, last + 1)`` that make up each window of a parity."""
        windows = [self.vae_frame_window(blk.vae_start, shifted) for blk in self.blocks()]
        spans: list[tuple[int, int]] = []
        for b, w in enumerate(windows):
            if w == len(spans):
                spans.append((b, b + 1))
            else:  # same window as the previous block: windows are unions of consecutive blocks
                spans[w] = (spans[w][0], b + 1)
        return spans

    # ------------------------------------------------------------------------ per-window ranges
    def segments(self, shifted: bool) -> tuple[WindowSegment, ...]:
        """Per-window token ranges in ``self.order`` (see :class:`WindowSegment`)."""
        key = ("segments", bool(shifted))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if self.order == "blocked":
            offsets = self.block_token_offsets()
            segs = tuple(
                WindowSegment(offsets[first], offsets[last], offsets[last], offsets[last])
                for first, last in self.window_blocks(shifted)
            )
        else:
            vae_bounds, sem_bounds = self._frame_bounds(shifted)
            sv, ss, base = self.vae_tokens_per_frame, self.sem_tokens_per_frame, self.num_vae_tokens
            segs = tuple(
                WindowSegment(
                    vae_bounds[w] * sv,
                    vae_bounds[w + 1] * sv,
                    base + sem_bounds[w] * ss,
                    base + sem_bounds[w + 1] * ss,
                )
                for w in range(len(vae_bounds) - 1)
            )
        self._cache[key] = segs
        return segs

    def window_lengths(self, shifted: bool) -> list[int]:
        """Tokens per window (the same in either order)."""
        return [s.length for s in self.segments(shifted)]

    def max_window_length(self, shifted: bool) -> int:
        """Tokens in the longest window of a parity."""
        return max(self.window_lengths(shifted))

    def window_ids(self, shifted: bool) -> torch.Tensor:
        """Window index of every token in ``self.order``, ``LongTensor[num_tokens]`` on the CPU.

        Non-decreasing in ``"blocked"`` order, for both parities.
        """
        ids = torch.empty(self.num_tokens, dtype=torch.long)
        for w, seg in enumerate(self.segments(shifted)):
            ids[seg.start0 : seg.end0] = w
            ids[seg.start1 : seg.end1] = w
        return ids

    def cu_seqlens(self, shifted: bool, device: torch.device | str = "cpu") -> torch.Tensor:
        """``int32[W + 1]`` window boundaries: window ``w`` is tokens ``cu[w]:cu[w + 1]`` in blocked order.

        (In streams order the same numbers delimit the windows of the window-major :meth:`index_map`.)
        """
        return self.index_map(shifted, device).cu_seqlens

    # ----------------------------------------------------------------------- order conversion
    @property
    def permutation(self) -> torch.Tensor:
        """``LongTensor[N]`` with ``x_blocked = x_streams[:, permutation]`` (the same for either order)."""
        cached = self._cache.get("permutation")
        if cached is not None:
            return cached
        sv, ss, base = self.vae_tokens_per_frame, self.sem_tokens_per_frame, self.num_vae_tokens
        parts = []
        for blk in self.blocks():
            parts.append(torch.arange(blk.vae_start * sv, blk.vae_end * sv))
            parts.append(torch.arange(base + blk.sem_start * ss, base + blk.sem_end * ss))
        perm = torch.cat(parts)
        self._cache["permutation"] = perm
        return perm

    @property
    def inverse_permutation(self) -> torch.Tensor:
        """``LongTensor[N]`` with ``x_streams = x_blocked[:, inverse_permutation]``."""
        cached = self._cache.get("inverse_permutation")
        if cached is not None:
            return cached
        perm = self.permutation
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        self._cache["inverse_permutation"] = inv
        return inv

    def _device_table(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache.setdefault(key, getattr(self, name).to(device))
        return cached

    def _convert(self, x: torch.Tensor, dim: int, table: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"WindowLayout: x must be a torch.Tensor, got {type(x).__name__}")
        if not is_int(dim) or not -x.dim() <= dim < x.dim():
            raise ValueError(f"WindowLayout: dim must be an int in [{-x.dim()}, {x.dim()}), got {dim!r}")
        if x.shape[dim] != self.num_tokens:
            raise ValueError(
                f"WindowLayout: x has {x.shape[dim]} tokens along dim {dim}, the layout has {self.num_tokens}"
            )
        return x.index_select(dim, self._device_table(table, x.device))

    def to_blocked(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Streams-order tokens along ``dim`` -> blocked order (one ``index_select``)."""
        return self._convert(x, dim, "permutation")

    def from_blocked(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Blocked-order tokens along ``dim`` -> streams order (one ``index_select``)."""
        return self._convert(x, dim, "inverse_permutation")

    # ------------------------------------------------------------------------ window-major map
    def index_map(self, shifted: bool, device: torch.device | str = "cpu") -> WindowIndexMap:
        """Window-major permutation of ``self.order`` tokens and ``cu_seqlens``, once per parity and device.

        In blocked order ``perm`` is the identity: windows are already contiguous.
        """
        device = torch.device(device)
        key = ("index_map", bool(shifted), str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        # No lock: two threads racing here build equal maps and one store wins, which is harmless;
        # a lock would also make layouts impossible to build inside a torch.compile graph.
        segs = self.segments(shifted)
        perm = torch.cat(
            [torch.cat([torch.arange(s.start0, s.end0), torch.arange(s.start1, s.end1)]) for s in segs]
        ).to(torch.int32)
        lengths = torch.tensor([0] + [s.length for s in segs], dtype=torch.int64)
        cu_seqlens = torch.cumsum(lengths, 0).to(torch.int32)
        result = WindowIndexMap(perm.to(device), cu_seqlens.to(device), max(s.length for s in segs))
        self._cache[key] = result
        return result

    # ---------------------------------------------------------------------------------- FLOPs
    def attention_flops(self, head_dim: int, num_heads: int = 1, batch: int = 1, shifted: bool = False) -> int:
        """Forward FLOPs of windowed attention (two matmuls, ``4 * L^2 * D`` per window and head)."""
        return 4 * batch * num_heads * head_dim * sum(n * n for n in self.window_lengths(shifted))

    def full_attention_flops(self, head_dim: int, num_heads: int = 1, batch: int = 1) -> int:
        """Forward FLOPs of full attention over the same ``N`` tokens."""
        return 4 * batch * num_heads * head_dim * self.num_tokens**2


@dataclasses.dataclass(frozen=True)
class WindowShard:
    """Time blocks ``[first_block, end_block)`` of a blocked-order layout: whole windows of one parity.

    The tokens one context-parallel rank attends over in a layer of parity ``shifted``: a contiguous run of
    the parent's blocked-order tokens that holds every window of that parity it touches entirely. It
    answers the per-window questions backends ask (:meth:`segments`, :meth:`window_lengths`, ...) in local
    token coordinates, so ``swin_attention(q, k, v, shard, shifted=shard.shifted)`` runs any backend on the
    ``[B, shard.num_tokens, H, D]`` slice with no communication.

    Args:
        layout: the whole sequence, in blocked order.
        first_block, end_block: the block range (see :meth:`WindowLayout.blocks`).
        shifted: the parity whose windows the range must hold whole.

    Example:
        >>> layout = WindowLayout(8, 4, 2, 2, 4, order="blocked")  # 4 blocks of 2 frames
        >>> shard = WindowShard(layout, 1, 3, shifted=True)  # the shifted window over frames 2-5
        >>> shard.token_range, shard.window_lengths(True)
        ((10, 28), [18])
    """

    layout: WindowLayout
    first_block: int
    end_block: int
    shifted: bool
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.layout, WindowLayout) or self.layout.order != "blocked":
            raise TypeError(f"WindowShard: layout must be a WindowLayout in blocked order, got {self.layout!r}")
        check_bool("shifted", self.shifted, who="WindowShard")
        num_blocks = len(self.layout.blocks())
        check_int("first_block", self.first_block, minimum=0, who="WindowShard", type_error=TypeError)
        check_int("end_block", self.end_block, minimum=self.first_block + 1, who="WindowShard", type_error=TypeError)
        if self.end_block > num_blocks:
            raise ValueError(
                f"WindowShard: end_block must be <= {num_blocks} (the layout's blocks), got {self.end_block}"
            )
        for first, end in self.layout.window_blocks(self.shifted):
            inside = self.first_block <= first and end <= self.end_block
            outside = end <= self.first_block or first >= self.end_block
            if not (inside or outside):
                parity = "shifted" if self.shifted else "unshifted"
                raise ValueError(
                    f"WindowShard: blocks [{self.first_block}, {self.end_block}) cut the {parity} window of blocks "
                    f"[{first}, {end}); a shard must hold whole windows"
                )
        # Built now rather than on first use: a torch.compile'd block that traced the first use would find the cache
        # changed by its own call, fail that graph's guard and compile the same block a second time.
        self.segments(self.shifted)

    order = "blocked"

    @property
    def token_range(self) -> tuple[int, int]:
        """``(start, end)`` of the shard's tokens in the parent's blocked order."""
        offsets = self.layout.block_token_offsets()
        return offsets[self.first_block], offsets[self.end_block]

    @property
    def num_tokens(self) -> int:
        start, end = self.token_range
        return end - start

    def _check_parity(self, shifted: bool) -> None:
        if bool(shifted) != self.shifted:
            raise ValueError(
                f"WindowShard: this shard holds whole {'shifted' if self.shifted else 'unshifted'} windows; "
                f"asked for shifted={shifted}"
            )

    def segments(self, shifted: bool) -> tuple[WindowSegment, ...]:
        """The shard's windows in local token coordinates (one range each, as in blocked order)."""
        self._check_parity(shifted)
        cached = self._cache.get("segments")
        if cached is None:
            start = self.token_range[0]
            cached = self._cache["segments"] = tuple(
                WindowSegment(s.start0 - start, s.end0 - start, s.end0 - start, s.end0 - start)
                for s, (first, _) in zip(self.layout.segments(shifted), self.layout.window_blocks(shifted))
                if self.first_block <= first < self.end_block
            )
        return cached

    def window_lengths(self, shifted: bool) -> list[int]:
        return [s.length for s in self.segments(shifted)]

    def max_window_length(self, shifted: bool) -> int:
        return max(self.window_lengths(shifted))

    def num_windows(self, shifted: bool) -> int:
        return len(self.segments(shifted))

    def window_ids(self, shifted: bool) -> torch.Tensor:
        """Local window index of every token of the shard, ``LongTensor[num_tokens]`` (non-decreasing)."""
        lengths = torch.tensor(self.window_lengths(shifted))
        return torch.repeat_interleave(torch.arange(len(lengths)), lengths)

    def cu_seqlens(self, shifted: bool, device: torch.device | str = "cpu") -> torch.Tensor:
        """``int32[W + 1]`` local window boundaries."""
        lengths = torch.tensor([0, *self.window_lengths(shifted)], dtype=torch.int64)
        return torch.cumsum(lengths, 0).to(torch.int32).to(device)

    def attention_flops(self, head_dim: int, num_heads: int = 1, batch: int = 1, shifted: bool | None = None) -> int:
        """Forward FLOPs of the shard's windowed attention."""
        shifted = self.shifted if shifted is None else shifted
        return 4 * batch * num_heads * head_dim * sum(n * n for n in self.window_lengths(shifted))
