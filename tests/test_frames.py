"""Frame sampling of the VAE and semantic streams on one timeline."""

from __future__ import annotations

import math

import pytest

from semanticgen.frames import sample_frame_indices, stream_frame_count


def test_paper_rates_on_a_24fps_minute():
    s = sample_frame_indices(24 * 60, 24.0)
    assert len(s.vae_indices) == 1437  # largest 1 + 4k whose samples fit in 1440 frames
    assert s.vae_indices == tuple(range(1437))  # same rate: every source frame in order
    assert len(s.sem_indices) == 96  # 60 s * 1.6 fps, even
    assert s.sem_indices == tuple(15 * j for j in range(96))  # one semantic frame every 15 VAE frames
    assert s.sem_positions[:3] == pytest.approx((0.0, 15.0, 30.0))


@pytest.mark.parametrize("fps", [23.976, 25.0, 29.97, 30.0, 50.0, 59.94, 12.0])
def test_indices_match_time_based_reference(fps):
    """Each index is the source frame on screen at the sample's time, computed independently in exact fractions."""
    from fractions import Fraction

    num_frames = int(fps * 7.3)
    s = sample_frame_indices(num_frames, fps, start=0.5)
    fps_q = Fraction(fps).limit_denominator(1000)
    for count, rate, indices in (
        (len(s.vae_indices), 24, s.vae_indices),
        (len(s.sem_indices), Fraction(8, 5), s.sem_indices),
    ):
        expected = tuple(
            min(num_frames - 1, math.floor((Fraction(1, 2) + Fraction(k) / rate) * fps_q)) for k in range(count)
        )
        assert indices == expected
    # both streams cover the same span and stay inside the clip
    assert s.vae_times[-1] < s.start + s.duration and s.sem_times[-1] < s.start + s.duration
    assert max(s.vae_indices + s.sem_indices) < num_frames
    assert (len(s.vae_indices) - 1) % 4 == 0 and len(s.sem_indices) % 2 == 0


def test_slow_source_repeats_frames_and_streams_align():
    s = sample_frame_indices(80, 8.0, vae_fps=24.0, sem_fps=1.6)  # 10 s at 8 fps
    assert s.vae_indices[:6] == (0, 0, 0, 1, 1, 1)
    # the semantic frame at time t and the VAE frame at the same time come from the same source frame
    for j, t in enumerate(s.sem_times):
        k = round((t - s.start) * 24.0)
        assert s.vae_times[k] == pytest.approx(t)
        assert s.vae_indices[k] == s.sem_indices[j]


def test_explicit_counts_and_duration():
    s = sample_frame_indices(600, 30.0, start=2.0, duration=3.0, vae_frames=17, sem_frames=4)
    assert len(s.vae_indices) == 17 and len(s.sem_indices) == 4
    assert s.vae_indices[0] == 60 and s.sem_indices[1] == 78  # floor((2 + 1 / 1.6) s * 30 fps) = floor(78.75)
    s = sample_frame_indices(100, 24.0, vae_offset=0, vae_multiple=4)
    assert len(s.vae_indices) == 100


def test_stream_frame_count():
    assert stream_frame_count(10.0, 24.0, multiple=4, offset=1) == 237
    assert stream_frame_count(10.0, 1.6, multiple=2) == 16
    assert stream_frame_count(0.5, 1.6, multiple=2) == 0
    assert stream_frame_count(1.25, 1.6, multiple=2) == 2  # samples at 0 and 0.625 s


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_frames": 0, "fps": 24.0}, "num_frames"),
        ({"num_frames": 10, "fps": 0.0}, "fps"),
        ({"num_frames": 10, "fps": float("nan")}, "fps"),
        ({"num_frames": 48, "fps": 24.0, "start": 2.0}, "start"),
        ({"num_frames": 48, "fps": 24.0, "duration": 3.0}, "past the clip's end"),
        ({"num_frames": 12, "fps": 24.0}, "too short for the sem stream"),
        ({"num_frames": 240, "fps": 24.0, "vae_frames": 16}, "1 \\+ 4 \\* k"),
        ({"num_frames": 240, "fps": 24.0, "sem_frames": 3}, "multiple of 2"),
        ({"num_frames": 240, "fps": 24.0, "sem_frames": 18}, "need"),
        ({"num_frames": 240, "fps": 24.0, "vae_frames": 241}, "need"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_frame_indices(**kwargs)
