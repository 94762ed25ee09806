"""The halo exchange overlapped with the interior windows: the split's maths, and on 2 gloo ranks the same
outputs, gradients and bytes as the blocking exchange."""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semanticgen.models import LatentGenerator, patchify
from semanticgen.ops import WindowLayout
from semanticgen.parallel import COMM_COUNTER, ContextGroup, ContextPlan
from semanticgen.parallel import overlap as overlap_module

LAYOUTS = {
    "even Tw": (16, 3, 4, 2, 4),
    "odd Tw": (15, 2, 5, 3, 3),
    "Ts=0": (12, 3, 0, 0, 2),
    "Ts not dividing Tv, ragged end": (13, 2, 3, 2, 4),
    "Ts > Tv": (8, 2, 11, 1, 2),
    "Tw=1 (nothing moves)": (6, 2, 2, 1, 1),
}


@pytest.mark.parametrize("dims", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_halo_split_separates_the_windows_that_need_the_moved_block(dims):
    """For every rank count: interior and boundary are runs of whole windows that together are the rank's tokens;
    the boundary holds every token that arrives at this parity and the interior none."""
    layout = WindowLayout(*dims, order="blocked")
    for size in range(1, layout.num_windows(False) + 1):
        plan = ContextPlan.build(layout, size)
        for rank in range(size):
            sent, received = plan.handover(rank)
            for shifted in (False, True):
                split = plan.halo_split(rank, shifted)
                assert plan.halo_split(rank, shifted) is split  # built once per (rank, parity)
                start, end = plan.token_range(rank, shifted)
                n = end - start
                # Going to shifted ownership the block from rank - 1 comes first; going back, the one from rank + 1
                # comes last.
                arriving = (0, received) if shifted else (n - sent, n)
                (i0, i1), (b0, b1) = split.interior, split.boundary
                if arriving[1] > arriving[0]:
                    assert b0 <= arriving[0] and arriving[1] <= b1
                    assert split.boundary_shard.num_windows(shifted) == 1
                else:
                    assert split.boundary == (0, 0) and split.boundary_shard is None
                parts = sorted(r for r in (split.interior, split.boundary) if r[1] > r[0])
                assert parts[0][0] == 0 and parts[-1][1] == n and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
                windows = sum(s.num_windows(shifted) for s in (split.interior_shard, split.boundary_shard) if s)
                assert windows == plan.shard(rank, shifted).num_windows(shifted)
                for rng, shard in ((split.interior, split.interior_shard), (split.boundary, split.boundary_shard)):
                    if shard is not None:  # the shard's tokens are the range's, in the parent's coordinates
                        assert shard.token_range == (start + rng[0], start + rng[1])
                assert i1 == i0 or i1 <= arriving[0] or i0 >= arriving[1]


# ------------------------------------------------------------------------------------------ 2 gloo ranks
# Window 2 (blocks of one latent frame). 9 frames: rank 0 owns 2 unshifted windows (one interior, one boundary),
# rank 1 owns 3 shifted windows (two interior, one boundary). 5 frames: rank 0 owns one unshifted window, which
# needs the block coming back (boundary only, nothing to overlap), and one shifted window (interior only).
CASES = {"interior windows": 9, "boundary only": 5}


def _model_and_inputs(frames: int):
    """An fp64 model and inputs holding fp32-representable values: the fp32 runs start from the same numbers."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(LatentGenerator.Config.tiny(), attention="swin", window=2, depth=4, swin_backend="cpu")
    model = LatentGenerator(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    model.float().double()  # rounds every parameter to fp32 in place
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, frames, 4, 6, generator=g, dtype=torch.float64)
    z_sem = torch.randn(2, 3, 5, cfg.sem_dim, generator=g, dtype=torch.float64)
    text = torch.randn(2, 5, cfg.text_dim, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    t = torch.rand(2, generator=g, dtype=torch.float64)
    target = torch.randn(2, cfg.in_channels, frames, 4, 6, generator=g, dtype=torch.float64)
    inputs = tuple(v.float().double() if v.is_floating_point() else v for v in (x, t, text, mask, z_sem))
    return model, inputs, target.float().double()


def _loss(model, inputs, target, cp):
    pred, index = model.forward_context_parallel(*inputs, cp)
    goal = patchify(target, model.patch).index_select(1, index)
    return (pred - goal).square().sum() / target.numel()


def _worker(rank: int, world: int, store_path: str, frames: int, results: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        model, inputs, target = _model_and_inputs(frames)
        model.float()
        inputs = tuple(v.float() if v.is_floating_point() else v for v in inputs)
        target = target.float()
        calls = []  # tokens each block call sees: shows that the overlapped path split the layer
        # In backward: ("grad", block, k) when the input gradient of that block's k-th call (in forward order) is
        # done; ("post",) for every batch of P2P ops the overlapped exchange starts.
        events = []

        def record(_module, args, i):
            k = sum(c[0] == i for c in calls)
            calls.append((i, args[0].shape[1]))
            if args[0].requires_grad:
                args[0].register_hook(lambda g: events.append(("grad", i, k)))

        for i, block in enumerate(model.blocks):
            block.register_forward_pre_hook(functools.partial(record, i=i))
        post = overlap_module.post_p2p

        def counted_post(*args):
            events.append(("post",))
            return post(*args)

        overlap_module.post_p2p = counted_post
        out = {}
        for overlap in (True, False):
            cp = ContextGroup.from_group(overlap=overlap)
            model.zero_grad(set_to_none=True)
            gathered = model.forward_gathered(*inputs, cp)
            calls.clear()
            COMM_COUNTER.reset()
            loss = _loss(model, inputs, target, cp)
            events.clear()
            loss.backward()
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            grads = {}
            for name, p in model.named_parameters():
                grads[name] = p.grad.clone()
                dist.all_reduce(grads[name])  # what FSDP's reduction over the CP group does (as a sum)
            out[overlap] = dict(gathered=gathered, loss=loss, grads=grads, sent=COMM_COUNTER.bytes_sent)
            out[overlap].update(calls=list(calls), events=list(events))
        results[rank] = out
    finally:
        dist.destroy_process_group()


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.double() - ref).abs().max().item()


@pytest.mark.distributed
@pytest.mark.parametrize("frames", list(CASES.values()), ids=list(CASES))
def test_overlapped_exchange_equals_blocking(frames, tmp_path):
    """fp32 on 2 gloo ranks: the overlapped exchange's output, loss and every parameter gradient are as accurate
    (against one fp64 process) as the blocking exchange's, it sends the same bytes, and it really runs each block
    after a parity change as interior windows, then boundary window."""
    model, inputs, target = _model_and_inputs(frames)
    ref_out = model(*inputs)
    ref_loss = (ref_out - target).square().mean()
    ref_loss.backward()
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), frames, results), nprocs=2, join=True)
    plan = ContextPlan.build(model.window_layout(frames, 2 * 3, 3, 5), 2)
    depth, eps = model.config.depth, torch.finfo(torch.float32).eps
    for rank in (0, 1):
        got, blocking = results[rank][True], results[rank][False]
        # Splitting a layer into two calls changes how matmuls block their rows, so the paths differ in the last
        # bits (3.6e-7 at most on the output here): each must be within 2x the other's error against fp64 (the
        # house rule), with a floor of 4 ulps of the reference's magnitude.
        pairs = [
            ("out", got["gathered"], blocking["gathered"], ref_out),
            ("loss", got["loss"], blocking["loss"], ref_loss),
        ]
        pairs += [(n, got["grads"][n], blocking["grads"][n], p.grad) for n, p in model.named_parameters()]
        for name, a, b, ref in pairs:
            floor = 4 * eps * ref.abs().max().item()
            assert _err(a, ref) <= 2 * _err(b, ref) + floor, (name, _err(a, ref), _err(b, ref))
            assert _err(b, ref) <= 2 * _err(a, ref) + floor, (name, _err(a, ref), _err(b, ref))
        assert got["sent"] == blocking["sent"] == depth * sum(plan.handover(rank)) * 2 * model.config.hidden * 4
        # Blocking: one call per block on all of the rank's tokens. Overlapped: after each parity change the
        # interior windows first, then the boundary window (one call where one of them is empty).
        sizes = [e - s for s, e in (plan.token_range(rank, i % 2 == 1) for i in range(depth))]
        assert blocking["calls"] == list(enumerate(sizes))
        expected = [(0, sizes[0])]
        for i in range(1, depth):
            split = plan.halo_split(rank, i % 2 == 1)
            expected += [(i, e - s) for s, e in (split.interior, split.boundary) if e > s]
        assert got["calls"] == expected
        # Backward overlaps too: where a layer has both parts and this rank received a block, the gradient of that
        # block is posted (back to its sender) after the boundary window's backward and before the interior's.
        sent, received = plan.handover(rank)
        for i in range(1, depth):
            split = plan.halo_split(rank, i % 2 == 1)
            arrived = received if i % 2 == 1 else sent
            if arrived and split.interior[1] > split.interior[0]:
                ev = got["events"]
                b, n = ev.index(("grad", i, 1)), ev.index(("grad", i, 0))  # interior ran first in forward
                assert b < n and ("post",) in ev[b:n], (i, ev)
