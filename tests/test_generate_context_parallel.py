"""Sampling with stage 2 split over 2 ranks (torchrun, gloo) gives the latents of one process."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_helpers import REPO, child_env
from safetensors import safe_open

from semanticgen.data import Encoders
from semanticgen.exports import model_configs, write_safetensors
from semanticgen.train.config import load_config
from semanticgen.train.stages import DataWidths, build_models

pytestmark = [pytest.mark.distributed]

LONG = REPO / "configs" / "tiny_long.toml"
# tiny_long's clip: latents [C, T, H, W] = [4, 9, 8, 8] (5 unshifted windows of 2 latent frames); z_sem
# [Ts, Ss, dim]: 4 frames of 4 tokens of the compressor's width 4.
SHAPES = {"latents": [4, 9, 8, 8], "semantic": [4, 4, 4], "text": [12, 32]}


def _fake_run(root: Path, **latent_overrides) -> Path:
    """A run directory whose ``model.safetensors`` holds random, non-trivial weights of tiny_long's models (the
    zero-initialised output layers would make every velocity 0 and any two runs trivially equal)."""
    cfg = load_config(LONG)
    widths = DataWidths.from_encoders(Encoders.from_specs(cfg.encoders))
    cfg.model["latent_generator"].update(latent_overrides)
    torch.manual_seed(0)
    models = build_models(cfg.model, widths)
    tensors = {}
    for name, model in models.items():
        for key, p in model.named_parameters():
            value = torch.randn_like(p) * 0.2 + (1.0 if "norm" in key and key.endswith("weight") else 0.0)
            tensors[f"{name}.{key}"] = value
    meta = {"config": dataclasses.asdict(cfg), "model_configs": model_configs(models), "shapes": SHAPES}
    write_safetensors(tensors, meta, root / "model.safetensors")
    return root


def _generate(nproc: int, run: Path, out: Path, *extra: str, module: tuple[str, ...] = ("semanticgen.generate",)):
    """``python -m semanticgen.generate`` (or ``module``, e.g. the CLI's ``generate``) on ``nproc`` ranks."""
    args = [
        "-m",
        *module,
        "--checkpoint",
        str(run),
        "--prompt",
        "a red square moving right",
        "--steps",
        "3",
        "--guidance",
        "2.0",
        "--seed",
        "5",
        "--out",
        str(out / "demo.mp4"),
        "--latents-out",
        str(out / "latents.safetensors"),
        *extra,
    ]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run(
        [sys.executable, *launcher, *args], env=child_env(), capture_output=True, text=True, timeout=240, cwd=REPO
    )


def _latents(path: Path) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("latents")


def test_cp2_latents_equal_one_process(tmp_path):
    run = _fake_run(tmp_path / "run")
    one, two = tmp_path / "one", tmp_path / "two"
    for nproc, out in ((1, one), (2, two)):
        proc = _generate(nproc, run, out)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert (out / "demo.mp4").stat().st_size > 0
    assert "stage 2 over 2 ranks" in proc.stdout  # the last run: torchrun, 2 ranks
    a, b = _latents(one / "latents.safetensors"), _latents(two / "latents.safetensors")
    assert a.shape == b.shape == (1, *SHAPES["latents"]) and a.dtype == torch.float32
    assert float((a - b).abs().max()) <= 1e-5
    assert not list(two.glob("*.tmp")), "a temporary file was left behind"
    # `semanticgen generate` under torchrun takes the same path.
    cli = tmp_path / "cli"
    proc = _generate(2, run, cli, module=("semanticgen.cli", "generate"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert float((_latents(cli / "latents.safetensors") - a).abs().max()) <= 1e-5


def test_cp_sampling_refuses_full_attention(tmp_path):
    """A latent generator with full attention cannot be split: one error line from rank 0, exit 2, no files."""
    run = _fake_run(tmp_path / "run", attention="full")
    out = tmp_path / "out"
    proc = _generate(2, run, out)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "semanticgen generate: error:" in line]
    assert len(lines) == 1 and "attention='swin'" in lines[0], proc.stderr[-3000:]
    assert not out.exists()


def test_pipeline_refuses_what_it_cannot_split():
    """Checked at construction, before any sampling (no process group needed): a ContextGroup of 2 with a
    full-attention latent generator, or with a clip of one window, is refused naming the reason."""
    from semanticgen.encoders import HashTextEncoder, PixelVAE
    from semanticgen.models import LatentGenerator, SemanticGenerator
    from semanticgen.parallel import ContextGroup
    from semanticgen.pipeline import SemanticGenPipeline

    sem = SemanticGenerator(SemanticGenerator.Config.tiny())
    parts = (HashTextEncoder(dim=16, max_len=8), PixelVAE(temporal_factor=4, spatial_factor=4))
    shapes = {"sem_shape": (2, 4, 4), "latent_shape": (4, 4, 4, 4)}  # 4 latent frames: windows of 2 frames
    full = LatentGenerator(LatentGenerator.Config.tiny())
    cp = ContextGroup(0, 2)
    with pytest.raises(ValueError, match="attention='swin'"):
        SemanticGenPipeline(sem, full, *parts, **shapes, context_parallel=cp)
    swin = LatentGenerator(dataclasses.replace(LatentGenerator.Config.tiny(), attention="swin", window=2))
    SemanticGenPipeline(sem, swin, *parts, **shapes, context_parallel=cp)  # 2 windows for 2 ranks: fine
    with pytest.raises(ValueError, match="at least 3 unshifted windows per clip; this clip has 2"):
        SemanticGenPipeline(sem, swin, *parts, **shapes, context_parallel=ContextGroup(0, 3))
    with pytest.raises(TypeError, match="ContextGroup"):
        SemanticGenPipeline(sem, swin, *parts, **shapes, context_parallel=2)
    assert SemanticGenPipeline(sem, full, *parts, **shapes, context_parallel=ContextGroup(0, 1)).cp is None
