"""WindowLayout: window indices on the shared timeline, segments, index maps, argument checks."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from semanticgen.ops import WindowLayout

LAYOUTS = {
    "Tv=32,Sv=4,Ts=4,Ss=3,Tw=4": (32, 4, 4, 3, 4),
    "Ts=0": (9, 5, 0, 0, 4),
    "Ts=3 not dividing Tv=8": (8, 3, 3, 2, 4),
    "odd Tw=3": (10, 2, 4, 3, 3),
    "Tw=1 one-frame windows": (6, 2, 3, 2, 1),
    "Tv<Tw": (3, 4, 2, 2, 8),
    "Ts>Tv": (4, 2, 7, 1, 2),
}


def _window_by_fractions(p: Fraction, window: int, shifted: bool) -> int:
    shift = window // 2 if shifted else 0
    return math.floor((p + shift) / window)


@pytest.mark.parametrize("shifted", [False, True], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("dims", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_window_ids_match_exact_timeline(dims, shifted):
    tv, sv, ts, ss, tw = dims
    layout = WindowLayout(vae_frames=tv, vae_tokens_per_frame=sv, sem_frames=ts, sem_tokens_per_frame=ss, window=tw)
    assert layout.num_tokens == tv * sv + ts * ss
    expected = [_window_by_fractions(Fraction(i), tw, shifted) for i in range(tv) for _ in range(sv)]
    expected += [_window_by_fractions(Fraction(j * tv, ts), tw, shifted) for j in range(ts) for _ in range(ss)]
    ids = layout.window_ids(shifted)
    assert ids.dtype == torch.long and ids.shape == (layout.num_tokens,)
    assert ids.tolist() == expected


def test_integer_maths_where_floats_round_wrong():
    # Tv=30, Ts=22, Tw=3: semantic frame 11 sits exactly at p = 15, the start of window 5. In floats,
    # 11 * (30 / 22) is 14.999999999999998 and floor(p / 3) would say window 4.
    tv, ts, tw = 30, 22, 3
    assert math.floor(11 * (tv / ts) / tw) == 4
    layout = WindowLayout(vae_frames=tv, vae_tokens_per_frame=1, sem_frames=ts, sem_tokens_per_frame=1, window=tw)
    assert layout.sem_frame_window(11, shifted=False) == 5
    assert layout.window_ids(False)[tv + 11].item() == 5


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("dims", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_segments_and_index_map_partition_tokens(dims, shifted):
    tv, sv, ts, ss, tw = dims
    layout = WindowLayout(vae_frames=tv, vae_tokens_per_frame=sv, sem_frames=ts, sem_tokens_per_frame=ss, window=tw)
    ids = layout.window_ids(shifted)
    imap = layout.index_map(shifted)
    assert sorted(imap.perm.tolist()) == list(range(layout.num_tokens))
    cu = imap.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == layout.num_tokens and len(cu) == layout.num_windows(shifted) + 1
    for w in range(layout.num_windows(shifted)):
        rows = imap.perm[cu[w] : cu[w + 1]].long()
        assert (ids[rows] == w).all()
        assert len(rows) == int((ids == w).sum())
    assert imap.max_seqlen == max(cu[w + 1] - cu[w] for w in range(len(cu) - 1))
    assert layout.index_map(shifted) is imap  # cached


def test_shifted_layers_have_half_windows_at_both_ends():
    layout = WindowLayout(vae_frames=16, vae_tokens_per_frame=2, sem_frames=2, sem_tokens_per_frame=3, window=4)
    assert layout.window_lengths(False) == [4 * 2 + 3, 4 * 2, 4 * 2 + 3, 4 * 2]
    # shift 2: frames 0-1 | 2-5 | 6-9 | 10-13 | 14-15; semantic frames at p=0 and p=8.
    assert layout.window_lengths(True) == [2 * 2 + 3, 4 * 2, 4 * 2 + 3, 4 * 2, 2 * 2]


def test_flops():
    layout = WindowLayout(vae_frames=32, vae_tokens_per_frame=256, sem_frames=4, sem_tokens_per_frame=128, window=4)
    assert layout.num_tokens == 8704 and layout.num_windows(False) == 8
    assert layout.full_attention_flops(64, 8) == 4 * 8 * 64 * 8704**2
    assert layout.attention_flops(64, 8) == 4 * 8 * 64 * (4 * 1152**2 + 4 * 1024**2)


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (
            dict(vae_frames=0, vae_tokens_per_frame=4, sem_frames=1, sem_tokens_per_frame=1, window=2),
            ValueError,
            "vae_frames",
        ),
        (
            dict(vae_frames=4, vae_tokens_per_frame=0, sem_frames=1, sem_tokens_per_frame=1, window=2),
            ValueError,
            "vae_tokens_per_frame",
        ),
        (
            dict(vae_frames=4, vae_tokens_per_frame=4, sem_frames=-1, sem_tokens_per_frame=1, window=2),
            ValueError,
            "sem_frames",
        ),
        (
            dict(vae_frames=4, vae_tokens_per_frame=4, sem_frames=2, sem_tokens_per_frame=0, window=2),
            ValueError,
            "sem_tokens_per_frame",
        ),
        (
            dict(vae_frames=4, vae_tokens_per_frame=4, sem_frames=2, sem_tokens_per_frame=1, window=0),
            ValueError,
            "window",
        ),
        (
            dict(vae_frames=4.0, vae_tokens_per_frame=4, sem_frames=2, sem_tokens_per_frame=1, window=2),
            TypeError,
            "vae_frames",
        ),
        (
            dict(vae_frames=4, vae_tokens_per_frame=4, sem_frames=2, sem_tokens_per_frame=1, window=True),
            TypeError,
            "window",
        ),
    ],
)
def test_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        WindowLayout(**kwargs)


def test_layout_is_hashable_and_equal_by_value():
    a = WindowLayout(vae_frames=4, vae_tokens_per_frame=4, sem_frames=2, sem_tokens_per_frame=1, window=2)
    b = WindowLayout(vae_frames=4, vae_tokens_per_frame=4, sem_frames=2, sem_tokens_per_frame=1, window=2)
    a.index_map(True)
    assert a == b and hash(a) == hash(b)
