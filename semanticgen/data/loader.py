"""Deterministic, resumable, rank-sharded data loading.

The sample stream is an endless sequence of positions ``0, 1, 2, ...``; position ``p`` is dataset item
``perm(seed, epoch)[p % N]`` with ``epoch = p // N``. Micro-step ``k`` covers the global positions
``[k * G, (k + 1) * G)`` with ``G = micro_batch_size * world_size``, and rank ``r`` takes the ``r``-th slice of
``micro_batch_size`` of them. Hence:

* the loader position is one integer (micro-steps taken), saved in checkpoints;
* 1 rank with micro batch ``2b`` and 2 ranks with ``b`` see the same global batch at every step;
* every sample carries its stream position (``sample_id``), from which per-sample noise is seeded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(num_items, generator=g)


class StreamDataset(Dataset):
    """Maps a stream position to ``base[perm(seed, epoch)[position % N]]`` plus ``sample_id = position``."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed
        self.num_items = len(base)  # type: ignore[arg-type]
        if self.num_items < 1:
            raise ValueError("dataset is empty")
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:  # positions are unbounded; the sampler decides which are read
        return 2**62

    def __getitem__(self, position: int) -> dict[str, Any]:
        epoch, offset = divmod(position, self.num_items)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(self.num_items, self.seed, epoch)
        item = dict(self.base[int(self._perm[offset])])
        item["sample_id"] = position
        return item


class RankBatchSampler(Sampler[list[int]]):
    """Yields this rank's list of stream positions for micro-steps ``start, start + 1, ...`` forever."""

    def __init__(self, micro_batch_size: int, rank: int, world_size: int, start: int = 0) -> None:
        self.micro_batch_size, self.rank, self.world_size, self.start = micro_batch_size, rank, world_size, start

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start
        g = self.micro_batch_size * self.world_size
        while True:
            base = k * g + self.rank * self.micro_batch_size
            yield list(range(base, base + self.micro_batch_size))
            k += 1


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, list strings, sum ``skipped``; ``sample_id`` becomes an int64 tensor."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key == "skipped":
            out[key] = int(sum(values))
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif key == "sample_id":
            out[key] = torch.tensor(values, dtype=torch.int64)
        else:
            out[key] = values
    return out


class MicroBatchStream:
    """Iterator of this rank's micro-batches with a resumable position (micro-steps consumed).

    ``num_workers > 0`` prefetches in worker processes; the order does not depend on it.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        seed: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        position: int = 0,
        num_workers: int = 0,
    ) -> None:
        self.position = position
        sampler = RankBatchSampler(micro_batch_size, rank, world_size, start=position)
        self._loader = DataLoader(
            StreamDataset(dataset, seed),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            prefetch_factor=2 if num_workers > 0 else None,
        )
        self._it = iter(self._loader)

    def __iter__(self) -> MicroBatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._it)
        self.position += 1
        return batch
