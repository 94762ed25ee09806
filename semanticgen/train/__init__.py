"""FSDP2 training of both SemanticGen stages under ``torchrun``.

Usage::

    python -m semanticgen.train CONFIG [--run-dir DIR] [--steps N] [--save-every N] [--resume [PATH]] [--set k=v ...]
    torchrun --standalone --nproc_per_node=2 -m semanticgen.train configs/tiny.toml --run-dir runs/tiny
    torchrun --standalone --nproc_per_node=4 -m semanticgen.train configs/tiny_long.toml --context-parallel 2
    python -m semanticgen.train export RUN_DIR [--out FILE]          # consolidated safetensors for inference
    python -m semanticgen.train preencode CONFIG --out DIR [...]     # cache encoder outputs as shards

Multi-node: plain ``torchrun`` rendezvous (``--nnodes``, ``--rdzv_backend=c10d``, ``--rdzv_endpoint=HOST:PORT``) on
every node; nothing else is needed.
"""

from __future__ import annotations

import argparse
import logging
import os

from semanticgen._checks import check_int
from semanticgen.errors import UsageError, run_command

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m semanticgen.train",
        description="Train SemanticGen stages with FSDP2 (launch with torchrun for several processes). "
        "Subcommands: 'export RUN_DIR [--out FILE]', 'preencode CONFIG --out DIR'.",
    )
    p.add_argument("config", help="training config file (.toml, .yaml)")
    p.add_argument("--run-dir", default=None, help="checkpoints and metrics.jsonl go here (default: config run_dir)")
    p.add_argument("--steps", type=int, default=None, help="stop after global step N (a checkpoint is saved there)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (checkpoint.save_every)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="resume from the newest complete checkpoint of the run dir, or from PATH",
    )
    p.add_argument(
        "--context-parallel",
        dest="context_parallel",
        type=int,
        default=None,
        metavar="C",
        help="ranks sharing one clip in the latent stage (parallel.context_parallel; must divide the world size)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (TOML value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m semanticgen.train`` and ``semanticgen train``; returns the exit code."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        from .export import main as export_main

        return export_main(argv[1:])
    if argv and argv[0] == "preencode":
        from .preencode import main as preencode_main

        return preencode_main(argv[1:])

    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s"
    )
    # Configuration, launch and run-directory mistakes (UsageError): one line naming the problem, not a traceback
    # from every rank. They are the same on every rank (config, data shapes, world size), so rank 0 alone says it.
    return run_command("semanticgen.train", lambda: _train(args), report=rank == 0)


def _train(args: argparse.Namespace) -> int:
    from .config import ConfigSources

    # The flags' own checks first, so an error names the flag rather than the config key it sets.
    for flag, value, minimum in (
        ("--steps", args.steps, 0),
        ("--save-every", args.save_every, 1),
        ("--context-parallel", args.context_parallel, 1),
    ):
        if value is not None:
            check_int(flag, value, minimum=minimum, error=UsageError)
    overrides = list(args.set)
    if args.save_every is not None:
        overrides.append(f"checkpoint.save_every={args.save_every}")
    if args.no_progress:
        overrides.append("log.progress=false")
    if args.context_parallel is not None:
        overrides.append(f"parallel.context_parallel={args.context_parallel}")
    sources = ConfigSources.read(args.config, overrides)
    cfg = sources.load()  # a UsageError naming the file or the --set at fault
    if args.run_dir is not None:
        cfg.run_dir = args.run_dir

    from .distributed import shutdown_distributed
    from .loop import train

    try:
        return train(cfg, run_dir=cfg.run_dir, stop_step=args.steps, resume=args.resume, sources=sources)
    finally:
        shutdown_distributed()
