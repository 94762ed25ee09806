"""Generate a video from a trained run, in one process or with stage 2 split over ranks (context parallelism).

Usage::

    python -m semanticgen.generate --checkpoint RUN_DIR --prompt "a red square moving right" --out demo.mp4
    torchrun --standalone --nproc_per_node=C -m semanticgen.generate --checkpoint RUN_DIR --prompt ... \\
        --out demo.mp4 --latents-out latents.safetensors

Under ``torchrun`` the ``C`` ranks form one context-parallel group: every rank loads the models and runs stage 1
with the same seed (the augmented semantic tokens are then broadcast from rank 0), stage 2 runs each rank's windows
and gathers the velocity every step (:class:`~semanticgen.pipeline.SemanticGenPipeline`), and rank 0 decodes and
writes the mp4 (and ``--latents-out``). The latent generator must use ``attention = "swin"`` and the clip have at
least ``C`` unshifted windows. ``--latents-out`` holds the final latents ``[1, C, T, H, W]`` (float32, key
``latents``), so runs on different numbers of ranks can be compared exactly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from semanticgen._files import save_safetensors_atomic
from semanticgen.errors import UsageError, run_command


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _guidance(text: str) -> float:
    # Guidance below 1 extrapolates away from the prompt; below 0 it is a sign error, not a setting.
    value = float(text)
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite guidance scale >= 0 (1 = no guidance), got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``python -m semanticgen.generate`` (and of ``semanticgen generate``)."""
    p.add_argument("--checkpoint", required=True, help="run directory written by `semanticgen train`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", default="demo.mp4", help="output mp4 (default: %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=20, help="Euler steps per stage (default: %(default)s)")
    p.add_argument("--guidance", type=_guidance, default=3.0, help="classifier-free guidance (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=_positive_float, help="frame rate of the mp4 (default: the run's VAE-stream fps)")
    p.add_argument(
        "--latents-out",
        dest="latents_out",
        metavar="FILE.safetensors",
        help="also save the final latents (float32, key 'latents'), written atomically by rank 0",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(
        argparse.ArgumentParser(
            prog="python -m semanticgen.generate",
            description="Generate a video from a trained run; under torchrun, stage 2 is split over the ranks "
            "(context parallelism).",
        )
    )


def save_latents(latents, path: str | Path, meta: dict) -> Path:
    """Write ``{"latents": float32 CPU tensor}`` with ``meta`` (JSON under the ``semanticgen`` key) atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"--latents-out must end in .safetensors, got {path.name!r}")
    return save_safetensors_atomic({"latents": latents.detach().float().cpu()}, path, meta)


def generate(args: argparse.Namespace) -> int:
    """Run generation for parsed ``args`` (see :func:`add_arguments`); returns the exit code.

    Raises:
        UsageError: bad arguments, a run directory that is not one, or a model that cannot be split over the ranks.
    """
    import torch
    import torch.distributed as dist

    from semanticgen.parallel import ContextGroup
    from semanticgen.runs import build_pipeline_from_run, run_video_fps
    from semanticgen.threads import configure_threads

    # As training and eval do: on a small shared CPU a full-width OpenMP team waits for every core each op (a tiny
    # clip took 21 s with 2 threads on 2 busy CPUs, 0.4 s with 1). OMP_NUM_THREADS, when set, wins.
    configure_threads()

    run_dir = Path(args.checkpoint)
    if not run_dir.exists():
        raise UsageError(f"--checkpoint: no such run directory or file: {run_dir}")
    if args.latents_out is not None and not str(args.latents_out).endswith(".safetensors"):
        raise UsageError(f"--latents-out must end in .safetensors, got {args.latents_out!r}")
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    started = False
    if distributed and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        started = True
    try:
        cp = ContextGroup.from_group() if distributed else None
        rank = cp.rank if cp is not None else 0
        pipeline = build_pipeline_from_run(run_dir, device=device, context_parallel=cp)
        fps = args.fps if args.fps is not None else run_video_fps(run_dir)
        frames, extra = pipeline(
            [args.prompt],
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            progress=rank == 0,
            return_intermediates=True,
            decode=rank == 0,
        )
        if rank == 0:
            from semanticgen.video import save_video

            size = 1 if cp is None else cp.size
            if args.latents_out is not None:
                meta = {"prompt": args.prompt, "seed": args.seed, "steps": args.steps, "guidance": args.guidance}
                path = save_latents(extra["latents"], args.latents_out, dict(meta, context_parallel=size))
                print(f"wrote {path} (latents {list(extra['latents'].shape)})")
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            save_video(frames[0], out, fps=fps)
            print(
                f"wrote {out} ({frames.shape[1]} frames, {frames.shape[-1]}x{frames.shape[-2]}, {fps:g} fps; "
                f"stage 2 over {size} rank{'s' if size > 1 else ''})"
            )
        if cp is not None:
            dist.barrier()  # the other ranks leave once the files are written
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The same mistake on every rank: rank 0 names it in one line.
    return run_command("semanticgen generate", lambda: generate(args), report=int(os.environ.get("RANK", "0")) == 0)


if __name__ == "__main__":
    sys.exit(main())
