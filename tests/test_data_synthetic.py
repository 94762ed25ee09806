"""Synthetic moving-shape clips: deterministic, well-formed, captions that describe the motion."""

from __future__ import annotations

import pytest
import torch

from semanticgen.data import SyntheticShapes


def _centroid(frame: torch.Tensor, background: float) -> torch.Tensor:
    """(x, y) centre of the pixels that differ from the background, ``frame [3, H, W]``."""
    fg = (frame - background).abs().sum(0) > 1e-3
    ys, xs = torch.nonzero(fg, as_tuple=True)
    return torch.stack([xs.float().mean(), ys.float().mean()])


def test_shapes_range_and_determinism():
    ds = SyntheticShapes(8, height=24, width=40, vae_frames=9, vae_fps=8.0, sem_frames=2, sem_fps=1.6, seed=3)
    a, b = ds[5], ds[5]
    assert a["vae_video"].shape == (9, 3, 24, 40) and a["sem_video"].shape == (2, 3, 24, 40)
    assert a["vae_video"].dtype == torch.float32
    assert float(a["vae_video"].min()) >= 0.0 and float(a["vae_video"].max()) <= 1.0
    assert torch.equal(a["vae_video"], b["vae_video"]) and a["caption"] == b["caption"]
    other = SyntheticShapes(8, height=24, width=40, vae_frames=9, vae_fps=8.0, seed=4)
    assert [ds.describe(i) for i in range(8)] != [other.describe(i) for i in range(8)]
    with pytest.raises(IndexError):
        ds[8]


@pytest.mark.parametrize("index", range(12))
def test_caption_matches_motion(index):
    ds = SyntheticShapes(12, height=32, width=32, vae_frames=17, vae_fps=6.4, sem_frames=4, sem_fps=1.6)
    d = ds.describe(index)
    clip = ds[index]
    assert clip["caption"] == f"a {d['colour']} {d['shape']} moving {d['direction']}"
    start = _centroid(clip["vae_video"][0], d["background"])
    end = _centroid(clip["vae_video"][-1], d["background"])
    dx, dy = (end - start).tolist()
    expected = {"right": dx > 4, "left": dx < -4, "down": dy > 4, "up": dy < -4}
    assert expected[d["direction"]], (d["direction"], dx, dy)
    # The semantic stream samples the same motion on the same timeline (t = k / 1.6 s).
    sem_t = torch.arange(4, dtype=torch.float64) / 1.6
    torch.testing.assert_close(clip["sem_video"], ds.render(index, sem_t))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticShapes(0)
    with pytest.raises(ValueError, match="fps"):
        SyntheticShapes(4, vae_fps=0)
