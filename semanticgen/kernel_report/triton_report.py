"""Ahead-of-time compile every Triton kernel for a GPU target and report its resources and pipeline.

No GPU is needed: ``triton.compile`` lowers each kernel to PTX for ``GPUTarget("cuda", cc, 32)``, and
``ptxas -v`` assembles that PTX for ``sm_90a`` / ``sm_80`` and reports its resources. Every shipped
config (tile plus autotune config, see ``semanticgen.kernels._triton_utils``) is compiled for bf16,
fp16 and fp32 with the specialisation a real launch gets: contiguous last dimension
(``stride_*d == 1``), 16-byte aligned pointers and strides divisible by 16; default configs also with
int64 strides (what a launch with a stride ``>= 2**31`` compiles to) and in their secondary variants
(the forward's pointer fallback next to its TMA build on sm_90, the opt-in atomic-dQ dK/dV kernel).

Each row also says what the PTX does: ``wgmma`` (Hopper warp-group MMA), ``tma``
(``cp.async.bulk.tensor``), ``loop_waits_all`` (see :func:`loop_waits_all`) and ``ctas_per_sm`` (see
:func:`ctas_per_sm`).

Usage::

    from semanticgen.kernel_report.triton_report import triton_kernel_reports, format_table
    rows = triton_kernel_reports("sm_90a")   # list of dicts, one per kernel x dtype x head dim x config
    print(format_table(rows))
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

from .ptxas import find_ptxas, parse_ptxas_verbose, run_ptxas

__all__ = [
    "triton_kernel_reports",
    "parse_arch",
    "kernel_specs",
    "loop_waits_all",
    "ctas_per_sm",
    "format_table",
    "SHARED_MEMORY_LIMIT",
]

# Largest dynamic shared memory one block may use (opt-in), bytes.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_DTYPE_NAMES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """How to compile one kernel: its jit function, config table and argument kinds."""

    name: str
    fn: object
    table: object
    pointers: dict[str, str]  # arg name -> element type ("in" = the input dtype)
    floats: tuple[str, ...] = ()
    has_dot: bool = True


def _specs() -> list[KernelSpec]:
    from semanticgen.kernels import swin_attention_bwd as bwd
    from semanticgen.kernels import swin_attention_fwd as fwd

    i32 = "i32"
    return [
        KernelSpec(
            "swin_attn_fwd",
            fwd.swin_attn_fwd_kernel,
            fwd.FWD_CONFIGS,
            {"Q": "in", "K": "in", "V": "in", "Out": "in", "LSE": "fp32", "TILES": i32},
            floats=("qk_scale",),
        ),
        KernelSpec(
            "swin_attn_bwd_preprocess",
            bwd.swin_attn_bwd_preprocess_kernel,
            bwd.PREPROCESS_CONFIGS,
            {"Out": "in", "DO": "in", "DELTA": "fp32"},
            has_dot=False,
        ),
        KernelSpec(
            "swin_attn_bwd_dkdv",
            bwd.swin_attn_bwd_dkdv_kernel,
            bwd.DKDV_CONFIGS,
            {
                **{n: "in" for n in ("Q", "K", "V", "DO", "DK", "DV")},
                **{"DQ_ACC": "fp32", "LSE": "fp32", "DELTA": "fp32", "TILES": i32},
            },
            floats=("qk_scale", "sm_scale"),
        ),
        KernelSpec(
            "swin_attn_bwd_dq",
            bwd.swin_attn_bwd_dq_kernel,
            bwd.DQ_CONFIGS,
            {
                **{n: "in" for n in ("Q", "K", "V", "DO", "DQ")},
                **{"LSE": "fp32", "DELTA": "fp32", "TILES": i32},
            },
            floats=("qk_scale", "sm_scale"),
        ),
    ]


def kernel_specs() -> list[KernelSpec]:
    """Every Triton kernel the package ships (imports triton, so not done at module import)."""
    return _specs()


def parse_arch(arch: str) -> tuple[int, str]:
    """``"sm_90a"``/``"sm90"``/``"90"`` -> ``(90, "sm_90a")``; ``"sm_80"`` -> ``(80, "sm_80")``.

    Compute capability 9.0 always uses ``sm_90a`` (Triton emits wgmma, which needs the ``a`` target).

    Raises:
        ValueError: not an ``sm_XY`` target Triton supports (8.0 or newer).
    """
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a str like 'sm_90a', got {type(arch).__name__}")
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})([a-z]?)", arch.strip().lower())
    if not m:
        raise ValueError(f"arch must look like 'sm_80' or 'sm_90a', got {arch!r}")
    cc = int(m.group(1))
    if cc < 80:
        raise ValueError(f"Triton kernels need compute capability >= 8.0, got {arch!r}")
    suffix = "a" if cc >= 90 and cc < 100 else m.group(2)
    return cc, f"sm_{cc}{suffix}"


def _compile(
    spec: KernelSpec,
    cc: int,
    dtype: str,
    head_dim: int,
    tile: int,
    config,
    tile_name: str,
    variant: dict[str, object],
    index_bits: int = 32,
):
    """``triton.compile`` one kernel for ``GPUTarget("cuda", cc, 32)`` with a launch's specialisation.

    ``variant``: extra constexprs (``TMA``, ``ATOMIC_DQ``). ``index_bits=64`` types every stride as
    ``i64``, what Triton does when a launch passes a stride of ``2**31`` or more.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    from semanticgen.kernels._triton_utils import padded_head_dim

    fn = spec.fn
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": padded_head_dim(head_dim),
        tile_name: tile,
        **config.kwargs,
        **variant,
    }
    if spec.has_dot:
        # Tails are peeled exactly where the launcher peels them (wgmma: bf16/fp16 on 9.x).
        peel = cc // 10 == 9 and dtype != "fp32"
        constexprs.update(PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False, PEEL_TAIL=peel)
    attrs = {}
    for index, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in spec.pointers:
            kind = spec.pointers[arg]
            signature[arg] = "*" + (dtype if kind == "in" else kind)
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg in spec.floats:
            signature[arg] = "fp32"
        elif arg.startswith("stride_") and arg.endswith("d"):
            signature[arg] = "constexpr"  # a launch with a contiguous last dim specialises stride 1
            constexprs[arg] = 1
        elif arg.startswith("stride_"):
            signature[arg] = f"i{index_bits}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "i32"
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        source,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )


# ------------------------------------------------------------------------------------- PTX analysis
_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_WAIT_ALL_CP_ASYNC = re.compile(r"\bcp\.async\.wait_group\s+0;")
_TMA_COPY = "cp.async.bulk.tensor"
_MBARRIER_WAIT = "mbarrier.try_wait"


def _main_loops(lines: list[str]) -> list[tuple[int, int]]:
    """``(first, last)`` line of every loop: a ``$L__BB`` label and a later branch back to it."""
    labels: dict[str, int] = {}
    loops = []
    for i, line in enumerate(lines):
        if m := _LABEL.match(line):
            labels[m.group(1)] = i
        elif (m := _BRANCH.search(line)) and m.group(1) in labels:
            loops.append((labels[m.group(1)], i))
    return loops


def loop_waits_all(ptx: str) -> bool:
    """Whether some loop of the kernel waits, every iteration, for all of its outstanding async copies.

    Precisely, for a loop (a ``$L__BB`` label up to the branch back to it):

    * ``cp.async`` pipelines: the loop body contains ``cp.async.wait_group 0``, i.e. it waits until no
      copy group is pending, so the next blocks' loads cannot be in flight during that wait;
    * TMA pipelines (``cp.async.bulk.tensor`` completing on mbarriers): the body issues TMA copies and
      waits on an mbarrier, but no TMA copy is issued in the loop's prologue (between the previous loop
      and this one), so every wait is for a copy issued in the same iteration: no prefetch.

    Triton's pipeliner with ``num_stages >= 3`` waits for ``stages - 2`` groups (``wait_group N > 0``,
    or per-stage mbarriers with prologue prefetches), which this reports as ``False``. The spin loops
    inside mbarrier waits use local ``waitLoop`` labels, not ``$L__BB``, and are not loops here.
    """
    lines = ptx.splitlines()
    loops = _main_loops(lines)
    for first, last in loops:
        body = lines[first : last + 1]
        if any(_WAIT_ALL_CP_ASYNC.search(line) for line in body):
            return True
        if any(_TMA_COPY in line for line in body) and any(_MBARRIER_WAIT in line for line in body):
            prologue_start = max((end for start, end in loops if end < first), default=0)
            if not any(_TMA_COPY in line for line in lines[prologue_start:first]):
                return True
    return False


# Per-SM limits for the occupancy estimate: registers, shared memory (bytes), threads, resident blocks.
_SM_LIMITS = {
    80: (65536, 167936, 2048, 32),
    86: (65536, 102400, 1536, 16),
    89: (65536, 102400, 1536, 24),
    90: (65536, 233472, 2048, 32),
}
_SHARED_RESERVED_PER_BLOCK = 1024  # the driver reserves 1 KiB of shared memory per resident block (sm_80+)


def ctas_per_sm(cc: int, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident blocks per SM allowed by registers, shared memory and threads (the minimum of the three).

    Registers are allocated per warp in units of 256 (8 per thread); shared memory per block includes
    the 1 KiB the driver reserves.
    """
    regs_sm, smem_sm, threads_sm, blocks_sm = _SM_LIMITS.get(cc, _SM_LIMITS[80])
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = regs_sm // (regs_per_warp * num_warps) if registers else blocks_sm
    by_smem = smem_sm // (shared_bytes + _SHARED_RESERVED_PER_BLOCK)
    by_threads = threads_sm // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, blocks_sm))


def _variants(spec: KernelSpec, cc: int, dtype: str) -> list[tuple[str, dict[str, object], bool]]:
    """``(name, constexprs, primary)`` builds of a kernel for an arch and dtype.

    The primary build is what a launch with contiguous inputs runs; the others (the pointer fallback
    of the TMA forward and dQ kernels, the opt-in atomic-dQ backward) are reported for their default
    config only.
    """
    from semanticgen.kernels._triton_utils import tma_available

    if spec.name in ("swin_attn_fwd", "swin_attn_bwd_dq"):
        if cc // 10 == 9 and dtype != "fp32" and tma_available():
            return [("tma", {"TMA": True}, True), ("pointer", {"TMA": False}, False)]
        return [("pointer", {"TMA": False}, True)]
    if spec.name == "swin_attn_bwd_dkdv":
        return [("deterministic", {"ATOMIC_DQ": False}, True), ("atomic_dq", {"ATOMIC_DQ": True}, False)]
    return [("", {}, True)]


def triton_kernel_reports(
    arch: str,
    *,
    head_dims: Iterable[int] = (64, 128),
    dtypes: Iterable[str] = ("bf16", "fp16", "fp32"),
    defaults_only: bool = False,
    index_bits: Iterable[int] = (32, 64),
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Compile every Triton kernel and shipped config for ``arch`` and read its resources with ``ptxas -v``.

    Args:
        arch: ``"sm_90a"`` (H100 class) or ``"sm_80"`` (A100 class); see :func:`parse_arch`.
        head_dims: head dimensions to compile for (default 64 and 128).
        dtypes: input dtypes, ``"bf16"``, ``"fp16"``, ``"fp32"`` (default all three).
        defaults_only: compile only the default config of each kernel (the one used without autotuning).
        index_bits: ``32`` (strides fit int32, every config) and/or ``64`` (int64 strides, as Triton
            specialises launches with a stride ``>= 2**31``; default configs only).
        progress: called with a short message before each compile.

    Returns:
        One dict per (kernel, dtype, head dim, config, variant, index bits): ``kernel``, ``config`` (str:
        tile, blocks, warps, stages, variant, ``i64``, ``(default)`` marked), ``default`` (bool: the config
        used without autotuning), ``variant`` (``"tma"``/``"pointer"`` forward and dQ, ``"deterministic"`` /
        ``"atomic_dq"`` dK/dV, ``""`` otherwise), ``primary`` (bool: the variant contiguous inputs run),
        ``index_bits``, ``arch``, ``dtype``, ``head_dim``, ``num_warps``, ``num_stages``, ``registers``
        (per thread), ``spill_store_bytes``, ``spill_load_bytes``, ``shared_bytes`` (Triton's dynamic plus
        ptxas' static shared memory per block), ``shared_limit_bytes``, ``ctas_per_sm``
        (:func:`ctas_per_sm`), ``wgmma`` (PTX has ``wgmma.mma_async``), ``tma`` (PTX has
        ``cp.async.bulk.tensor``), ``loop_waits_all`` (:func:`loop_waits_all`), ``source`` (``"triton"``).

    Raises:
        ValueError: bad ``arch``, dtype or index bits. ``PtxasError``: ptxas missing or failing.
    """
    from semanticgen.kernels._triton_utils import arch_class, padded_head_dim

    cc, ptx_arch = parse_arch(arch)
    dtype_names = []
    for d in dtypes:
        if d not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}, got {d!r}")
        dtype_names.append(_DTYPE_NAMES[d])
    bits_list = list(index_bits)
    if not bits_list or any(b not in (32, 64) for b in bits_list):
        raise ValueError(f"index_bits must be a non-empty subset of (32, 64), got {bits_list!r}")
    table_arch = arch_class((cc // 10, cc % 10))
    ptxas = find_ptxas()
    rows: list[dict] = []
    for spec in _specs():
        for dtype in dtype_names:
            for head_dim in head_dims:
                for variant, constexprs, primary in _variants(spec, cc, dtype):
                    tile, configs = spec.table.lookup(
                        table_arch, padded_head_dim(head_dim), fp32=dtype == "fp32", variant=variant or None
                    )
                    for bits in bits_list:
                        full = primary and bits == 32 and not defaults_only
                        for position, config in enumerate(configs if full else configs[:1]):
                            label = ",".join(
                                [f"{spec.table.tile_name}={tile}", config.label()]
                                + ([variant] if variant else [])
                                + (["i64"] if bits == 64 else [])
                            ) + (" (default)" if position == 0 else "")
                            if progress is not None:
                                progress(f"{spec.name} {ptx_arch} {dtype} D={head_dim} {label}")
                            compiled = _compile(
                                spec, cc, dtype, head_dim, tile, config, spec.table.tile_name, constexprs, bits
                            )
                            ptx = compiled.asm["ptx"]
                            report = parse_ptxas_verbose(run_ptxas(ptx, ptx_arch, ptxas), arch=ptx_arch)
                            entry = report[compiled.metadata.name]
                            shared = int(compiled.metadata.shared) + entry["shared_bytes"]
                            rows.append(
                                {
                                    "kernel": spec.name,
                                    "config": label,
                                    "default": position == 0,
                                    "variant": variant,
                                    "primary": primary,
                                    "index_bits": bits,
                                    "arch": ptx_arch,
                                    "dtype": dtype,
                                    "head_dim": head_dim,
                                    "num_warps": config.num_warps,
                                    "num_stages": config.num_stages,
                                    "registers": entry["registers"],
                                    "spill_store_bytes": entry["spill_store_bytes"],
                                    "spill_load_bytes": entry["spill_load_bytes"],
                                    "shared_bytes": shared,
                                    "shared_limit_bytes": SHARED_MEMORY_LIMIT.get(cc),
                                    "ctas_per_sm": ctas_per_sm(cc, entry["registers"] or 0, shared, config.num_warps),
                                    "wgmma": "wgmma.mma_async" in ptx,
                                    "tma": _TMA_COPY in ptx,
                                    "loop_waits_all": loop_waits_all(ptx),
                                    "source": "triton",
                                }
                            )
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table of report rows: kernel, dtype, D, config, registers, spills, shared, CTAs/SM, flags."""
    header = (
        f"{'kernel':26s} {'dtype':5s} {'D':>4s} {'config':70s} {'regs':>4s} {'spill':>9s} {'smem':>7s} "
        f"{'ctas':>4s} {'wgmma':>5s} {'tma':>5s} {'waits_all':>9s}"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['kernel']:26s} {r['dtype']:5s} {r['head_dim']:>4d} {r['config']:70s} {r['registers']:>4d} "
            f"{r['spill_store_bytes']:>4d}/{r['spill_load_bytes']:<4d} {r['shared_bytes']:>7d} {r['ctas_per_sm']:>4d} "
            f"{r['wgmma']!s:>5s} {r['tma']!s:>5s} {r['loop_waits_all']!s:>9s}"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m semanticgen.kernel_report.triton_report sm_90a
    import sys

    print(format_table(triton_kernel_reports(sys.argv[1] if len(sys.argv) > 1 else "sm_90a")))
