"""AdamW, warm-up + cosine learning-rate schedule and gradient clipping on sharded (DTensor) gradients."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .config import OptimConfig


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm gains and biases are not decayed)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based count of steps already taken).

    Linear warm-up over ``warmup_steps`` from ``1/warmup_steps`` to 1, then cosine decay to ``min_lr_ratio`` at
    ``total_steps`` (or constant).
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global L2 norm of all gradients to ``max_norm`` (if > 0) and return the norm before clipping.

    FSDP2 gradients are DTensors sharded over the mesh: the per-shard sums of squares are reduced across ranks
    (``full_tensor``) so every rank sees the same global norm and applies the same scale.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded_sq = local_sq = None
    for g in grads:
        sq = g.detach().float().pow(2).sum()
        if isinstance(sq, DTensor):
            sharded_sq = sq if sharded_sq is None else sharded_sq + sq
        else:
            local_sq = sq if local_sq is None else local_sq + sq
    total_sq = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    if sharded_sq is not None:
        total_sq = total_sq + sharded_sq.full_tensor()
    if local_sq is not None:
        total_sq = total_sq + local_sq
    total = total_sq.sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(float(scale))
    return float(total)
