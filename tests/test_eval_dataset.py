"""The eval's real clips are the training clips: its dataset is the run's, extended past ``num_samples``."""

from __future__ import annotations

from pathlib import Path

import torch

from semanticgen.data import build_dataset
from semanticgen.evaluation.prompt_eval import _SEARCH_PAST_TRAINING, _dataset

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"


def test_eval_dataset_starts_with_the_training_clips_of_the_run():
    from semanticgen.train.config import load_config

    cfg = load_config(CONFIG, ["seed=3", "data.num_samples=16"])
    saved = cfg.to_dict()  # what the run's config.json holds
    train, extended = build_dataset(cfg.data, seed=cfg.seed), _dataset(saved)
    assert len(extended) == 16 + _SEARCH_PAST_TRAINING
    for index in (0, 15):
        a, b = train[index], extended[index]
        assert a["caption"] == b["caption"]
        for key in ("vae_video", "sem_video"):
            assert torch.equal(a[key], b[key]), (index, key)
    other = _dataset(dict(saved, seed=4))
    assert not torch.equal(other[0]["vae_video"], train[0]["vae_video"])  # the seed is the run's, not a default
