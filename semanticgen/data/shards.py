"""Pre-encoded training data: safetensors shards of VAE latents, semantic features and text embeddings.

A shard directory holds::

    index.json                  {"num_samples", "shards": [{"file", "num_samples"}], "shapes", "encoders", "captions"}
    null_text.safetensors       the empty prompt's embedding (text, text_mask), for text dropout
    shard_00000.safetensors     latents [n, C, T', H', W'], sem_features [n, Ts, Ss, d], text [n, L, D],
                                text_mask [n, L]

Shards are written by ``python -m semanticgen.train preencode`` and read by :class:`ShardDataset`, which memory-maps
them and reads one sample at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset

from semanticgen._files import save_safetensors_atomic

TENSOR_KEYS = ("latents", "sem_features", "text", "text_mask")
INDEX = "index.json"
NULL_TEXT = "null_text.safetensors"


class ShardWriter:
    """Accumulates encoded samples and writes a shard every ``shard_size`` samples, then ``index.json`` on close."""

    def __init__(self, out_dir: str | Path, *, shard_size: int = 256, encoders: dict | None = None) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.encoders = encoders or {}
        self._pending: dict[str, list[torch.Tensor]] = {k: [] for k in TENSOR_KEYS}
        self._pending_n = 0
        self.shards: list[dict[str, Any]] = []
        self.captions: list[str] = []
        self.shapes: dict[str, list[int]] | None = None

    def add(self, batch: dict[str, Any]) -> None:
        """Add an encoded batch (``latents``, ``sem_features``, ``text``, ``text_mask``, ``caption``)."""
        shapes = {k: list(batch[k].shape[1:]) for k in TENSOR_KEYS}
        if self.shapes is None:
            self.shapes = shapes
        elif shapes != self.shapes:
            raise ValueError(f"ShardWriter: every sample must have the same shapes; first {self.shapes}, now {shapes}")
        for k in TENSOR_KEYS:
            self._pending[k].extend(batch[k].detach().cpu().contiguous().unbind(0))
        self.captions.extend(batch["caption"])
        self._pending_n += len(batch["caption"])
        while self._pending_n >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        name = f"shard_{len(self.shards):05d}.safetensors"
        tensors = {k: torch.stack(self._pending[k][:n]) for k in TENSOR_KEYS}
        tensors["text_mask"] = tensors["text_mask"].to(torch.uint8)  # bool is stored as uint8 for portability
        save_safetensors_atomic(tensors, self.out_dir / name)
        for k in TENSOR_KEYS:
            del self._pending[k][:n]
        self._pending_n -= n
        self.shards.append({"file": name, "num_samples": n})

    def write_null_text(self, emb: torch.Tensor, mask: torch.Tensor) -> None:
        save_safetensors_atomic({"text": emb.cpu(), "text_mask": mask.cpu().to(torch.uint8)}, self.out_dir / NULL_TEXT)

    def close(self) -> Path:
        if self._pending_n:
            self._flush(self._pending_n)
        index = {
            "num_samples": sum(s["num_samples"] for s in self.shards),
            "shards": self.shards,
            "shapes": self.shapes,
            "encoders": self.encoders,
            "captions": self.captions,
        }
        tmp = self.out_dir / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.out_dir / INDEX)
        return self.out_dir / INDEX


class ShardDataset(Dataset):
    """Reads samples from a shard directory written by :class:`ShardWriter`.

    Items: ``latents``, ``sem_features``, ``text`` (float32), ``text_mask`` (bool), ``caption``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        index_path = self.root / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(
                f"ShardDataset: {index_path} not found; write shards with `python -m semanticgen.train preencode`"
            )
        self.index = json.loads(index_path.read_text())
        self.num_samples = int(self.index["num_samples"])
        if self.num_samples < 1:
            raise ValueError(f"ShardDataset: {self.root} holds no samples")
        self._starts: list[int] = []
        start = 0
        for s in self.index["shards"]:
            self._starts.append(start)
            start += int(s["num_samples"])
        self._handles: dict[int, Any] = {}

    @property
    def shapes(self) -> dict[str, list[int]]:
        return self.index["shapes"]

    @property
    def encoders(self) -> dict:
        return self.index.get("encoders", {})

    def __len__(self) -> int:
        return self.num_samples

    def _locate(self, index: int) -> tuple[int, int]:
        import bisect

        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"ShardDataset: index {index} out of range [0, {self.num_samples})")
        shard, offset = self._locate(index)
        handle = self._handles.get(shard)
        if handle is None:  # opened lazily, per process (data-loader workers each get their own)
            handle = safe_open(str(self.root / self.index["shards"][shard]["file"]), framework="pt")
            self._handles[shard] = handle
        item: dict[str, Any] = {k: handle.get_slice(k)[offset : offset + 1][0] for k in TENSOR_KEYS}
        item["text_mask"] = item["text_mask"].bool()
        item["caption"] = self.index["captions"][index]
        return item

    def __getstate__(self):  # file handles do not pickle into worker processes
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def null_text(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.root / NULL_TEXT
        if not path.is_file():
            return None
        t = load_file(str(path))
        return t["text"].float(), t["text_mask"].bool()
