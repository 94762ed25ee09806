"""The learned VAE as a run's first stage: train it on the run's raw clips, measure its latents, write it.

With ``[encoders.vae] kind = "learned"`` and no ``path``, :func:`~semanticgen.train.loop.train` trains a
:class:`~semanticgen.encoders.learned_vae.LearnedVideoAE` here before the latent stage, data parallel over the
process group (DDP: the AE is a few hundred thousand parameters, so every rank keeps a whole replica and only the
gradients are averaged), and writes ``RUN_DIR/vae.safetensors``; the later stages and inference encode and decode
with that file (:func:`run_vae_spec`). A run that finds the file does not train it again.

Its metrics go to ``RUN_DIR/metrics.jsonl`` with ``stage = "autoencoder"`` and ``step`` counting up to 0
(``autoencoder_step - autoencoder.steps``), so they come before global step 1 and are kept when a later stage
resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from semanticgen.data import Encoders, MicroBatchStream
from semanticgen.encoders import build_semantic_encoder, build_text_encoder, build_vae
from semanticgen.encoders.learned_vae import VAE_FILE, LearnedVAEConfig, LearnedVideoAE, run_vae_spec
from semanticgen.errors import UsageError

from .config import AutoencoderConfig, OptimConfig, TrainConfig
from .distributed import DistInfo, all_reduce_mean, barrier
from .metrics import MetricsWriter, Progress, peak_memory_mb
from .optim import build_optimizer, build_scheduler, clip_grad_norm

__all__ = [
    "VAE_FILE",
    "run_vae_spec",
    "needs_autoencoder",
    "run_encoders",
    "untrained_vae",
    "train_autoencoder",
    "latent_stats",
    "train_run_autoencoder",
]

logger = logging.getLogger(__name__)


def needs_autoencoder(vae_spec: Mapping[str, Any] | None, run_dir: str | Path) -> bool:
    """True when ``vae_spec`` is a learned VAE that this run trains itself and ``RUN_DIR/vae.safetensors`` is
    not there yet (a ``path`` in the table points at a VAE trained elsewhere: nothing to train)."""
    if not isinstance(vae_spec, Mapping) or vae_spec.get("kind") != "learned" or vae_spec.get("path"):
        return False
    return not (Path(run_dir) / VAE_FILE).is_file()


def untrained_vae(vae_spec: Mapping[str, Any]) -> LearnedVideoAE:
    """A freshly initialised AE with the architecture of a ``kind = "learned"`` ``[encoders.vae]`` table."""
    keys = {k: v for k, v in vae_spec.items() if k not in ("kind", "path")}
    allowed = [f.name for f in dataclasses.fields(LearnedVAEConfig)]
    unknown = sorted(set(keys) - set(allowed))
    if unknown:
        raise UsageError(f"build_vae: unknown key(s) {unknown} for kind 'learned'; allowed keys: {['path', *allowed]}")
    return LearnedVideoAE(LearnedVAEConfig(**keys))


def run_encoders(specs: Mapping[str, Mapping[str, Any]], run_dir: str | Path) -> tuple[Encoders, bool]:
    """The run's encoders from its ``[encoders]`` tables, a learned VAE read from ``RUN_DIR/vae.safetensors``.

    Returns ``(encoders, pending)``: ``pending`` is True when that file is still to be trained; the VAE is then an
    untrained stand-in with the configured shape (its channels and frame counts are all the checks need).
    """
    vae_spec = specs.get("vae")
    if not needs_autoencoder(vae_spec, run_dir):
        resolved = dict(specs)
        if vae_spec is not None:
            resolved["vae"] = run_vae_spec(vae_spec, run_dir)
        return Encoders.from_specs(resolved), False
    missing = [k for k in ("semantic", "text") if k not in specs]
    if missing:
        raise UsageError(
            f"encoders: missing table(s) {missing}; expected [encoders.vae], [encoders.semantic], [encoders.text]"
        )
    stand_in = untrained_vae(vae_spec)
    return Encoders(stand_in, build_semantic_encoder(specs["semantic"]), build_text_encoder(specs["text"])), True


class _Objective(nn.Module):
    """Reconstruction MSE of the AE with noisy latents, plus the L2 penalty on the latents' learned part.

    The wrapper DDP holds, so that one ``forward`` covers everything with gradients.
    """

    def __init__(self, ae: LearnedVideoAE, settings: AutoencoderConfig) -> None:
        super().__init__()
        self.ae = ae
        self.latent_noise = settings.latent_noise
        self.residual_weight = settings.residual_weight

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, residual = self.ae.encode_parts(video)
        if self.latent_noise > 0:
            # Relative to each channel's spread, so the noise means the same whatever scale the latents settle at.
            scale = z.detach().std(dim=(0, 2, 3, 4), keepdim=True)
            z = z + self.latent_noise * scale * torch.randn_like(z)
        recon = self.ae.decode_raw(z)
        mse = (recon - video.to(recon.dtype)).square().mean()
        penalty = residual.square().mean()
        return mse + self.residual_weight * penalty, {"mse": mse.detach(), "residual": penalty.detach()}


def train_autoencoder(
    ae: LearnedVideoAE,
    dataset,
    settings: AutoencoderConfig,
    *,
    device: torch.device,
    seed: int = 0,
    metrics: MetricsWriter | None = None,
    progress: bool = False,
    num_workers: int = 0,
) -> list[float]:
    """Train ``ae`` in place for ``settings.steps`` steps on the ``vae_video`` clips of ``dataset``.

    Data parallel over the default process group when one with several ranks is initialised: each rank reads its
    own ``settings.batch`` clips of every step (:class:`~semanticgen.data.MicroBatchStream`) and DDP averages the
    gradients, so every rank ends with the same weights (start from the same ones: DDP copies rank 0's). Returns
    the reconstruction MSE of each step, averaged over the ranks.
    """
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    ae.to(device).train().requires_grad_(True)
    objective: nn.Module = _Objective(ae, settings)
    if distributed:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device] if device.type == "cuda" else None
        )
    params = [p for p in ae.parameters() if p.requires_grad]
    optim = OptimConfig(lr=settings.lr, weight_decay=0.0, warmup_steps=settings.warmup_steps)
    optimizer = build_optimizer(params, optim)
    scheduler = build_scheduler(optimizer, settings.steps, optim)
    stream = MicroBatchStream(
        dataset, seed=seed + 29, micro_batch_size=settings.batch, rank=rank, world_size=world, num_workers=num_workers
    )
    torch.manual_seed(seed * 1000 + rank + 7)  # per-rank latent noise
    bar = Progress(progress and rank == 0, total=settings.steps, initial=0, desc="autoencoder")
    history = []
    for step in range(1, settings.steps + 1):
        t0 = time.perf_counter()
        video = next(stream)["vae_video"].to(device)
        loss, parts = objective(video)
        loss.backward()
        grad_norm = clip_grad_norm(params, settings.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        means = all_reduce_mean({"loss": loss.detach(), **parts}, device)
        history.append(means["mse"])
        elapsed = time.perf_counter() - t0
        record = {
            "step": step - settings.steps,
            "stage": "autoencoder",
            "autoencoder_step": step,
            **means,
            "psnr": -10.0 * math.log10(max(means["mse"], 1e-12)),
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": settings.batch * world / elapsed,
            "step_time_s": elapsed,
            "peak_memory_mb": peak_memory_mb(device),
        }
        if metrics is not None:
            metrics.write(record)
        bar.update({"mse": f"{means['mse']:.5f}", "psnr": f"{record['psnr']:.1f}"})
    bar.close()
    ae.eval().requires_grad_(False)
    return history


@torch.no_grad()
def latent_stats(
    ae: LearnedVideoAE, dataset, *, device: torch.device, max_clips: int, batch: int = 16
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``ae``'s unnormalised latents over the first ``max_clips`` clips of
    ``dataset``, each rank encoding every ``world``-th clip; the sums are reduced in float64 over the ranks."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    c = ae.latent_channels
    sums = torch.zeros(3, c, dtype=torch.float64, device=device)  # count, sum, sum of squares
    indices = list(range(rank, min(len(dataset), max_clips), world))
    for start in range(0, len(indices), batch):
        video = torch.stack([dataset[i]["vae_video"] for i in indices[start : start + batch]]).to(device)
        z = ae.encode_parts(video)[0].double().transpose(0, 1).reshape(c, -1)
        sums += torch.stack(
            [torch.full((c,), z.shape[1], dtype=torch.float64, device=device), z.sum(1), z.square().sum(1)]
        )
    if distributed:
        dist.all_reduce(sums)
    count, total, squares = sums
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def train_run_autoencoder(cfg: TrainConfig, run_dir: str | Path, dataset, info: DistInfo) -> LearnedVideoAE:
    """Train the run's learned VAE (``cfg.autoencoder``), write ``RUN_DIR/vae.safetensors`` from rank 0 and
    return it as read back from that file, on ``info.device`` (every rank): the same weights inference loads."""
    run_dir = Path(run_dir)
    vae_spec = cfg.encoders["vae"]
    torch.manual_seed(cfg.seed)
    ae = untrained_vae(vae_spec)
    settings = cfg.autoencoder
    # Only a run with no trained stage trains its AE (train() refuses the others), so any earlier line in the
    # metrics file is from an interrupted attempt: start the file afresh.
    metrics = MetricsWriter(run_dir / "metrics.jsonl", info.is_main, resume_step=-1)
    t0 = time.perf_counter()
    try:
        history = train_autoencoder(
            ae,
            dataset,
            settings,
            device=info.device,
            seed=cfg.seed,
            metrics=metrics,
            progress=cfg.log.progress,
            num_workers=cfg.data.num_workers,
        )
    finally:
        metrics.close()
    train_s = time.perf_counter() - t0
    mean, std = latent_stats(ae, dataset, device=info.device, max_clips=settings.stats_clips)
    ae.set_latent_stats(mean, std)
    path = run_dir / VAE_FILE
    if info.is_main:
        meta = {"autoencoder": dataclasses.asdict(settings), "final_mse": history[-1], "train_seconds": train_s}
        ae.save(path, meta)
        logger.info(
            "autoencoder: %d steps in %.1f s, final MSE %.5f (PSNR %.1f dB); wrote %s",
            settings.steps,
            train_s,
            history[-1],
            -10 * math.log10(max(history[-1], 1e-12)),
            path,
        )
    barrier()
    return build_vae(run_vae_spec(vae_spec, run_dir)).to(info.device)
