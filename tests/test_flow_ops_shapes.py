"""Fused flow ops over a sweep of shapes: the result must not depend on how the elements are laid out.

The elementwise kernels split the flat index range across threads and read a per-batch scalar (dt,
guidance, t) for each element's batch entry. The batch layout changes only which scalar an element gets:
a 1-D tensor has one-element batch entries, ``(1, n)`` one entry, a large leading dim many short ones, and
odd sizes put entry boundaries and thread boundaries inside vectors. For every layout the op must

* equal, bitwise, the same op on the flat tensor with each element's scalar spelled out per element (every
  element runs the same fp32 expression whichever loop, vector or tail, handles it), and
* meet the accuracy rule against fp64: at most twice eager torch's error at the input dtype (max and
  mean; a single element can land either side of eager's, so on a handful of elements "no worse than
  eager" would be chance).

Timings across these shapes belong in benchmarks/flow_ops.py, not here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import error_bound

from semanticgen.ops import flow

pytestmark = pytest.mark.usefixtures("compiled_ops")

# Sizes straddle the 32768-element parallel grain and the 8/16-lane vectors; batch entries of 1, 2, 3, 7,
# 17 and 40000 elements.
SHAPES = [
    (1,),
    (7,),
    (65537,),
    (1, 65537),
    (65537, 1),
    (32771, 2),
    (21845, 3),
    (9363, 7),
    (3855, 17),
    (3, 40000),
    (5, 3, 7, 311),
]
KINDS = ["float", "batch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ids(value) -> str:
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value).replace("torch.", "")


@pytest.fixture
def _on_device(device):
    with device:
        yield device


def _per_batch(kind: str, values: torch.Tensor):
    """The op's scalar argument: a float (one value) or a ``[B]`` tensor (one per batch entry)."""
    return float(values[0]) if kind == "float" else values


def _per_element(kind: str, values: torch.Tensor, shape) -> torch.Tensor:
    """The same scalar for every element of the flattened tensor (fp32, as the kernels read it)."""
    if kind == "float":
        values = values[:1].expand(shape[0])
    inner = 1
    for d in shape[1:]:
        inner *= d
    return values.to(torch.float32).repeat_interleave(inner)


def _fp64(kind: str, values: torch.Tensor, shape) -> torch.Tensor:
    return _per_element(kind, values, shape).double().reshape(shape)


def _rand(shape, dtype, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def _assert_accurate(ours, eager, ref64, what):
    """The accuracy rule (``conftest.error_bound``) on the max and the mean absolute error."""
    o_err, e_err = (ours.double() - ref64).abs(), (eager.double() - ref64).abs()
    magnitude = ref64.abs().max().item()
    for stat in ("max", "mean"):
        ours_err, plain_err = getattr(o_err, stat)().item(), getattr(e_err, stat)().item()
        bound = error_bound(plain_err, magnitude, ours.dtype)
        assert ours_err <= bound, f"{what}: {stat} error {ours_err:.3g} > {bound:.3g} (eager {plain_err:.3g})"


@pytest.mark.usefixtures("_on_device")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_cfg_euler_step_any_layout(dtype, shape, kind):
    z, vc, vu = _rand(shape, dtype), _rand(shape, dtype, 2.0), _rand(shape, dtype, 2.0)
    g_values, dt_values = 1.0 + 6.0 * torch.rand(shape[0]), -torch.rand(shape[0]) * 0.3 - 0.01
    g, dt = _per_batch(kind, g_values), _per_batch(kind, dt_values)
    out = torch.full_like(z, float("nan"))
    assert flow.cfg_euler_step(z, vc, vu, g, dt, out=out) is out

    flat = [x.reshape(-1) for x in (z, vc, vu)]
    expect = flow.cfg_euler_step(
        *flat, _per_element(kind, g_values, shape), _per_element(kind, dt_values, shape)
    ).reshape(shape)
    assert torch.equal(out, expect)

    g64, dt64 = _fp64(kind, g_values, shape), _fp64(kind, dt_values, shape)
    ref = z.double() + dt64 * (vu.double() + g64 * (vc.double() - vu.double()))
    ge, dte = g64.to(dtype), dt64.to(dtype)
    _assert_accurate(out, z + dte * (vu + ge * (vc - vu)), ref, "cfg_euler_step")


@pytest.mark.usefixtures("_on_device")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_euler_step_any_layout(dtype, shape, kind):
    z, v = _rand(shape, dtype), _rand(shape, dtype, 3.0)
    dt_values = -torch.rand(shape[0]) * 0.3 - 0.01
    zz = z.clone()
    assert flow.euler_step_(zz, v, _per_batch(kind, dt_values)) is zz

    expect = flow.euler_step(z.reshape(-1), v.reshape(-1), _per_element(kind, dt_values, shape)).reshape(shape)
    assert torch.equal(zz, expect)

    dt64 = _fp64(kind, dt_values, shape)
    _assert_accurate(zz, z + dt64.to(dtype) * v, z.double() + dt64 * v.double(), "euler_step")


@pytest.mark.usefixtures("_on_device")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_flow_noising_any_layout(dtype, shape, kind):
    z0, eps = _rand(shape, dtype, 0.5), _rand(shape, dtype)
    t_values = torch.rand(shape[0])
    z_t, u = flow.flow_noising(z0, eps, _per_batch(kind, t_values))

    flat = flow.flow_noising(z0.reshape(-1), eps.reshape(-1), _per_element(kind, t_values, shape))
    assert torch.equal(z_t, flat[0].reshape(shape)) and torch.equal(u, flat[1].reshape(shape))

    t64 = _fp64(kind, t_values, shape)
    te = t64.to(dtype)
    ref = (1 - t64) * z0.double() + t64 * eps.double()
    _assert_accurate(z_t, (1 - te) * z0 + te * eps, ref, "flow_noising z_t")
    _assert_accurate(u, eps - z0, eps.double() - z0.double(), "flow_noising u")


@pytest.mark.usefixtures("_on_device")
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_flow_matching_loss_and_gradient_any_layout(dtype, shape):
    v, z0, eps = (_rand(shape, dtype) for _ in range(3))
    leaf = v.clone().requires_grad_()
    loss = flow.flow_matching_loss(leaf, z0, eps)
    loss.backward()
    flat_leaf = v.reshape(-1).clone().requires_grad_()
    flat_loss = flow.flow_matching_loss(flat_leaf, z0.reshape(-1), eps.reshape(-1))
    flat_loss.backward()
    # The loss reduces in fixed blocks of the flat index, whatever the shape.
    assert torch.equal(loss, flat_loss)
    assert torch.equal(leaf.grad, flat_leaf.grad.reshape(shape))
