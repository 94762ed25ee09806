"""Fused rectified-flow ops against eager torch, torch.compile and a STREAM-triad memory roof.

For each op (``cfg_euler_step`` with ``out=``, ``euler_step_`` in place, ``flow_noising``, the
``flow_matching_loss`` forward and forward+backward) on ``2^24`` elements shaped ``(4, 2^22)``, times

* ``fused``: the semanticgen op, writing into preallocated buffers where it has ``out=``;
* ``eager``: the same expression in eager torch as a user would write it, in the inputs' dtype (its
  temporaries included);
* ``eager fp32``: for bf16 inputs only, that expression upcast to float32 and rounded once at the end.
  The fused ops compute in fp32 and round once, so this is the eager baseline with the fused op's
  accuracy; the ``err_ulps`` column measures which candidates match it;
* ``compiled``: the as-written expression through ``torch.compile`` (inductor), into the same buffers;
* ``triad roof``: the STREAM triad ``a = b + s * c`` (``torch.add(b, c, alpha=s, out=a)``) in float32
  on three buffers each at least 4x the last-level cache (CPU: the largest cache level in sysfs; CUDA: L2),
  so it streams from memory. The op tensors (64 MiB per float32 tensor) move 3-7 tensors per call, 4-8x a
  32 MiB LLC; ``working_set_vs_llc`` says how far out of cache each op is here.

Every row reports the median time with its spread over the repeats (``ms_min``, ``ms_max``; ``noise``
flags max/min above ``semanticgen.timing.SPREAD_BOUND``), the achieved GB/s (bytes the op must move, divided by
time: each input read once and each output written once; the triad counts its 3 arrays the same way,
and neither counts write-allocate reads), the speedup over eager, the time ratio against the compiled
expression, the fraction of the triad roof's GB/s measured in the same round-robin, and ``err_ulps``
(the largest error of any output element against a float64 evaluation of the same inputs, in units in the
last place, in the output dtype, of the sum of the absolute values of the expression's terms: one correct
rounding is <= 0.5; the loss rows: the scalar's error).
On CPU all candidates of one op are timed round-robin so background load hits them alike; on CUDA each is
timed with CUDA events after warm-up, with L2 flushed before every call.

A shape sweep then times ``cfg_euler_step(..., out=)`` (fused and eager, float32) on the same ``2^24``
elements laid out as ``(n,)``, ``(1, n)``, ``(4, n/4)`` and ``(B, n/B)`` with large ``B``: the op's speed
should not depend on how the leading dimension is laid out. Each sweep row gives ``vs_best_layout`` (its median
over the fastest layout's, same op, impl and dtype) and ``slow_layout``, set when even its fastest repeat took
more than ``semanticgen.timing.LAYOUT_BOUND`` (1.5) times the fastest layout's slowest: a shape cliff, which the run's
closing warning names.

Run alone: ``python -m semanticgen.benchmarks.flow_ops [--quick] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import math

import torch

from semanticgen._extension import cpu_capability
from semanticgen.ops import flow
from semanticgen.timing import (
    NullProgress,
    flag_slow_layouts,
    last_level_cache_bytes,
    spread_fields,
    time_candidates,
)

NUMEL = 1 << 24
BATCH = 4
GUIDANCE, DT, T = 5.0, -0.02, 0.3
TRIAD_SCALE = 3.0
TRIAD_LLC_MULTIPLE = 4  # STREAM's rule: each array at least 4x the last-level cache
OPS = (
    "cfg_euler_step",
    "cfg_euler_step [B] tensors",
    "euler_step_",
    "flow_noising",
    "flow_noising new outputs",
    "flow_matching_loss",
    "flow_matching_loss fwd+bwd",
)
# Leading dims of the cfg_euler_step layout sweep (0 = 1-D ``(n,)``); same NUMEL elements in each.
SWEEP_BATCHES = (0, 1, BATCH, 1024, 1 << 16)
SWEEP_OP = "cfg_euler_step shape sweep"
ERR_ELEMENTS = 1 << 18  # elements compared against float64 (a prefix of the output: the check stays cheap)


def _dtypes(quick: bool) -> tuple[torch.dtype, ...]:
    return (torch.float32,) if quick else (torch.float32, torch.bfloat16)


def steps(quick: bool) -> int:
    return len(OPS) * len(_dtypes(quick)) + 1  # the layout sweep is timed in one round


def skip_reason(device: str) -> str | None:
    """Why the suite cannot run on ``device`` (None when it can)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device is available"
    if not flow.extension_available():
        return "semanticgen._C is not built (pip install --no-build-isolation -e .)"
    return None


def _time(fns: dict, device: str, repeats: int) -> dict[str, dict[str, float]]:
    """Per candidate, :func:`summarize`'s median/min/max milliseconds (:func:`time_candidates`: on CUDA, events
    with an L2 flush before each call, after 3 warm-up calls that also trigger torch.compile's first compile)."""
    return time_candidates(fns, device=device, repeats=repeats, warmup=2, cuda_warmup=3)


def triad_numel(llc_bytes: int) -> int:
    """Float32 elements per triad buffer: at least ``TRIAD_LLC_MULTIPLE`` x the cache, a multiple of 2^20."""
    return math.ceil(TRIAD_LLC_MULTIPLE * llc_bytes / 4 / 2**20) * 2**20


def _triad(device: str):
    """STREAM triad ``a = b + s * c`` on float32 buffers each >= 4x the last-level cache.

    Returns ``(callable, bytes moved per call, elements per buffer, last-level cache bytes)``.
    """
    llc = last_level_cache_bytes(device)
    numel = triad_numel(llc)
    a = torch.empty(numel, device=device)
    b, c = torch.rand(numel, device=device), torch.rand(numel, device=device)
    return (lambda: torch.add(b, c, alpha=TRIAD_SCALE, out=a)), 3 * numel * 4, numel, llc


_MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _ulp_err(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Max over elements of ``|got - ref|`` in units in the last place, in ``got``'s dtype, of ``scale``.

    ``scale`` is the sum of the absolute values of the expression's terms (default ``|ref|``): where the
    terms cancel, even one rounding of each term is many ulps of the tiny result, so an error is measured
    against what the inputs allow (componentwise). Per element, not against the largest output, so an
    expression that rounds every intermediate shows where the update term is large next to ``z``.
    """
    ref = ref.double()
    scale = ref.abs() if scale is None else scale.double()
    _, exponent = torch.frexp(scale.clamp_min(torch.finfo(got.dtype).tiny))
    ulp = torch.ldexp(torch.ones_like(ref), exponent - 1 - _MANTISSA_BITS[got.dtype])
    return float(((got.double() - ref).abs() / ulp).max())


def _cases(dtype: torch.dtype, device: str) -> dict[str, tuple[int, dict, object]]:
    """Per op: ``(bytes moved, {impl: callable}, check)``. Bytes count one read per input and one write per
    output; ``check(fn)`` runs ``fn`` once and returns its error against float64 (None where not measured)."""
    shape = (BATCH, NUMEL // BATCH)
    z, a, b = (torch.randn(shape, device=device).to(dtype) for _ in range(3))
    out, out2 = torch.empty_like(z), torch.empty_like(z)
    size = z.numel() * z.element_size()
    upcast = dtype != torch.float32  # the fp32-upcast eager baseline only differs from eager below fp32
    k = ERR_ELEMENTS
    z64, a64, b64 = (t.flatten()[:k].double() for t in (z, a, b))

    def eager_cfg(z, vc, vu, out):
        torch.add(z, DT * (vu + GUIDANCE * (vc - vu)), out=out)

    def eager32_cfg(z, vc, vu, out):
        z, vc, vu = z.float(), vc.float(), vu.float()
        out.copy_(z + DT * (vu + GUIDANCE * (vc - vu)))

    def expr_cfg(z, vc, vu, out):
        out.copy_(z + DT * (vu + GUIDANCE * (vc - vu)))

    # Per-batch guidance and dt as device tensors (what a CUDA-graph-captured sampler passes).
    g_b = torch.full((BATCH,), GUIDANCE, device=device)
    dt_b = torch.full((BATCH,), DT, device=device)

    def eager_cfg_b(z, vc, vu, g, dt, out):
        g, dt = g.to(z.dtype)[:, None], dt.to(z.dtype)[:, None]
        torch.add(z, dt * (vu + g * (vc - vu)), out=out)

    def eager32_cfg_b(z, vc, vu, g, dt, out):
        z, vc, vu, g, dt = z.float(), vc.float(), vu.float(), g[:, None], dt[:, None]
        out.copy_(z + dt * (vu + g * (vc - vu)))

    def expr_cfg_b(z, vc, vu, g, dt, out):
        g, dt = g.to(z.dtype)[:, None], dt.to(z.dtype)[:, None]
        out.copy_(z + dt * (vu + g * (vc - vu)))

    def eager_euler(z, v):
        z.add_(v, alpha=DT)

    def eager32_euler(z, v):
        z.copy_(z.float() + DT * v.float())

    def expr_euler(z, v):
        z.copy_(z + DT * v)

    def eager_noising(z0, eps, out_zt, out_u):
        torch.add((1 - T) * z0, T * eps, out=out_zt)
        torch.sub(eps, z0, out=out_u)

    def eager32_noising(z0, eps, out_zt, out_u):
        z0, eps = z0.float(), eps.float()
        out_zt.copy_((1 - T) * z0 + T * eps)
        out_u.copy_(eps - z0)

    def expr_noising(z0, eps, out_zt, out_u):
        out_zt.copy_((1 - T) * z0 + T * eps)
        out_u.copy_(eps - z0)

    def new_noising(z0, eps):
        return (1 - T) * z0 + T * eps, eps - z0

    def new32_noising(z0, eps):
        z0, eps = z0.float(), eps.float()
        return ((1 - T) * z0 + T * eps).to(dtype), (eps - z0).to(dtype)

    def eager_loss(v, z0, eps):
        # Upcasts only for the mean: eps - z0 is rounded to the input dtype first, as users write it.
        return torch.nn.functional.mse_loss(v.float(), (eps - z0).float())

    def eager32_loss(v, z0, eps):
        return torch.nn.functional.mse_loss(v.float(), eps.float() - z0.float())

    leaf = a.detach().clone().requires_grad_()

    def fused_loss_bwd():
        leaf.grad = None
        flow.flow_matching_loss(leaf, z, b).backward()

    def eager_loss_bwd():
        leaf.grad = None
        eager_loss(leaf, z, b).backward()

    def eager32_loss_bwd():
        leaf.grad = None
        eager32_loss(leaf, z, b).backward()

    compiled_loss = torch.compile(eager_loss)

    def compiled_loss_bwd():
        leaf.grad = None
        compiled_loss(leaf, z, b).backward()

    compiled_cfg, compiled_euler = torch.compile(expr_cfg), torch.compile(expr_euler)
    compiled_noising = torch.compile(expr_noising)
    compiled_cfg_b, compiled_new_noising = torch.compile(expr_cfg_b), torch.compile(new_noising)

    # float64 references on the first ERR_ELEMENTS elements (all in batch row 0, so scalar g and dt apply).
    ref_cfg = z64 + DT * (b64 + GUIDANCE * (a64 - b64))
    scale_cfg = z64.abs() + abs(DT) * (b64.abs() + GUIDANCE * (a64.abs() + b64.abs()))
    scale_zt, scale_u = (1 - T) * z64.abs() + T * a64.abs(), a64.abs() + z64.abs()

    def check_cfg(fn):
        fn()
        return _ulp_err(out.flatten()[:k], ref_cfg, scale_cfg)

    def check_euler(fn):
        out.copy_(z)  # the timed calls let `out` drift; restart from z so the reference applies
        fn()
        return _ulp_err(out.flatten()[:k], z64 + DT * a64, z64.abs() + abs(DT) * a64.abs())

    def check_noising(fn):
        fn()
        return max(
            _ulp_err(out.flatten()[:k], (1 - T) * z64 + T * a64, scale_zt),
            _ulp_err(out2.flatten()[:k], a64 - z64, scale_u),
        )

    def check_new_noising(fn):
        zt, u = fn()
        return max(
            _ulp_err(zt.flatten()[:k], (1 - T) * z64 + T * a64, scale_zt), _ulp_err(u.flatten()[:k], a64 - z64, scale_u)
        )

    def check_loss(fn):
        # The whole tensor: a reduction's error depends on every element. (v - (eps - z0))^2 in float64.
        ref = (a.double() - (b.double() - z.double())).square().mean()
        return _ulp_err(fn().detach().reshape(1), ref.reshape(1))

    def cands(fused, eager, eager32, compiled):
        return {"fused": fused, "eager": eager, **({"eager fp32": eager32} if upcast else {}), "compiled": compiled}

    return {
        "cfg_euler_step": (
            4 * size,
            cands(
                lambda: flow.cfg_euler_step(z, a, b, GUIDANCE, DT, out=out),
                lambda: eager_cfg(z, a, b, out),
                lambda: eager32_cfg(z, a, b, out),
                lambda: compiled_cfg(z, a, b, out),
            ),
            check_cfg,
        ),
        "cfg_euler_step [B] tensors": (
            4 * size,
            cands(
                lambda: flow.cfg_euler_step(z, a, b, g_b, dt_b, out=out),
                lambda: eager_cfg_b(z, a, b, g_b, dt_b, out),
                lambda: eager32_cfg_b(z, a, b, g_b, dt_b, out),
                lambda: compiled_cfg_b(z, a, b, g_b, dt_b, out),
            ),
            check_cfg,
        ),
        # In place on `out` (refilled never: the values drift, the traffic does not).
        "euler_step_": (
            3 * size,
            cands(
                lambda: flow.euler_step_(out, a, DT),
                lambda: eager_euler(out, a),
                lambda: eager32_euler(out, a),
                lambda: compiled_euler(out, a),
            ),
            check_euler,
        ),
        "flow_noising": (
            4 * size,
            cands(
                lambda: flow.flow_noising(z, a, T, out=(out, out2)),
                lambda: eager_noising(z, a, out, out2),
                lambda: eager32_noising(z, a, out, out2),
                lambda: compiled_noising(z, a, out, out2),
            ),
            check_noising,
        ),
        # Fresh outputs every call, as in a training step with autograd. On CPU each fresh 64 MiB
        # tensor is new memory from the OS, so page faults are part of every candidate's time.
        "flow_noising new outputs": (
            4 * size,
            cands(
                lambda: flow.flow_noising(z, a, T),
                lambda: new_noising(z, a),
                lambda: new32_noising(z, a),
                lambda: compiled_new_noising(z, a),
            ),
            check_new_noising,
        ),
        "flow_matching_loss": (
            3 * size,
            cands(
                lambda: flow.flow_matching_loss(a, z, b),
                lambda: eager_loss(a, z, b),
                lambda: eager32_loss(a, z, b),
                lambda: compiled_loss(a, z, b),
            ),
            check_loss,
        ),
        # Forward reads 3 tensors, backward reads 3 and writes 1 gradient. No error column: the gradient
        # check lives in tests/test_flow_ops.py.
        "flow_matching_loss fwd+bwd": (
            7 * size,
            cands(fused_loss_bwd, eager_loss_bwd, eager32_loss_bwd, compiled_loss_bwd),
            None,
        ),
    }


def _sweep_cases(device: str) -> dict[tuple[int, ...], dict]:
    """``cfg_euler_step(..., out=)`` candidates (fused, eager) per layout of the same NUMEL float32 elements."""
    z, a, b, out = (torch.randn(NUMEL, device=device) for _ in range(4))
    cases = {}
    for batch in SWEEP_BATCHES:
        shape = (NUMEL,) if batch == 0 else (batch, NUMEL // batch)
        zs, as_, bs, outs = (t.view(shape) for t in (z, a, b, out))
        cases[shape] = {
            "fused": lambda zs=zs, as_=as_, bs=bs, outs=outs: flow.cfg_euler_step(zs, as_, bs, GUIDANCE, DT, out=outs),
            "eager": lambda zs=zs, as_=as_, bs=bs, outs=outs: torch.add(
                zs, DT * (bs + GUIDANCE * (as_ - bs)), out=outs
            ),
        }
    return cases


def _row(device, op, impl, dtype_name, shape, nbytes, timing, llc, **extra) -> dict:
    return {
        "suite": "flow",
        "device": device,
        "op": op,
        "impl": impl,
        "dtype": dtype_name,
        "shape": str(tuple(shape)),
        "numel": math.prod(shape),
        "threads": torch.get_num_threads(),
        "cpu_capability": cpu_capability() if device == "cpu" else None,
        **spread_fields(timing),
        "GB/s": nbytes / (timing["ms"] * 1e-3) / 1e9,
        "working_set_vs_llc": nbytes / llc,
        **extra,
    }


def run(quick: bool = False, device: str = "cpu", progress=None) -> list[dict]:
    """Rows ``{op, impl, dtype, shape, ms, ms_min, ms_max, spread, noise, GB/s, speedup_vs_eager,
    compiled_ms_ratio, roof_fraction, err_ulps}``, the ``triad roof`` rows among them, then the shape sweep's
    (``vs_best_layout`` and ``slow_layout`` in place of the compiled and error columns; see
    :func:`semanticgen.timing.flag_slow_layouts`).

    ``cpu_capability`` in each CPU row names the variant of the fused kernels that ran (``avx2``
    or ``avx512``; set ``SEMANTICGEN_CPU_CAPABILITY`` to compare them).
    """
    progress = progress or NullProgress()
    repeats = 5 if quick else 15
    rows: list[dict] = []
    triad, triad_bytes, triad_numel, llc = _triad(device)
    for dtype in _dtypes(quick):
        cases = _cases(dtype, device)
        dtype_name = str(dtype).removeprefix("torch.")
        for op, (nbytes, fns, check) in cases.items():
            times = _time({**fns, "triad roof": triad}, device, repeats)
            roof_gbs = triad_bytes / (times["triad roof"]["ms"] * 1e-3) / 1e9
            for impl, t in times.items():
                is_roof = impl == "triad roof"
                moved = triad_bytes if is_roof else nbytes
                extra = {
                    "speedup_vs_eager": times["eager"]["ms"] / t["ms"],
                    "compiled_ms_ratio": times["compiled"]["ms"] / t["ms"],
                    "roof_fraction": moved / (t["ms"] * 1e-3) / 1e9 / roof_gbs,
                    "err_ulps": None if is_roof or check is None else check(fns[impl]),
                }
                shape = (triad_numel,) if is_roof else (BATCH, NUMEL // BATCH)
                rows.append(_row(device, op, impl, "float32" if is_roof else dtype_name, shape, moved, t, llc, **extra))
            progress.advance(f"flow {op} {dtype_name}")
        del cases
    # Every layout in one round-robin (on CPU): a burst of background load then slows all layouts alike instead
    # of posing as a shape cliff in the one it hit.
    cases = _sweep_cases(device)
    fns = {f"{impl} {shape}": fn for shape, impl_fns in cases.items() for impl, fn in impl_fns.items()}
    times = _time({**fns, "triad roof": triad}, device, repeats)
    roof_gbs = triad_bytes / (times["triad roof"]["ms"] * 1e-3) / 1e9
    sweep: list[dict] = []
    for shape, impl_fns in cases.items():
        for impl in impl_fns:
            t = times[f"{impl} {shape}"]
            gbs = 4 * NUMEL * 4 / (t["ms"] * 1e-3) / 1e9
            extra = {"speedup_vs_eager": times[f"eager {shape}"]["ms"] / t["ms"], "roof_fraction": gbs / roof_gbs}
            sweep.append(_row(device, SWEEP_OP, impl, "float32", shape, 4 * NUMEL * 4, t, llc, **extra))
    flag_slow_layouts(sweep)  # per op/impl/dtype: vs_best_layout, and slow_layout beyond LAYOUT_BOUND
    progress.advance("flow cfg_euler_step layout sweep")
    return rows + sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="float32 only, 5 repeats")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if reason := skip_reason(args.device):
        parser.error(f"cannot run on {args.device}: {reason}")

    class _Print:
        def advance(self, label: str = "") -> None:
            print(f"done: {label}", flush=True)

    rows = run(quick=args.quick, device=args.device, progress=_Print())
    header = (
        "op", "impl", "dtype", "shape", "ms", "ms_min", "ms_max", "GB/s", "speedup_vs_eager", "roof_fraction",
        "err_ulps", "vs_best_layout", "slow_layout", "noise",
    )  # fmt: skip
    if args.device == "cpu":
        print(f"fused CPU kernels: {rows[0]['cpu_capability']}, {rows[0]['threads']} threads")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{row.get(k):.3g}" if isinstance(row.get(k), float) else str(row.get(k)) for k in header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
