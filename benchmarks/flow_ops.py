"""Fused rectified-flow ops against eager torch, torch.compile and the memory-bandwidth roof.

For each op (``cfg_euler_step`` with ``out=``, ``euler_step_`` in place, ``flow_noising``, the
``flow_matching_loss`` forward and forward+backward) on ``2^24`` elements, times

* ``fused``: the semanticgen op, writing into preallocated buffers where it has ``out=``;
* ``eager``: the same expression in eager torch (what a user would write; its temporaries included);
* ``compiled``: that expression through ``torch.compile`` (inductor), writing into the same buffers;
* ``copy roof``: ``dst.copy_(src)`` of one tensor of the same size into a preallocated one.

Every row reports the median time, the achieved GB/s (bytes the op must move, divided by time: each
input read once and each output written once), the speedup over eager, the time ratio against the
compiled expression, and the fraction of the copy roof's GB/s measured in the same run. All
candidates of one op are timed round-robin so background load hits them alike.

Run alone: ``python -m semanticgen.benchmarks.flow_ops [--quick] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse

import torch

from semanticgen._extension import cpu_capability
from semanticgen.ops import flow

from ._timing import NullProgress, measure_interleaved

NUMEL = 1 << 24
BATCH = 4
GUIDANCE, DT, T = 5.0, -0.02, 0.3
OPS = (
    "cfg_euler_step",
    "cfg_euler_step [B] tensors",
    "euler_step_",
    "flow_noising",
    "flow_noising new outputs",
    "flow_matching_loss",
    "flow_matching_loss fwd+bwd",
)


def _dtypes(quick: bool) -> tuple[torch.dtype, ...]:
    return (torch.float32,) if quick else (torch.float32, torch.bfloat16)


def steps(quick: bool) -> int:
    return len(OPS) * len(_dtypes(quick))


def skip_reason(device: str) -> str | None:
    """Why the suite cannot run on ``device`` (None when it can)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device is available"
    if not flow.extension_available():
        return "semanticgen._C is not built (pip install --no-build-isolation -e .)"
    return None


def _cases(dtype: torch.dtype, device: str):
    """Per op: bytes moved (one read per input, one write per output) and the candidate callables;
    plus the copy roof (one tensor copied into a preallocated one) and the bytes of one tensor."""
    shape = (BATCH, NUMEL // BATCH)
    z, a, b = (torch.randn(shape, device=device).to(dtype) for _ in range(3))
    out, out2 = torch.empty_like(z), torch.empty_like(z)
    size = z.numel() * z.element_size()

    def eager_cfg(z, vc, vu, out):
        torch.add(z, DT * (vu + GUIDANCE * (vc - vu)), out=out)

    def expr_cfg(z, vc, vu, out):
        out.copy_(z + DT * (vu + GUIDANCE * (vc - vu)))

    # Per-batch guidance and dt as device tensors (what a CUDA-graph-captured sampler passes).
    g_b = torch.full((BATCH,), GUIDANCE, device=device)
    dt_b = torch.full((BATCH,), DT, device=device)

    def eager_cfg_b(z, vc, vu, g, dt, out):
        g, dt = g.to(z.dtype)[:, None], dt.to(z.dtype)[:, None]
        torch.add(z, dt * (vu + g * (vc - vu)), out=out)

    def expr_cfg_b(z, vc, vu, g, dt, out):
        g, dt = g.to(z.dtype)[:, None], dt.to(z.dtype)[:, None]
        out.copy_(z + dt * (vu + g * (vc - vu)))

    def eager_euler(z, v):
        z.add_(v, alpha=DT)

    def expr_euler(z, v):
        z.copy_(z + DT * v)

    def eager_noising(z0, eps, out_zt, out_u):
        torch.add((1 - T) * z0, T * eps, out=out_zt)
        torch.sub(eps, z0, out=out_u)

    def expr_noising(z0, eps, out_zt, out_u):
        out_zt.copy_((1 - T) * z0 + T * eps)
        out_u.copy_(eps - z0)

    def new_noising(z0, eps):
        return (1 - T) * z0 + T * eps, eps - z0

    def eager_loss(v, z0, eps):
        return torch.nn.functional.mse_loss(v.float(), (eps - z0).float())

    leaf = a.detach().clone().requires_grad_()

    def fused_loss_bwd():
        leaf.grad = None
        flow.flow_matching_loss(leaf, z, b).backward()

    def eager_loss_bwd():
        leaf.grad = None
        eager_loss(leaf, z, b).backward()

    compiled_loss = torch.compile(eager_loss)

    def compiled_loss_bwd():
        leaf.grad = None
        compiled_loss(leaf, z, b).backward()

    compiled_cfg, compiled_euler = torch.compile(expr_cfg), torch.compile(expr_euler)
    compiled_noising = torch.compile(expr_noising)
    compiled_cfg_b, compiled_new_noising = torch.compile(expr_cfg_b), torch.compile(new_noising)
    return (
        {
            "cfg_euler_step": (
                4 * size,
                {
                    "fused": lambda: flow.cfg_euler_step(z, a, b, GUIDANCE, DT, out=out),
                    "eager": lambda: eager_cfg(z, a, b, out),
                    "compiled": lambda: compiled_cfg(z, a, b, out),
                },
            ),
            "cfg_euler_step [B] tensors": (
                4 * size,
                {
                    "fused": lambda: flow.cfg_euler_step(z, a, b, g_b, dt_b, out=out),
                    "eager": lambda: eager_cfg_b(z, a, b, g_b, dt_b, out),
                    "compiled": lambda: compiled_cfg_b(z, a, b, g_b, dt_b, out),
                },
            ),
            # In place on `out` (refilled never: the values drift, the traffic does not).
            "euler_step_": (
                3 * size,
                {
                    "fused": lambda: flow.euler_step_(out, a, DT),
                    "eager": lambda: eager_euler(out, a),
                    "compiled": lambda: compiled_euler(out, a),
                },
            ),
            "flow_noising": (
                4 * size,
                {
                    "fused": lambda: flow.flow_noising(z, a, T, out=(out, out2)),
                    "eager": lambda: eager_noising(z, a, out, out2),
                    "compiled": lambda: compiled_noising(z, a, out, out2),
                },
            ),
            # Fresh outputs every call, as in a training step with autograd. On CPU each fresh 64 MiB
            # tensor is new memory from the OS, so page faults are part of every candidate's time.
            "flow_noising new outputs": (
                4 * size,
                {
                    "fused": lambda: flow.flow_noising(z, a, T),
                    "eager": lambda: new_noising(z, a),
                    "compiled": lambda: compiled_new_noising(z, a),
                },
            ),
            "flow_matching_loss": (
                3 * size,
                {
                    "fused": lambda: flow.flow_matching_loss(a, z, b),
                    "eager": lambda: eager_loss(a, z, b),
                    "compiled": lambda: compiled_loss(a, z, b),
                },
            ),
            # Forward reads 3 tensors, backward reads 3 and writes 1 gradient.
            "flow_matching_loss fwd+bwd": (
                7 * size,
                {"fused": fused_loss_bwd, "eager": eager_loss_bwd, "compiled": compiled_loss_bwd},
            ),
        },
        (lambda: out2.copy_(z)),
        size,
    )


def run(quick: bool = False, device: str = "cpu", progress=None) -> list[dict]:
    """Rows ``{op, impl, dtype, numel, ms, GB/s, speedup_vs_eager, compiled_ms_ratio, roof_fraction}``.

    ``cpu_capability`` in each CPU row names the variant of the fused kernels that ran (``avx2``
    or ``avx512``; set ``SEMANTICGEN_CPU_CAPABILITY`` to compare them).
    """
    progress = progress or NullProgress()
    repeats = 5 if quick else 15
    rows: list[dict] = []
    variant = cpu_capability() if device == "cpu" else None
    for dtype in _dtypes(quick):
        cases, roof, size = _cases(dtype, device)
        dtype_name = str(dtype).removeprefix("torch.")
        for op, (nbytes, fns) in cases.items():
            fns = {**fns, "copy roof": roof}
            times = measure_interleaved(fns, device=device, warmup=2, repeats=repeats)
            roof_gbs = 2 * size / (times["copy roof"]["ms"] * 1e-3) / 1e9
            for impl, t in times.items():
                moved = 2 * size if impl == "copy roof" else nbytes
                gbs = moved / (t["ms"] * 1e-3) / 1e9
                rows.append(
                    {
                        "suite": "flow",
                        "device": device,
                        "op": op,
                        "impl": impl,
                        "dtype": dtype_name,
                        "numel": NUMEL,
                        "threads": torch.get_num_threads(),
                        "cpu_capability": variant,
                        "ms": t["ms"],
                        "ms_min": t["ms_min"],
                        "GB/s": gbs,
                        "speedup_vs_eager": times["eager"]["ms"] / t["ms"],
                        "compiled_ms_ratio": times["compiled"]["ms"] / t["ms"],
                        "roof_fraction": gbs / roof_gbs,
                    }
                )
            progress.advance(f"flow {op} {dtype_name}")
        del cases, roof
    return rows


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
    header = ("op", "impl", "dtype", "ms", "GB/s", "speedup_vs_eager", "compiled_ms_ratio", "roof_fraction")
    if args.device == "cpu":
        print(f"fused CPU kernels: {rows[0]['cpu_capability']}, {rows[0]['threads']} threads")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
