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
    if data_cfg.kind == "synthetic":
        return SyntheticShapes(
            data_cfg.num_samples,
            height=data_cfg.height,
            width=data_cfg.width,
            vae_frames=data_cfg.vae_frames,
            vae_fps=data_cfg.vae_fps,
            sem_frames=data_cfg.sem_frames,
            sem_fps=data_cfg.sem_fps,
            seed=seed,
        )
    if data_cfg.kind == "video_folder":
        return VideoFolder(
            data_cfg.path,
            captions=data_cfg.captions or None,
            height=data_cfg.height,
            width=data_cfg.width,
            vae_frames=data_cfg.vae_frames,
            vae_fps=data_cfg.vae_fps,
            sem_frames=data_cfg.sem_frames,
            sem_fps=data_cfg.sem_fps,
        )
    if data_cfg.kind == "shards":
        return ShardDataset(data_cfg.path)
    raise ValueError(f"data.kind must be 'synthetic', 'video_folder' or 'shards', got {data_cfg.kind!r}")
