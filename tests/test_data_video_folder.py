"""Video-folder dataset: PyAV decoding at the two stream rates, captions, unreadable videos skipped and counted."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from semanticgen.data import VideoFolder
from semanticgen.frames import sample_frame_indices
from semanticgen.video import save_video

FPS = 30.0
NUM_FRAMES = 75  # 2.5 s


def _index_video(num_frames: int = NUM_FRAMES, size: int = 32) -> torch.Tensor:
    """Flat frames whose colour encodes the frame index: red = 16 * (i % 16) + 8, green = 16 * (i // 16) + 8."""
    frames = torch.zeros(num_frames, size, size, 3, dtype=torch.uint8)
    for i in range(num_frames):
        frames[i, ..., 0] = 16 * (i % 16) + 8
        frames[i, ..., 1] = 16 * (i // 16) + 8
        frames[i, ..., 2] = 128
    return frames


def _decoded_indices(video: torch.Tensor) -> list[int]:
    """Frame indices read back from ``[F, 3, H, W]`` frames in [0, 1] made by :func:`_index_video`."""
    rgb = video.mean(dim=(2, 3)) * 255.0
    lo = ((rgb[:, 0] - 8) / 16).round().long()
    hi = ((rgb[:, 1] - 8) / 16).round().long()
    return (hi * 16 + lo).tolist()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "videos"
    save_video(_index_video(), root / "a" / "clip.mp4", fps=FPS, crf=0)
    (root / "a" / "clip.txt").write_text("a clip whose colour counts frames\n")
    save_video(_index_video(), root / "b.mp4", fps=FPS, crf=0)
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (root / "empty.mp4").write_bytes(b"")
    save_video(_index_video(10), root / "uncaptioned.mp4", fps=FPS, crf=0)
    captions = [
        {"video": "b.mp4", "caption": "second clip"},
        {"video": "corrupt.mp4", "caption": "never decodes"},
        {"video": "empty.mp4", "caption": "zero bytes"},
    ]
    (root / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    return root


def test_streams_sample_the_paper_rates(folder):
    ds = VideoFolder(folder, height=32, width=32, vae_frames=49, vae_fps=24.0, sem_frames=4, sem_fps=1.6)
    item = ds[0]  # a/clip.mp4 (sorted paths)
    assert item["caption"] == "a clip whose colour counts frames"
    assert item["vae_video"].shape == (49, 3, 32, 32) and item["sem_video"].shape == (4, 3, 32, 32)
    ref = sample_frame_indices(NUM_FRAMES, FPS, vae_frames=49, sem_frames=4)
    assert _decoded_indices(item["vae_video"]) == list(ref.vae_indices)
    assert _decoded_indices(item["sem_video"]) == list(ref.sem_indices)  # 0, 18, 37, 56: 1.6 fps of a 30 fps clip
    assert item["skipped"] == 0


def test_short_video_repeats_last_frame_and_resizes(folder):
    ds = VideoFolder(folder, height=16, width=24, vae_frames=5, vae_fps=1.0, sem_frames=2, sem_fps=0.25)
    item = ds[0]
    assert item["vae_video"].shape == (5, 3, 16, 24)
    idx = _decoded_indices(item["vae_video"])
    assert idx == [0, 30, 60, NUM_FRAMES - 1, NUM_FRAMES - 1]
    assert _decoded_indices(item["sem_video"]) == [0, NUM_FRAMES - 1]


def test_unreadable_videos_are_skipped_and_counted(folder, caplog):
    ds = VideoFolder(folder, height=32, width=32, vae_frames=5, vae_fps=24.0, sem_frames=2, sem_fps=1.6)
    names = [p.name for p, _ in ds.items]
    assert names == ["clip.mp4", "b.mp4", "corrupt.mp4", "empty.mp4"]  # uncaptioned.mp4 left out
    assert ds.num_uncaptioned == 1
    with caplog.at_level(logging.WARNING, logger="semanticgen.data.video_folder"):
        item = ds[2]  # corrupt.mp4, then empty.mp4, then wraps around to clip.mp4
    assert item["path"].endswith("clip.mp4") and item["skipped"] == 2
    assert ds.num_skipped == 2
    assert sum("skipping unreadable video" in r.message for r in caplog.records) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="semanticgen.data.video_folder"):
        again = ds[3]  # empty.mp4 is known bad now: skipped without a second warning
    assert again["path"].endswith("clip.mp4") and again["skipped"] == 1 and ds.num_skipped == 3
    assert not caplog.records


def test_nothing_decodable_is_a_clear_error(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"garbage")
    (tmp_path / "x.txt").write_text("caption")
    ds = VideoFolder(tmp_path, height=8, width=8)
    with pytest.raises(RuntimeError, match="none of the 1 videos"):
        ds[0]


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        VideoFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no captioned videos"):
        VideoFolder(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"video": "a.mp4"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        VideoFolder(tmp_path, captions=tmp_path / "bad.jsonl")
