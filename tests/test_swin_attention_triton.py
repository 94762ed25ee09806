"""Triton backend of swin_attention: the real kernels, run by Triton's CPU interpreter, against fp64.

``TRITON_INTERPRET=1`` must be set before triton is imported, so every kernel run happens in one
subprocess (this file run as a script, see ``_worker``) that prints its measurements as JSON; the
tests below assert on those numbers. The subprocess poisons fresh ``torch.empty`` allocations with
NaN, so a kernel that leaves an output element unwritten fails. Tolerances follow flash-attn: the
kernel's error against the fp64 reference is at most twice that of the same computation in plain
torch at the input dtype (plus a small floor).

The in-process tests check what needs no kernel run: registration and availability without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# name -> (Tv, Sv, Ts, Ss, Tw), batch, heads, head dim, dtype
CASES = {
    "Ts=0 D=32 fp32": ((6, 5, 0, 0, 2), 2, 2, 32, "float32"),
    "Ts=3 not dividing Tv=8 D=64 bf16": ((8, 3, 3, 2, 4), 1, 2, 64, "bfloat16"),
    "odd Tw=3 D=80 fp32": ((7, 4, 3, 2, 3), 2, 1, 80, "float32"),
    "odd Tw=3 D=80 fp16": ((7, 4, 3, 2, 3), 1, 2, 80, "float16"),
    "Tv=3<Tw=8 D=96 bf16": ((3, 4, 2, 3, 8), 1, 2, 96, "bfloat16"),
    # Windows of 36-40 tokens: several 32-row tiles and key blocks per window, ragged last tiles.
    "multi-tile windows D=128 bf16": ((6, 16, 2, 4, 2), 1, 1, 128, "bfloat16"),
    "multi-tile windows D=64 fp32": ((6, 16, 2, 4, 2), 2, 2, 64, "float32"),
}
PARITIES = {"unshifted": False, "shifted": True}
FLOOR = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


# ---------------------------------------------------------------------------------- subprocess
def _errors(layout, shifted, q, k, v, backend_fn, scale=None):
    """Max abs error vs fp64 of (kernel, plain torch at the input dtype) for out, dq, dk, dv."""
    from semanticgen.ops.swin_attention import swin_attention_reference

    grad = torch.randn_like(q)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = backend_fn(*leaves)
    ours = [out, *torch.autograd.grad(out, leaves, grad)]
    exact_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = swin_attention_reference(*exact_in, layout, shifted=shifted, scale=scale)
    exact = [ref, *torch.autograd.grad(ref, exact_in, grad.double())]
    low_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low = swin_attention_reference(*low_in, layout, shifted=shifted, scale=scale)
    plain = [low, *torch.autograd.grad(low, low_in, grad)]
    nonfinite = any(not torch.isfinite(t).all() for t in ours)
    return {
        name: [(a.double() - e).abs().max().item(), (p.double() - e).abs().max().item()]
        for name, a, e, p in zip(("out", "dq", "dk", "dv"), ours, exact, plain)
    } | {"nonfinite": nonfinite, "dtype_ok": all(t.dtype == q.dtype for t in ours)}


def _worker() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
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
        swin_attention_reference,
    )
    from semanticgen.ops.swin_attention import triton_backend as tb

    results: dict = {"cases": {}}
    torch.manual_seed(0)
    for name, (dims, batch, heads, dim, dtype_name) in CASES.items():
        layout = WindowLayout(*dims)
        dtype = getattr(torch, dtype_name)
        for parity, shifted in PARITIES.items():
            q, k, v = (torch.randn(batch, layout.num_tokens, heads, dim, dtype=dtype) for _ in range(3))
            fn = lambda q, k, v, layout=layout, shifted=shifted: swin_attention(  # noqa: E731
                q, k, v, layout, shifted=shifted, backend="triton"
            )
            results["cases"][f"{name} {parity}"] = _errors(layout, shifted, q, k, v, fn)

    # Non-contiguous q/k/v (strided head dim, [B, H, N, D] transposed) and a custom scale.
    layout = WindowLayout(6, 3, 3, 2, 2)
    q = torch.randn(2, layout.num_tokens, 2, 64)[..., ::2]
    k = torch.randn(2, 2, layout.num_tokens, 32).transpose(1, 2)
    v = torch.randn(2, layout.num_tokens, 32, 2).transpose(2, 3)
    fn = lambda q, k, v: swin_attention(q, k, v, layout, shifted=True, scale=0.3, backend="triton")  # noqa: E731
    results["non_contiguous"] = _errors(layout, True, q, k, v, fn, scale=0.3)
    results["inputs_were_non_contiguous"] = not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())

    # A stride-0 gradient (what ``out.sum().backward()`` hands the op) is read through its strides.
    layout = WindowLayout(5, 6, 2, 3, 2)
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 32, requires_grad=True) for _ in range(3))
    out = swin_attention(q, k, v, layout, shifted=True, backend="triton")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    exact_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = torch.autograd.grad(swin_attention_reference(*exact_in, layout, shifted=True).sum(), exact_in)
    results["expanded_grad_error"] = max((a.double() - e).abs().max().item() for a, e in zip(grads, exact))

    # The saved log-sum-exp, against logsumexp of the fp64 window-masked scores.
    layout = WindowLayout(5, 6, 2, 3, 2)
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 32) for _ in range(3))
    index = layout.index_map(True, "cpu")
    tiles = [tb.tile_table(layout, True, "cpu", b) for b in (32, 32, 32)]
    out, lse = tb.fwd_op(q, k, v, index.perm, index.cu_seqlens, *tiles, 0.25, 32, 32, 32)
    ids = layout.window_ids(True)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 0.25
    scores = scores.masked_fill(ids[:, None] != ids[None, :], float("-inf"))
    results["lse_error"] = (lse.double() - torch.logsumexp(scores, -1)).abs().max().item()
    results["lse_shape"] = list(lse.shape)
    results["lse_dtype"] = str(lse.dtype)

    # Determinism: two backward passes are bitwise equal.
    layout = WindowLayout(6, 16, 2, 4, 2)
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 32, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    runs = []
    for _ in range(2):
        out = swin_attention(q, k, v, layout, shifted=True, backend="triton")
        runs.append(torch.autograd.grad(out, (q, k, v), grad))
    results["deterministic"] = all(torch.equal(a, b) for a, b in zip(*runs))

    # backend=None on CPU tensors picks the interpreted Triton backend.
    results["available_cpu"] = available_backends("cpu")["triton"]
    out_default = swin_attention(q, k, v, layout, shifted=True)
    results["default_matches_triton"] = torch.equal(out_default, out)

    # torch.compile(fullgraph=True) over the interpreter-path custom op, forward and backward.
    torch.empty = real_empty  # fake tensors must not be filled

    def two_layers(x):
        q, k, v = (x * s for s in (1.0, 0.5, -1.0))
        y = swin_attention(q, k, v, layout, shifted=False, backend="triton")
        return swin_attention(y, k, v, layout, shifted=True, backend="triton")

    x = torch.randn(1, layout.num_tokens, 2, 32, requires_grad=True)
    eager = two_layers(x)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(two_layers, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    results["compile_out_diff"] = (got - eager).abs().max().item()
    results["compile_grad_diff"] = (g_got - g_eager).abs().max().item()

    # opcheck: schema, fake implementation and autograd registration of the forward op.
    small = WindowLayout(3, 4, 1, 2, 2)
    index = small.index_map(False, "cpu")
    tiles = [tb.tile_table(small, False, "cpu", 32) for _ in range(3)]
    q, k, v = (torch.randn(1, small.num_tokens, 1, 16, requires_grad=True) for _ in range(3))
    try:
        torch.library.opcheck(tb.fwd_op, (q, k, v, index.perm, index.cu_seqlens, *tiles, 0.25, 32, 32, 32))
        out, lse = tb.fwd_op(q, k, v, index.perm, index.cu_seqlens, *tiles, 0.25, 32, 32, 32)
        bwd_args = (torch.randn_like(out), *(t.detach() for t in (q, k, v, out, lse)), index.perm, index.cu_seqlens)
        torch.library.opcheck(tb.bwd_op, (*bwd_args, tiles[1], tiles[2], 0.25, 32, 32))
        results["opcheck"] = "ok"
    except Exception as exc:  # reported to the parent, which fails the test with the message
        results["opcheck"] = f"{type(exc).__name__}: {exc}"

    # Head dims above 128 are refused with a ValueError naming the limit.
    try:
        big = torch.randn(1, small.num_tokens, 1, 160)
        swin_attention(big, big, big, small, backend="triton")
        results["big_head_dim"] = "no error"
    except ValueError as exc:
        results["big_head_dim"] = str(exc)
    return results


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", SEMANTICGEN_TRITON_AUTOTUNE="1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("parity", list(PARITIES))
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_fp64(interpreted, case, parity):
    result = interpreted["cases"][f"{case} {parity}"]
    assert not result["nonfinite"], "kernel left NaN/inf (unwritten or overflowed) elements"
    assert result["dtype_ok"]
    floor = FLOOR[CASES[case][4]]
    for name in ("out", "dq", "dk", "dv"):
        ours, plain = result[name]
        assert ours <= max(2 * plain, floor), f"{name}: error {ours:.3g} vs plain torch {plain:.3g}"


def test_non_contiguous_inputs_and_custom_scale(interpreted):
    assert interpreted["inputs_were_non_contiguous"]
    result = interpreted["non_contiguous"]
    assert not result["nonfinite"]
    for name in ("out", "dq", "dk", "dv"):
        ours, plain = result[name]
        assert ours <= max(2 * plain, FLOOR["float32"]), f"{name}: error {ours:.3g} vs plain torch {plain:.3g}"


def test_saved_lse_is_the_windowed_logsumexp(interpreted):
    assert interpreted["lse_shape"] == [1, 2, 36]  # [B, H, N], caller order
    assert interpreted["lse_dtype"] == "torch.float32"
    assert interpreted["lse_error"] < 1e-5


def test_stride_zero_gradient(interpreted):
    assert interpreted["expanded_grad_error"] < 1e-5


def test_backward_is_deterministic(interpreted):
    assert interpreted["deterministic"]


def test_backend_none_picks_triton_under_interpreter(interpreted):
    assert interpreted["available_cpu"] is None
    assert interpreted["default_matches_triton"]


def test_torch_compile_fullgraph(interpreted):
    assert interpreted["compile_out_diff"] < 1e-6
    assert interpreted["compile_grad_diff"] < 1e-5


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


def test_tile_table_covers_every_window_row_once():
    from semanticgen.ops.swin_attention import WindowLayout
    from semanticgen.ops.swin_attention import triton_backend as tb

    layout = WindowLayout(7, 5, 3, 4, 3)
    for shifted in (False, True):
        lengths = layout.window_lengths(shifted)
        table = tb.tile_table(layout, shifted, "cpu", 16)
        assert table.dtype == torch.int32 and table.shape[1] == 2
        assert table.shape[0] == sum(-(-n // 16) for n in lengths)  # ragged windows: only their own tiles
        cu = layout.index_map(shifted, "cpu").cu_seqlens.tolist()
        covered = sorted(r for w, start in table.tolist() for r in range(start, min(start + 16, cu[w + 1])))
        assert covered == list(range(layout.num_tokens))
        assert tb.tile_table(layout, shifted, "cpu", 16) is table  # cached on the layout


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker()))


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
    index = layout.index_map(True, "cpu")
    tiles = tb.tile_table(layout, True, "cpu", 128)
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    def forward(q, k, v, perm, cu_seqlens, tiles):
        return tb.fwd_op(q, k, v, perm, cu_seqlens, tiles, tiles, tiles, 0.125, 128, 128, 128)[0]

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q, k, v = (torch.empty(1, layout.num_tokens, 2, 64, dtype=torch.bfloat16, device="cuda") for _ in range(3))
        perm, cu_seqlens, tiles = (mode.from_tensor(t).to("cuda") for t in (index.perm, index.cu_seqlens, tiles))
        out = aot_function(forward, fw_compiler=keep_graph)(q, k, v, perm, cu_seqlens, tiles)
    assert out.shape == q.shape and out.device.type == "cuda"
    code = "\n".join(graphs)
    assert "triton_kernel_wrapper_functional" in code
    assert "'BLOCK_M': 128" in code and "'HEAD_DIM': 64" in code
