"""Rectified flow: timestep sampling, noising, loss, noise augmentation and the CFG Euler sampler."""

from __future__ import annotations

import pytest
import torch

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


def test_flow_noising_and_loss():
    z0, eps = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    t = torch.tensor([0.0, 0.3, 1.0])
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
def test_euler_sampler_integrates_the_straight_line_field_exactly(steps, shift, dtype):
    # The rectified-flow field of a single data point x0: v(z, t) = (z - x0) / t. Its trajectories are straight
    # lines, so Euler lands on x0 exactly whatever the step count or time grid (up to rounding: float32 runs
    # the fused kernels, float64 plain torch).
    x0 = torch.randn(2, 3, 4, dtype=dtype)
    noise = torch.randn(2, 3, 4, dtype=dtype)
    out = euler_sample(
        lambda z, t: (z - x0) / t[:, None, None].to(dtype), noise, steps=steps, shift=shift, progress=False
    )
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out, x0, rtol=tol, atol=tol)


def test_euler_sampler_constant_field_and_inputs():
    noise = torch.randn(2, 5)
    noise_before = noise.clone()
    v = torch.randn(2, 5)
    seen = []

    def velocity(z, t):
        seen.append(t.clone())
        return v

    out = euler_sample(velocity, noise, steps=4, progress=False)
    torch.testing.assert_close(out, noise - v)  # integrates from t=1 to t=0: z0 = z1 - v
    assert len(seen) == 4 and all(t.shape == (2,) for t in seen)
    torch.testing.assert_close(torch.stack(seen)[:, 0], torch.tensor([1.0, 0.75, 0.5, 0.25]))
    assert torch.equal(noise, noise_before)  # the caller's noise is not modified in place


def test_cfg_with_guidance_one_equals_conditional():
    x0 = torch.randn(3, 4)
    cond = lambda z, t: (z - x0) / t[:, None]
    uncond = lambda z, t: z * 0.3 + 1.0
    noise = torch.randn(3, 4)
    plain = euler_sample(cond, noise, steps=5, progress=False)
    # A tensor guidance always runs the fused CFG step, so this exercises it with guidance 1.
    guided = euler_sample(cond, noise, steps=5, guidance=torch.tensor(1.0), uncond_fn=uncond, progress=False)
    torch.testing.assert_close(guided, plain)
    per_sample = euler_sample(cond, noise, steps=5, guidance=torch.ones(3), uncond_fn=uncond, progress=False)
    torch.testing.assert_close(per_sample, plain)


def test_cfg_guidance_combines_velocities():
    noise = torch.randn(2, 6)
    vc, vu = torch.randn(2, 6), torch.randn(2, 6)
    for g in (0.0, 2.5, torch.tensor([1.0, 4.0])):
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


def test_euler_sampler_float32_fused_path_matches_plain_torch_loop():
    noise = torch.randn(2, 3, 8)
    fn = lambda z, t: torch.tanh(z) * (1 + t[:, None, None])
    un = lambda z, t: z  # returns its input: the sampler must not update it in place underneath
    out = euler_sample(fn, noise, steps=6, shift=2.0, guidance=3.0, uncond_fn=un, progress=False)
    times = sampling_schedule(6, shift=2.0)
    z = noise.clone()
    for i in range(6):
        t = times[i].expand(2)
        vc, vu = fn(z, t), un(z, t)
        z = z + (times[i + 1] - times[i]) * (vu + 3.0 * (vc - vu))
    torch.testing.assert_close(out, z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_matching_loss_gradient_matches_plain_torch(dtype):
    z0, eps = torch.randn(2, 4, 6, dtype=dtype), torch.randn(2, 4, 6, dtype=dtype)
    v = torch.randn(2, 4, 6, dtype=dtype, requires_grad=True)
    loss = flow_matching_loss(v, z0, eps)
    assert loss.dtype == torch.float32
    loss.backward()
    v_ref = v.detach().float().requires_grad_(True)
    ref = (v_ref - (eps.float() - z0.float())).square().mean()
    ref.backward()
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(v.grad.float(), v_ref.grad, rtol=tol, atol=tol)


def test_docstring_examples_run():
    import doctest

    import semanticgen.rectified_flow as rf

    result = doctest.testmod(rf, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
