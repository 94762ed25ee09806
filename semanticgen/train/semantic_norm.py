"""Measure the per-channel statistics stage 1 is normalised by (:class:`~semanticgen.models.SemanticNorm`).

Run once at the start of the semantic stage, with the frozen compressor from the latent stage, over the first
``norm_clips`` clips of the training data (the clips of the first epoch's order, each once). Every rank encodes its
slice; the sums are reduced over the world, so the statistics do not depend on the number of ranks (up to the
order of float64 additions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from semanticgen.data import MicroBatchStream
from semanticgen.models import SemanticNorm


@torch.no_grad()
def measure_semantic_norm(
    compressor: nn.Module,
    dataset: Any,
    features: Callable[[dict[str, Any]], torch.Tensor],
    *,
    clips: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
) -> SemanticNorm:
    """Mean and std per channel of ``compressor(features(batch), sample=False).mean`` over ``clips`` clips.

    Args:
        compressor: the frozen compressor (FSDP-sharded or not: every rank runs the same number of forwards).
        dataset: the training dataset (raw clips or pre-encoded shards).
        features: ``batch -> sem_features [B, Ts, Ss, in_dim]`` on ``device`` (encodes raw clips if needed).
        clips: how many clips to measure (at most the dataset's length).
        micro_batch_size, rank, world_size: how the clips are split over the ranks.
        seed: of the data order (the clips measured are the first ``clips`` of that order).
        device: where the compressor runs.

    Returns:
        The statistics over every token of the measured clips (population std, floored at 1e-6).
    """
    clips = min(int(clips), len(dataset))
    per_step = micro_batch_size * world_size
    stream = MicroBatchStream(dataset, seed=seed, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size)
    count = torch.zeros((), dtype=torch.float64, device=device)
    total = sumsq = None
    for _ in range(math.ceil(clips / per_step)):
        batch = next(stream)
        keep = (batch["sample_id"] < clips).to(device)  # the last step may run past the measured clips
        mean = compressor(features(batch), sample=False).mean.double()  # [B, Ts, Ss, dim]
        mean = mean[keep].flatten(0, -2)  # [tokens, dim]
        if total is None:
            total = torch.zeros(mean.shape[-1], dtype=torch.float64, device=device)
            sumsq = torch.zeros_like(total)
        count += mean.shape[0]
        total += mean.sum(0)
        sumsq += mean.square().sum(0)
    stats = torch.cat([count[None], total, sumsq])
    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(stats)
    n, dim = stats[0], (stats.numel() - 1) // 2
    mu = stats[1 : 1 + dim] / n
    var = (stats[1 + dim :] / n - mu.square()).clamp_min(0.0)
    return SemanticNorm(tuple(mu.tolist()), tuple(var.sqrt().clamp_min(1e-6).tolist()))
