"""Read a training run directory: its trained models, its metadata and the two-stage pipeline built from them.

What a user of a finished run needs (``semanticgen generate``, ``python -m semanticgen.generate``, ``semanticgen
eval``). It reads through :mod:`semanticgen.exports` (the export format) and :mod:`semanticgen.checkpoint_layout`
(finding complete checkpoints), and imports nothing from :mod:`semanticgen.train`, which writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from semanticgen.checkpoint_layout import latest_checkpoint
from semanticgen.errors import UsageError
from semanticgen.exports import collect_run_weights, models_from_meta, read_export, read_export_meta
from semanticgen.models import SemanticNorm


def load_run_models(run_dir: str | Path) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Trained models of a run (``RUN_DIR/model.safetensors`` if present, else consolidated from the stage exports
    and newest checkpoints), in eval mode, and the export metadata."""
    path = Path(run_dir)
    if path.is_file():
        tensors, meta = read_export(path)
    elif (path / "model.safetensors").is_file():
        tensors, meta = read_export(path / "model.safetensors")
    else:
        tensors, meta = collect_run_weights(path)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        models = models_from_meta(meta)
    for name, model in models.items():
        prefix = name + "."
        sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        model.load_state_dict(sd, assign=True)  # strict: every parameter must come from the file
        model.eval().requires_grad_(False)
    return models, meta


def build_pipeline_from_run(
    run_dir: str | Path,
    *,
    device: torch.device | str | None = None,
    noise_level: float | None = None,
    context_parallel=None,
):
    """A :class:`~semanticgen.pipeline.SemanticGenPipeline` from a run directory (or its ``model.safetensors``).

    Needs both stages trained (``stage = "both"``, or ``latent`` then ``semantic`` into the same run directory), or
    a one-stage text-to-latent run (``latent.semantic_tokens = false``), whose pipeline has no semantic generator.
    The VAE and text encoder are rebuilt from the run's ``[encoders]`` config; ``noise_level`` defaults to the latent
    stage's ``sem_noise_level`` (the augmentation the latent generator was trained with). Each stage samples with the
    ``timestep_shift`` it was trained with, and stage 1's samples are de-normalised with the run's
    ``semantic_norm`` statistics (runs trained with ``semantic.normalize_tokens``).
    """
    from semanticgen.encoders import build_text_encoder, build_vae, run_vae_spec
    from semanticgen.pipeline import SemanticGenPipeline

    models, meta = load_run_models(run_dir)
    cfg = meta["config"]
    # latent.semantic_tokens = false: the one-stage text-to-latent baseline, which has no semantic stage.
    one_stage = not cfg["latent"].get("semantic_tokens", True)
    needed = ("latent_generator",) if one_stage else ("semantic_generator", "latent_generator")
    missing = [n for n in needed if n not in models]
    if missing:
        raise UsageError(f"{run_dir}: the run has no trained {' or '.join(missing)}; train both stages first")
    shapes = meta.get("shapes") or {}
    if "latents" not in shapes or "semantic" not in shapes:
        raise ValueError(f"{run_dir}: export metadata lacks sample shapes")
    sem_shape = tuple(shapes["semantic"])
    if one_stage:
        sem_shape = (0, *sem_shape[1:])
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    vae = build_vae(run_vae_spec(cfg["encoders"]["vae"], run_dir))  # a learned VAE: the run's vae.safetensors
    text = build_text_encoder(cfg["encoders"]["text"])
    for enc in (vae, text):
        if isinstance(enc, nn.Module):
            enc.to(device)
    if noise_level is None:
        noise_level = float(cfg["latent"]["sem_noise_level"])
    norm = meta.get("semantic_norm")
    return SemanticGenPipeline(
        None if one_stage else models["semantic_generator"].to(device),
        models["latent_generator"].to(device),
        text,
        vae,
        sem_shape=sem_shape,
        latent_shape=tuple(shapes["latents"]),
        noise_level=noise_level,
        # Sample each stage with the timestep shift it was trained with (flow times drawn in training were shifted).
        sem_shift=float(cfg["semantic"]["timestep_shift"]),
        latent_shift=float(cfg["latent"]["timestep_shift"]),
        sem_norm=SemanticNorm.from_dict(norm) if norm is not None else None,
        context_parallel=context_parallel,
    )


def run_video_fps(run_dir: str | Path) -> float:
    """Frame rate of the VAE stream the run was trained on (``data.vae_fps``): the rate to save its videos at."""
    return float(run_meta(run_dir)["config"]["data"]["vae_fps"])


def run_meta(run_dir: str | Path) -> dict[str, Any]:
    """Metadata (config, model configs, shapes) of a run directory or export file, without loading weights."""
    path = Path(run_dir)
    for candidate in (path, path / "model.safetensors", path / "semantic.safetensors", path / "latent.safetensors"):
        if candidate.is_file():
            return read_export_meta(candidate)
    ckpt = latest_checkpoint(path / "checkpoints")
    if ckpt is None:
        raise UsageError(f"{run_dir}: no export and no complete checkpoint")
    return ckpt.meta
