"""Launch small ``torchrun`` training runs from tests and read their outputs."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"

# Small enough that a step takes tens of milliseconds on one CPU core.
SMALL = [
    "--set=data.micro_batch_size=2",
    "--set=data.num_samples=64",
    "--set=log.progress=false",
    "--set=latent.optim.warmup_steps=2",
    "--set=semantic.optim.warmup_steps=2",
    "--set=autoencoder.steps=3",  # when the config trains a learned VAE first
    "--set=autoencoder.warmup_steps=1",
    "--set=autoencoder.stats_clips=16",
]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone`` (picks a free port) running ``semanticgen.train``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "semanticgen.train",
        *args,
    ]


_SHARED_VAE: list[str] = []


def shared_vae_override() -> str:
    """``--set=encoders.vae.path=...`` of a learned VAE trained once per test session (the tiny config's, 3 steps).

    Runs of the tiny config use it instead of training their own: the comparisons between runs (rank counts,
    resume) are about the later stages, and the VAE's training depends on the rank count (per-rank batch
    statistics and noise), so each run training its own would compare different latents.
    """
    if not _SHARED_VAE:
        root = Path(tempfile.mkdtemp(prefix="semanticgen-test-vae-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        run_train(1, root / "run", "--steps=0", shared_vae=False)
        _SHARED_VAE.append(f"--set=encoders.vae.path={json.dumps(str(root / 'run' / 'vae.safetensors'))}")
    return _SHARED_VAE[0]


def run_train(
    nproc: int, run_dir: Path, *extra: str, config: Path = TINY, timeout: float = 240, shared_vae: bool = True
) -> None:
    """Run training to completion; fail the test with the output if it does not exit 0. Runs of the tiny config
    use the session's shared learned VAE (:func:`shared_vae_override`) unless ``shared_vae=False``."""
    if shared_vae and config == TINY:
        extra = (shared_vae_override(), *extra)
    cmd = torchrun_cmd(nproc, [str(config), "--run-dir", str(run_dir), *SMALL, *extra])
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        err = proc.stderr
        usage = "\n".join(line for line in err.splitlines() if "semanticgen.train: error:" in line)
        first = err.find("Traceback")  # the failing rank's own traceback, before torchrun's summary
        # A rank killed by a signal has no traceback of its own: what it printed last comes before torchrun's
        # (e.g. "terminate called without an active exception" for an abort at exit).
        before = "\n".join(err[: max(first, 0)].splitlines()[-30:]) if first > 0 else ""
        shown = usage + "\n" + before + "\n" + (err[first : first + 6000] if first >= 0 else err[-6000:])
        raise AssertionError(f"training failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{shown}")


def metrics(run_dir: Path, *, autoencoder: bool = False) -> list[dict]:
    """The records of ``metrics.jsonl``: the latent and semantic stages' (or only the learned VAE's)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if (r.get("stage") == "autoencoder") == autoencoder]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}
