"""``python -m semanticgen.train export RUN_DIR [--out FILE]``, and gathering a sharded stage's weights for export.

The command writes ``FILE`` (default ``RUN_DIR/model.safetensors``), the consolidated export of every model the run
trained; the format, and reading it, live in :mod:`semanticgen.exports`, which needs no training code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from semanticgen.errors import run_command
from semanticgen.exports import export_run


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded float32 CPU state dict of a (possibly FSDP2-sharded) module; a collective, call on every rank.
    Only rank 0 gets the tensors (others get an empty dict)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(module, options=opts)
        if dist.get_rank() != 0:
            return {}
    else:
        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m semanticgen.train export", description="Consolidate a run's weights.")
    p.add_argument("run_dir", help="training run directory")
    p.add_argument("--out", default=None, help="output .safetensors (default RUN_DIR/model.safetensors)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m semanticgen.train export``; a user mistake (a run directory that is not one)
    is one ``error:`` line and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: _export(args.run_dir, args.out))


def _export(run_dir: str, out: str | None) -> int:
    path: Path = export_run(run_dir, out)
    print(f"wrote {path}")
    return 0
