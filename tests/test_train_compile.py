"""``[parallel] compile = true``: every block computation runs compiled, on the plain path (``__call__``) and on
both parts of overlapped context parallelism's ``forward_split``, with and without activation checkpointing, and
sharded with FSDP2 (one unshard per ``forward_split`` still); outputs and gradients as accurate as uncompiled."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_context_parallel_overlap import (
    _assert_as_accurate,
    _expected_calls,
    _fp32_model_and_inputs,
    _join,
    _model_and_inputs,
    _Stage,
)
from torch._dynamo.backends.registry import lookup_backend

from semanticgen.models import DiTBlock, WanBlock, blocks
from semanticgen.models.blocks import SplitForward
from semanticgen.ops import WindowLayout
from semanticgen.parallel import ContextGroup, ContextPlan
from semanticgen.train.config import ParallelConfig
from semanticgen.train.sharding import _wrap_block


class _CountingBackend:
    """A ``torch.compile`` backend: ``inner`` (a registered backend's name), counting the graphs it compiles and
    the runs of those graphs (each run of a block's compiled forward is one run of one graph)."""

    def __init__(self, inner: str) -> None:
        self.inner = lookup_backend(inner)
        self.graphs = 0
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        compiled = self.inner(gm, example_inputs)

        def run(*args):
            self.runs += 1
            return compiled(*args)

        return run


def _unwrapped(name: str) -> str:
    """A parameter's name without the part activation checkpointing's wrapper inserts."""
    return name.replace("_checkpoint_wrapped_module.", "")


def _compile_with(monkeypatch, backend: _CountingBackend) -> None:
    """Make ``compile = true`` (``_wrap_block``, ``shard_model``) compile every block with ``backend``."""
    compile_forward = SplitForward.compile_forward
    monkeypatch.setattr(SplitForward, "compile_forward", functools.partialmethod(compile_forward, backend=backend))


# ------------------------------------------------------------------------------------------ one block
# The window layout of _model_and_inputs(9)'s clip (9 latent frames of 2 x 3 patches, 3 semantic frames of 5 tokens,
# window 2) split over 2 ranks: after the change to shifted ownership rank 1 runs 29 interior tokens, then a boundary
# window of 17: two parts with different token counts (and window bounds), so two graphs.
LAYOUT = WindowLayout(9, 6, 3, 5, 2, order="blocked")
RANK, SHIFTED = 1, True


def _block_inputs(hidden: int, heads: int) -> dict:
    """``forward_split``'s arguments for ``RANK`` at parity ``SHIFTED``, fp64 holding fp32-representable values, and
    ``weights`` (fixed cotangents of the two outputs)."""
    plan = ContextPlan.build(LAYOUT, 2)
    split = plan.halo_split(RANK, SHIFTED)
    (i0, i1), (b0, b1) = split.interior, split.boundary
    assert 0 < i1 - i0 != b1 - b0 > 0
    g = torch.Generator().manual_seed(2)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).float().double()

    half = hidden // heads // 2
    return dict(
        interior=rand(2, i1 - i0, hidden),
        boundary=rand(2, b1 - b0, hidden),
        time_mod=rand(2, 6, hidden, scale=0.1),
        text=rand(2, 5, hidden),
        text_mask=torch.tensor([[True] * 3 + [False] * 2, [True] * 5]),
        rope=((rand(i1 - i0, half), rand(i1 - i0, half)), (rand(b1 - b0, half), rand(b1 - b0, half))),
        shards=(split.interior_shard, split.boundary_shard),
        weights=(rand(2, i1 - i0, hidden), rand(2, b1 - b0, hidden)),
    )


def _run_split(block, inputs: dict, dtype: torch.dtype) -> dict:
    """``forward_split`` on ``inputs`` cast to ``dtype``, then backward of a fixed linear loss: outputs, input
    gradients and parameter gradients by name (the checkpoint wrapper's prefix removed)."""
    floating = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    cast = {k: v.to(dtype, copy=True) for k, v in floating.items()}  # fresh leaves: fp64 .to would return the input
    interior = cast["interior"].requires_grad_(True)
    boundary = cast["boundary"].requires_grad_(True)
    rope = tuple(tuple(t.to(dtype) for t in part) for part in inputs["rope"])
    out_i, out_b = block.forward_split(
        interior,
        lambda: boundary,
        cast["time_mod"],
        cast["text"],
        inputs["text_mask"],
        rope,
        inputs["shards"],
        SHIFTED,
    )
    w_i, w_b = (w.to(dtype) for w in inputs["weights"])
    ((out_i * w_i).sum() + (out_b * w_b).sum()).backward()
    got = {"out_interior": out_i.detach(), "out_boundary": out_b.detach()}
    got.update(grad_interior=interior.grad, grad_boundary=boundary.grad)
    for name, p in block.named_parameters():
        got[_unwrapped(name)] = p.grad
    return got


def _random_block(cls: type = DiTBlock) -> DiTBlock | WanBlock:
    """A tiny fp64 block with random parameters that fp32 holds exactly (the zero-initialised ones too)."""
    block = cls(DiTBlock.Config(hidden=32, heads=2, mlp_ratio=2.0, swin_backend="cpu")).double()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return block.float().double()


@pytest.mark.parametrize(
    "cls, checkpointing", [(DiTBlock, False), (DiTBlock, True), (WanBlock, False)], ids=["dit", "dit-ckpt", "wan"]
)
def test_forward_split_runs_the_compiled_forward(cls, checkpointing, monkeypatch):
    """With ``compile = true`` both parts of ``forward_split`` and ``__call__`` run compiled graphs (counted by the
    backend; aot_eager: dynamo and AOTAutograd, without inductor's C++ build), one static graph per part shape, none
    recompiled on the next call; checkpointing recomputes through them. Outputs, input and parameter gradients are as
    accurate against fp64 as the uncompiled block's (fp32: the house 2x rule with a 4-ulp floor)."""
    backend = _CountingBackend("aot_eager")
    _compile_with(monkeypatch, backend)
    ref_block = _random_block(cls)
    inputs = _block_inputs(ref_block.config.hidden, ref_block.config.heads)
    ref = _run_split(ref_block, inputs, torch.float64)
    # The uncompiled fp32 run also fills the shards' cached window bounds outside any graph.
    plain = _run_split(_wrap_block(copy.deepcopy(ref_block).float(), ParallelConfig()), inputs, torch.float32)

    parallel = ParallelConfig(compile=True, activation_checkpointing=checkpointing)
    block = _wrap_block(copy.deepcopy(ref_block).float(), parallel)
    runs = 4 if checkpointing else 2  # each part once forward, and once more to recompute in backward
    got = _run_split(block, inputs, torch.float32)
    assert (backend.graphs, backend.runs) == (2, runs)
    _assert_as_accurate(got, plain, ref)
    again = _run_split(block, inputs, torch.float32)
    assert (backend.graphs, backend.runs) == (2, 2 * runs)
    for name, value in again.items():
        torch.testing.assert_close(value, got[name], rtol=0, atol=0, msg=name)

    # The plain path runs the same compiled forward: one more graph, for the whole ownership's token count.
    shard = ContextPlan.build(LAYOUT, 2).shard(RANK, SHIFTED)
    whole = torch.cat([inputs["boundary"], inputs["interior"]], 1)  # the boundary window comes first here
    rope = tuple(torch.cat([b, i]) for i, b in zip(*inputs["rope"]))
    args = (whole, inputs["time_mod"], inputs["text"], inputs["text_mask"], *rope, shard, SHIFTED)
    with torch.no_grad():
        ref_whole = ref_block(*args)
        plain_whole = ref_block.float()(*(a.float() if isinstance(a, torch.Tensor) else a for a in args))
    out = block(*(a.float() if isinstance(a, torch.Tensor) else a for a in args))
    assert (backend.graphs, backend.runs) == (3, 2 * runs + 1)
    _assert_as_accurate({"whole": out}, {"whole": plain_whole}, {"whole": ref_whole})


def test_compiled_block_deepcopies_onto_the_copy():
    """``compile_forward`` binds the compiled function to the block as a method: a deepcopy's forward is the copy's."""
    block = _random_block().float()
    block.compile_forward(backend="eager")
    clone = copy.deepcopy(block)
    assert clone.forward.__self__ is clone and clone.forward.__func__ is block.forward.__func__


def test_compile_forward_raises_the_process_wide_limit_on_older_torch(monkeypatch):
    """Where ``torch.compile`` takes no ``recompile_limit`` (torch before pytorch/pytorch#177936), ``compile_forward``
    raises dynamo's process-wide limit to the block's instead, and never lowers it."""
    compiled = []

    # torch 2.6's signature
    def old_compile(
        model, *, fullgraph=False, dynamic=None, backend="inductor", mode=None, options=None, disable=False
    ):
        compiled.append((model, dynamic, backend))
        return model

    monkeypatch.setattr(torch, "compile", old_compile)
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 8)
    block = _random_block()
    block.compile_forward(backend="eager")
    assert torch._dynamo.config.cache_size_limit == blocks._RECOMPILE_LIMIT > 8
    assert compiled == [(DiTBlock.forward, False, "eager")]
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 1000)
    block.compile_forward(backend="eager")
    assert torch._dynamo.config.cache_size_limit == 1000


# ------------------------------------------------------------------------------ FSDP2 units, 2 gloo ranks
FRAMES = 9  # rank 0 splits its unshifted layers into interior and boundary, rank 1 its shifted ones


def _fsdp_compile_worker(rank: int, world: int, store_path: str, checkpointing: bool, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from semanticgen.train.sharding import shard_model

    _join(rank, world, store_path)
    try:
        backend = _CountingBackend("inductor")  # the real default backend, counted
        with pytest.MonkeyPatch.context() as monkeypatch:
            _compile_with(monkeypatch, backend)
            gathers = []
            all_gather_single = dist.all_gather_single

            def counted(*args, **kwargs):  # FSDP2's parameter all-gather (torch 2.14: dist.all_gather_single)
                gathers.append(args[0].numel())
                return all_gather_single(*args, **kwargs)

            monkeypatch.setattr(dist, "all_gather_single", counted)
            out = {}
            for compiled in (False, True):
                model, inputs, target = _fp32_model_and_inputs(FRAMES)
                stage = _Stage(model)
                parallel = ParallelConfig(activation_checkpointing=checkpointing, compile=compiled)
                shard_model(stage, init_device_mesh("cpu", (world,)), parallel, torch.device("cpu"))

                def step(stage=stage, inputs=inputs, target=target) -> dict:
                    stage.zero_grad(set_to_none=True)
                    gathers.clear()
                    graphs, runs = backend.graphs, backend.runs
                    loss = stage(inputs, target, ContextGroup.from_group(overlap=True))
                    loss.backward()
                    loss = loss.detach().clone()
                    dist.all_reduce(loss)
                    # FSDP averages the ranks' gradients; the sum of the ranks' losses is the clip's.
                    grads = {
                        _unwrapped(n).removeprefix("latent_generator."): p.grad.full_tensor() * world
                        for n, p in stage.named_parameters()
                    }
                    counts = dict(gathers=len(gathers), graphs=backend.graphs - graphs, runs=backend.runs - runs)
                    return dict(counts, loss=loss, grads=grads)

                # Only overlapped steps: a blocking one would add graphs (whole ownership in each parity) that
                # cost minutes of cold inductor compiles on 2 cores and test nothing the overlapped step does not.
                out[compiled] = [step() for _ in range(3)]
            results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_compile_under_fsdp_and_overlapped_cp(checkpointing, tmp_path):
    """The training path (``shard_model`` with ``compile = true``, inductor) on 2 gloo ranks, overlapped CP: every
    block run of a step (layer 0 on the whole ownership through ``__call__``, the interior and boundary parts of the
    later layers through ``forward_split``, and their recomputation under checkpointing) is a run of a compiled
    graph; the third step compiles nothing; FSDP still all-gathers once per block per pass; loss and gradients are
    as accurate against one fp64 process as the uncompiled run's."""
    model, inputs, target = _model_and_inputs(FRAMES)
    ref_loss = (model(*inputs) - target).square().mean()
    ref_loss.backward()
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_fsdp_compile_worker, args=(2, str(tmp_path / "store"), checkpointing, results), nprocs=2, join=True)
    plan = ContextPlan.build(model.window_layout(FRAMES, 2 * 3, 3, 5), 2)
    depth = model.config.depth
    ref = {"loss": ref_loss, **{n: p.grad for n, p in model.named_parameters()}}
    passes = 2 if checkpointing else 1  # checkpointing runs every block's forward again in backward
    for rank in (0, 1):
        plain, compiled = results[rank][False], results[rank][True]
        _, expected = _expected_calls(plan, rank, depth)  # (block, tokens) of each block run, parts separately
        assert len(expected) > depth  # some layers ran as two parts
        for i, (got, base) in enumerate(zip(compiled, plain)):
            assert base["runs"] == base["graphs"] == 0
            assert got["runs"] == passes * len(expected), (rank, i, got["runs"])
            assert got["gathers"] == base["gathers"] == 2 * depth + 1
            _assert_as_accurate({"loss": got["loss"], **got["grads"]}, {"loss": base["loss"], **base["grads"]}, ref)
        # One static graph per (parity, token count and stride, window bounds) the rank meets, all in the first step:
        # a shard's window table is built with the shard, so a traced call does not change what its guard read.
        graphs = [c["graphs"] for c in compiled]
        assert graphs[0] > 0 and graphs[1:] == [0, 0], (rank, graphs)
