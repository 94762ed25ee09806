"""Learning-rate schedule and gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch

from semanticgen.train.config import OptimConfig
from semanticgen.train.optim import build_optimizer, build_scheduler, clip_grad_norm, lr_factor


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, 14, cfg) for s in range(15)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    const = OptimConfig(warmup_steps=2, schedule="constant")
    assert [lr_factor(s, 10, const) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    cfg = OptimConfig(lr=2.0, warmup_steps=2)
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, 10, cfg)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1.0, 2.0, 2.0])


def test_no_decay_on_vectors():
    w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer([w, b], OptimConfig(weight_decay=0.5))
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(w)] == 0.5 and decays[id(b)] == 0.0
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([torch.nn.Parameter(torch.ones(1), requires_grad=False)], OptimConfig())


def test_clip_matches_torch_on_plain_tensors():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    grads = [torch.randn_like(p) * 3 for p in params]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, r, g in zip(params, ref, grads):
        p.grad, r.grad = g.clone(), g.clone()
    norm = clip_grad_norm(params, 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert norm == pytest.approx(float(ref_norm), rel=1e-6)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-7)
    # max_norm <= 0: the norm is reported, gradients untouched.
    before = [p.grad.clone() for p in params]
    assert clip_grad_norm(params, 0.0) == pytest.approx(1.0, rel=1e-5)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)
