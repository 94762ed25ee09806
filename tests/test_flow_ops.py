"""Fused rectified-flow ops (semanticgen.ops.flow) against fp64 formulas, on every device here.

Op tests take ``device`` (tests/conftest.py): ``cpu`` always, ``cuda`` on a GPU machine, where the CUDA
kernels meet the same references. Without ``semanticgen._C`` they skip, or fail under
``SEMANTICGEN_REQUIRE_EXTENSION=1`` (CI).

Accuracy rule: each op must be at least as accurate (max and mean absolute error against fp64) as
the same expression evaluated in eager torch at the input dtype. Sizes are odd on purpose (not
multiples of the 8/16-element vector width) so both the vector loops and the scalar tails run, and
per-batch scalars change value in the middle of a vector.
"""

from __future__ import annotations

import pytest
import torch
from conftest import error_bound

from semanticgen.ops import flow

pytestmark = pytest.mark.usefixtures("compiled_ops")


@pytest.fixture(autouse=True)
def _factories_on_device(request):
    """Tests that take ``device`` build their tensors there: inside ``torch.device(device)`` the factory
    functions (``torch.randn``, ``torch.tensor``, ...) default to it, so one body runs on CPU and on CUDA."""
    if "device" not in request.fixturenames:
        yield
        return
    with request.getfixturevalue("device"):
        yield


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (3, 37), (2, 5, 7, 11), (4, 4099)]
SCALAR_KINDS = ["float", "0d", "batch", "batch_1s"]


def _ids(value) -> str:
    """Readable test ids: ``bfloat16``, ``3x37``."""
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value).replace("torch.", "")


def _scalar(kind: str, values: torch.Tensor, ref: torch.Tensor):
    """dt/guidance/t in one of the accepted forms, on ``ref``'s device; ``values`` holds one float per batch
    element."""
    values = values.to(ref.device)
    if kind == "float":
        return float(values[0])
    if kind == "0d":
        return values[0].clone()
    if kind == "batch":
        return values.clone()
    return values.reshape(-1, *([1] * (ref.dim() - 1))).clone()  # [B, 1, ..., 1]


def _exact(kind: str, s, ref: torch.Tensor) -> torch.Tensor:
    """The scalar operand as the kernel sees it (fp32-rounded), in fp64, shaped to broadcast."""
    if isinstance(s, float):
        return torch.tensor(s, dtype=torch.float32, device=ref.device).double()
    return s.to(torch.float32).double().reshape(-1, *([1] * (ref.dim() - 1)) if s.numel() > 1 else ())


def _eager(s, ref: torch.Tensor):
    """The scalar operand as eager torch at the input dtype would use it, shaped to broadcast."""
    if isinstance(s, float):
        return s
    return s.to(ref.dtype).reshape(-1, *([1] * (ref.dim() - 1)) if s.numel() > 1 else ())


def _errors(got: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float]:
    err = (got.double() - ref64).abs()
    return err.max().item(), err.mean().item()


def _assert_at_least_as_accurate(ours: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, what: str):
    assert ours.dtype == eager.dtype
    o_max, o_mean = _errors(ours, ref64)
    e_max, e_mean = _errors(eager, ref64)
    assert o_max <= e_max, f"{what}: max error {o_max:.3g} > eager {e_max:.3g}"
    assert o_mean <= e_mean, f"{what}: mean error {o_mean:.3g} > eager {e_mean:.3g}"


def _rand(shape, dtype, scale=1.0, device=None):
    return (torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype)


def _batch(shape) -> int:
    return shape[0]


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("kind", SCALAR_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_euler_step_accuracy(device, dtype, shape, kind):
    z, v = _rand(shape, dtype, device=device), _rand(shape, dtype, 3.0, device)
    dt = _scalar(kind, -torch.rand(_batch(shape)) * 0.3 - 0.01, z)
    ref = z.double() + _exact(kind, dt, z) * v.double()
    eager = z + _eager(dt, z) * v
    _assert_at_least_as_accurate(flow.euler_step(z, v, dt), eager, ref, "euler_step")


@pytest.mark.parametrize("kind", SCALAR_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_cfg_euler_step_accuracy(device, dtype, shape, kind):
    z, vc, vu = _rand(shape, dtype, device=device), _rand(shape, dtype, 2.0, device), _rand(shape, dtype, 2.0, device)
    b = _batch(shape)
    g = _scalar(kind, 1.0 + 6.0 * torch.rand(b), z)
    dt = _scalar(kind, -torch.rand(b) * 0.3 - 0.01, z)
    g64, dt64 = _exact(kind, g, z), _exact(kind, dt, z)
    ref = z.double() + dt64 * (vu.double() + g64 * (vc.double() - vu.double()))
    eager = z + _eager(dt, z) * (vu + _eager(g, z) * (vc - vu))
    _assert_at_least_as_accurate(flow.cfg_euler_step(z, vc, vu, g, dt), eager, ref, "cfg_euler_step")


@pytest.mark.parametrize("kind", SCALAR_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_flow_noising_accuracy(device, dtype, shape, kind):
    z0, eps = _rand(shape, dtype, 0.5, device), _rand(shape, dtype, device=device)
    t = _scalar(kind, torch.rand(_batch(shape)), z0)
    t64 = _exact(kind, t, z0)
    z_t, u = flow.flow_noising(z0, eps, t)
    te = _eager(t, z0)
    _assert_at_least_as_accurate(
        z_t, (1 - te) * z0 + te * eps, (1 - t64) * z0.double() + t64 * eps.double(), "flow_noising z_t"
    )
    _assert_at_least_as_accurate(u, eps - z0, eps.double() - z0.double(), "flow_noising u")


def test_flow_noising_endpoints_are_exact(device):
    z0, eps = torch.randn(3, 37, device=device), torch.randn(3, 37, device=device)
    z_t, _ = flow.flow_noising(z0, eps, torch.tensor([0.0, 1.0, 0.0], device=device))
    torch.testing.assert_close(z_t[0], z0[0], rtol=0, atol=0)
    torch.testing.assert_close(z_t[1], eps[1], rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1,), (3, 37), (2, 3, 32771)], ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_flow_matching_loss_accuracy(device, dtype, shape):
    v, z0, eps = (_rand(shape, dtype, device=device) for _ in range(3))
    ref = ((v.double() - (eps.double() - z0.double())) ** 2).mean()
    loss = flow.flow_matching_loss(v, z0, eps)
    assert loss.dtype == torch.float32 and loss.shape == ()
    eager = torch.nn.functional.mse_loss(v, eps - z0)
    assert abs(loss.double() - ref) <= abs(eager.double() - ref)
    # fp32 result of an fp64-blocked sum: close to fp32 rounding of the exact mean.
    assert abs(loss.double() - ref) <= 4 * torch.finfo(torch.float32).eps * ref


def test_flow_matching_loss_is_deterministic_across_thread_counts():
    v, z0, eps = (torch.randn(3 * 32768 + 5) for _ in range(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = flow.flow_matching_loss(v, z0, eps)
        torch.set_num_threads(2)
        two = flow.flow_matching_loss(v, z0, eps)
    finally:
        torch.set_num_threads(before)
    assert one.item() == two.item()


# ----------------------------------------------------------------------------- broadcasting and layouts


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_per_batch_scalar_equals_per_element_float(device, dtype):
    # inner size 37 * 3 = 111: batch boundaries fall inside vectors of 8 and 16.
    z, vc, vu = (_rand((5, 37, 3), dtype, device=device) for _ in range(3))
    g, dt = 1.0 + torch.rand(5, device=device) * 4, -torch.rand(5, device=device)
    got = flow.cfg_euler_step(z, vc, vu, g, dt)
    for b in range(5):
        one = flow.cfg_euler_step(z[b : b + 1], vc[b : b + 1], vu[b : b + 1], float(g[b]), float(dt[b]))
        torch.testing.assert_close(got[b : b + 1], one, rtol=0, atol=0)


def test_wrapper_copies_strided_inputs_for_the_contiguous_kernels(device):
    """The kernels take contiguous memory only (``test_raw_ops_reject_bad_input_without_crashing``: a raw op
    refuses a strided view), so the Python wrappers copy strided inputs first. This checks that copy: a
    transposed view, a sliced one and one with a storage offset give bitwise the result of contiguous
    copies (a wrapper that handed the kernel a view's storage would read its elements in the wrong order)."""
    views = {
        "transposed": lambda: torch.randn(37, 6, device=device).t(),
        "every other column": lambda: torch.randn(6, 74, device=device)[:, ::2],
        "storage offset": lambda: torch.randn(7, 37, device=device)[1:],
    }
    for name, make in views.items():
        z, v, vu = make(), make(), make()
        assert not z.is_contiguous() or z.storage_offset() > 0, name
        c = [x.contiguous() for x in (z, v, vu)]
        dt = -torch.rand(6, device=device)
        torch.testing.assert_close(flow.euler_step(z, v, dt), flow.euler_step(c[0], c[1], dt), rtol=0, atol=0)
        torch.testing.assert_close(
            flow.cfg_euler_step(z, v, vu, 3.0, dt), flow.cfg_euler_step(*c, 3.0, dt), rtol=0, atol=0
        )
        for a, b in zip(flow.flow_noising(z, v, dt.abs()), flow.flow_noising(c[0], c[1], dt.abs())):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(flow.flow_matching_loss(z, v, vu), flow.flow_matching_loss(*c), rtol=0, atol=0)


def test_empty_tensors(device):
    z = torch.empty(0, 5, device=device)
    assert flow.euler_step(z, z, -0.1).shape == (0, 5)
    assert flow.cfg_euler_step(z, z, z, 2.0, -0.1).shape == (0, 5)
    with pytest.raises(ValueError, match="empty"):
        flow.flow_matching_loss(z, z, z)


# ----------------------------------------------------------------------------- out= and in place


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_out_writes_every_element(device, dtype):
    z, vc, vu = (_rand((3, 1001), dtype) for _ in range(3))
    out = torch.full_like(z, float("nan"))
    res = flow.cfg_euler_step(z, vc, vu, 4.0, torch.full((3,), -0.05), out=out)
    assert res is out and not out.isnan().any()
    torch.testing.assert_close(out, flow.cfg_euler_step(z, vc, vu, 4.0, -0.05), rtol=0, atol=0)
    out.fill_(float("nan"))
    flow.euler_step(z, vc, -0.05, out=out)
    torch.testing.assert_close(out, flow.euler_step(z, vc, -0.05), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_flow_noising_out_writes_every_element(device, dtype):
    z0, eps, t = _rand((3, 1001), dtype), _rand((3, 1001), dtype), torch.rand(3)
    z_t, u = torch.full_like(z0, float("nan")), torch.full_like(z0, float("nan"))
    got = flow.flow_noising(z0, eps, t, out=(z_t, u))
    assert got[0] is z_t and got[1] is u
    expect = flow.flow_noising(z0, eps, t)
    torch.testing.assert_close(z_t, expect[0], rtol=0, atol=0)
    torch.testing.assert_close(u, expect[1], rtol=0, atol=0)
    u_strided = torch.empty(1001, 3, dtype=dtype).t()
    flow.flow_noising(z0, eps, t, out=(z_t, u_strided))
    torch.testing.assert_close(u_strided, expect[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"out\[1\] overlaps out\[0\]"):
        flow.flow_noising(z0, eps, t, out=(z_t, z_t))
    with pytest.raises(ValueError, match=r"out\[0\] overlaps z0"):
        flow.flow_noising(z0, eps, t, out=(z0, u))
    with pytest.raises(TypeError, match="pair"):
        flow.flow_noising(z0, eps, t, out=z_t)


def test_out_may_alias_z_and_in_place_step(device):
    z, v, vu = torch.randn(3, 77), torch.randn(3, 77), torch.randn(3, 77)
    expect = flow.euler_step(z, v, -0.1)
    zz = z.clone()
    assert flow.euler_step(zz, v, -0.1, out=zz) is zz
    torch.testing.assert_close(zz, expect, rtol=0, atol=0)
    zz = z.clone()
    assert flow.euler_step_(zz, v, torch.tensor(-0.1)) is zz
    torch.testing.assert_close(zz, expect, rtol=0, atol=0)
    zz = z.clone()
    flow.cfg_euler_step(zz, v, vu, 2.5, -0.1, out=zz)
    torch.testing.assert_close(zz, flow.cfg_euler_step(z, v, vu, 2.5, -0.1), rtol=0, atol=0)


def test_out_non_contiguous_and_non_contiguous_z_in_place(device):
    z, v = torch.randn(5, 33), torch.randn(5, 33)
    out = torch.empty(33, 5).t()
    flow.euler_step(z, v, -0.2, out=out)
    torch.testing.assert_close(out, flow.euler_step(z, v, -0.2), rtol=0, atol=0)
    zt = torch.randn(33, 5).t()
    expect = flow.euler_step(zt, v, -0.2)
    flow.euler_step_(zt, v, -0.2)
    torch.testing.assert_close(zt, expect, rtol=0, atol=0)


def test_sampling_loop_with_device_timesteps_matches_float_loop(device):
    steps, z0 = 7, torch.randn(2, 3, 37)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    dts = ts[1:] - ts[:-1]
    velocity = lambda z, t: -0.5 * z + t  # noqa: E731
    z_tensor, z_float = z0.clone(), z0.clone()
    for i in range(steps):
        flow.euler_step_(z_tensor, velocity(z_tensor, ts[i]), dts[i])
        flow.euler_step_(z_float, velocity(z_float, ts[i]), float(dts[i]))
    torch.testing.assert_close(z_tensor, z_float, rtol=0, atol=0)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    z = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"v has shape \(4, 11\)"):
        flow.euler_step(z, torch.randn(4, 11), 0.1)
    with pytest.raises(TypeError, match="dtype torch.bfloat16"):
        flow.euler_step(z, z.bfloat16(), 0.1)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        flow.euler_step(z.double(), z.double(), 0.1)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        flow.euler_step(z, [1.0], 0.1)
    with pytest.raises(TypeError, match="dt must be a float or a tensor"):
        flow.euler_step(z, z, "0.1")
    with pytest.raises(ValueError, match=r"shape \[4\].*got shape \(5,\)"):
        flow.flow_noising(z, z, torch.rand(5))
    with pytest.raises(ValueError, match=r"got shape \(4, 2\)"):
        flow.flow_noising(z, z, torch.rand(4, 2))
    with pytest.raises(ValueError, match="guidance"):
        flow.cfg_euler_step(z, z, z, torch.ones(3), 0.1)
    with pytest.raises(ValueError, match="v is on meta, expected z's device cpu"):
        flow.euler_step(z, torch.empty(4, 10, device="meta"), 0.1)
    with pytest.raises(ValueError, match="tensor dt is on meta"):
        flow.euler_step(z, z, torch.empty(4, device="meta"))
    with pytest.raises(ValueError, match="out must match the inputs"):
        flow.euler_step(z, z, 0.1, out=torch.empty(4, 9))
    v = torch.randn(4, 10)
    with pytest.raises(ValueError, match="out overlaps v"):
        flow.euler_step(z, v, 0.1, out=v)
    with pytest.raises(ValueError, match="partially overlaps z"):
        big = torch.randn(5, 10)
        flow.euler_step(big[:4], v, 0.1, out=big[1:])
    with pytest.raises(RuntimeError, match="does not support autograd"):
        flow.euler_step_(z.clone().requires_grad_(), v, 0.1)


def test_raw_ops_reject_bad_input_without_crashing(device):
    ops = torch.ops.semanticgen
    z = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="shape"):
        ops.euler_step(z, torch.randn(4, 9), None, 0.1)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.euler_step(z.t(), z.t(), None, 0.1)
    with pytest.raises(RuntimeError, match="float32"):
        ops.flow_noising(z, z, torch.rand(4, dtype=torch.float64), 0.0)
    with pytest.raises(RuntimeError, match=r"shape \[\] or \[4\]"):
        ops.flow_noising(z, z, torch.rand(3), 0.0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops.flow_matching_loss(z.double(), z.double(), z.double())


# ----------------------------------------------------------------------------- autograd


def _grads(fn, inputs):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(1)
    # Drawn in fp32 whatever the outputs' dtype, so the fp64 reference gets the same seeds.
    seeds = [torch.randn_like(o, dtype=torch.float32).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [x for x in inputs if isinstance(x, torch.Tensor)], seeds)
    return outs, grads


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _as_fp64(x):
    return x.detach().double() if isinstance(x, torch.Tensor) else x


def _check_grads(ours_fn, eager_fn, inputs):
    """Outputs and gradients of the fused op within the accuracy rule (``conftest.error_bound``): at most
    twice the error of ``eager_fn`` at the inputs' dtype, both against ``eager_fn`` in fp64."""
    ours, g_ours = _grads(ours_fn, [_leaf(x) if isinstance(x, torch.Tensor) else x for x in inputs])
    ref, g_ref = _grads(eager_fn, [_leaf(x) if isinstance(x, torch.Tensor) else x for x in inputs])
    exact, g_exact = _grads(eager_fn, [_leaf(_as_fp64(x)) if isinstance(x, torch.Tensor) else x for x in inputs])
    names = [f"output {i}" for i in range(len(ours))] + [f"grad {i}" for i in range(len(g_ours))]
    for name, a, b, e in zip(names, (*ours, *g_ours), (*ref, *g_ref), (*exact, *g_exact)):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        ours_err = (a.double() - e).abs().max().item()
        plain_err = (b.double() - e).abs().max().item()
        bound = error_bound(plain_err, e.abs().max().item(), a.dtype)
        assert ours_err <= bound, f"{name}: error {ours_err:.3g} > {bound:.3g} (plain torch {plain_err:.3g})"


def _bview(s, x):
    return s.view(-1, *([1] * (x.dim() - 1)))


def test_euler_step_gradients(device):
    z, v, dt = torch.randn(3, 5, 7), torch.randn(3, 5, 7), -torch.rand(3)
    _check_grads(flow.euler_step, lambda z, v, dt: z + _bview(dt, z) * v, [z, v, dt])
    _check_grads(flow.euler_step, lambda z, v, dt: z + dt * v, [z, v, torch.tensor(-0.3)])
    _check_grads(flow.euler_step, lambda z, v, dt: z + dt * v, [z, v, -0.3])


def test_cfg_euler_step_gradients(device):
    z, vc, vu = (torch.randn(3, 5, 7) for _ in range(3))
    g, dt = 1 + torch.rand(3), -torch.rand(3)
    eager = lambda z, vc, vu, g, dt: z + _bview(dt, z) * (vu + _bview(g, z) * (vc - vu))  # noqa: E731
    _check_grads(flow.cfg_euler_step, eager, [z, vc, vu, g, dt])
    eager_f = lambda z, vc, vu, g, dt: z + dt * (vu + g * (vc - vu))  # noqa: E731
    _check_grads(flow.cfg_euler_step, eager_f, [z, vc, vu, 4.0, torch.tensor(-0.2)])


def test_flow_noising_gradients(device):
    z0, eps, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7), torch.rand(3)
    _check_grads(
        flow.flow_noising, lambda z0, eps, t: ((1 - _bview(t, z0)) * z0 + _bview(t, z0) * eps, eps - z0), [z0, eps, t]
    )
    _check_grads(flow.flow_noising, lambda z0, eps, t: ((1 - t) * z0 + t * eps, eps - z0), [z0, eps, 0.25])


def test_flow_noising_gradient_through_one_output(device):
    z0, eps = _leaf(torch.randn(2, 9)), _leaf(torch.randn(2, 9))
    _, u = flow.flow_noising(z0, eps, 0.3)
    u.sum().backward()
    torch.testing.assert_close(z0.grad, -torch.ones(2, 9))
    torch.testing.assert_close(eps.grad, torch.ones(2, 9))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_flow_matching_loss_gradients(device, dtype):
    v, z0, eps = (_rand((3, 5, 71), dtype) for _ in range(3))
    leaves = [_leaf(x) for x in (v, z0, eps)]
    (3.0 * flow.flow_matching_loss(*leaves)).backward()
    r = v.double() - (eps.double() - z0.double())
    g_ref = 3.0 * 2.0 * r / r.numel()
    for leaf, sign in zip(leaves, (1, 1, -1)):
        assert leaf.grad.dtype == dtype
        # One rounding of the fp32 gradient to the input dtype.
        tol = torch.finfo(dtype).eps * g_ref.abs().max().item()
        torch.testing.assert_close(leaf.grad.double(), sign * g_ref, rtol=torch.finfo(dtype).eps, atol=tol)


# ----------------------------------------------------------------------------- opcheck and torch.compile


def _opcheck_samples() -> dict:
    """label -> (op overload, args), built per test on the default device (see ``_factories_on_device``)."""
    z, v, vu = torch.randn(3, 37), torch.randn(3, 37), torch.randn(3, 37)
    dt, g, t = -torch.rand(3), 1 + torch.rand(3), torch.rand(3)
    ops = torch.ops.semanticgen
    return {
        "euler_step batch dt": (ops.euler_step.default, (z, v, dt, 0.0)),
        "euler_step float dt": (ops.euler_step.default, (z, v, None, -0.25)),
        "euler_step_out": (ops.euler_step_out.default, (z, v, dt, 0.0, torch.empty_like(z))),
        "euler_step_": (ops.euler_step_.default, (z.clone(), v, None, -0.25)),
        "cfg_euler_step batch": (ops.cfg_euler_step.default, (z, v, vu, g, 0.0, dt, 0.0)),
        "cfg_euler_step 0-d dt": (ops.cfg_euler_step.default, (z, v, vu, None, 3.0, dt[:1].reshape(()), 0.0)),
        "cfg_euler_step_out": (ops.cfg_euler_step_out.default, (z, v, vu, g, 0.0, None, -0.1, torch.empty_like(z))),
        "cfg_euler_step_": (ops.cfg_euler_step_.default, (z.clone(), v, vu, None, 3.0, dt, 0.0)),
        "flow_noising": (ops.flow_noising.default, (z, v, t, 0.0)),
        "flow_noising bf16": (ops.flow_noising.default, (z.bfloat16(), v.bfloat16(), None, 0.7)),
        "flow_noising_out": (ops.flow_noising_out.default, (z, v, t, 0.0, torch.empty_like(z), torch.empty_like(z))),
        "flow_matching_loss": (ops.flow_matching_loss.default, (z, v, vu)),
        "flow_matching_loss_backward": (ops.flow_matching_loss_backward.default, (torch.tensor(1.5), z, v, vu)),
    }


# The labels above, listed again so collection needs no compiled op (without _C the tests skip or fail
# one by one instead of the module failing to import).
OPCHECK_SAMPLES = (
    "euler_step batch dt",
    "euler_step float dt",
    "euler_step_out",
    "euler_step_",
    "cfg_euler_step batch",
    "cfg_euler_step 0-d dt",
    "cfg_euler_step_out",
    "cfg_euler_step_",
    "flow_noising",
    "flow_noising bf16",
    "flow_noising_out",
    "flow_matching_loss",
    "flow_matching_loss_backward",
)


# Functional ops with an autograd formula: opcheck also runs their backward.
_DIFFERENTIABLE = {"euler_step", "cfg_euler_step", "flow_noising", "flow_matching_loss"}


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES)
def test_opcheck(device, sample):
    samples = _opcheck_samples()
    assert set(samples) == set(OPCHECK_SAMPLES)
    op, args = samples[sample]
    if op._name.split("::")[1] in _DIFFERENTIABLE:
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_sampler_and_loss(device, backend):
    def sample(z, v_cond, v_uncond, ts, guidance):
        dts = ts[1:] - ts[:-1]
        for i in range(ts.shape[0] - 1):
            flow.cfg_euler_step(z, v_cond * ts[i], v_uncond, guidance, dts[i], out=z)
            flow.euler_step_(z, v_uncond, dts[i] * 0.1)
        return z

    def train_step(z0, eps, t, w):
        z_t, u = flow.flow_noising(z0, eps, t)
        return flow.flow_matching_loss(z_t * w, z0, eps)

    z, vc, vu = torch.randn(2, 3, 37), torch.randn(2, 3, 37), torch.randn(2, 3, 37)
    ts, guidance = torch.linspace(1, 0, 5), torch.tensor([2.0, 5.0])
    compiled = torch.compile(sample, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(z.clone(), vc, vu, ts, guidance), sample(z.clone(), vc, vu, ts, guidance))

    z0, eps, t = torch.randn(2, 3, 37), torch.randn(2, 3, 37), torch.rand(2)
    w1, w2 = torch.ones((), requires_grad=True), torch.ones((), requires_grad=True)
    loss_c = torch.compile(train_step, fullgraph=True, backend=backend)(z0, eps, t, w1)
    loss_e = train_step(z0, eps, t, w2)
    torch.testing.assert_close(loss_c, loss_e)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(w1.grad, w2.grad)
