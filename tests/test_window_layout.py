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


# ------------------------------------------------------------------------------------------ blocked order
def _block_of_time(p: Fraction, window: int) -> tuple[int, int]:
    """A time's block, from first principles: the pair of its unshifted and shifted windows."""
    return _window_by_fractions(p, window, False), _window_by_fractions(p, window, True)


def _check_blocked(dims):
    tv, sv, ts, ss, tw = dims
    streams = WindowLayout(tv, sv, ts, ss, tw)
    blocked = streams.with_order("blocked")
    perm = blocked.permutation
    n = streams.num_tokens
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(n))
    assert torch.equal(streams.permutation, perm)  # the same on a layout of either order
    # Token times (exact fractions) in streams order, then in blocked order.
    times = [Fraction(i) for i in range(tv) for _ in range(sv)] + [
        Fraction(j * tv, ts) for j in range(ts) for _ in range(ss)
    ]
    is_sem = [False] * (tv * sv) + [True] * (ts * ss)
    blocked_times = [times[r] for r in perm.tolist()]
    blocked_sem = [is_sem[r] for r in perm.tolist()]
    keys = [_block_of_time(p, tw) for p in blocked_times]
    # Blocks follow each other in time; inside a block its VAE tokens come before its semantic tokens,
    # each stream frame-major (the streams-order index grows).
    assert keys == sorted(keys)
    for r in range(1, n):
        if keys[r] == keys[r - 1]:
            assert (blocked_sem[r - 1], perm[r - 1].item()) < (blocked_sem[r], perm[r].item())
    for shifted in (False, True):
        ids = blocked.window_ids(shifted)
        assert torch.equal(ids, streams.window_ids(shifted)[perm])
        assert bool((ids[1:] >= ids[:-1]).all()), "blocked window ids must be non-decreasing"
        # Every block's tokens share both window ids.
        for r in range(1, n):
            if keys[r] == keys[r - 1]:
                assert ids[r] == ids[r - 1]
        cu = blocked.cu_seqlens(shifted).tolist()
        assert blocked.cu_seqlens(shifted).dtype == torch.int32
        assert cu == [0] + torch.cumsum(torch.bincount(ids), 0).tolist()
        segs = blocked.segments(shifted)
        assert [(s.start0, s.end0) for s in segs] == list(zip(cu[:-1], cu[1:]))
        assert all(s.start1 == s.end1 == s.end0 for s in segs)
        assert blocked.window_lengths(shifted) == streams.window_lengths(shifted)
        assert torch.equal(blocked.index_map(shifted).perm, torch.arange(n, dtype=torch.int32))
    x = torch.randn(2, n, 3)
    xb = blocked.to_blocked(x)
    assert torch.equal(xb, x[:, perm])
    assert torch.equal(blocked.from_blocked(xb), x)
    assert torch.equal(streams.from_blocked(streams.to_blocked(x.transpose(0, 1), dim=0), dim=0), x.transpose(0, 1))


@pytest.mark.parametrize("dims", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_blocked_order_contract(dims):
    _check_blocked(dims)


def test_blocked_order_on_random_layouts():
    """Property test: 200 random layouts (odd and even Tw, Ts = 0, Ts not dividing Tv, Ts > Tv, Tv < Tw)."""
    g = torch.Generator().manual_seed(1234)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    for _ in range(200):
        ts = draw(0, 12)
        _check_blocked((draw(1, 24), draw(1, 3), ts, draw(1, 3) if ts else 0, draw(1, 9)))


def test_blocks_are_half_windows_for_even_window():
    layout = WindowLayout(vae_frames=12, vae_tokens_per_frame=2, sem_frames=3, sem_tokens_per_frame=1, window=4)
    assert [(b.vae_start, b.vae_end) for b in layout.blocks()] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    # Semantic frames at p = 0, 4, 8 open blocks 0, 2 and 4.
    assert [(b.sem_start, b.sem_end) for b in layout.blocks()] == [(0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3)]
    assert layout.window_blocks(False) == [(0, 2), (2, 4), (4, 6)]
    assert layout.window_blocks(True) == [(0, 1), (1, 3), (3, 5), (5, 6)]


def test_paper_scale_blocked_layout():
    """60 s at 480p (the plan's geometry): 586,080 tokens, 18 windows, 36 half-window blocks."""
    layout = WindowLayout(360, 1560, 48, 510, 20, order="blocked")
    assert layout.num_tokens == 586_080
    assert layout.num_windows(False) == 18 and len(layout.blocks()) == 36
    cu = layout.cu_seqlens(True)
    assert cu[-1].item() == layout.num_tokens and layout.max_window_length(False) == 20 * 1560 + 3 * 510


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda: WindowLayout(4, 2, 1, 1, 2, order="window-major"), ValueError, "order"),
        (lambda: WindowLayout(4, 2, 1, 1, 2).to_blocked(torch.randn(1, 5, 2)), ValueError, "has 9"),
        (lambda: WindowLayout(4, 2, 1, 1, 2).to_blocked(torch.randn(1, 9, 2), dim=3), ValueError, "dim"),
        (lambda: WindowLayout(4, 2, 1, 1, 2).from_blocked([0] * 9), TypeError, "torch.Tensor"),
    ],
    ids=["order", "length", "dim", "not-tensor"],
)
def test_blocked_order_bad_arguments(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
