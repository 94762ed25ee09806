"""Rectified flow: timestep sampling, noising, the flow-matching loss, noise augmentation and a CFG Euler sampler.

Convention (shared with :mod:`semanticgen.ops`): ``z_t = (1 - t) z0 + t eps``, velocity target
``u = eps - z0``; sampling integrates from ``t = 1`` (noise) to ``t = 0`` (data) with ``z <- z + (t_next - t) v``.
The elementwise work (noising, loss, Euler and CFG steps) runs through the fused kernels of
:mod:`semanticgen.ops.flow`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from semanticgen._checks import check_int, check_number, is_int, is_real
from semanticgen.ops import flow as flow_ops

__all__ = [
    "time_shift",
    "resolution_shift",
    "sample_timesteps",
    "sampling_schedule",
    "flow_noising",
    "flow_matching_loss",
    "noise_augment",
    "euler_sample",
    "randn_per_sample",
]

TIMESTEP_KINDS = ("uniform", "logit_normal")
Scalar = float | torch.Tensor
Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for a whole batch, one per sample (each sample's noise then depends on its own generator only,
not on the batch it is drawn in), or ``None`` for torch's global one."""


def randn_per_sample(
    shape: Sequence[int],
    generator: Generators,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape = [B, ...]``.

    With a sequence of ``B`` generators sample ``i`` is drawn from ``generator[i]`` alone, so a sample's noise is
    the same whether it is drawn alone or in a batch of any size (what ``torch.randn((1, ...), generator=g)``
    draws). A single generator (or ``None``) draws the whole batch at once.

    Raises:
        ValueError: the number of generators is not ``B``. TypeError: an item is not a ``torch.Generator``.
    """
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    generators = list(generator)
    if not shape or len(generators) != shape[0]:
        raise ValueError(
            f"randn_per_sample: need one generator per sample ({shape[0] if shape else 0}), got {len(generators)}"
        )
    for g in generators:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"randn_per_sample: generators must be torch.Generator, got {type(g).__name__}")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generators])


# --------------------------------------------------------------------------------------------------------------
# Elementwise maths through the fused ops of semanticgen.ops.flow (one pass over memory, no temporaries).
# Those kernels take float32/bfloat16/float16; float64 (used for exactness checks) runs the same expression in
# plain torch.
def _fused(x: torch.Tensor) -> bool:
    return x.dtype in flow_ops.SUPPORTED_DTYPES


def _per_batch(value: Scalar, like: torch.Tensor) -> Scalar:
    """A float, 0-d tensor or ``[B]`` tensor, shaped to broadcast against ``like [B, ...]``."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value.to(like.device).reshape(-1, *([1] * (like.dim() - 1)))
    return value


def _unaliased(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``v`` in ``z``'s dtype, copied if it shares memory with ``z`` (which the in-place step overwrites)."""
    v = v.to(z.dtype)
    if v.device == z.device and v.untyped_storage().data_ptr() == z.untyped_storage().data_ptr():
        v = v.clone()
    return v


def _euler_step_(z: torch.Tensor, v: torch.Tensor, dt: Scalar) -> torch.Tensor:
    """``z += dt * v`` in place."""
    if _fused(z):
        return flow_ops.euler_step_(z, v, dt)
    return z.add_(_per_batch(dt, z) * v)


def _cfg_euler_step_(
    z: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: Scalar, dt: Scalar
) -> torch.Tensor:
    """``z += dt * (v_uncond + guidance * (v_cond - v_uncond))`` in place."""
    if _fused(z):
        return flow_ops.cfg_euler_step(z, v_cond, v_uncond, guidance, dt, out=z)
    return z.add_(_per_batch(dt, z) * (v_uncond + _per_batch(guidance, z) * (v_cond - v_uncond)))


def _flow_noising(z0: torch.Tensor, eps: torch.Tensor, t: Scalar) -> tuple[torch.Tensor, torch.Tensor]:
    if _fused(z0):
        return flow_ops.flow_noising(z0, eps, t)
    tb = _per_batch(t, z0)
    return (1 - tb) * z0 + tb * eps, eps - z0


def _flow_matching_loss(v_pred: torch.Tensor, z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    if _fused(v_pred):
        return flow_ops.flow_matching_loss(v_pred, z0, eps)
    return (v_pred - (eps - z0)).square().mean()


# --------------------------------------------------------------------------------------------------------------
def _check_scalar_or_batch(name: str, value: object, batch: int) -> None:
    if not (is_real(value) or isinstance(value, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor (0-d or [B]), got {type(value).__name__}")
    if isinstance(value, torch.Tensor) and not (value.dim() == 0 or tuple(value.shape) == (batch,)):
        raise ValueError(
            f"{name} must be a 0-d tensor or one value per batch element [B={batch}], got {tuple(value.shape)}"
        )


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift ``t' = shift * t / (1 + (shift - 1) * t)``.

    ``shift > 1`` moves time towards the noise end (``t = 1``): larger videos keep more signal at a given
    noise level, so they need more steps spent at high noise. ``shift = 1`` is the identity; ``0`` and
    ``1`` are fixed points.
    """
    check_number("shift", shift, positive=True, finite=True, who="time_shift")
    if shift == 1:
        return t
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, *, base_tokens: int = 4096, base_shift: float = 1.0) -> float:
    """Time shift for a sequence of ``num_tokens`` tokens: ``base_shift * sqrt(num_tokens / base_tokens)``.

    SD3's rule: noising ``m`` times as many tokens to the same ``t`` leaves a signal-to-noise ratio that
    corresponds, per token, to ``t`` shifted by ``sqrt(m)``. ``base_tokens`` is the size the schedule was tuned
    for, ``base_shift`` the shift used there.
    """
    check_int("num_tokens", num_tokens, minimum=1, who="resolution_shift")
    check_int("base_tokens", base_tokens, minimum=1, who="resolution_shift")
    base_shift = check_number("base_shift", base_shift, positive=True, finite=True, who="resolution_shift")
    return base_shift * math.sqrt(num_tokens / base_tokens)


def sample_timesteps(
    batch: int,
    *,
    kind: str = "logit_normal",
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    loc: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """Training timesteps.

    Args:
        batch: number of timesteps ``B``.
        kind: ``"uniform"`` (``U(0, 1)``) or ``"logit_normal"`` (``sigmoid(N(loc, scale^2))``, which spends more
            samples in the middle where the velocity is hardest to predict, as in SD3).
        shift: resolution shift applied afterwards (:func:`time_shift`).
        generator: RNG (on ``device``) for reproducible draws.
        loc, scale: the logit-normal's location and scale.

    Returns:
        ``float32 [B]`` in ``(0, 1)``.
    """
    check_int("batch", batch, minimum=1, who="sample_timesteps")
    if kind == "uniform":
        t = torch.rand(batch, generator=generator, device=device)
    elif kind == "logit_normal":
        if not scale > 0:
            raise ValueError(f"sample_timesteps: scale must be > 0, got {scale}")
        t = torch.sigmoid(torch.randn(batch, generator=generator, device=device) * scale + loc)
    else:
        raise ValueError(f"sample_timesteps: kind must be one of {TIMESTEP_KINDS}, got {kind!r}")
    return time_shift(t, shift)


def sampling_schedule(steps: int, *, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """Sampling times ``float32 [steps + 1]`` from 1 down to 0, evenly spaced then :func:`time_shift`-ed."""
    check_int("steps", steps, minimum=1, who="sampling_schedule")
    return time_shift(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def flow_noising(z0: torch.Tensor, eps: torch.Tensor, t: Scalar) -> tuple[torch.Tensor, torch.Tensor]:
    """``z_t = (1 - t) z0 + t eps`` and the velocity target ``u = eps - z0``.

    Args:
        z0: clean data ``[B, ...]``; eps: noise of the same shape.
        t: float, 0-d tensor or ``[B]`` tensor.
    """
    if z0.shape != eps.shape:
        raise ValueError(f"flow_noising: z0 {tuple(z0.shape)} and eps {tuple(eps.shape)} must have the same shape")
    _check_scalar_or_batch("flow_noising: t", t, z0.shape[0])
    if isinstance(t, torch.Tensor):
        t = t.to(z0.device)  # timesteps drawn on the host (per-sample generators) follow the data
    return _flow_noising(z0, eps, t)


def flow_matching_loss(v_pred: torch.Tensor, z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Conditional flow-matching loss ``mean((v_pred - (eps - z0))^2)``, a 0-d float32 tensor (float64 for float64)."""
    if not (v_pred.shape == z0.shape == eps.shape):
        raise ValueError(
            f"flow_matching_loss: v_pred {tuple(v_pred.shape)}, z0 {tuple(z0.shape)} and eps {tuple(eps.shape)} "
            "must have the same shape"
        )
    return _flow_matching_loss(v_pred, z0, eps)


def noise_augment(z_sem: torch.Tensor, level: Scalar, *, generator: Generators = None) -> torch.Tensor:
    """Noise-augment semantic tokens before they condition stage 2 (as RAE does for its decoder).

    Stage 2 trains on semantic tokens from real videos but runs on tokens that stage 1 generated; noising
    both to the same level hides their difference. The noise follows the flow's own forward process,
    ``(1 - level) * z_sem + level * eps``, so ``level`` reads as a flow time: 0 leaves ``z_sem`` unchanged,
    1 replaces it by pure noise.

    Args:
        z_sem: ``[B, ...]`` semantic tokens.
        level: float in ``[0, 1]``, or a tensor (0-d or ``[B]``) of such values (e.g. a random level per
            sample during training).
        generator: RNG for ``eps`` (on ``z_sem``'s device): one, or one per sample (:func:`randn_per_sample`).

    Returns:
        Tensor like ``z_sem``.
    """
    _check_scalar_or_batch("noise_augment: level", level, z_sem.shape[0])
    if not isinstance(level, torch.Tensor):
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"noise_augment: level must be in [0, 1], got {level}")
        if level == 0:
            return z_sem
    else:
        level = level.to(z_sem.device)
    eps = randn_per_sample(z_sem.shape, generator, device=z_sem.device, dtype=z_sem.dtype)
    return _flow_noising(z_sem, eps, level)[0]


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def euler_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor | Sequence[int],
    *,
    steps: int,
    guidance: Scalar = 1.0,
    uncond_fn: VelocityFn | None = None,
    progress: bool = True,
    generator: torch.Generator | None = None,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Integrate the flow from noise (``t = 1``) to data (``t = 0``) with Euler steps and classifier-free guidance.

    Each step evaluates ``v = velocity_fn(z, t)`` (and ``uncond_fn(z, t)`` when guiding) and applies
    ``z <- z + dt * (v_u + guidance * (v_c - v_u))``. The loop never synchronises with the device: times and
    step sizes are precomputed tensors on the device, and nothing is read back.

    Args:
        velocity_fn: ``(z [B, ...], t [B]) -> v [B, ...]``, the conditional velocity.
        noise: the starting ``z_1`` (not modified), or a shape to draw it from ``N(0, I)`` with ``generator``.
        steps: number of Euler steps.
        guidance: CFG scale (float, 0-d or ``[B]`` tensor). A Python ``1.0`` skips ``uncond_fn`` entirely.
        uncond_fn: the unconditional velocity (e.g. the model with an empty prompt); required unless
            ``guidance`` is the float 1.0.
        progress: show a progress bar over steps.
        generator: RNG used when ``noise`` is a shape (same seed, same result).
        shift: resolution shift of the time grid (:func:`sampling_schedule`).
        device, dtype: where and in which dtype to draw ``noise`` when it is a shape.

    Returns:
        ``z_0`` with the shape of ``noise``.

    Example:
        >>> x0 = torch.randn(2, 3)
        >>> out = euler_sample(lambda z, t: (z - x0) / t[:, None], torch.randn(2, 3), steps=4, progress=False)
        >>> torch.allclose(out, x0, atol=1e-5)
        True
    """
    if not callable(velocity_fn):
        raise TypeError(f"euler_sample: velocity_fn must be callable, got {type(velocity_fn).__name__}")
    if isinstance(noise, torch.Tensor):
        z = noise.clone()
    elif isinstance(noise, Sequence) and all(is_int(s) for s in noise):
        z = torch.randn(tuple(noise), generator=generator, device=device, dtype=dtype)
    else:
        raise TypeError(f"euler_sample: noise must be a tensor or a shape (sequence of ints), got {noise!r}")
    if z.dim() < 1 or z.shape[0] < 1:
        raise ValueError(f"euler_sample: noise must be [B, ...] with B >= 1, got shape {tuple(z.shape)}")
    batch = z.shape[0]
    _check_scalar_or_batch("euler_sample: guidance", guidance, batch)
    guided = isinstance(guidance, torch.Tensor) or float(guidance) != 1.0
    if guided and uncond_fn is None:
        raise ValueError("euler_sample: guidance != 1 needs uncond_fn (the unconditional velocity)")
    if isinstance(guidance, torch.Tensor):
        guidance = guidance.to(device=z.device, dtype=torch.float32)  # once, before the loop

    times = sampling_schedule(steps, shift=shift, device=z.device)
    dts = times[1:] - times[:-1]  # negative: integrating towards t = 0; dts[i] is read on the device
    t_rows = times[:, None].expand(steps + 1, batch).contiguous()  # row i is the [B] time of step i

    for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        t = t_rows[i]
        # A model run under autocast may return a lower-precision velocity; the state stays in z's dtype.
        v_cond = _unaliased(velocity_fn(z, t), z)
        if guided:
            _cfg_euler_step_(z, v_cond, _unaliased(uncond_fn(z, t), z), guidance, dts[i])
        else:
            _euler_step_(z, v_cond, dts[i])
    return z
