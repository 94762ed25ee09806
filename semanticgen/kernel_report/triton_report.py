"""Ahead-of-time compile every Triton kernel for a GPU target and report registers, spills and shared memory.

No GPU is needed: ``triton.compile`` lowers each kernel to PTX for ``GPUTarget("cuda", cc, 32)``, and
``ptxas -v`` assembles that PTX for ``sm_90a`` / ``sm_80`` and reports its resources. Every shipped
config (tile plus autotune config, see ``semanticgen.kernels._triton_utils``) is compiled with the
specialisation a real launch gets: contiguous last dimension (``stride_*d == 1``), 16-byte aligned
pointers and strides divisible by 16.

Usage::

    from semanticgen.kernel_report.triton_report import triton_kernel_reports
    rows = triton_kernel_reports("sm_90a")   # list of dicts, one per kernel x config x head dim
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

from .ptxas import find_ptxas, parse_ptxas_verbose, run_ptxas

__all__ = ["triton_kernel_reports", "parse_arch", "kernel_specs", "SHARED_MEMORY_LIMIT"]

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


def _compile(spec: KernelSpec, cc: int, dtype: str, head_dim: int, tile: int, config, tile_name: str):
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
    }
    if spec.has_dot:
        constexprs.update(PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
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
        else:
            signature[arg] = "i32"
            if arg.startswith("stride_"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        source,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )


def triton_kernel_reports(
    arch: str,
    *,
    head_dims: Iterable[int] = (64, 128),
    dtypes: Iterable[str] = ("bf16",),
    defaults_only: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Compile every Triton kernel and shipped config for ``arch`` and read its resources with ``ptxas -v``.

    Args:
        arch: ``"sm_90a"`` (H100 class) or ``"sm_80"`` (A100 class); see :func:`parse_arch`.
        head_dims: head dimensions to compile for (default 64 and 128).
        dtypes: input dtypes, ``"bf16"``, ``"fp16"``, ``"fp32"`` (default bf16).
        defaults_only: compile only the default config of each kernel (the one used without autotuning).
        progress: called with a short message before each compile.

    Returns:
        One dict per (kernel, head dim, config): ``kernel``, ``config`` (str: tile, blocks, warps,
        stages, ``(default)`` marked), ``default`` (bool: the config used without autotuning), ``arch``, ``dtype``,
        ``head_dim``, ``registers`` (per thread), ``spill_store_bytes``, ``spill_load_bytes``,
        ``shared_bytes`` (Triton's dynamic plus ptxas' static shared memory per block),
        ``shared_limit_bytes``, ``source`` (``"triton"``).

    Raises:
        ValueError: bad ``arch`` or dtype. ``PtxasError``: ptxas missing or failing.
    """
    from semanticgen.kernels._triton_utils import arch_class, padded_head_dim

    cc, ptx_arch = parse_arch(arch)
    dtype_names = []
    for d in dtypes:
        if d not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}, got {d!r}")
        dtype_names.append(_DTYPE_NAMES[d])
    table_arch = arch_class((cc // 10, cc % 10))
    ptxas = find_ptxas()
    rows: list[dict] = []
    for spec in _specs():
        for dtype in dtype_names:
            for head_dim in head_dims:
                tile, configs = spec.table.lookup(table_arch, padded_head_dim(head_dim), fp32=dtype == "fp32")
                for position, config in enumerate(configs[:1] if defaults_only else configs):
                    label = f"{spec.table.tile_name}={tile},{config.label()}" + (" (default)" if position == 0 else "")
                    if progress is not None:
                        progress(f"{spec.name} {ptx_arch} {dtype} D={head_dim} {label}")
                    compiled = _compile(spec, cc, dtype, head_dim, tile, config, spec.table.tile_name)
                    report = parse_ptxas_verbose(run_ptxas(compiled.asm["ptx"], ptx_arch, ptxas), arch=ptx_arch)
                    entry = report[compiled.metadata.name]
                    rows.append(
                        {
                            "kernel": spec.name,
                            "config": label,
                            "default": position == 0,
                            "arch": ptx_arch,
                            "dtype": dtype,
                            "head_dim": head_dim,
                            "registers": entry["registers"],
                            "spill_store_bytes": entry["spill_store_bytes"],
                            "spill_load_bytes": entry["spill_load_bytes"],
                            "shared_bytes": int(compiled.metadata.shared) + entry["shared_bytes"],
                            "shared_limit_bytes": SHARED_MEMORY_LIMIT.get(cc),
                            "source": "triton",
                        }
                    )
    return rows


if __name__ == "__main__":  # python -m semanticgen.kernel_report.triton_report sm_90a
    import sys

    for row in triton_kernel_reports(sys.argv[1] if len(sys.argv) > 1 else "sm_90a"):
        print(
            f"{row['kernel']:26s} D={row['head_dim']:<4d} {row['config']:54s} regs={row['registers']:<4d} "
            f"spill={row['spill_store_bytes']}/{row['spill_load_bytes']} smem={row['shared_bytes']}"
        )
