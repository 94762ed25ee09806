"""The halo exchange overlapped with the interior windows: the split's maths, and on 2 gloo ranks the same
outputs, gradients and bytes as the blocking exchange, unsharded and with FSDP2 block units (as many all-gathers)."""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

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


def _fp32_model_and_inputs(frames: int):
    """What a rank runs: :func:`_model_and_inputs` in fp32 (exactly the fp64 values, which fp32 holds)."""
    model, inputs, target = _model_and_inputs(frames)
    return model.float(), tuple(v.float() if v.is_floating_point() else v for v in inputs), target.float()


def _join(rank: int, world: int, store_path: str) -> None:
    """One thread per rank (2 ranks on 2 cores), then the gloo group over a file store."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)


def _loss(model, inputs, target, cp):
    pred, index = model.forward_context_parallel(*inputs, cp)
    goal = patchify(target, model.patch).index_select(1, index)
    return (pred - goal).square().sum() / target.numel()


def _record_block_calls(model, calls: list, events: list) -> None:
    """Record ``(block, tokens)`` for every run of a block's ``forward`` (a whole layer, or one part of
    ``forward_split``, which calls ``forward`` without ``__call__``'s hooks), and ``("grad", block, k)`` in
    ``events`` when the input gradient of that block's k-th run is done."""

    def record(forward, x, *args, i):
        k = sum(c[0] == i for c in calls)
        calls.append((i, x.shape[1]))
        if x.requires_grad:
            x.register_hook(lambda g: events.append(("grad", i, k)))
        return forward(x, *args)

    for i, block in enumerate(model.blocks):
        block.forward = functools.partial(record, block.forward, i=i)


def _worker(rank: int, world: int, store_path: str, frames: int, results: dict) -> None:
    _join(rank, world, store_path)
    try:
        model, inputs, target = _fp32_model_and_inputs(frames)
        calls = []  # tokens each block call sees: shows that the overlapped path split the layer
        # In backward: ("grad", block, k) when the input gradient of that block's k-th call (in forward order) is
        # done; ("post",) for every batch of P2P ops the overlapped exchange starts.
        events = []

        _record_block_calls(model, calls, events)
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


def _assert_as_accurate(got: dict, blocking: dict, ref: dict) -> None:
    """The house rule: each of ``got`` and ``blocking`` (name -> fp32 tensor) is within 2x the other's error against
    the fp64 ``ref``, with a floor of 4 ulps of the reference's magnitude."""
    eps = torch.finfo(torch.float32).eps
    for name, r in ref.items():
        a, b = got[name], blocking[name]
        floor = 4 * eps * r.abs().max().item()
        assert _err(a, r) <= 2 * _err(b, r) + floor, (name, _err(a, r), _err(b, r))
        assert _err(b, r) <= 2 * _err(a, r) + floor, (name, _err(a, r), _err(b, r))


def _expected_calls(plan: ContextPlan, rank: int, depth: int) -> tuple[list, list]:
    """``(block, tokens)`` of every block run, blocking and overlapped: after each parity change the overlapped path
    runs the interior windows first, then the boundary window (one run where one of them is empty)."""
    sizes = [e - s for s, e in (plan.token_range(rank, i % 2 == 1) for i in range(depth))]
    overlapped = [(0, sizes[0])]
    for i in range(1, depth):
        split = plan.halo_split(rank, i % 2 == 1)
        overlapped += [(i, e - s) for s, e in (split.interior, split.boundary) if e > s]
    return list(enumerate(sizes)), overlapped


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
    depth = model.config.depth
    for rank in (0, 1):
        got, blocking = results[rank][True], results[rank][False]
        # Splitting a layer into two parts changes how matmuls block their rows, so the paths differ in the last
        # bits (3.6e-7 at most on the output here).
        ref = {"out": ref_out, "loss": ref_loss, **{n: p.grad for n, p in model.named_parameters()}}
        _assert_as_accurate(
            {"out": got["gathered"], "loss": got["loss"], **got["grads"]},
            {"out": blocking["gathered"], "loss": blocking["loss"], **blocking["grads"]},
            ref,
        )
        assert got["sent"] == blocking["sent"] == depth * sum(plan.handover(rank)) * 2 * model.config.hidden * 4
        expected_blocking, expected = _expected_calls(plan, rank, depth)
        assert blocking["calls"] == expected_blocking
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


# ------------------------------------------------------------------------------ FSDP2 units (the training path)
class _Stage(nn.Module):
    """What a training stage is to FSDP: the root unit, whose forward calls the generator's CP entry point."""

    def __init__(self, generator: LatentGenerator) -> None:
        super().__init__()
        self.latent_generator = generator

    def forward(self, inputs, target, cp):
        return _loss(self.latent_generator, inputs, target, cp)


def _fsdp_worker(rank: int, world: int, store_path: str, frames: int, checkpointing: bool, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from semanticgen.train.config import ParallelConfig
    from semanticgen.train.sharding import shard_model

    _join(rank, world, store_path)
    try:
        model, inputs, target = _fp32_model_and_inputs(frames)
        calls, events = [], []
        _record_block_calls(model, calls, events)
        stage = _Stage(model)
        # As training shards the stage: fully_shard per block (forward_split registered), then the generator, then
        # the root; fp32 on CPU; parameters sharded over both ranks, which are also the CP group.
        parallel = ParallelConfig(activation_checkpointing=checkpointing)
        shard_model(stage, init_device_mesh("cpu", (world,)), parallel, torch.device("cpu"))
        gathers = []
        all_gather_single = dist.all_gather_single

        def counted(*args, **kwargs):  # FSDP2's parameter all-gather (torch 2.14: dist.all_gather_single)
            gathers.append(args[0].numel())
            return all_gather_single(*args, **kwargs)

        dist.all_gather_single = counted

        def step(overlap: bool) -> dict:
            cp = ContextGroup.from_group(overlap=overlap)
            stage.zero_grad(set_to_none=True)
            calls.clear()
            gathers.clear()
            COMM_COUNTER.reset()
            loss = stage(inputs, target, cp)
            loss.backward()
            out = dict(gathers=len(gathers), gathered_elements=sum(gathers), sent=COMM_COUNTER.bytes_sent)
            out["calls"] = list(calls)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            # FSDP averages the ranks' gradients; each rank's loss is its share of the clip's: the sum is the clip's.
            grads = {
                n.removeprefix("latent_generator.").replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor()
                * world
                for n, p in stage.named_parameters()
            }
            return dict(out, loss=loss, grads=grads)

        step(False)  # warm-up: FSDP's lazy initialisation, layouts, plans
        results[rank] = {overlap: step(overlap) for overlap in (True, False)}
    finally:
        dist.destroy_process_group()


FSDP_CASES = {"interior windows": (9, False), "interior windows, checkpointing": (9, True), "boundary only": (5, False)}


@pytest.mark.distributed
@pytest.mark.parametrize("frames, checkpointing", list(FSDP_CASES.values()), ids=list(FSDP_CASES))
def test_overlap_under_fsdp_gathers_once_per_layer(frames, checkpointing, tmp_path):
    """The training path: blocks are FSDP2 units (``shard_model``), 2 gloo ranks. The overlapped step all-gathers
    exactly as often as the blocking step (each block's ``forward_split`` is one FSDP call), runs each block after a
    parity change as interior then boundary, gives loss and gradients as accurate as the blocking step's (against
    one fp64 process) and sends the plan's bytes (activation checkpointing's recomputation resends nothing)."""
    model, inputs, target = _model_and_inputs(frames)
    ref_loss = (model(*inputs) - target).square().mean()
    ref_loss.backward()
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "store"), frames, checkpointing, results), nprocs=2, join=True)
    plan = ContextPlan.build(model.window_layout(frames, 2 * 3, 3, 5), 2)
    depth = model.config.depth
    ref = {"loss": ref_loss, **{n: p.grad for n, p in model.named_parameters()}}
    for rank in (0, 1):
        got, blocking = results[rank][True], results[rank][False]
        # Forward: every block and the generator's own parameters once; backward: again for every unit resharded
        # after forward (all blocks but the last, and the generator). A second call per layer would add a gather
        # in forward and one in backward for each split layer (the first version's probe: 7 became 12 at depth 3).
        assert got["gathers"] == blocking["gathers"] == 2 * depth + 1, (got["gathers"], blocking["gathers"])
        assert got["gathered_elements"] == blocking["gathered_elements"]
        _assert_as_accurate({"loss": got["loss"], **got["grads"]}, {"loss": blocking["loss"], **blocking["grads"]}, ref)
        assert got["sent"] == blocking["sent"] == depth * sum(plan.handover(rank)) * 2 * model.config.hidden * 4
        expected_blocking, expected = _expected_calls(plan, rank, depth)
        # Checkpointing reruns every block's forward (both parts of a split one) in backward, once.
        runs = 2 if checkpointing else 1
        assert got["calls"][: len(expected)] == expected and len(got["calls"]) == runs * len(expected)
        assert blocking["calls"][: len(expected_blocking)] == expected_blocking
        assert len(blocking["calls"]) == runs * len(expected_blocking)
