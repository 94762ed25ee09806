"""Long-video planning: token counts, windows and attention FLOPs."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from semanticgen.planning import DEFAULT_WINDOW, format_plan, plan


def test_paper_figures_for_a_480p_minute():
    p = plan(60, 480, 832)
    assert p.vae_tokens_per_frame == 1560  # paper: 1,560 tokens per 480p latent frame
    assert p.latent_frames == 360 and p.video_frames == 1437
    assert p.vae_tokens == 561_600  # paper: about 562K VAE tokens a minute
    assert p.sem_video_frames == 96 and p.sem_frames == 48 and p.sem_grid == (17, 30)
    assert p.sem_tokens == 48 * 510
    assert 0.035 < p.sem_ratio < 0.05  # paper: semantic tokens about 4% of the VAE tokens
    assert p.stage2_tokens == p.vae_tokens + p.sem_tokens
    assert p.window == DEFAULT_WINDOW and p.windows == 18 and p.windows_shifted == 19
    assert p.flops_ratio > 10


def _brute_force_window_flops(latent_frames, sv, sem_frames, ss, window, shifted, heads, head_dim):
    """Tokens per window from each frame's exact time on the latent-frame axis, independent of WindowLayout."""
    shift = window // 2 if shifted else 0
    counts: dict[int, int] = {}
    for i in range(latent_frames):
        w = (i + shift) // window
        counts[w] = counts.get(w, 0) + sv
    for j in range(sem_frames):
        pos = Fraction(j * latent_frames, sem_frames)
        w = int((pos + shift) // window)
        counts[w] = counts.get(w, 0) + ss
    return 4 * heads * head_dim * sum(n * n for n in counts.values()), len(counts)


@pytest.mark.parametrize(
    ("seconds", "height", "width", "window", "layers"),
    [(60, 480, 832, 20, 40), (10, 240, 416, 8, 3), (7.3, 320, 320, 6, 1), (1.0, 160, 160, 4, 2)],
    ids=["60s-480p", "10s-240p-Tw8", "7.3s-odd-layers", "1s-one-sem-frame"],
)
def test_flops_match_brute_force(seconds, height, width, window, layers):
    p = plan(seconds, height, width, window=window, heads=3, head_dim=16, layers=layers)
    args = (p.latent_frames, p.vae_tokens_per_frame, p.sem_frames, p.sem_tokens_per_frame, window)
    unshifted, n_unshifted = _brute_force_window_flops(*args, False, 3, 16)
    shifted, n_shifted = _brute_force_window_flops(*args, True, 3, 16)
    assert (p.windows, p.windows_shifted) == (n_unshifted, n_shifted)
    assert p.windowed_attention_flops == (layers - layers // 2) * unshifted + (layers // 2) * shifted
    assert p.full_attention_flops == layers * 4 * 3 * 16 * p.stage2_tokens**2
    assert p.stage1_attention_flops == layers * 4 * 3 * 16 * p.sem_tokens**2


def test_short_clip_without_semantic_frames():
    p = plan(0.5, 160, 160)
    assert p.sem_frames == 0 and p.sem_tokens == 0 and p.stage1_attention_flops == 0
    assert p.latent_frames == 3  # 12 frames -> largest 1 + 4k is 9


def test_other_configs():
    p = plan(60, 720, 1280, fps=16, vae_spatial=16, patch=1, window=10)
    assert p.vae_tokens_per_frame == 45 * 80
    assert p.latent_frames == 1 + (960 - 1) // 4
    assert p.window_seconds == pytest.approx(10 * 4 / 16)


def test_to_dict_is_json_and_table_has_the_numbers():
    p = plan(60, 480, 832)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["vae_tokens"] == 561_600 and d["sem_grid"] == [17, 30]
    text = format_plan(p)
    for needle in ("561,600", "1,560", "24,480", "Tw = 20", "18 windows", f"{p.flops_ratio:,.1f}x"):
        assert needle in text


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((60, 481, 832), {}, "multiples of vae_spatial \\* patch = 16"),
        ((0, 480, 832), {}, "seconds"),
        ((float("inf"), 480, 832), {}, "seconds"),
        ((60, 480, 832), {"window": 0}, "window"),
        ((60, 480, 832), {"heads": 2.5}, "heads"),
        ((0.01, 480, 832), {}, "less than one frame"),
    ],
)
def test_rejects_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(*args, **kwargs)


# ------------------------------------------------------------------------------- context parallel
def test_context_parallel_plan_at_paper_scale():
    """60 s 480p over 8 ranks: whole windows per rank, halo bytes from the handed-over blocks only."""
    from semanticgen.planning import format_context_parallel, plan_context_parallel

    p = plan(60, 480, 832, heads=40, head_dim=128)
    c = plan_context_parallel(p, 8, hidden=5120)
    assert sum(c.tokens_per_rank) == p.stage2_tokens and sum(c.windows_per_rank) == p.windows == 18
    assert max(c.windows_per_rank) == 3 and min(c.windows_per_rank) == 2
    assert c.activation_bytes_per_rank == max(c.tokens_per_rank) * 5120 * 2
    # One block of a 20-frame window is 10 latent frames (+ its semantic frames); a rank moves at most its
    # head and its tail block per pair of layers, so per layer one block's hidden states on average.
    block = 10 * 1560 + 2 * 510
    assert c.bytes_per_layer["halo_hidden"] <= block * 5120 * 2
    assert c.bytes_per_layer["halo_kv"] == 2 * c.bytes_per_layer["halo_hidden"]
    assert c.bytes_per_layer["halo_hidden"] < c.bytes_per_layer["ulysses"] / 10
    assert c.seconds_per_layer["halo_hidden"] == pytest.approx(c.bytes_per_layer["halo_hidden"] / 50e9)
    text = format_context_parallel(c)
    for needle in ("8 ranks", "window halo (ours)", "Ulysses", "ring attention", "50 GB/s", "600 TFLOP/s"):
        assert needle in text


def test_context_parallel_plan_refuses_more_ranks_than_windows():
    from semanticgen.planning import plan_context_parallel

    with pytest.raises(ValueError, match="at least 19 unshifted windows.*has 18"):
        plan_context_parallel(plan(60, 480, 832), 19)
    with pytest.raises(ValueError, match="link_gbytes_per_s"):
        plan_context_parallel(plan(60, 480, 832), 2, link_gbytes_per_s=0)
