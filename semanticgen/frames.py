"""Frame sampling for the two streams: VAE frames (24 fps) and semantic-encoder frames (1.6 fps) on one timeline.

Both streams sample the same time span of a source clip of any frame rate. Stream ``s`` with rate
``r_s`` takes its ``k``-th frame at time ``start + k / r_s`` seconds; the source frame shown at time ``t``
is ``floor(t * fps)`` (frame ``i`` is on screen during ``[i / fps, (i + 1) / fps)``). With the paper's
rates a semantic frame falls on every 15th VAE frame (``24 / 1.6 = 15``).

Frame counts follow what the encoders accept: a causal (Wan-style) VAE takes ``1 + 4k`` frames and the
Qwen2.5-VL tower takes frame pairs, so by default the VAE count is the largest ``1 + 4k`` and the
semantic count the largest even number whose samples fit in the span.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from semanticgen._checks import check_int, check_number, is_real

__all__ = ["FrameSample", "sample_frame_indices", "stream_frame_count"]

# Times are compared against frame boundaries with this slack, so that e.g. 1/1.6 s * 24 fps = 15.000000000000002
# lands on frame 15 and not 14 or 16.
_EPS = 1e-9


@dataclass(frozen=True)
class FrameSample:
    """Source frame indices (and their times, in seconds) of both streams over one span.

    Attributes:
        vae_indices: source frame of each VAE-stream frame.
        sem_indices: source frame of each semantic-stream frame.
        vae_times, sem_times: the sampling times, seconds from the start of the source clip.
        start: first sampled time, seconds.
        duration: length of the span the streams cover, seconds.
    """

    vae_indices: tuple[int, ...]
    sem_indices: tuple[int, ...]
    vae_times: tuple[float, ...]
    sem_times: tuple[float, ...]
    start: float
    duration: float

    @property
    def sem_positions(self) -> tuple[float, ...]:
        """Position of each semantic frame on the VAE stream's frame axis (``(t - start) * vae_fps``)."""
        if len(self.vae_times) < 2:
            return tuple(0.0 for _ in self.sem_times)
        vae_rate = 1.0 / (self.vae_times[1] - self.vae_times[0])
        return tuple((t - self.start) * vae_rate for t in self.sem_times)


def _check_positive(name: str, value: object) -> float:
    return check_number(name, value, positive=True, finite=True, who="sample_frame_indices")


def stream_frame_count(span: float, rate: float, *, multiple: int = 1, offset: int = 0) -> int:
    """Largest ``offset + multiple * k`` (``k >= 0``, at least 1 frame) whose samples at ``rate`` fit in ``span`` s.

    Samples sit at ``k / rate`` for ``k = 0, 1, ...`` and must be earlier than ``span``. Returns 0 when not
    even the smallest admissible count fits.
    """
    fits = math.ceil(span * rate - _EPS)  # samples with k / rate < span
    if fits < max(offset, 1):
        return 0
    count = offset + ((fits - offset) // multiple) * multiple
    return count if count >= 1 else 0


def sample_frame_indices(
    num_frames: int,
    fps: float,
    *,
    vae_fps: float = 24.0,
    sem_fps: float = 1.6,
    start: float = 0.0,
    duration: float | None = None,
    vae_frames: int | None = None,
    sem_frames: int | None = None,
    vae_multiple: int = 4,
    vae_offset: int = 1,
    sem_multiple: int = 2,
) -> FrameSample:
    """Pick source frames for the VAE stream and the semantic stream over one span of a clip.

    Args:
        num_frames: frames in the source clip.
        fps: the source clip's frame rate.
        vae_fps: rate of the VAE stream (paper: 24).
        sem_fps: rate of the semantic stream (paper: 1.6).
        start: first sampled time in seconds.
        duration: span to cover in seconds (default: from ``start`` to the end of the clip).
        vae_frames: exact VAE frame count (default: the largest admissible count that fits the span).
        sem_frames: exact semantic frame count (default: likewise).
        vae_multiple, vae_offset: admissible VAE counts are ``vae_offset + vae_multiple * k``
            (Wan VAE: ``1 + 4k``; use ``vae_offset=0`` for a VAE that takes multiples).
        sem_multiple: admissible semantic counts are multiples of this (Qwen2.5-VL: 2).

    Returns:
        :class:`FrameSample`. A source slower than a stream repeats source frames; a faster one skips them.

    Raises:
        ValueError: bad arguments, a span outside the clip, or a span too short for one admissible count
            (or for an explicitly requested count).

    Example:
        >>> s = sample_frame_indices(300, 30.0)  # 10 s at 30 fps
        >>> len(s.vae_indices), len(s.sem_indices), s.sem_indices[:3]
        (237, 16, (0, 18, 37))
    """
    check_int("num_frames", num_frames, minimum=1, who="sample_frame_indices")
    fps = _check_positive("fps", fps)
    vae_fps = _check_positive("vae_fps", vae_fps)
    sem_fps = _check_positive("sem_fps", sem_fps)
    counts = (("vae_multiple", vae_multiple, 1), ("vae_offset", vae_offset, 0), ("sem_multiple", sem_multiple, 1))
    for name, value, minimum in counts:
        check_int(name, value, minimum=minimum, who="sample_frame_indices")
    clip_seconds = num_frames / fps
    if not is_real(start) or not 0 <= start < clip_seconds:
        raise ValueError(f"sample_frame_indices: start must be in [0, {clip_seconds:g}) s for this clip, got {start!r}")
    available = clip_seconds - start
    if duration is None:
        span = available
    else:
        span = _check_positive("duration", duration)
        if span > available + _EPS:
            raise ValueError(
                f"sample_frame_indices: duration {span:g} s from start {start:g} s runs past the clip's end "
                f"({clip_seconds:g} s = {num_frames} frames at {fps:g} fps)"
            )

    def resolve(name: str, requested: int | None, rate: float, multiple: int, offset: int) -> int:
        if requested is None:
            count = stream_frame_count(span, rate, multiple=multiple, offset=offset)
            if count == 0:
                raise ValueError(
                    f"sample_frame_indices: a {span:g} s span is too short for the {name} stream at {rate:g} fps "
                    f"(needs at least {offset or multiple} frame(s))"
                )
            return count
        check_int(f"{name}_frames", requested, minimum=1, who="sample_frame_indices")
        if requested < offset or (requested - offset) % multiple:
            form = f"{offset} + {multiple} * k" if offset else f"a multiple of {multiple}"
            raise ValueError(f"sample_frame_indices: {name}_frames must be {form}, got {requested}")
        needed = (requested - 1) / rate  # time of the last sample
        if needed >= span - _EPS:
            raise ValueError(
                f"sample_frame_indices: {requested} {name} frames at {rate:g} fps need "
                f"{needed + 1 / rate:g} s, but the span is {span:g} s"
            )
        return requested

    n_vae = resolve("vae", vae_frames, vae_fps, vae_multiple, vae_offset)
    n_sem = resolve("sem", sem_frames, sem_fps, sem_multiple, 0)

    def indices(count: int, rate: float) -> tuple[tuple[int, ...], tuple[float, ...]]:
        times = tuple(start + k / rate for k in range(count))
        return tuple(min(num_frames - 1, math.floor(t * fps + _EPS)) for t in times), times

    vae_idx, vae_t = indices(n_vae, vae_fps)
    sem_idx, sem_t = indices(n_sem, sem_fps)
    return FrameSample(vae_idx, sem_idx, vae_t, sem_t, float(start), float(span))
