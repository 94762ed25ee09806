"""The ``semanticgen`` command line: info, bench, kernels, plan, train, generate, eval, selftest.

A user mistake (bad flag, missing file, invalid value) ends with one ``semanticgen: error: ...``
line and a non-zero exit; tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from semanticgen.errors import UsageError, run_command


def _console():
    """A rich console; wide when the output is not a terminal, so piped tables are not cut."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


# ------------------------------------------------------------------------------------------ info
def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from semanticgen import __version__
    from semanticgen._extension import built_cuda_archs, extension_error
    from semanticgen.ops import available_backends
    from semanticgen.ops.swin_attention import backend_descriptions

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        import flash_attn

        flash_version = flash_attn.__version__
    except ImportError:
        flash_version = "not installed (optional extra: pip install 'semanticgen[gpu]')"

    info: dict = {
        "semanticgen": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda or "no",
        "triton": triton_version,
        "flash-attn": flash_version,
        "CUDA devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "extension semanticgen._C": "loaded" if extension_error() is None else f"MISSING: {extension_error()}",
        "extension CUDA archs": ", ".join(built_cuda_archs()) or "none (built without CUDA)",
        "CPU flow kernels": _cpu_kernels(),
    }
    compiled_ops = {}
    if extension_error() is None:
        import torch._C as tc

        for op in _compiled_op_names():
            keys = [k for k in ("CPU", "CUDA") if tc._dispatch_has_kernel_for_dispatch_key(f"semanticgen::{op}", k)]
            compiled_ops[op] = keys
    backends = {
        dev: {name: (reason or "available") for name, reason in available_backends(dev).items()}
        for dev in ("cpu", "cuda")
    }
    kernels = backend_descriptions()
    if args.json:
        payload = {**info, "compiled_ops": compiled_ops, "swin_attention_backends": backends}
        print(json.dumps({**payload, "swin_attention_kernels": kernels}, indent=2))
        return 0
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    table = Table(title="semanticgen info", show_header=False)
    for key, value in info.items():
        table.add_row(key, escape(str(value)))
    for op, keys in compiled_ops.items():
        table.add_row(f"op {op}", ", ".join(keys) or "no kernel")
    console.print(table)
    btable = Table(title="swin_attention backends")
    btable.add_column("backend")
    btable.add_column("cpu tensors")
    btable.add_column("cuda tensors")
    btable.add_column("kernel")
    for name in backends["cpu"]:
        btable.add_row(name, backends["cpu"][name], backends["cuda"][name], escape(kernels.get(name, "-")))
    console.print(btable)
    return 0


def _cpu_kernels() -> str:
    """The CPU flow kernels' variant and why it is the one: ``"avx512 (chosen from the CPU's features)"``,
    ``"avx2 (forced by SEMANTICGEN_CPU_CAPABILITY=avx2)"``, or the error a bad value of that variable gives."""
    import os

    from semanticgen.environment import cpu_kernel_variant

    variant = cpu_kernel_variant()
    if variant is None:
        return "none (semanticgen._C not loaded)"
    if variant.startswith("error: "):  # the message names the variable and its value
        return variant
    forced = os.environ.get("SEMANTICGEN_CPU_CAPABILITY")  # _C takes an empty value as unset, so does this
    if forced:
        return f"{variant} (forced by SEMANTICGEN_CPU_CAPABILITY={forced})"
    return f"{variant} (chosen from the CPU's features)"


def _compiled_op_names() -> list[str]:
    """Operators declared by ``semanticgen._C`` (the ``TORCH_LIBRARY`` block) that run kernels: not the ones
    without arguments (``build_info``, ``cpu_capability``), which answer questions about the build and the CPU
    and have rows of their own."""
    import torch

    names = []
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("semanticgen::") and schema.arguments:
            name = schema.name.split("::", 1)[1]
            if name not in names:
                names.append(name)
    return sorted(names)


# ----------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from semanticgen import bench

    device = args.device or bench.best_device()
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available on this machine")
    elif device != "cpu":
        raise UsageError(f"--device must be 'cpu' or 'cuda', got {device!r}")
    suites = args.suite or list(bench.DEFAULT_SUITES)  # opt-in suites (the convergence study) only when named
    console = _console()
    console.print(f"semanticgen bench on [bold]{device}[/bold] ({'quick' if args.quick else 'full'} run)")
    bench.run(
        suites, quick=args.quick, device=device, out_dir=args.out, show_progress=not args.no_progress, console=console
    )
    return 0


# --------------------------------------------------------------------------------------- kernels
def cmd_kernels(args: argparse.Namespace) -> int:
    reports: list[dict] = []
    notes: list[str] = []
    for source, module_name, func_name in (
        ("triton", "semanticgen.kernel_report.triton_report", "triton_kernel_reports"),
        ("cuda", "semanticgen.kernel_report.cuda_report", "cuda_kernel_reports"),
    ):
        try:
            module = __import__(module_name, fromlist=[func_name])
            reports += getattr(module, func_name)(args.arch)
        except (ImportError, FileNotFoundError) as exc:
            # e.g. triton missing, or nvcc / the CUDA sources absent (CudaReportUnavailable).
            notes.append(f"{source} kernels: report unavailable ({exc})")
    if args.json:
        print(json.dumps({"arch": args.arch, "kernels": reports, "notes": notes}, indent=2))
        return 0 if reports else 1
    from rich.table import Table

    console = _console()
    table = Table(title=f"compiled kernels for {args.arch}")
    cols = (
        "source",
        "kernel",
        "config",
        "dtype",
        "head_dim",
        "registers",
        "spill_store_bytes",
        "spill_load_bytes",
        "shared_bytes",
        "ctas_per_sm",
        "wgmma",
        "tma",
        "loop_waits_all",
    )
    for col in cols:
        table.add_column(col.replace("_bytes", " (B)"), justify="right" if col in cols[4:] else "left")
    for rep in reports:
        spills = (rep.get("spill_store_bytes") or 0) + (rep.get("spill_load_bytes") or 0)
        style = "red" if spills else None
        table.add_row(*("-" if rep.get(c) is None else str(rep.get(c)) for c in cols), style=style)
    console.print(table)
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    return 0 if reports else 1


# ------------------------------------------------------------------------------------------ plan
def cmd_plan(args: argparse.Namespace) -> int:
    from semanticgen import planning

    kwargs = {k: getattr(args, k) for k in ("fps", "window", "heads", "head_dim") if getattr(args, k) is not None}
    result = planning.plan(args.seconds, args.height, args.width, **kwargs)
    cp = None
    if args.context_parallel is not None:
        cp = planning.plan_context_parallel(
            result,
            args.context_parallel,
            hidden=args.hidden,
            link_gbytes_per_s=args.link_gbps,
            attention_tflops=args.attention_tflops,
        )
    if args.json:
        print(json.dumps({**result.to_dict(), **({"context_parallel": cp.to_dict()} if cp else {})}, indent=2))
    else:
        print(planning.format_plan(result))
        if cp is not None:
            print()
            print(planning.format_context_parallel(cp))
    return 0


# ------------------------------------------------------------------------------- train, generate
def cmd_train(args: argparse.Namespace) -> int:
    from semanticgen.train import main as train_main

    return int(train_main(args.train_args) or 0)


def cmd_generate(args: argparse.Namespace) -> int:
    run_dir = Path(args.checkpoint)
    if not run_dir.exists():
        raise UsageError(f"--checkpoint: no such run directory or file: {run_dir}")
    # Under torchrun the ranks split stage 2 (context parallelism); see python -m semanticgen.generate.
    from semanticgen.generate import generate

    return generate(args)


# ------------------------------------------------------------------------------------------ eval
def cmd_eval(args: argparse.Namespace) -> int:
    from rich.table import Table

    from semanticgen.evaluation import evaluate_run, summary_rows
    from semanticgen.threads import configure_threads

    configure_threads()  # as training does: 1 thread on 2 shared CPUs (a 2-thread team waits for both each step)
    payload = evaluate_run(
        args.checkpoint,
        args.out,
        num_prompts=args.prompts,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    settings = payload["settings"]
    table = Table(
        title=f"prompt adherence over {settings['num_prompts']} prompts ({settings['steps']} steps, guidance "
        f"{settings['guidance']:g}, seed {settings['seed']})"
    )
    for col in ("clips", "colour", "shape", "direction", "all three"):
        table.add_column(col, justify="left" if col == "clips" else "right")
    for row in summary_rows(payload):
        table.add_row(*row)
    console = _console()
    console.print(table)
    console.print(f"{payload['timing']['seconds_per_generated_clip']:.2f} s per generated clip; wrote {payload['out']}")
    return 0


# -------------------------------------------------------------------------------------- selftest
def cmd_selftest(args: argparse.Namespace) -> int:
    import time

    from semanticgen import selftest

    device = args.device or ("cuda" if _cuda_available() else "cpu")
    reason = selftest.device_unavailable(device)
    if reason is not None:
        raise UsageError(reason)
    console = _console()
    name = selftest.device_name(device)
    console.print(f"semanticgen selftest on [bold]{name}[/bold] ({'quick' if args.quick else 'full'} run)")
    start = time.perf_counter()
    rows, elapsed = selftest.run_selftest(
        device, quick=args.quick, sections=args.only or selftest.SECTIONS, log=console.print
    )
    selftest.print_report(rows, elapsed, name, console)
    if args.json:
        report = selftest.report_json(rows, elapsed, device, args.quick, name)
        report["wall_seconds"] = time.perf_counter() - start
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {path}")
    return selftest.exit_code(rows)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semanticgen",
        description="Fast kernels, models and training for SemanticGen-style two-stage video generation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="versions, compiled kernels and backends available on this machine")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    from semanticgen.bench import SUITES

    p = sub.add_parser(
        "bench",
        help="run the benchmark suite on the best device present",
        description="Windowed vs full attention over a sweep of sequence lengths, the fused flow ops vs eager "
        "and compiled torch, and one diffusion-transformer block. Writes results.json, results.csv and "
        "attention_scaling.png to --out.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, finishes in about a minute")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--suite", action="append", choices=list(SUITES), help="run only these suites (repeatable)")
    p.add_argument(
        "--out", default=None, help="output directory (default: a new bench-results/<timestamp>-<device>[-quick]/)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "kernels",
        help="compile every kernel ahead of time for a GPU arch and report registers, spills, shared memory",
    )
    p.add_argument("--arch", default="sm_90a", choices=["sm_80", "sm_90a"], help="target (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("plan", help="token counts, windows and attention FLOPs of a long video (no weights needed)")
    p.add_argument("--seconds", type=_positive_float, required=True)
    p.add_argument("--height", type=_positive_int, required=True)
    p.add_argument("--width", type=_positive_int, required=True)
    p.add_argument("--fps", type=_positive_float, help="VAE-stream frame rate (default 24)")
    p.add_argument("--window", type=_positive_int, help="window length Tw in latent frames")
    p.add_argument("--heads", type=_positive_int, help="attention heads")
    p.add_argument("--head-dim", dest="head_dim", type=_positive_int, help="head dimension")
    p.add_argument(
        "--context-parallel",
        dest="context_parallel",
        type=_positive_int,
        help="also print per-rank tokens, memory and halo bytes for stage 2 split over this many ranks",
    )
    p.add_argument("--hidden", type=_positive_int, default=5120, help="model width for --context-parallel (5120)")
    p.add_argument(
        "--link-gbps", dest="link_gbps", type=_positive_float, default=50.0, help="assumed GB/s per GPU link (50)"
    )
    p.add_argument(
        "--attention-tflops",
        dest="attention_tflops",
        type=_positive_float,
        default=600.0,
        help="assumed attention TFLOP/s per GPU (600)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "train",
        help="train a stage (same arguments as python -m semanticgen.train)",
        add_help=False,
        prefix_chars="\0",
    )
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate a video from a trained run directory")
    # One option list for `semanticgen generate` and `python -m semanticgen.generate` (under torchrun too).
    from semanticgen.generate import add_arguments as add_generate_arguments

    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)

    from semanticgen.generate import _guidance
    from semanticgen.generate import build_parser as build_generate_parser

    generate_defaults = build_generate_parser()
    default_steps, default_guidance = (generate_defaults.get_default(k) for k in ("steps", "guidance"))
    p = sub.add_parser(
        "eval",
        help="prompt adherence of a run trained on the synthetic shapes: colour, shape and direction accuracy",
        description="Generates one clip per prompt over a seeded sample of the 84 synthetic captions, judges each "
        "with an analytic detector (colour, shape, direction of the moving region), and measures the ceilings: "
        "stage 2 alone fed the semantic tokens of real clips, and the detector on real clips (raw and through the "
        "run's VAE). Writes eval.json, eval.png (contact sheet of the generated clips) and "
        "eval_stage2_ceiling.png to --out.",
    )
    p.add_argument("--checkpoint", required=True, help="run directory written by `semanticgen train`")
    p.add_argument("--prompts", type=int, default=None, metavar="N", help="a seeded subset of N of the 84 prompts")
    p.add_argument("--out", default=None, help="output directory (default: RUN/eval/)")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompt subset and the noise (default: 0)")
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=f"Euler steps per stage (default: as semanticgen generate, {default_steps})",
    )
    p.add_argument(
        "--guidance",
        type=_guidance,
        default=None,
        help=f"classifier-free guidance (default: as semanticgen generate, {default_guidance})",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--batch-size", dest="batch_size", type=_positive_int, default=16, help="clips per batch (default: %(default)s)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=cmd_eval)

    from semanticgen.selftest import EXIT_CODES_HELP as SELFTEST_EXIT_CODES
    from semanticgen.selftest import SECTIONS as SELFTEST_SECTIONS

    p = sub.add_parser(
        "selftest",
        help="acceptance run: kernel correctness, int64 offsets, flow ops, CUDA graphs and timing on one device",
        description="Checks every swin_attention backend (forward and gradients) and the fused flow ops against "
        "fp64 references, int64 offsets and CUDA-graph capture on CUDA, and times the backends against full "
        "attention. Prints a verdict table.",
        epilog=SELFTEST_EXIT_CODES,
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="lighter matrix and smaller timing sizes")
    p.add_argument("--json", metavar="FILE", help="also write every row and the environment to FILE")
    p.add_argument(
        "--only", action="append", choices=list(SELFTEST_SECTIONS), help="run only these sections (repeatable)"
    )
    p.set_defaults(func=cmd_selftest)
    return parser


def _quiet_cuda_home_warning() -> None:
    """Silence torch's "No CUDA runtime is found, using CUDA_HOME=..." warning.

    ``torch.utils.cpp_extension`` logs it on import whenever a CUDA toolkit is installed on a machine without a
    GPU, and ``torch.compile`` imports that module, so every ``semanticgen bench`` printed it. It says nothing a
    user can act on: ``semanticgen info`` reports the devices and the build.
    """
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_cuda_home_warning()
    try:
        # A user mistake (UsageError) is one line and exit 2; anything else is a bug and keeps its traceback.
        return run_command(f"semanticgen {args.command}", lambda: args.func(args))
    except KeyboardInterrupt:
        print("semanticgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
