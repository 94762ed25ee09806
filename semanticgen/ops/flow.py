"""Fused rectified-flow ops: Euler sampling steps, noising and the flow-matching loss.

Convention (rectified flow): ``z_t = (1 - t) * z0 + t * eps``, velocity target ``u = eps - z0``;
sampling runs from ``t = 1`` to ``t = 0`` with Euler steps ``z <- z + (t_next - t) * v``, so ``dt``
is negative.

Each op reads its operands once and writes its result once, in one compiled kernel
(``csrc/cpu/flow_ops_cpu.cpp``, ``csrc/cuda/flow_ops_cuda.cu``), instead of the 3-6 passes and
temporaries of the same expression in eager torch. Inputs are float32, bfloat16 or float16; the
arithmetic is fp32 with one rounding at the store, so results are at least as accurate as the
expression evaluated in eager torch at the input dtype.

Scalar operands (``dt``, ``guidance``, ``t``) are either

* a Python ``float`` (passed to the kernel by value), or
* a tensor on the op's device holding one value (shape ``[]`` or ``[1]``) or one value per batch
  element (shape ``[B]``, or ``[B, 1, ..., 1]``), where ``B = x.shape[0]``. The kernel reads it on
  the device, so a sampling loop whose ``dt`` comes from a device tensor of timesteps never
  synchronises with the host and can be captured in a CUDA graph. Non-float32 tensors are converted
  to float32 (on the device). A one-element CPU tensor is also accepted for a CUDA input and read
  as a float (that read is free: the value is already on the host).

Sampling loop that allocates nothing per step::

    ts = torch.linspace(1.0, 0.0, steps + 1, device=z.device)
    dts = ts[1:] - ts[:-1]                    # negative
    for i in range(steps):
        v = model(z, ts[i].expand(z.shape[0]))
        euler_step_(z, v, dts[i])             # z += dts[i] * v, dts[i] read on the device
"""

from __future__ import annotations

import numbers

import torch

from semanticgen._extension import extension_available, require_extension

__all__ = ["euler_step", "euler_step_", "cfg_euler_step", "flow_noising", "flow_matching_loss", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

ScalarLike = float | torch.Tensor


def _ops():
    require_extension("semanticgen.ops.flow")
    return torch.ops.semanticgen


# ----------------------------------------------------------------------------- input checks


def _check_tensor(fn: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: {name} must be float32, bfloat16 or float16, got {x.dtype}")
    return x


def _check_operands(fn: str, ref_name: str, ref: object, **others: object) -> list[torch.Tensor]:
    """Same shape, dtype and device for every tensor operand; returns them contiguous, ``ref`` first."""
    ref = _check_tensor(fn, ref_name, ref)
    checked = [ref.contiguous()]
    for name, x in others.items():
        x = _check_tensor(fn, name, x)
        if x.shape != ref.shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}, expected {ref_name}'s {tuple(ref.shape)}")
        if x.dtype != ref.dtype:
            raise TypeError(f"{fn}: {name} has dtype {x.dtype}, expected {ref_name}'s {ref.dtype}")
        if x.device != ref.device:
            raise ValueError(f"{fn}: {name} is on {x.device}, expected {ref_name}'s device {ref.device}")
        checked.append(x.contiguous())
    return checked


def _scalar_operand(fn: str, name: str, x: object, ref: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """``(tensor, 0.0)`` for a tensor operand (float32, shape ``[]`` or ``[B]``), ``(None, x)`` for a float."""
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return None, float(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a float or a tensor, got {type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must be a real-valued tensor, got {x.dtype}")
    batch = ref.shape[0] if ref.dim() > 0 else 1
    if x.numel() == 1:
        flat = x.reshape(())
    elif ref.dim() > 0 and x.dim() >= 1 and x.shape[0] == batch and x.numel() == batch:
        flat = x.reshape(batch)  # [B] or [B, 1, ..., 1]
    else:
        raise ValueError(
            f"{fn}: {name} must be a float, a one-element tensor or one value per batch element "
            f"(shape [{batch}] for {tuple(ref.shape)} inputs), got shape {tuple(x.shape)}"
        )
    if flat.device != ref.device:
        if flat.dim() == 0 and flat.device.type == "cpu":
            return None, float(flat)  # a host value already: reading it costs no device sync
        raise ValueError(f"{fn}: tensor {name} is on {flat.device}, expected the inputs' device {ref.device}")
    return flat.to(torch.float32).contiguous(), 0.0


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    )


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' memory ranges intersect (conservative: by storage extent)."""
    if a.device != b.device or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def extent(t: torch.Tensor) -> tuple[int, int]:
        start = t.data_ptr()
        span = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1 if t.numel() else 0
        return start, start + span * t.element_size()

    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1


def _check_out(
    fn: str, out: object, z: torch.Tensor, inputs: dict[str, torch.Tensor], name: str = "out"
) -> torch.Tensor:
    """Validates an output buffer; returns it. ``out`` may be ``inputs["z"]`` itself but no other input."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != z.shape or out.dtype != z.dtype or out.device != z.device:
        raise ValueError(
            f"{fn}: {name} must match the inputs (shape {tuple(z.shape)}, {z.dtype}, {z.device}), "
            f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out, *inputs.values())):
        raise RuntimeError(f"{fn}: out= does not support autograd; call it without out= or under torch.no_grad()")
    if not torch.compiler.is_compiling():
        for other, x in inputs.items():
            if other != "z" and _overlaps(out, x):
                raise ValueError(f"{fn}: {name} overlaps {other}" + ("; out may alias z only" if "z" in inputs else ""))
        if "z" in inputs and _overlaps(out, z) and not _same_memory(out, z):
            raise ValueError(f"{fn}: {name} partially overlaps z; pass z itself to update it in place")
    return out


def _in_place_target(out: torch.Tensor, z: torch.Tensor) -> bool:
    """True when ``out`` is ``z`` (the same contiguous memory), so the in-place kernel can run."""
    if out is z:
        return z.is_contiguous()
    if torch.compiler.is_compiling():
        return False
    return z.is_contiguous() and _same_memory(out, z)


# ----------------------------------------------------------------------------- public ops


def euler_step(z: torch.Tensor, v: torch.Tensor, dt: ScalarLike, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """One Euler step ``z + dt * v``.

    Args:
        z: current sample ``[B, ...]`` (float32, bfloat16 or float16).
        v: velocity, same shape, dtype and device as ``z``.
        dt: ``t_next - t`` (negative when sampling from t=1 to t=0): a float, or a tensor of shape
            ``[]`` or ``[B]`` on ``z``'s device (see the module docstring).
        out: optional preallocated result (same shape/dtype/device as ``z``); may be ``z`` itself.

    Returns:
        ``[B, ...]`` tensor in ``z``'s dtype (``out`` when given).

    Example::

        z = euler_step(z, v, -0.02)
        euler_step(z, v, dts[i], out=z)  # in place, same as euler_step_(z, v, dts[i])
    """
    z_c, v_c = _check_operands("euler_step", "z", z, v=v)
    dt_t, dt_v = _scalar_operand("euler_step", "dt", dt, z)
    ops = _ops()
    if out is None:
        return ops.euler_step(z_c, v_c, dt_t, dt_v)
    _check_out("euler_step", out, z, {"z": z, "v": v})
    if _in_place_target(out, z):
        ops.euler_step_(out, v_c, dt_t, dt_v)
    elif out.is_contiguous():
        ops.euler_step_out(z_c, v_c, dt_t, dt_v, out)
    else:
        out.copy_(ops.euler_step(z_c, v_c, dt_t, dt_v))
    return out


def euler_step_(z: torch.Tensor, v: torch.Tensor, dt: ScalarLike) -> torch.Tensor:
    """In-place Euler step ``z += dt * v``; returns ``z``. Shapes and ``dt`` as in :func:`euler_step`."""
    _check_tensor("euler_step_", "z", z)
    return euler_step(z, v, dt, out=z)


def cfg_euler_step(
    z: torch.Tensor,
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor,
    guidance: ScalarLike,
    dt: ScalarLike,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Classifier-free-guided Euler step ``z + dt * (v_uncond + guidance * (v_cond - v_uncond))``.

    Args:
        z: current sample ``[B, ...]`` (float32, bfloat16 or float16).
        v_cond: conditional velocity, same shape, dtype and device as ``z``.
        v_uncond: unconditional velocity, same shape, dtype and device as ``z``.
        guidance: guidance scale (1.0 = no guidance): a float or a tensor ``[]``/``[B]``.
        dt: ``t_next - t``: a float or a tensor ``[]``/``[B]`` on ``z``'s device.
        out: optional preallocated result; may be ``z`` itself (in-place update).

    Returns:
        ``[B, ...]`` tensor in ``z``'s dtype (``out`` when given).

    Example::

        cfg_euler_step(z, v_c, v_u, 5.0, dts[i], out=z)
    """
    fn = "cfg_euler_step"
    z_c, vc_c, vu_c = _check_operands(fn, "z", z, v_cond=v_cond, v_uncond=v_uncond)
    g_t, g_v = _scalar_operand(fn, "guidance", guidance, z)
    dt_t, dt_v = _scalar_operand(fn, "dt", dt, z)
    ops = _ops()
    if out is None:
        return ops.cfg_euler_step(z_c, vc_c, vu_c, g_t, g_v, dt_t, dt_v)
    _check_out(fn, out, z, {"z": z, "v_cond": v_cond, "v_uncond": v_uncond})
    if _in_place_target(out, z):
        ops.cfg_euler_step_(out, vc_c, vu_c, g_t, g_v, dt_t, dt_v)
    elif out.is_contiguous():
        ops.cfg_euler_step_out(z_c, vc_c, vu_c, g_t, g_v, dt_t, dt_v, out)
    else:
        out.copy_(ops.cfg_euler_step(z_c, vc_c, vu_c, g_t, g_v, dt_t, dt_v))
    return out


def flow_noising(
    z0: torch.Tensor, eps: torch.Tensor, t: ScalarLike, *, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noised sample and velocity target: ``z_t = (1 - t) * z0 + t * eps`` and ``u = eps - z0``.

    Args:
        z0: clean data ``[B, ...]`` (float32, bfloat16 or float16).
        eps: Gaussian noise, same shape, dtype and device as ``z0``.
        t: timestep in ``[0, 1]``: a float or a tensor ``[]``/``[B]`` (one per batch element, broadcast
            over the remaining dimensions) on ``z0``'s device.
        out: optional preallocated ``(z_t, u)`` (each like ``z0``, aliasing no input and not each
            other); no autograd through it.

    Returns:
        ``(z_t, u)``, both ``[B, ...]`` in ``z0``'s dtype (the ``out`` pair when given).

    Example::

        t = torch.rand(z0.shape[0], device=z0.device)
        z_t, u = flow_noising(z0, torch.randn_like(z0), t)
    """
    fn = "flow_noising"
    z0_c, eps_c = _check_operands(fn, "z0", z0, eps=eps)
    t_t, t_v = _scalar_operand(fn, "t", t, z0)
    ops = _ops()
    if out is None:
        return tuple(ops.flow_noising(z0_c, eps_c, t_t, t_v))
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"{fn}: out must be a (z_t, u) pair of tensors, got {type(out).__name__}")
    z_t, u = out
    inputs = {"z0": z0, "eps": eps}
    _check_out(fn, z_t, z0, inputs, name="out[0]")
    _check_out(fn, u, z0, {**inputs, "out[0]": z_t}, name="out[1]")
    if z_t.is_contiguous() and u.is_contiguous():
        ops.flow_noising_out(z0_c, eps_c, t_t, t_v, z_t, u)
    else:
        new_z_t, new_u = ops.flow_noising(z0_c, eps_c, t_t, t_v)
        z_t.copy_(new_z_t)
        u.copy_(new_u)
    return z_t, u


def flow_matching_loss(v_pred: torch.Tensor, z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss ``mean((v_pred - (eps - z0)) ** 2)`` over all elements, with a fused backward.

    The reduction is fp32 within blocks of fixed size and fp64 across them, in a fixed order, so the
    value does not depend on the thread count.

    Args:
        v_pred: predicted velocity ``[B, ...]`` (float32, bfloat16 or float16).
        z0: clean data, same shape, dtype and device.
        eps: noise, same shape, dtype and device.

    Returns:
        0-d float32 tensor (float32 for every input dtype: a bf16 loss would round away the
        differences between training steps).

    Example::

        z_t, u = flow_noising(z0, eps, t)
        loss = flow_matching_loss(model(z_t, t), z0, eps)
        loss.backward()
    """
    v_c, z0_c, eps_c = _check_operands("flow_matching_loss", "v_pred", v_pred, z0=z0, eps=eps)
    if v_c.numel() == 0:
        raise ValueError("flow_matching_loss: inputs are empty; the mean of no elements is undefined")
    return _ops().flow_matching_loss(v_c, z0_c, eps_c)


# ----------------------------------------------------------------------------- fake kernels and autograd


def _batch_view(s: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A ``[]`` or ``[B]`` scalar operand shaped to broadcast against ``ref [B, ...]``."""
    return s if s.dim() == 0 else s.view(-1, *([1] * (ref.dim() - 1)))


def _reduce_to(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Sum of ``x [B, ...]`` down to the shape of the scalar operand ``s`` (``[]`` or ``[B]``)."""
    return x.sum() if s.dim() == 0 else x.reshape(s.shape[0], -1).sum(dim=1)


def _scalar_value(tensor: torch.Tensor | None, value: float, ref: torch.Tensor) -> torch.Tensor | float:
    return value if tensor is None else _batch_view(tensor, ref)


def _register() -> None:
    lib = "semanticgen::"

    @torch.library.register_fake(lib + "euler_step")
    def _(z, v, dt, dt_value):
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "cfg_euler_step")
    def _(z, v_cond, v_uncond, guidance, guidance_value, dt, dt_value):
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    for name in ("euler_step_out", "euler_step_", "cfg_euler_step_out", "cfg_euler_step_", "flow_noising_out"):
        torch.library.register_fake(lib + name)(lambda *args: None)

    @torch.library.register_fake(lib + "flow_noising")
    def _(z0, eps, t, t_value):
        return (
            torch.empty_like(z0, memory_format=torch.contiguous_format),
            torch.empty_like(z0, memory_format=torch.contiguous_format),
        )

    @torch.library.register_fake(lib + "flow_matching_loss")
    def _(v_pred, z0, eps):
        return v_pred.new_empty((), dtype=torch.float32)

    @torch.library.register_fake(lib + "flow_matching_loss_backward")
    def _(grad, v_pred, z0, eps):
        return torch.empty_like(v_pred, memory_format=torch.contiguous_format)

    # Backward passes are plain torch in fp32: they run once per training step, not per sampling step,
    # and only the loss backward is hot enough to deserve its own kernel.
    def euler_setup(ctx, inputs, output):
        z, v, dt, dt_value = inputs
        ctx.save_for_backward(v, dt)
        ctx.dt_value = dt_value

    def euler_backward(ctx, grad):
        v, dt = ctx.saved_tensors
        g = grad.float()
        dt_b = _scalar_value(dt, ctx.dt_value, v)
        dz = grad.to(v.dtype) if ctx.needs_input_grad[0] else None
        dv = (g * dt_b).to(v.dtype) if ctx.needs_input_grad[1] else None
        ddt = _reduce_to(g * v.float(), dt) if dt is not None and ctx.needs_input_grad[2] else None
        return dz, dv, ddt, None

    torch.library.register_autograd(lib + "euler_step", euler_backward, setup_context=euler_setup)

    def cfg_setup(ctx, inputs, output):
        z, v_cond, v_uncond, guidance, guidance_value, dt, dt_value = inputs
        ctx.save_for_backward(v_cond, v_uncond, guidance, dt)
        ctx.guidance_value, ctx.dt_value = guidance_value, dt_value

    def cfg_backward(ctx, grad):
        v_cond, v_uncond, guidance, dt = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad.float()
        gs = _scalar_value(guidance, ctx.guidance_value, v_cond)
        dt_b = _scalar_value(dt, ctx.dt_value, v_cond)
        g_dt = g * dt_b
        dz = grad.to(v_cond.dtype) if need[0] else None
        dvc = (g_dt * gs).to(v_cond.dtype) if need[1] else None
        dvu = (g_dt * (1.0 - gs)).to(v_cond.dtype) if need[2] else None
        diff = v_cond.float() - v_uncond.float()
        dg = _reduce_to(g_dt * diff, guidance) if guidance is not None and need[3] else None
        ddt = None
        if dt is not None and need[5]:
            ddt = _reduce_to(g * (v_uncond.float() + gs * diff), dt)
        return dz, dvc, dvu, dg, None, ddt, None

    torch.library.register_autograd(lib + "cfg_euler_step", cfg_backward, setup_context=cfg_setup)

    def noising_setup(ctx, inputs, output):
        z0, eps, t, t_value = inputs
        ctx.save_for_backward(z0, eps, t)
        ctx.t_value = t_value

    def noising_backward(ctx, grad_zt, grad_u):
        z0, eps, t = ctx.saved_tensors
        need = ctx.needs_input_grad
        t_b = _scalar_value(t, ctx.t_value, z0)
        g_zt = torch.zeros_like(z0, dtype=torch.float32) if grad_zt is None else grad_zt.float()
        g_u = torch.zeros_like(z0, dtype=torch.float32) if grad_u is None else grad_u.float()
        dz0 = (g_zt * (1.0 - t_b) - g_u).to(z0.dtype) if need[0] else None
        deps = (g_zt * t_b + g_u).to(eps.dtype) if need[1] else None
        dt = _reduce_to(g_zt * (eps.float() - z0.float()), t) if t is not None and need[2] else None
        return dz0, deps, dt, None

    torch.library.register_autograd(lib + "flow_noising", noising_backward, setup_context=noising_setup)

    def loss_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def loss_backward(ctx, grad):
        v_pred, z0, eps = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not any(need):
            return None, None, None
        grad_v = torch.ops.semanticgen.flow_matching_loss_backward(
            grad.to(torch.float32).reshape(()).contiguous(), v_pred, z0, eps
        )
        # d/dz0 of (v - eps + z0)^2 is +d/dv and d/deps is -d/dv.
        return (grad_v if need[0] else None, grad_v if need[1] else None, -grad_v if need[2] else None)

    torch.library.register_autograd(lib + "flow_matching_loss", loss_backward, setup_context=loss_setup)


if extension_available():
    _register()
