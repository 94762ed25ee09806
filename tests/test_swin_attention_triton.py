"""Triton backend of swin_attention: the real kernels, run by Triton's CPU interpreter, against fp64.

``TRITON_INTERPRET=1`` must be set before triton is imported, so every kernel run happens in one
subprocess (this file run as a script, see ``_worker``) that prints its measurements as JSON; the
tests below assert on those numbers. Every case runs in both token orders (``"streams"`` and
``"blocked"``), both parities, forward and all three gradients, with the default (deterministic) and,
for a few cases, the atomic-dQ backward. The same worker runs a second time on CUDA tensors through the
shipped ``triton_op`` and per-architecture configs when a GPU is present (``device`` = ``"cuda"``;
skipped otherwise). The subprocess poisons fresh ``torch.empty`` allocations with
NaN, so a kernel that leaves an output element unwritten fails. Tolerances follow flash-attn: the
kernel's error against the fp64 reference is at most twice that of the same computation in plain
torch at the input dtype (``conftest.error_bound``: a floor of a few ulps of the output's magnitude only
where plain torch's error is 0).

The in-process tests check what needs no kernel run: registration and availability without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import error_bound

# name -> (Tv, Sv, Ts, Ss, Tw), batch, heads, head dim, dtype
CASES = {
    "Ts=0 D=32 fp32": ((6, 5, 0, 0, 2), 2, 2, 32, "float32"),
    "Ts=3 not dividing Tv=8 D=64 bf16": ((8, 3, 3, 2, 4), 1, 2, 64, "bfloat16"),
    "odd Tw=3 D=80 fp32": ((7, 4, 3, 2, 3), 2, 1, 80, "float32"),
    "odd Tw=3 D=80 fp16": ((7, 4, 3, 2, 3), 1, 2, 80, "float16"),
    "Tv=3<Tw=8 D=96 bf16": ((3, 4, 2, 3, 8), 1, 2, 96, "bfloat16"),
    "Tw=1 D=16 fp16": ((4, 3, 2, 2, 1), 2, 1, 16, "float16"),
    # Windows of 36-40 tokens: several 32-row tiles and key blocks per window, ragged last tiles.
    "multi-tile windows D=128 bf16": ((6, 16, 2, 4, 2), 1, 1, 128, "bfloat16"),
    "multi-tile windows D=64 fp32": ((6, 16, 2, 4, 2), 2, 2, 64, "float32"),
    # 40 VAE + 6-9 semantic tokens per window: the second 32-row tile straddles the VAE/semantic
    # boundary in streams order, and key loops run a full block, a ragged VAE tail and a semantic tail.
    "straddling tiles D=16 fp16": ((5, 10, 4, 3, 4), 1, 2, 16, "float16"),
}
PARITIES = {"unshifted": False, "shifted": True}
ORDERS = ("streams", "blocked")
# Cases also run with the non-deterministic atomic-dQ backward (SEMANTICGEN_SWIN_ATOMIC_DQ=1).
ATOMIC_CASES = ("straddling tiles D=16 fp16", "multi-tile windows D=64 fp32", "odd Tw=3 D=80 fp16")
DEVICES = ("interpreter", "cuda")


# ---------------------------------------------------------------------------------- subprocess
def _errors(layout, shifted, q, k, v, backend_fn, scale=None, grad=None):
    """``[kernel error, plain torch error, magnitude]`` for out, dq, dk, dv: max abs errors against fp64, and
    the largest |fp64 value| (for ``error_bound``). ``grad``: the output gradient (default: random normal).

    Plain torch's error is the larger of its two ways of computing the attention at the input dtype, as in
    ``semanticgen selftest``: the dense-mask reference (einsum, softmax, einsum) and
    ``scaled_dot_product_attention`` with the boolean window mask. In fp32 the dense reference keeps every
    intermediate in fp32 and can be up to 4x more accurate than a blocked online-softmax kernel (measured
    against torch's own CPU flash kernel); in bf16/fp16 it rounds scores and probabilities to the input
    dtype and is the less accurate one.
    """
    from semanticgen.ops.swin_attention import swin_attention_reference

    grad = torch.randn_like(q) if grad is None else grad

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, grad.to(dtype))]

    def sdpa(q, k, v):
        ids = layout.window_ids(shifted).to(q.device)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=ids[:, None] == ids[None, :], scale=scale
        )
        return out.transpose(1, 2)

    def dense(q, k, v):
        return swin_attention_reference(q, k, v, layout, shifted=shifted, scale=scale)

    ours = run(backend_fn, q.dtype)
    exact = run(dense, torch.float64)
    plains = [run(dense, q.dtype), run(sdpa, q.dtype)]

    def err(a, e):
        return (a.double() - e).abs().max().item()

    nonfinite = any(not torch.isfinite(t).all() for t in ours)
    return {
        name: [err(ours[i], e), max(err(p[i], e) for p in plains), e.abs().max().item()]
        for i, (name, e) in enumerate(zip(("out", "dq", "dk", "dv"), exact))
    } | {"nonfinite": nonfinite, "dtype_ok": all(t.dtype == q.dtype for t in ours)}


def _blocks(tb, q):
    """``(fwd, dq, dkdv)`` tile sizes the shipped tables give ``q``'s device, head dim and dtype."""
    from semanticgen.kernels._triton_utils import device_arch_class, padded_head_dim

    arch, dim, fp32 = device_arch_class(q.device), padded_head_dim(q.shape[-1]), q.dtype == torch.float32
    return tuple(t.lookup(arch, dim, fp32=fp32)[0] for t in (tb.FWD_CONFIGS, tb.DQ_CONFIGS, tb.DKDV_CONFIGS))


def _worker(device_kind: str) -> dict:
    interpret = device_kind == "interpreter"
    assert (os.environ.get("TRITON_INTERPRET") == "1") == interpret
    device = "cpu" if interpret else "cuda"
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    torch.empty = poisoned_empty

    from semanticgen.ops.swin_attention import (
        WindowLayout,
        available_backends,
        swin_attention,
    )
    from semanticgen.ops.swin_attention import triton_backend as tb

    def randn(*shape, dtype=torch.float32, requires_grad=False):
        return torch.randn(*shape, dtype=dtype, device=device, requires_grad=requires_grad)

    from semanticgen.kernels._triton_utils import tma_enabled

    results: dict = {"cases": {}, "tma_used": {}, "device_kind": device_kind}
    results["gpu_tma_expected"] = not interpret and torch.cuda.get_device_capability()[0] == 9 and tma_enabled()
    torch.manual_seed(0)
    for name, (dims, batch, heads, dim, dtype_name) in CASES.items():
        dtype = getattr(torch, dtype_name)
        for order in ORDERS:
            layout = WindowLayout(*dims).with_order(order)
            # Interpreter: half precision runs the tensor-descriptor (TMA) path in blocked order and the
            # pointer path in streams order; on a GPU the launcher decides as in production.
            tb._TMA_UNDER_INTERPRETER = interpret and order == "blocked"
            for parity, shifted in PARITIES.items():
                q, k, v = (randn(batch, layout.num_tokens, heads, dim, dtype=dtype) for _ in range(3))
                fn = lambda q, k, v, layout=layout, shifted=shifted: swin_attention(  # noqa: E731
                    q, k, v, layout, shifted=shifted, backend="triton"
                )
                results["cases"][f"{name} {order} {parity}"] = _errors(layout, shifted, q, k, v, fn)
                results["tma_used"][f"{name} {order} {parity}"] = tb._use_tma(k, v)
                if name in ATOMIC_CASES:
                    os.environ[tb.ATOMIC_DQ_ENV] = "1"
                    try:
                        results["cases"][f"{name} {order} {parity} atomic-dQ"] = _errors(layout, shifted, q, k, v, fn)
                    finally:
                        del os.environ[tb.ATOMIC_DQ_ENV]
    tb._TMA_UNDER_INTERPRETER = False

    # Blocked order is the same attention: the blocked output is the streams output, permuted.
    layout = WindowLayout(5, 10, 4, 3, 4)
    blocked = layout.with_order("blocked")
    q, k, v = (randn(1, layout.num_tokens, 2, 16) for _ in range(3))
    out_s = swin_attention(q, k, v, layout, shifted=True, backend="triton")
    out_b = swin_attention(*(blocked.to_blocked(t) for t in (q, k, v)), blocked, shifted=True, backend="triton")
    results["orders_agree"] = (blocked.to_blocked(out_s) - out_b).abs().max().item()

    # The atomic-dQ backward is refused while deterministic algorithms are enforced; bad values too.
    os.environ[tb.ATOMIC_DQ_ENV] = "1"
    torch.use_deterministic_algorithms(True)
    try:
        swin_attention(q, k, v, layout, backend="triton")
        results["atomic_refused"] = "no error"
    except RuntimeError as exc:
        results["atomic_refused"] = str(exc)
    finally:
        torch.use_deterministic_algorithms(False)
    os.environ[tb.ATOMIC_DQ_ENV] = "maybe"
    try:
        swin_attention(q, k, v, layout, backend="triton")
        results["atomic_bad_value"] = "no error"
    except ValueError as exc:
        results["atomic_bad_value"] = str(exc)
    del os.environ[tb.ATOMIC_DQ_ENV]

    # Non-contiguous q/k/v (strided head dim, [B, H, N, D] transposed) and a custom scale.
    layout = WindowLayout(6, 3, 3, 2, 2)
    q = randn(2, layout.num_tokens, 2, 64)[..., ::2]
    k = randn(2, 2, layout.num_tokens, 32).transpose(1, 2)
    v = randn(2, layout.num_tokens, 32, 2).transpose(2, 3)
    fn = lambda q, k, v: swin_attention(q, k, v, layout, shifted=True, scale=0.3, backend="triton")  # noqa: E731
    results["non_contiguous"] = _errors(layout, True, q, k, v, fn, scale=0.3)
    results["inputs_were_non_contiguous"] = not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())

    # A stride-0 gradient (what ``out.sum().backward()`` hands the op) is read through its strides.
    layout = WindowLayout(5, 6, 2, 3, 2)
    q, k, v = (randn(1, layout.num_tokens, 2, 32) for _ in range(3))
    ones = torch.ones((), device=device).expand(q.shape)
    fn = lambda q, k, v: swin_attention(q, k, v, layout, shifted=True, backend="triton")  # noqa: E731
    results["expanded_grad"] = _errors(layout, True, q, k, v, fn, grad=ones)

    # The saved log-sum-exp, against logsumexp of the fp64 window-masked scores (both orders).
    results["lse_error"] = {}
    for order in ORDERS:
        layout = WindowLayout(5, 6, 2, 3, 2).with_order(order)
        q, k, v = (randn(1, layout.num_tokens, 2, 32) for _ in range(3))
        blocks = _blocks(tb, q)
        tiles = [tb.tile_table(layout, True, device, b) for b in blocks]
        out, lse = tb.fwd_op(q, k, v, *tiles, 0.25, *blocks, 64, False)
        ids = layout.window_ids(True).to(device)
        exact, plain = (
            torch.logsumexp(
                (torch.einsum("bqhd,bkhd->bhqk", q.to(dt), k.to(dt)) * 0.25).masked_fill(
                    ids[:, None] != ids[None, :], float("-inf")
                ),
                -1,
            )
            for dt in (torch.float64, torch.float32)
        )
        results["lse_error"][order] = [
            (lse.double() - exact).abs().max().item(),
            (plain.double() - exact).abs().max().item(),
            exact.abs().max().item(),
        ]
        results["lse_shape"] = list(lse.shape)
        results["lse_dtype"] = str(lse.dtype)

    # Repeated backward passes are bitwise equal. The interpreter runs one program at a time, so there it
    # shows only that nothing carries over between calls. On a GPU the programs of a launch run
    # concurrently, so a race in the default (non-atomic) backward would show: many windows and heads
    # (hundreds of concurrent programs), both precisions, five passes.
    if interpret:
        layout, (batch, heads, dim), dtypes, passes = WindowLayout(6, 16, 2, 4, 2), (1, 2, 32), (torch.float32,), 2
    else:
        layout, (batch, heads, dim) = WindowLayout(16, 64, 4, 16, 4), (2, 8, 64)
        dtypes, passes = (torch.bfloat16, torch.float32), 5
    unequal = []
    for dtype in dtypes:
        q, k, v = (randn(batch, layout.num_tokens, heads, dim, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        runs = []
        for _ in range(passes):
            out = swin_attention(q, k, v, layout, shifted=True, backend="triton")
            runs.append(torch.autograd.grad(out, (q, k, v), grad))
        if not all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run)):
            unequal.append(str(dtype))
    results["repeatable_backward"] = {"passes": passes, "dtypes": [str(d) for d in dtypes], "unequal": unequal}
    # The backend=None check below compares with this output.
    layout = WindowLayout(6, 16, 2, 4, 2)
    q, k, v = (randn(1, layout.num_tokens, 2, 32, requires_grad=True) for _ in range(3))
    out = swin_attention(q, k, v, layout, shifted=True, backend="triton")

    # Autotune alternatives differ only in warps and stages: on a GPU every config of a kernel gives
    # bitwise the same result (the interpreter ships one config per kernel, nothing to compare).
    if not interpret:
        from itertools import zip_longest

        from semanticgen.kernels._triton_utils import device_arch_class, padded_head_dim, window_bucket

        layout = WindowLayout(8, 40, 2, 16, 4)
        bucket = window_bucket(layout.max_window_length(True))
        mismatches = []
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for dim in (64, 128):
                q, k, v, do = (randn(2, layout.num_tokens, 3, dim, dtype=dtype) for _ in range(4))
                blocks = _blocks(tb, q)
                tiles = [tb.tile_table(layout, True, device, b) for b in blocks]
                arch, dpad, fp32 = device_arch_class(q.device), padded_head_dim(dim), dtype == torch.float32
                variant = None if tb._use_tma(k, v) else "pointer"
                fwd_cfgs = tb.FWD_CONFIGS.lookup(arch, dpad, fp32=fp32, variant=variant)[1]
                dq_cfgs, dkdv_cfgs = (t.lookup(arch, dpad, fp32=fp32)[1] for t in (tb.DQ_CONFIGS, tb.DKDV_CONFIGS))
                runs = [tb._launch_fwd(q, k, v, tiles[0], 0.125, blocks[0], bucket, forced=c) for c in fwd_cfgs]
                if not all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run)):
                    mismatches.append(f"fwd {dtype} D={dim}")
                out, lse = runs[0]
                pairs = list(zip_longest(dkdv_cfgs, dq_cfgs, fillvalue=None))
                grads = [
                    tb._launch_bwd(
                        do,
                        q,
                        k,
                        v,
                        out,
                        lse,
                        tiles[1],
                        tiles[2],
                        0.125,
                        blocks[1],
                        blocks[2],
                        bucket,
                        False,
                        forced=(c1 or dkdv_cfgs[0], c2 or dq_cfgs[0]),
                    )  # fmt: skip
                    for c1, c2 in pairs
                ]
                if not all(torch.equal(a, b) for run in grads[1:] for a, b in zip(grads[0], run)):
                    mismatches.append(f"bwd {dtype} D={dim}")
        results["config_mismatches"] = mismatches

    # backend=None picks the Triton backend (on CPU tensors only under the interpreter).
    results["available"] = available_backends(device)["triton"]
    out_default = swin_attention(q, k, v, layout, shifted=True)
    results["default_matches_triton"] = torch.equal(out_default, out)

    # torch.compile(fullgraph=True) over the op, forward and backward.
    torch.empty = real_empty  # fake tensors must not be filled

    def two_layers(x):
        q, k, v = (x * s for s in (1.0, 0.5, -1.0))
        y = swin_attention(q, k, v, layout, shifted=False, backend="triton")
        return swin_attention(y, k, v, layout, shifted=True, backend="triton")

    x = randn(1, layout.num_tokens, 2, 32, requires_grad=True)
    eager = two_layers(x)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(two_layers, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    results["compile_out_diff"] = (got - eager).abs().max().item()
    results["compile_grad_diff"] = (g_got - g_eager).abs().max().item()

    # On a GPU, also through inductor with bf16 (the TMA forward on 9.x: its descriptors need Triton's
    # scratch allocator inside compiled code too). Same kernels and inputs, so bitwise equal.
    if not interpret:
        q, k, v = (randn(1, layout.num_tokens, 2, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

        def one_layer(q, k, v):
            return swin_attention(q, k, v, layout, shifted=True, backend="triton")

        grad = torch.randn_like(q)
        eager = [one_layer(q, k, v)]
        eager += torch.autograd.grad(eager[0], (q, k, v), grad)
        got = [torch.compile(one_layer, fullgraph=True)(q, k, v)]
        got += torch.autograd.grad(got[0], (q, k, v), grad)
        results["inductor_bf16_equal"] = all(torch.equal(a, b) for a, b in zip(eager, got))

    # opcheck: schema, fake implementation and autograd registration of both ops, both dQ modes.
    small = WindowLayout(3, 4, 1, 2, 2)
    q, k, v = (randn(1, small.num_tokens, 1, 16, requires_grad=True) for _ in range(3))
    blocks = _blocks(tb, q)
    tiles = [tb.tile_table(small, False, device, b) for b in blocks]
    try:
        for atomic in (False, True):
            torch.library.opcheck(tb.fwd_op, (q, k, v, *tiles, 0.25, *blocks, 64, atomic))
            out, lse = tb.fwd_op(q, k, v, *tiles, 0.25, *blocks, 64, atomic)
            bwd_args = (torch.randn_like(out), *(t.detach() for t in (q, k, v, out, lse)))
            torch.library.opcheck(tb.bwd_op, (*bwd_args, tiles[1], tiles[2], 0.25, *blocks[1:], 64, atomic))
        results["opcheck"] = "ok"
    except Exception as exc:  # reported to the parent, which fails the test with the message
        results["opcheck"] = f"{type(exc).__name__}: {exc}"

    # Head dims above 128 are refused with a ValueError naming the limit.
    try:
        big = randn(1, small.num_tokens, 1, 160)
        swin_attention(big, big, big, small, backend="triton")
        results["big_head_dim"] = "no error"
    except ValueError as exc:
        results["big_head_dim"] = str(exc)
    return results


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", params=DEVICES)
def interpreted(request):
    """Measurements of one worker run: ``"interpreter"`` (CPU, always) or ``"cuda"`` (shipped configs).

    The CUDA run goes through the ``triton_op`` with the real per-architecture configs and TMA choice.
    """
    env = dict(os.environ, SEMANTICGEN_TRITON_AUTOTUNE="1")
    env.pop("SEMANTICGEN_SWIN_ATOMIC_DQ", None)
    if request.param == "interpreter":
        env["TRITON_INTERPRET"] = "1"
    else:
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: the shipped Triton configs run only on a GPU")
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", request.param],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"{request.param} subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- tests
def _check_errors(result, dtype_name):
    assert not result["nonfinite"], "kernel left NaN/inf (unwritten or overflowed) elements"
    assert result["dtype_ok"]
    for name in ("out", "dq", "dk", "dv"):
        ours, plain, magnitude = result[name]
        bound = error_bound(plain, magnitude, getattr(torch, dtype_name))
        assert ours <= bound, f"{name}: error {ours:.3g} > {bound:.3g} (plain torch {plain:.3g})"


@pytest.mark.parametrize("parity", list(PARITIES))
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_fp64(interpreted, case, order, parity):
    _check_errors(interpreted["cases"][f"{case} {order} {parity}"], CASES[case][4])


@pytest.mark.parametrize("parity", list(PARITIES))
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", ATOMIC_CASES)
def test_atomic_dq_backward_matches_fp64(interpreted, case, order, parity):
    _check_errors(interpreted["cases"][f"{case} {order} {parity} atomic-dQ"], CASES[case][4])


def test_load_paths(interpreted):
    """fp32 always uses pointer loads. Half precision: under the interpreter, tensor descriptors (TMA) in
    blocked order and pointers in streams order (as the worker chose); on a GPU, TMA exactly on 9.x."""
    used = interpreted["tma_used"]
    for case, spec in CASES.items():
        for order in ORDERS:
            for parity in PARITIES:
                if spec[4] == "float32":
                    expected = False
                elif interpreted["device_kind"] == "interpreter":
                    expected = order == "blocked"
                else:
                    expected = interpreted["gpu_tma_expected"]
                assert used[f"{case} {order} {parity}"] is expected, (case, order, parity)


def test_orders_agree(interpreted):
    assert interpreted["orders_agree"] < 1e-5


def test_atomic_dq_is_refused_when_deterministic_or_malformed(interpreted):
    assert "non-deterministic" in interpreted["atomic_refused"]
    assert "SEMANTICGEN_SWIN_ATOMIC_DQ must be 0 or 1" in interpreted["atomic_bad_value"]


def test_non_contiguous_inputs_and_custom_scale(interpreted):
    assert interpreted["inputs_were_non_contiguous"]
    _check_errors(interpreted["non_contiguous"], "float32")


def test_saved_lse_is_the_windowed_logsumexp(interpreted):
    assert interpreted["lse_shape"] == [1, 2, 36]  # [B, H, N], caller order
    assert interpreted["lse_dtype"] == "torch.float32"
    assert set(interpreted["lse_error"]) == set(ORDERS)
    for order, (ours, plain, magnitude) in interpreted["lse_error"].items():
        bound = error_bound(plain, magnitude, torch.float32)  # plain torch: logsumexp of fp32 masked scores
        assert ours <= bound, f"{order}: error {ours:.3g} > {bound:.3g} (plain torch {plain:.3g})"


def test_stride_zero_gradient(interpreted):
    _check_errors(interpreted["expanded_grad"], "float32")


def test_backward_is_bitwise_repeatable(interpreted):
    """Repeated passes of the default backward give bitwise the same gradients.

    On CUDA this is the determinism check: the programs of a launch run concurrently, and the worker
    runs five passes, bf16 and fp32, over hundreds of programs. Under the interpreter, which runs one
    program at a time and cannot race, it shows only that nothing carries over between calls."""
    result = interpreted["repeatable_backward"]
    assert result["unequal"] == [], result
    if interpreted["device_kind"] == "cuda":
        assert result["passes"] >= 5 and "torch.bfloat16" in result["dtypes"]


def test_autotune_configs_are_bitwise_identical(interpreted):
    if interpreted["device_kind"] == "interpreter":
        pytest.skip("the interpreter table has one config per kernel; compared on a GPU only")
    assert interpreted["config_mismatches"] == []


def test_backend_none_picks_triton(interpreted):
    assert interpreted["available"] is None
    assert interpreted["default_matches_triton"]


def test_torch_compile_fullgraph(interpreted):
    assert interpreted["compile_out_diff"] < 1e-6
    assert interpreted["compile_grad_diff"] < 1e-5


def test_inductor_bf16_matches_eager(interpreted):
    if interpreted["device_kind"] == "interpreter":
        pytest.skip("inductor compiles CUDA kernels; the interpreter path is covered by the aot_eager test")
    assert interpreted["inductor_bf16_equal"]


def test_opcheck(interpreted):
    assert interpreted["opcheck"] == "ok"


def test_head_dim_above_limit_is_a_value_error(interpreted):
    assert "head dim must be <= 128" in interpreted["big_head_dim"]


def test_registration_without_gpu_or_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs under the interpreter")
    from semanticgen.ops.swin_attention import available_backends, interface
    from semanticgen.ops.swin_attention import triton_backend as tb

    backend = interface._BACKENDS["triton"]
    assert backend.devices == ("cuda",)  # plain CPU users keep the "cpu" backend
    assert backend.priority > interface._BACKENDS["reference"].priority
    assert set(backend.dtypes) == {torch.bfloat16, torch.float16, torch.float32}
    if not torch.cuda.is_available():
        assert "no CUDA device" in tb.triton_unavailable()
        assert "no CUDA device" in available_backends("cuda")["triton"]
    assert available_backends("cpu")["triton"] is not None


@pytest.mark.parametrize("order", ORDERS)
def test_tile_table_covers_every_window_row_once(order):
    from semanticgen.ops.swin_attention import WindowLayout
    from semanticgen.ops.swin_attention import triton_backend as tb

    layout = WindowLayout(7, 5, 3, 4, 3).with_order(order)
    straddles = 0
    for shifted in (False, True):
        segments = layout.segments(shifted)
        table = tb.tile_table(layout, shifted, "cpu", 16)
        assert table.dtype == torch.int32 and table.shape[1] == 5
        assert table.shape[0] == sum(-(-s.length // 16) for s in segments)  # ragged windows: only their own tiles
        covered = []
        for start0, end0, start1, end1, first in table.tolist():
            assert (start0, end0, start1, end1) in segments
            tokens = [*range(start0, end0), *range(start1, end1)]
            covered += tokens[first : first + 16]
            straddles += first < end0 - start0 < min(first + 16, len(tokens))  # rows of both ranges
        assert sorted(covered) == list(range(layout.num_tokens))  # every token once, as its window's row
        assert tb.tile_table(layout, shifted, "cpu", 16) is table  # cached on the layout
    if order == "streams":
        assert straddles  # the layout has tiles that straddle the VAE/semantic boundary


def test_tile_table_rejects_bad_block():
    from semanticgen.ops.swin_attention import WindowLayout
    from semanticgen.ops.swin_attention import triton_backend as tb

    with pytest.raises(ValueError, match="block must be a positive int"):
        tb.tile_table(WindowLayout(3, 2, 0, 0, 2), False, "cpu", 0)


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker(sys.argv[sys.argv.index("--worker") + 1])))


def test_cuda_op_traces_into_its_triton_kernel_without_gpu(monkeypatch):
    """AOTAutograd (what torch.compile runs) sees the forward Triton kernel itself, not an opaque op.

    Fake CUDA tensors need no GPU; the device capability is pinned to an H100's for config lookup.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs under the interpreter")
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    from semanticgen.ops.swin_attention import WindowLayout
    from semanticgen.ops.swin_attention import triton_backend as tb

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    layout = WindowLayout(4, 8, 1, 4, 2)
    tiles = tb.tile_table(layout, True, "cpu", 128)
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    def forward(q, k, v, tiles):
        return tb.fwd_op(q, k, v, tiles, tiles, tiles, 0.125, 128, 128, 128, 64, False)[0]

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q, k, v = (torch.empty(1, layout.num_tokens, 2, 64, dtype=torch.bfloat16, device="cuda") for _ in range(3))
        tiles = mode.from_tensor(tiles).to("cuda")
        out = aot_function(forward, fw_compiler=keep_graph)(q, k, v, tiles)
    assert out.shape == q.shape and out.device.type == "cuda"
    code = "\n".join(graphs)
    assert "triton_kernel_wrapper_functional" in code
    assert "'BLOCK_M': 128" in code and "'HEAD_DIM': 64" in code
    # Contiguous bf16 on a (pretend) 9.x device takes the tensor-descriptor path when Triton has it.
    from semanticgen.kernels._triton_utils import tma_enabled

    assert f"'TMA': {tma_enabled()}" in code
