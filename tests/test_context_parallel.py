"""Window-parallel context parallelism: the plan's maths, shards, and 2-process equality on gloo (CPU)."""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semanticgen.models import LatentGenerator, patchify
from semanticgen.ops import WindowLayout, WindowShard, swin_attention
from semanticgen.parallel import COMM_COUNTER, ContextGroup, ContextPlan

LAYOUTS = {
    "even Tw": (16, 3, 4, 2, 4),
    "odd Tw": (15, 2, 5, 3, 3),
    "Ts=0": (12, 3, 0, 0, 2),
    "Ts not dividing Tv, ragged end": (13, 2, 3, 2, 4),
    "Ts > Tv": (8, 2, 11, 1, 2),
}


def _plans(dims):
    layout = WindowLayout(*dims, order="blocked")
    for size in range(1, layout.num_windows(False) + 1):
        yield layout, ContextPlan.build(layout, size)


@pytest.mark.parametrize("dims", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_plan_partitions_whole_windows(dims):
    for layout, plan in _plans(dims):
        num_blocks = len(layout.blocks())
        for shifted in (False, True):
            ranges = [plan.blocks(r, shifted) for r in range(plan.size)]
            assert ranges[0][0] == 0 and ranges[-1][1] == num_blocks
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), "ranges must tile the blocks in order"
            assert all(first < end for first, end in ranges), "every rank owns tokens"
            shards = [plan.shard(r, shifted) for r in range(plan.size)]  # validates: whole windows only
            # Built once per (rank, parity): the backends cache their device tables on the shard.
            assert all(plan.shard(r, shifted) is shards[r] for r in range(plan.size))
            assert sum(s.num_windows(shifted) for s in shards) == layout.num_windows(shifted)
        for r in range(plan.size):
            sent, received = plan.handover(r)
            us, ue = plan.token_range(r, False)
            ss, se = plan.token_range(r, True)
            assert (ss, se) == (us - received, ue - sent)
            assert (sent == 0) == (r == plan.size - 1 or layout.window == 1)


def test_plan_balances_tokens_exactly():
    """The partition minimises the largest rank's tokens: checked against every contiguous split."""
    layout = WindowLayout(23, 3, 7, 2, 4, order="blocked")
    offsets = layout.block_token_offsets()
    tokens = [offsets[e] - offsets[f] for f, e in layout.window_blocks(False)]
    for size in (2, 3, 4):
        plan = ContextPlan.build(layout, size)
        got = max(e - s for s, e in (plan.token_range(r, False) for r in range(size)))
        best = min(
            max(sum(tokens[a:b]) for a, b in zip((0, *cuts), (*cuts, len(tokens))))
            for cuts in itertools.combinations(range(1, len(tokens)), size - 1)
        )
        assert got == best


def test_plan_rejects_too_few_windows_and_bad_arguments():
    layout = WindowLayout(8, 2, 2, 1, 4, order="blocked")  # 2 unshifted windows
    with pytest.raises(ValueError, match="at least 3 unshifted windows.*has 2"):
        ContextPlan.build(layout, 3)
    with pytest.raises(TypeError, match="blocked order"):
        ContextPlan.build(layout.with_order("streams"), 2)
    with pytest.raises(ValueError, match="size must be >= 1"):
        ContextPlan.build(layout, 0)
    with pytest.raises(ValueError, match="rank"):
        ContextPlan.build(layout, 2).blocks(2, False)
    with pytest.raises(ValueError, match="whole windows"):
        WindowShard(layout, 0, 1, shifted=False)  # half of the first unshifted window


@pytest.mark.parametrize("dims", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_shards_attend_like_the_whole_sequence(dims):
    """Per-rank attention on each shard, concatenated, equals attention over the whole blocked sequence."""
    layout = WindowLayout(*dims, order="blocked")
    plan = ContextPlan.build(layout, min(3, layout.num_windows(False)))
    q, k, v = (torch.randn(2, layout.num_tokens, 2, 8, dtype=torch.float64) for _ in range(3))
    for shifted in (False, True):
        whole = swin_attention(q, k, v, layout, shifted=shifted, backend="cpu")
        parts = []
        for r in range(plan.size):
            s, e = plan.token_range(r, shifted)
            parts.append(swin_attention(q[:, s:e], k[:, s:e], v[:, s:e], plan.shard(r, shifted), shifted=shifted))
        torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="asked for shifted=True"):
        shard = plan.shard(0, False)
        s, e = plan.token_range(0, False)
        swin_attention(q[:, s:e], k[:, s:e], v[:, s:e], shard, shifted=True)


def test_bytes_per_layer_compares_schemes():
    """60 s at 480p on 8 ranks, width 5120 (Wan 14B), bf16: the halo is a few percent of Ulysses' bytes."""
    plan = ContextPlan.build(WindowLayout(360, 1560, 48, 510, 20, order="blocked"), 8)
    b = plan.bytes_per_layer(5120)
    block = max(sum(plan.handover(r)) for r in range(8))
    assert b["halo_hidden"] == block / 2 * 5120 * 2
    assert b["halo_kv"] == 2 * b["halo_hidden"]
    assert b["halo_hidden"] < 0.06 * b["ulysses"] < b["ring"]


# ------------------------------------------------------------------------------- model, 1 and 2 ranks
def _model_and_inputs(depth: int):
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        LatentGenerator.Config.tiny(), attention="swin", window=2, depth=depth, swin_backend="cpu"
    )
    model = LatentGenerator(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 9, 4, 6, generator=g, dtype=torch.float64)
    z_sem = torch.randn(2, 3, 5, cfg.sem_dim, generator=g, dtype=torch.float64)
    text = torch.randn(2, 5, cfg.text_dim, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    t = torch.rand(2, generator=g, dtype=torch.float64)
    target = torch.randn(2, cfg.in_channels, 9, 4, 6, generator=g, dtype=torch.float64)
    return model, (x, t, text, mask, z_sem), target


def _local_loss(model, inputs, target, cp):
    pred, index = model.forward_context_parallel(*inputs, cp)
    goal = patchify(target, model.patch).index_select(1, index)
    return (pred - goal).square().sum() / goal.new_tensor(target.numel())


def test_one_rank_context_parallel_equals_forward():
    model, inputs, target = _model_and_inputs(depth=3)
    cp = ContextGroup(0, 1)
    torch.testing.assert_close(model.forward_gathered(*inputs, cp), model(*inputs), rtol=1e-12, atol=1e-12)
    loss = _local_loss(model, inputs, target, cp)
    torch.testing.assert_close(loss, (model(*inputs) - target).square().mean(), rtol=1e-12, atol=1e-12)


def _worker(rank: int, world: int, store_path: str, depth: int, results: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        model, inputs, target = _model_and_inputs(depth)
        cp = ContextGroup.from_group()
        out = model.forward_gathered(*inputs, cp)
        COMM_COUNTER.reset()
        loss = _local_loss(model, inputs, target, cp)
        loss.backward()
        sent = COMM_COUNTER.bytes_sent
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)  # what FSDP's reduction over the CP group does (as a sum)
            grads[name] = g
        results[rank] = dict(out=out, loss=total, grads=grads, sent=sent)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("depth", [3, 4], ids=["odd-depth", "even-depth"])
def test_two_ranks_match_one_process(depth, tmp_path):
    """CP=2 on gloo: gathered output, loss and every parameter gradient equal the 1-process model (fp64), and
    each rank sends exactly the hidden states of its handed-over blocks, forward and backward."""
    model, inputs, target = _model_and_inputs(depth)
    ref_out = model(*inputs)
    ref_loss = (ref_out - target).square().mean()
    ref_loss.backward()
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), depth, results), nprocs=2, join=True)
    b, c = inputs[0].shape[0], model.config.hidden
    layout = model.window_layout(9, 2 * 3, 3, 5)
    plan = ContextPlan.build(layout, 2)
    transitions = depth - 1 + (1 if depth % 2 == 0 else 0)  # parity changes between layers, plus the way back
    for rank in (0, 1):
        res = results[rank]
        torch.testing.assert_close(res["out"], ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["loss"], ref_loss, rtol=1e-12, atol=1e-14)
        for name, p in model.named_parameters():
            torch.testing.assert_close(res["grads"][name], p.grad, rtol=1e-10, atol=1e-13, msg=name)
        # Each parity change sends (sent + received) tokens of this rank over forward and backward together.
        assert res["sent"] == transitions * sum(plan.handover(rank)) * b * c * 8
