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
exactly two contiguous token ranges in caller order: a run of VAE frames and a run of semantic
frames (possibly empty). :meth:`WindowLayout.segments` exposes that; kernels use the window-major
index map (:meth:`WindowLayout.index_map`) built from it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

__all__ = ["WindowLayout", "WindowSegment", "WindowIndexMap"]


class WindowSegment(NamedTuple):
    """Token ranges of one window in caller order: ``[vae_start, vae_end) + [sem_start, sem_end)``."""

    vae_start: int
    vae_end: int
    sem_start: int
    sem_end: int

    @property
    def length(self) -> int:
        return (self.vae_end - self.vae_start) + (self.sem_end - self.sem_start)


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


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"WindowLayout: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"WindowLayout: {name} must be >= {minimum}, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class WindowLayout:
    """One stage-2 sequence: VAE tokens then semantic tokens, split into time windows.

    Args:
        vae_frames: ``Tv``, latent frames of the VAE stream (>= 1).
        vae_tokens_per_frame: ``Sv``, tokens per latent frame (>= 1).
        sem_frames: ``Ts``, frames of the semantic stream (>= 0; 0 means no semantic tokens).
        sem_tokens_per_frame: ``Ss``, tokens per semantic frame (>= 1 when ``Ts > 0``).
        window: ``Tw``, window length in VAE latent frames (>= 1).

    Example:
        >>> layout = WindowLayout(vae_frames=32, vae_tokens_per_frame=256,
        ...                       sem_frames=4, sem_tokens_per_frame=128, window=4)
        >>> layout.num_tokens, layout.num_windows(shifted=False)
        (8704, 8)
    """

    vae_frames: int
    vae_tokens_per_frame: int
    sem_frames: int
    sem_tokens_per_frame: int
    window: int
    # Per-(parity, device) index maps, built once; excluded from equality and hashing.
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        _check_int("vae_frames", self.vae_frames, 1)
        _check_int("vae_tokens_per_frame", self.vae_tokens_per_frame, 1)
        _check_int("sem_frames", self.sem_frames, 0)
        _check_int("sem_tokens_per_frame", self.sem_tokens_per_frame, 1 if self.sem_frames > 0 else 0)
        _check_int("window", self.window, 1)

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

    def segments(self, shifted: bool) -> tuple[WindowSegment, ...]:
        """Per-window token ranges in caller order (see :class:`WindowSegment`)."""
        key = ("segments", bool(shifted))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        num_windows = self.num_windows(shifted)
        vae_bounds = [0] * (num_windows + 1)  # first VAE frame of each window, then Tv
        sem_bounds = [0] * (num_windows + 1)
        for i in range(self.vae_frames):
            vae_bounds[self.vae_frame_window(i, shifted) + 1] = i + 1
        for j in range(self.sem_frames):
            sem_bounds[self.sem_frame_window(j, shifted) + 1] = j + 1
        for w in range(1, num_windows + 1):  # windows without a semantic frame end where the last one did
            sem_bounds[w] = max(sem_bounds[w], sem_bounds[w - 1])
        sv, ss, base = self.vae_tokens_per_frame, self.sem_tokens_per_frame, self.num_vae_tokens
        segs = tuple(
            WindowSegment(
                vae_bounds[w] * sv,
                vae_bounds[w + 1] * sv,
                base + sem_bounds[w] * ss,
                base + sem_bounds[w + 1] * ss,
            )
            for w in range(num_windows)
        )
        self._cache[key] = segs
        return segs

    def window_lengths(self, shifted: bool) -> list[int]:
        """Tokens per window."""
        return [s.length for s in self.segments(shifted)]

    def window_ids(self, shifted: bool) -> torch.Tensor:
        """Window index of every token in caller order, ``LongTensor[num_tokens]`` on the CPU."""
        ids = torch.empty(self.num_tokens, dtype=torch.long)
        for w, seg in enumerate(self.segments(shifted)):
            ids[seg.vae_start : seg.vae_end] = w
            ids[seg.sem_start : seg.sem_end] = w
        return ids

    def index_map(self, shifted: bool, device: torch.device | str = "cpu") -> WindowIndexMap:
        """Window-major permutation and ``cu_seqlens``, built once per parity and device."""
        device = torch.device(device)
        key = ("index_map", bool(shifted), str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        # No lock: two threads racing here build equal maps and one store wins, which is harmless;
        # a lock would also make layouts impossible to build inside a torch.compile graph.
        segs = self.segments(shifted)
        perm = torch.cat(
            [torch.cat([torch.arange(s.vae_start, s.vae_end), torch.arange(s.sem_start, s.sem_end)]) for s in segs]
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
