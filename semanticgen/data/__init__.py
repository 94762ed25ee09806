"""Training data: synthetic moving shapes, captioned video folders (PyAV) and pre-encoded safetensors shards."""

from __future__ import annotations

from .encode import Encoders
from .loader import MicroBatchStream, StreamDataset, collate
from .shards import ShardDataset, ShardWriter
from .synthetic import SyntheticShapes
from .video_folder import VideoFolder

__all__ = [
    "Encoders",
    "MicroBatchStream",
    "StreamDataset",
    "collate",
    "ShardDataset",
    "ShardWriter",
    "SyntheticShapes",
    "VideoFolder",
    "build_dataset",
]


def build_dataset(data_cfg, seed: int = 0):
    """Dataset of a ``DataConfig`` (``semanticgen.train.config``): raw clips for ``synthetic``/``video_folder``,
    encoded samples for ``shards``."""
    # Clip geometry and frame rates shared by the two raw-video datasets.
    clip = {
        name: getattr(data_cfg, name) for name in ("height", "width", "vae_frames", "vae_fps", "sem_frames", "sem_fps")
    }
    if data_cfg.kind == "synthetic":
        return SyntheticShapes(data_cfg.num_samples, seed=seed, **clip)
    if data_cfg.kind == "video_folder":
        return VideoFolder(data_cfg.path, captions=data_cfg.captions or None, **clip)
    if data_cfg.kind == "shards":
        return ShardDataset(data_cfg.path)
    raise ValueError(f"data.kind must be 'synthetic', 'video_folder' or 'shards', got {data_cfg.kind!r}")
