"""The varlen backend: segment tables, order handling, kernel choice and backend selection.

FlashAttention's varlen kernel runs only on CUDA, so on CPU the backend's core runs with a stand-in
varlen function (a loop over ``cu_seqlens`` calling SDPA, differentiable) that also checks the packed
tensors and tables it receives; the results are compared with the dense-mask reference in fp64. With a
CUDA device the same cases run through the real kernel in bf16.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from semanticgen.ops import WindowLayout, swin_attention, swin_attention_reference
from semanticgen.ops.swin_attention import interface
from semanticgen.ops.swin_attention import varlen_backend as vb

# name -> (Tv, Sv, Ts, Ss, Tw)
LAYOUTS = {
    "Ts=0": (6, 5, 0, 0, 2),
    "Ts=3 not dividing Tv=8": (8, 3, 3, 2, 4),
    "odd Tw=3": (7, 4, 3, 2, 3),
    "Tw=1 one-frame windows": (5, 3, 5, 2, 1),
    "Tv=3<Tw=8": (3, 4, 2, 3, 8),
}
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="the real varlen kernel needs CUDA")
    ),
]


def _layout(dims, order):
    tv, sv, ts, ss, tw = dims
    return WindowLayout(
        vae_frames=tv, vae_tokens_per_frame=sv, sem_frames=ts, sem_tokens_per_frame=ss, window=tw, order=order
    )


class SdpaVarlen:
    """CPU stand-in for FlashAttention's varlen function that checks what the backend hands it.

    Each window ``cu[i]:cu[i + 1]`` of the packed ``[T, H, D]`` tensors gets its own SDPA call; records the
    calls so tests can look at the tables and at the memory the packed inputs live in.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, scale):
        assert q.dim() == 3 and q.shape == k.shape == v.shape and q.stride(-1) == 1
        assert cu_seqlens.dtype == torch.int32 and cu_seqlens.device == q.device
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        assert bounds[0] == 0 and bounds[-1] == q.shape[0] and min(lengths) > 0
        assert max_seqlen == max(lengths)
        self.calls.append({"q_ptr": q.data_ptr(), "cu_seqlens": bounds, "max_seqlen": max_seqlen, "scale": scale})
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            window = [t[a:b].transpose(0, 1) for t in (q, k, v)]  # [H, L, D]
            outs.append(F.scaled_dot_product_attention(*window, scale=scale).transpose(0, 1))
        return torch.cat(outs)


def _attn_for(device):
    if device == "cpu":
        return SdpaVarlen(), torch.float64, 1e-10, 1e-10
    return vb._kernel_for(torch.device(device)).fn, torch.bfloat16, 3e-2, 6e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["streams", "blocked"])
@pytest.mark.parametrize("shifted", [False, True], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("dims", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_matches_reference_forward_and_gradients(dims, shifted, order, device):
    layout = _layout(dims, order)
    attn, dtype, out_tol, grad_tol = _attn_for(device)
    batch, heads, dim, scale = 2, 3, 16, 0.3
    inputs = [torch.randn(batch, layout.num_tokens, heads, dim, dtype=torch.float64) for _ in range(3)]
    grad = torch.randn_like(inputs[0])

    ours_in = [t.to(device, dtype).requires_grad_() for t in inputs]
    out = vb.varlen_swin_attention(*ours_in, layout, shifted, scale, attn)
    assert out.shape == ours_in[0].shape and out.dtype == dtype
    ours = [out, *torch.autograd.grad(out, ours_in, grad.to(device, dtype))]

    ref_in = [t.clone().requires_grad_() for t in inputs]
    ref = swin_attention_reference(*ref_in, layout, shifted=shifted, scale=scale)
    exact = [ref, *torch.autograd.grad(ref, ref_in, grad)]
    for name, a, e, tol in zip(("out", "dq", "dk", "dv"), ours, exact, (out_tol, grad_tol, grad_tol, grad_tol)):
        err = (a.double().cpu() - e).abs().max().item()
        assert err <= tol * max(1.0, e.abs().max().item()), f"{name}: max error {err}"


def test_packs_windows_of_every_sample_with_offsets():
    layout = _layout(LAYOUTS["Ts=3 not dividing Tv=8"], "blocked")
    n = layout.num_tokens
    for shifted in (False, True):
        one = layout.cu_seqlens(shifted).tolist()
        three = vb.varlen_segments(layout, shifted, 3, "cpu")
        assert three.dtype == torch.int32
        expected = [b * n + x for b in range(3) for x in one[:-1]] + [3 * n]
        assert three.tolist() == expected
        assert vb.varlen_segments(layout, shifted, 3, "cpu") is three  # built once per (parity, batch, device)
    # Streams order has the same window lengths, so the same boundaries.
    assert vb.varlen_segments(layout.with_order("streams"), True, 2, "cpu").tolist() == (
        vb.varlen_segments(layout, True, 2, "cpu").tolist()
    )


def test_blocked_contiguous_input_is_passed_as_a_view():
    layout = _layout(LAYOUTS["odd Tw=3"], "blocked")
    q, k, v = (torch.randn(2, layout.num_tokens, 2, 8, dtype=torch.float64) for _ in range(3))
    attn = SdpaVarlen()
    vb.varlen_swin_attention(q, k, v, layout, True, 0.5, attn)
    assert attn.calls[0]["q_ptr"] == q.data_ptr()  # no gather, no copy
    assert attn.calls[0]["scale"] == 0.5
    assert attn.calls[0]["max_seqlen"] == layout.max_window_length(True)


def test_non_contiguous_blocked_input():
    layout = _layout(LAYOUTS["Tw=1 one-frame windows"], "blocked")
    # [B, H, N, D] storage seen as [B, N, H, D]: the packed view needs a copy, the result must not change.
    q, k, v = (torch.randn(2, 3, layout.num_tokens, 8, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    out = vb.varlen_swin_attention(q, k, v, layout, False, 0.25, SdpaVarlen())
    ref = swin_attention_reference(q, k, v, layout, shifted=False, scale=0.25)
    torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------------------ kernel wrappers
def _fake_varlen_module(monkeypatch, with_scale: bool):
    seen = {}

    def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        seen["scale"] = scale
        return SdpaVarlen()(q, k, v, cu_q, max_q, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)

    if with_scale:

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None):
            return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale)
    else:  # torch 2.9's signature: no scale

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
            assert not is_causal
            return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k)

    import torch.nn.attention.varlen as varlen_module

    monkeypatch.setattr(varlen_module, "varlen_attn", varlen_attn)
    vb._torch_varlen_scale_kwarg.cache_clear()  # read the fake's signature (the test clears it again after)
    return seen


@pytest.mark.parametrize("with_scale", [True, False], ids=["scale-kwarg", "torch-2.9-no-scale"])
def test_torch_varlen_wrapper_applies_the_scale(monkeypatch, with_scale):
    seen = _fake_varlen_module(monkeypatch, with_scale)
    layout = _layout(LAYOUTS["Ts=3 not dividing Tv=8"], "streams")
    q, k, v = (torch.randn(2, layout.num_tokens, 2, 8, dtype=torch.float64) for _ in range(3))
    try:
        out = vb.varlen_swin_attention(q, k, v, layout, True, 0.2, vb._torch_varlen)
    finally:
        vb._torch_varlen_scale_kwarg.cache_clear()
    assert seen["scale"] == (0.2 if with_scale else None)
    torch.testing.assert_close(out, swin_attention_reference(q, k, v, layout, shifted=True, scale=0.2))


def test_package_wrapper_takes_the_output_of_a_tuple(monkeypatch):
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None):
        out = SdpaVarlen()(q, k, v, cu_q, max_q, softmax_scale)
        return out, torch.zeros(q.shape[1], q.shape[0])  # (out, lse), as some FlashAttention-3 releases

    monkeypatch.setitem(sys.modules, "fake_fa3", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    layout = _layout(LAYOUTS["odd Tw=3"], "blocked")
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 8, dtype=torch.float64) for _ in range(3))
    out = vb.varlen_swin_attention(q, k, v, layout, False, 0.4, vb._package_varlen("fake_fa3"))
    torch.testing.assert_close(out, swin_attention_reference(q, k, v, layout, shifted=False, scale=0.4))


@pytest.mark.parametrize(
    ("registry", "fa3", "fa2", "capability", "expected"),
    [
        ("FA4", True, True, (9, 0), "-> FA4"),  # an activated torch impl wins: varlen_attn runs it
        (None, True, True, (9, 0), "FlashAttention-3"),
        (None, True, True, (8, 0), "flash_attn.flash_attn_varlen_func"),  # FA3 package is Hopper-only
        (None, False, True, (9, 0), "flash_attn.flash_attn_varlen_func"),
        (None, False, False, (9, 0), "torch varlen_attn"),
    ],
)
def test_kernel_choice(monkeypatch, registry, fa3, fa2, capability, expected):
    monkeypatch.setattr(vb, "_registry_impl", lambda: registry)
    monkeypatch.setattr(vb, "_have", lambda m: {"flash_attn_interface": fa3, "flash_attn": fa2}[m])
    monkeypatch.setattr(vb, "_device_capability", lambda device: capability)
    kernel = vb._kernel_for(torch.device("cuda", 0))
    assert expected in kernel.name
    assert (kernel.fn is vb._torch_varlen) == (registry is not None or not (fa2 or fa3))


def test_kernel_name_without_cuda():
    if torch.cuda.is_available():
        assert not vb.varlen_kernel_name().startswith("unavailable")
    else:
        assert vb.varlen_kernel_name() == f"unavailable: {vb.varlen_unavailable()}"


# ----------------------------------------------------------------------------- envelope, selection
@pytest.mark.parametrize(
    ("dtype", "head_dim", "capability", "rows", "needle"),
    [
        (torch.bfloat16, 128, (9, 0), 586_080, None),
        (torch.float16, 256, (8, 0), 10, None),
        (torch.bfloat16, 64, None, 10, "CUDA tensors only"),
        (torch.bfloat16, 64, (7, 5), 10, "compute capability >= 8.0"),
        (torch.float32, 64, (9, 0), 10, "dtypes"),
        (torch.bfloat16, 12, (9, 0), 10, "multiples of 8"),
        (torch.bfloat16, 264, (9, 0), 10, "<= 256"),
        (torch.bfloat16, 64, (9, 0), 2**31, "int32"),
    ],
)
def test_varlen_envelope(dtype, head_dim, capability, rows, needle):
    reason = vb.varlen_unsupported(dtype, head_dim, capability, rows)
    assert (reason is None) if needle is None else (needle in reason)


def test_registry_entry():
    backend = interface._BACKENDS["varlen"]
    assert backend.devices == ("cuda",)
    assert set(backend.dtypes) == {torch.bfloat16, torch.float16}
    assert backend.priority > 20  # above triton's, which takes what FlashAttention cannot
    assert backend.accepts is vb.varlen_rejects and isinstance(backend.describe(), str)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter lets triton take CPU tensors")
def test_cpu_tensors_pick_the_cpu_backend():
    layout = _layout(LAYOUTS["odd Tw=3"], "streams")
    q = torch.randn(1, layout.num_tokens, 2, 8)
    assert interface._select_backend(None, q).name == "cpu"
    assert interface._select_backend(None, q.bfloat16()).name == "cpu"


def test_explicit_varlen_on_cpu_tensors_is_a_clear_error():
    layout = _layout(LAYOUTS["odd Tw=3"], "blocked")
    q = torch.randn(1, layout.num_tokens, 2, 8, dtype=torch.bfloat16)
    expected = "unavailable: no CUDA device" if not torch.cuda.is_available() else "runs on cuda tensors"
    with pytest.raises(ValueError, match=expected):
        swin_attention(q, q, q, layout, backend="varlen")
    with pytest.raises(ValueError, match="CUDA tensors only"):
        vb.swin_attention_varlen(q, q, q, layout, False, 0.3)  # the backend function checks on its own
    with pytest.raises(TypeError, match="dtype must be one of"):
        vb.swin_attention_varlen(q.float(), q.float(), q.float(), layout, False, 0.3)


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    """The registry as a CUDA machine would see it, on CPU tensors: varlen runs "here" on an sm90 device."""
    capability = {"value": (9, 0)}
    monkeypatch.setattr(vb, "_device_capability", lambda device: capability["value"])
    backends = dict(interface._BACKENDS)
    backends["varlen"] = dataclasses.replace(
        backends["varlen"], devices=("cpu",), unavailable=lambda: None, fn=lambda *a: "varlen ran"
    )
    backends.pop("triton", None)  # under TRITON_INTERPRET it would also take CPU tensors
    monkeypatch.setattr(interface, "_BACKENDS", backends)
    return capability


@pytest.mark.parametrize(
    ("dtype", "head_dim", "capability", "expected"),
    [
        (torch.bfloat16, 64, (9, 0), "varlen"),
        (torch.float16, 256, (8, 0), "varlen"),
        (torch.float32, 64, (9, 0), "cpu"),  # FlashAttention has no fp32: the next backend takes it
        (torch.bfloat16, 12, (9, 0), "cpu"),
        (torch.bfloat16, 64, (7, 5), "cpu"),
    ],
)
def test_selection_is_data_driven(varlen_on_cpu, dtype, head_dim, capability, expected):
    varlen_on_cpu["value"] = capability
    layout = _layout(LAYOUTS["odd Tw=3"], "blocked")
    q = torch.randn(1, layout.num_tokens, 2, head_dim, dtype=dtype)
    assert interface._select_backend(None, q).name == expected
    if expected == "varlen":
        assert swin_attention(q, q, q, layout) == "varlen ran"


def test_explicit_varlen_outside_its_envelope(varlen_on_cpu):
    layout = _layout(LAYOUTS["odd Tw=3"], "blocked")
    q = torch.randn(1, layout.num_tokens, 2, 12, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cannot run these inputs: .*multiples of 8"):
        swin_attention(q, q, q, layout, backend="varlen")
    q = torch.randn(1, layout.num_tokens, 2, 16)
    with pytest.raises(TypeError, match="'varlen' supports dtypes"):
        swin_attention(q, q, q, layout, backend="varlen")


def test_no_accepting_backend_lists_every_reason(monkeypatch):
    # Two backends on the device, neither takes the inputs: the error names both and why.
    varlen = dataclasses.replace(interface._BACKENDS["varlen"], devices=("cpu",), unavailable=lambda: None)
    fp16_only = dataclasses.replace(varlen, name="cuda", dtypes=(torch.float16,), accepts=None, priority=5)
    monkeypatch.setattr(interface, "_BACKENDS", {"varlen": varlen, "cuda": fp16_only})
    monkeypatch.setattr(vb, "_device_capability", lambda device: (9, 0))
    layout = _layout(LAYOUTS["odd Tw=3"], "blocked")
    q = torch.randn(1, layout.num_tokens, 2, 8)
    with pytest.raises(TypeError, match=r"no cpu backend takes these inputs \(varlen: supports dtypes .*; cuda: "):
        swin_attention(q, q, q, layout)
    q = torch.randn(1, layout.num_tokens, 2, 12, dtype=torch.bfloat16)  # dtype fine for varlen, head dim not
    with pytest.raises(ValueError, match="varlen: FlashAttention takes head dims that are multiples of 8"):
        swin_attention(q, q, q, layout)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="selection among the real CUDA backends needs CUDA")
def test_cuda_tensors_pick_varlen_inside_its_envelope():
    layout = _layout(LAYOUTS["odd Tw=3"], "blocked")
    q = torch.randn(1, layout.num_tokens, 2, 64, device="cuda", dtype=torch.bfloat16)
    if vb.varlen_rejects(q) is None:
        assert interface._select_backend(None, q).name == "varlen"
        out = swin_attention(q, q, q, layout)
        ref = swin_attention_reference(q.float(), q.float(), q.float(), layout)
        assert (out.float() - ref).abs().max().item() < 3e-2
    fallback = interface._select_backend(None, q.float()).name
    assert fallback != "varlen"  # FlashAttention has no fp32


def test_window_shard_runs_on_its_slice():
    """A context-parallel rank's WindowShard (whole windows, blocked order) needs only the shard's own tables."""
    from semanticgen.ops.swin_attention import WindowShard

    layout = WindowLayout(8, 4, 2, 2, 4, order="blocked")
    shard = WindowShard(layout, 1, 3, shifted=True)
    start, end = shard.token_range
    q, k, v = (torch.randn(2, layout.num_tokens, 2, 8, dtype=torch.float64) for _ in range(3))
    whole = swin_attention_reference(q, k, v, layout, shifted=True, scale=0.3)
    part = vb.varlen_swin_attention(q[:, start:end], k[:, start:end], v[:, start:end], shard, True, 0.3, SdpaVarlen())
    torch.testing.assert_close(part, whole[:, start:end])
