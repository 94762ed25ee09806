"""Deterministic rank-sharded loading: same global batch for any rank count, resumable from an integer."""

from __future__ import annotations

import pytest
import torch

from semanticgen.data import MicroBatchStream, SyntheticShapes


def _ds():
    return SyntheticShapes(10, height=8, width=8, vae_frames=2, vae_fps=4.0, sem_frames=1)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_two_ranks_split_the_one_rank_batch():
    ds = _ds()
    one = _take(MicroBatchStream(ds, seed=1, micro_batch_size=4, rank=0, world_size=1), 6)
    r0 = _take(MicroBatchStream(ds, seed=1, micro_batch_size=2, rank=0, world_size=2), 6)
    r1 = _take(MicroBatchStream(ds, seed=1, micro_batch_size=2, rank=1, world_size=2), 6)
    for b, x, y in zip(one, r0, r1):
        assert b["sample_id"].tolist() == x["sample_id"].tolist() + y["sample_id"].tolist()
        assert torch.equal(b["vae_video"], torch.cat([x["vae_video"], y["vae_video"]]))
        assert b["caption"] == x["caption"] + y["caption"]


def test_epochs_cover_the_dataset_in_a_seeded_order():
    ds = _ds()
    stream = MicroBatchStream(ds, seed=5, micro_batch_size=5, rank=0, world_size=1)
    captions = [c for b in _take(stream, 4) for c in b["caption"]]
    epoch0, epoch1 = captions[:10], captions[10:]
    assert sorted(epoch0) == sorted(ds.caption(i) for i in range(10))
    assert sorted(epoch1) == sorted(epoch0)
    other = MicroBatchStream(ds, seed=6, micro_batch_size=5, rank=0, world_size=1)
    assert [c for b in _take(other, 2) for c in b["caption"]] != epoch0


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_from_position(workers):
    ds = _ds()
    full = _take(MicroBatchStream(ds, seed=2, micro_batch_size=3, rank=1, world_size=2), 7)
    resumed = MicroBatchStream(ds, seed=2, micro_batch_size=3, rank=1, world_size=2, position=4, num_workers=workers)
    tail = _take(resumed, 3)
    assert resumed.position == 7
    for a, b in zip(full[4:], tail):
        assert a["sample_id"].tolist() == b["sample_id"].tolist()
        assert torch.equal(a["vae_video"], b["vae_video"])
