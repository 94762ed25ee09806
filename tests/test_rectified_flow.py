"""Rectified flow: timestep sampling, noising, loss, noise augmentation and the CFG Euler sampler.

The noising, loss and sampler tests take ``device`` (tests/conftest.py): ``cpu`` always, ``cuda`` on a GPU machine,
where the fused ops run their CUDA kernels against the same references. Inputs are drawn on the CPU and moved, so
both devices see the same values. The timestep and noise-augmentation tests check seeded CPU generators: CPU only.
"""

from __future__ import annotations

import pytest
import torch
from conftest import error_bound, require_extension

from semanticgen.rectified_flow import (
    euler_sample,
    flow_matching_loss,
    flow_noising,
    noise_augment,
    resolution_shift,
    sample_timesteps,
    sampling_schedule,
    time_shift,
)


@pytest.fixture
def device(device):
    """conftest's ``device``; on CUDA the fused ops need ``semanticgen._C`` built with its CUDA kernels (a skip
    otherwise, or a failure under ``SEMANTICGEN_REQUIRE_EXTENSION=1``)."""
    if device.type == "cuda":
        require_extension(cuda=True)
    return device


def _plain_euler(fn, noise, steps, shift, guidance=None, uncond_fn=None):
    """The guided Euler sampler as a plain torch loop in ``noise``'s dtype and on its device (fp64: the exact
    reference)."""
    times = sampling_schedule(steps, shift=shift).to(device=noise.device, dtype=noise.dtype)
    z = noise.clone()
    for i in range(steps):
        t = times[i].expand(noise.shape[0])
        v = fn(z, t)
        if guidance is not None:
            vu = uncond_fn(z, t)
            v = vu + guidance * (v - vu)
        z = z + (times[i + 1] - times[i]) * v
    return z


def _assert_rule(name, ours, plain, exact):
    """``ours`` within the accuracy rule (``conftest.error_bound``): at most twice plain torch's error at the
    same dtype, both against fp64."""
    ours_err = (ours.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    bound = error_bound(plain_err, exact.abs().max().item(), ours.dtype)
    assert ours_err <= bound, f"{name}: error {ours_err:.3g} > {bound:.3g} (plain torch {plain_err:.3g})"


def test_time_shift_formula_and_fixed_points():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(time_shift(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert time_shift(t, 1.0) is t
    with pytest.raises(ValueError, match="shift"):
        time_shift(t, 0.0)


def test_resolution_shift():
    assert resolution_shift(4096) == 1.0
    assert resolution_shift(4 * 4096) == 2.0
    assert resolution_shift(1024, base_tokens=256, base_shift=1.5) == 3.0
    with pytest.raises(ValueError, match="num_tokens"):
        resolution_shift(0)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal"])
def test_sample_timesteps_range_seed_and_shift(kind):
    a = sample_timesteps(4096, kind=kind, generator=torch.Generator().manual_seed(3))
    b = sample_timesteps(4096, kind=kind, generator=torch.Generator().manual_seed(3))
    assert a.shape == (4096,) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() > 0 and a.max() < 1
    # Both are symmetric about 1/2; 4096 samples put the median within 0.03 of it.
    assert abs(a.median().item() - 0.5) < 0.03
    shifted = sample_timesteps(4096, kind=kind, shift=3.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(shifted, time_shift(a, 3.0))
    assert shifted.median() > 0.7


def test_logit_normal_concentrates_in_the_middle():
    t = sample_timesteps(8192, kind="logit_normal", generator=torch.Generator().manual_seed(0))
    u = sample_timesteps(8192, kind="uniform", generator=torch.Generator().manual_seed(0))
    middle = lambda x: ((x > 0.25) & (x < 0.75)).float().mean()
    assert middle(t) > middle(u) + 0.1  # logit-normal(0, 1): ~0.70 in the middle half; uniform: 0.5


def test_sample_timesteps_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        sample_timesteps(2, kind="cosine")
    with pytest.raises(ValueError, match="batch"):
        sample_timesteps(0)


def test_sampling_schedule_runs_from_one_to_zero():
    s = sampling_schedule(4)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = sampling_schedule(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and torch.all(shifted[1:] < shifted[:-1])
    with pytest.raises(ValueError, match="steps"):
        sampling_schedule(0)


def test_flow_noising_and_loss(device):
    z0, eps = torch.randn(3, 2, 5).to(device), torch.randn(3, 2, 5).to(device)
    t = torch.tensor([0.0, 0.3, 1.0], device=device)
    zt, u = flow_noising(z0, eps, t)
    torch.testing.assert_close(zt[0], z0[0])
    torch.testing.assert_close(zt[1], 0.7 * z0[1] + 0.3 * eps[1])
    torch.testing.assert_close(zt[2], eps[2])
    torch.testing.assert_close(u, eps - z0)
    zt_scalar, _ = flow_noising(z0, eps, 0.3)
    torch.testing.assert_close(zt_scalar, 0.7 * z0 + 0.3 * eps)
    assert flow_matching_loss(eps - z0, z0, eps) == 0
    v = torch.randn_like(z0)
    torch.testing.assert_close(flow_matching_loss(v, z0, eps), torch.mean((v - (eps - z0)) ** 2))
    with pytest.raises(ValueError, match="one value per batch"):
        flow_noising(z0, eps, torch.rand(2))
    with pytest.raises(ValueError, match="same shape"):
        flow_matching_loss(v[:2], z0, eps)


def test_noise_augment_levels():
    z = torch.randn(3, 2, 4, 8)
    assert noise_augment(z, 0.0) is z
    out = noise_augment(z, 1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, torch.randn(z.shape, generator=torch.Generator().manual_seed(5)))
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(noise_augment(z, 0.2, generator=torch.Generator().manual_seed(6)), 0.8 * z + 0.2 * eps)
    level = torch.tensor([0.0, 0.5, 1.0])
    per_sample = noise_augment(z, level, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(per_sample[0], z[0])
    torch.testing.assert_close(per_sample[1], 0.5 * z[1] + 0.5 * eps[1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        noise_augment(z, 1.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64-torch", "fp32-fused"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_sampler_integrates_the_straight_line_field_exactly(steps, shift, dtype, device):
    # The rectified-flow field of a single data point x0: v(z, t) = (z - x0) / t. Its trajectories are straight
    # lines, so Euler lands on x0 exactly whatever the step count or time grid (up to rounding: float32 runs
    # the fused kernels, float64 plain torch).
    x0 = torch.randn(2, 3, 4, dtype=dtype).to(device)
    noise = torch.randn(2, 3, 4, dtype=dtype).to(device)
    field = lambda z, t: (z - x0.to(z.dtype)) / t[:, None, None].to(z.dtype)  # noqa: E731
    out = euler_sample(field, noise, steps=steps, shift=shift, progress=False)
    if dtype == torch.float64:
        # Plain torch is what runs in fp64: there is no other computation to compare it with, so the bound
        # is rounding: FLOOR_ULPS fp64 ulps of |x0| per step.
        bound = error_bound(0.0, x0.abs().max().item(), dtype) * steps
        assert (out - x0).abs().max().item() <= bound
        return
    # The fused step rounds once per step (an fma): it equals a loop that steps in fp64 and rounds to fp32
    # (fp64 holds dt * v exactly; rounding the sum twice differs from once only in rare ties, none here).
    z = noise.clone()
    times = sampling_schedule(steps, shift=shift, device=device)
    for i in range(steps):
        v = field(z, times[i].expand(2))
        z = (z.double() + (times[i + 1] - times[i]).double() * v.double()).float()
    assert torch.equal(out, z)
    if (steps, shift) != (3, 1.0):
        _assert_rule("z", out, _plain_euler(field, noise, steps, shift), x0.double())
        return
    # Here plain torch's two roundings per step happen to cancel on this field: its error (1.49e-8) is a
    # quarter of the once-rounded loop's, 1 fp32 ulp (checked bitwise above), so the rule cannot hold.
    # Recorded, not loosened: the test fails if the case ever meets the rule.
    with pytest.raises(AssertionError, match="plain torch 1.49e-08"):
        _assert_rule("z", out, _plain_euler(field, noise, steps, shift), x0.double())
    pytest.xfail("plain torch's roundings cancel exactly on the straight-line field at steps=3, shift=1")


def test_euler_sampler_constant_field_and_inputs(device):
    noise = torch.randn(2, 5).to(device)
    noise_before = noise.clone()
    v = torch.randn(2, 5).to(device)
    seen = []

    def velocity(z, t):
        seen.append(t.clone())
        return v

    out = euler_sample(velocity, noise, steps=4, progress=False)
    torch.testing.assert_close(out, noise - v)  # integrates from t=1 to t=0: z0 = z1 - v
    assert len(seen) == 4 and all(t.shape == (2,) for t in seen)
    torch.testing.assert_close(torch.stack(seen)[:, 0], torch.tensor([1.0, 0.75, 0.5, 0.25], device=device))
    assert torch.equal(noise, noise_before)  # the caller's noise is not modified in place


def test_cfg_with_guidance_one_equals_conditional(device):
    x0 = torch.randn(3, 4).to(device)
    cond = lambda z, t: (z - x0) / t[:, None]
    uncond = lambda z, t: z * 0.3 + 1.0
    noise = torch.randn(3, 4).to(device)
    plain = euler_sample(cond, noise, steps=5, progress=False)
    # A tensor guidance always runs the fused CFG step, so this exercises it with guidance 1 (a CPU tensor: the
    # sampler moves it to the noise's device once).
    guided = euler_sample(cond, noise, steps=5, guidance=torch.tensor(1.0), uncond_fn=uncond, progress=False)
    torch.testing.assert_close(guided, plain)
    per_sample = euler_sample(cond, noise, steps=5, guidance=torch.ones(3), uncond_fn=uncond, progress=False)
    torch.testing.assert_close(per_sample, plain)


def test_cfg_guidance_combines_velocities(device):
    noise = torch.randn(2, 6).to(device)
    vc, vu = torch.randn(2, 6).to(device), torch.randn(2, 6).to(device)
    for g in (0.0, 2.5, torch.tensor([1.0, 4.0], device=device)):
        out = euler_sample(lambda z, t: vc, noise, steps=3, guidance=g, uncond_fn=lambda z, t: vu, progress=False)
        gb = g[:, None] if isinstance(g, torch.Tensor) else g
        torch.testing.assert_close(out, noise - (vu + gb * (vc - vu)))
    with pytest.raises(ValueError, match="uncond_fn"):
        euler_sample(lambda z, t: vc, noise, steps=3, guidance=2.0, progress=False)


def test_euler_sampler_seeded_noise_is_reproducible():
    fn = lambda z, t: torch.sin(z) * t[:, None, None]
    a = euler_sample(fn, (2, 3, 4), steps=3, generator=torch.Generator().manual_seed(11), progress=False)
    b = euler_sample(fn, (2, 3, 4), steps=3, generator=torch.Generator().manual_seed(11), progress=False)
    c = euler_sample(fn, (2, 3, 4), steps=3, generator=torch.Generator().manual_seed(12), progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(TypeError, match="noise"):
        euler_sample(fn, "noise", steps=3, progress=False)


def test_euler_sampler_progress_bar_can_be_disabled(capsys):
    euler_sample(lambda z, t: z, torch.randn(1, 2), steps=3, progress=False)
    assert "sampling" not in capsys.readouterr().err
    euler_sample(lambda z, t: z, torch.randn(1, 2), steps=3, progress=True)
    assert "sampling" in capsys.readouterr().err


def test_euler_sampler_float32_fused_path_matches_plain_torch_loop(device):
    noise = torch.randn(2, 3, 8).to(device)
    fn = lambda z, t: torch.tanh(z) * (1 + t[:, None, None])
    un = lambda z, t: z  # returns its input: the sampler must not update it in place underneath
    out = euler_sample(fn, noise, steps=6, shift=2.0, guidance=3.0, uncond_fn=un, progress=False)
    plain = _plain_euler(fn, noise, 6, 2.0, guidance=3.0, uncond_fn=un)
    _assert_rule("z", out, plain, _plain_euler(fn, noise.double(), 6, 2.0, guidance=3.0, uncond_fn=un))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_matching_loss_gradient_matches_plain_torch(dtype, device):
    z0, eps = torch.randn(2, 4, 6, dtype=dtype).to(device), torch.randn(2, 4, 6, dtype=dtype).to(device)
    v = torch.randn(2, 4, 6, dtype=dtype).to(device).requires_grad_(True)
    loss = flow_matching_loss(v, z0, eps)
    assert loss.dtype == torch.float32
    loss.backward()
    assert v.grad.dtype == dtype

    def plain_torch(v, z0, eps):
        leaf = v.detach().clone().requires_grad_(True)
        out = (leaf - (eps - z0)).square().mean()
        out.backward()
        return out, leaf.grad

    plain_loss, plain_grad = plain_torch(v, z0, eps)
    exact_loss, exact_grad = plain_torch(v.double(), z0.double(), eps.double())
    _assert_rule("loss", loss, plain_loss, exact_loss)
    _assert_rule("grad", v.grad, plain_grad, exact_grad)


def test_docstring_examples_run():
    import doctest

    import semanticgen.rectified_flow as rf

    result = doctest.testmod(rf, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
