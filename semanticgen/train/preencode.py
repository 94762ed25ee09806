"""Offline pre-encoding: run the frozen encoders once and cache their outputs as safetensors shards.

Usage::

    python -m semanticgen.train preencode CONFIG --out DIR [--shard-size 256] [--batch-size 8] [--set key=value ...]

reads ``[data]`` (``synthetic`` or ``video_folder``) and ``[encoders]`` of a training config, encodes every clip
once in dataset order and writes ``DIR`` (see :mod:`semanticgen.data.shards`). Train on it with
``--set data.kind=shards --set data.path=DIR``. Unreadable videos are skipped (logged and counted) as in training.
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from semanticgen._checks import check_int
from semanticgen.data import build_dataset
from semanticgen.data.encode import Encoders
from semanticgen.data.loader import collate
from semanticgen.data.shards import ShardWriter
from semanticgen.errors import UsageError, run_command

from .config import ConfigSources, TrainConfig
from .loop import check_encoder_checkpoints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m semanticgen.train preencode", description=__doc__.split("\n")[0])
    p.add_argument("config", help="training config (.toml/.yaml) whose [data] and [encoders] are used")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard file")
    p.add_argument("--batch-size", type=int, default=8, help="clips encoded at once")
    p.add_argument("--num-workers", type=int, default=0, help="decoding worker processes")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m semanticgen.train preencode``; a user mistake (a config that cannot work, a
    config that is already shards) is one ``error:`` line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: _preencode_config(args))


def _preencode_config(args: argparse.Namespace) -> int:
    """Read the config, check the checkpoints its encoders point at (naming the file or the ``--set`` at fault, as
    training does), then :func:`preencode`."""
    sources = ConfigSources.read(args.config, args.set)
    cfg = sources.load()
    check_encoder_checkpoints(cfg, sources)  # none for shards, which preencode refuses with its own message
    return preencode(cfg, args)


def preencode(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """Encode every clip of ``cfg.data`` with ``cfg.encoders`` into shards under ``args.out``."""
    check_int("--shard-size", args.shard_size, minimum=1, error=UsageError)
    check_int("--batch-size", args.batch_size, minimum=1, error=UsageError)
    check_int("--num-workers", args.num_workers, minimum=0, error=UsageError)
    if cfg.data.kind == "shards":
        raise UsageError("data.kind is already 'shards'; point the config at raw videos or synthetic data")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = build_dataset(cfg.data, seed=cfg.seed)
    encoders = Encoders.from_specs(cfg.encoders).to(device)
    writer = ShardWriter(args.out, shard_size=args.shard_size, encoders=cfg.encoders)
    writer.write_null_text(*encoders.null_text(device))
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers)
    skipped = 0
    seen: set[str] = set()
    for batch in tqdm(loader, desc="pre-encoding", unit="batch", disable=args.no_progress):
        skipped += int(batch.get("skipped", 0))
        if "path" in batch:
            # An unreadable video's slot is filled by the next readable one: keep each video once.
            keep = [i for i, p in enumerate(batch["path"]) if p not in seen and not seen.add(p)]
            if not keep:
                continue
            batch = {
                k: (v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep] if isinstance(v, list) else v)
                for k, v in batch.items()
            }
        encoded = encoders.encode_batch(batch, device)
        encoded["caption"] = batch["caption"]
        writer.add(encoded)
    index = writer.close()
    logging.getLogger(__name__).info(
        "wrote %d samples in %d shards to %s (%d unreadable videos skipped)",
        sum(s["num_samples"] for s in writer.shards),
        len(writer.shards),
        index.parent,
        skipped,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
