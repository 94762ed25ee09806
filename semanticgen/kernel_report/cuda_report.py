"""Registers, spills and shared memory of the hand-written CUDA kernels (``csrc/cuda/*.cu``), without a GPU.

Each ``.cu`` file is compiled to a cubin for one target with ``nvcc -cubin -arch=sm_XY -Xptxas -v``
against torch's include directories and the same code-generation flags as ``setup.py``; ptxas'
resource report is parsed by :func:`semanticgen.kernel_report.ptxas.parse_ptxas_verbose`.

The sources are looked up in ``$SEMANTICGEN_CSRC`` (a ``csrc`` directory), then next to the package
(an editable install or a source checkout: ``<repo>/csrc``), then in the copy a wheel ships as package
data (``semanticgen/_csrc``, written by setup.py's build_py: ``cuda/*.cu`` and ``include/*.h``).
nvcc is ``$CUDA_HOME/bin/nvcc``, then ``/usr/local/cuda/bin/nvcc``, then ``nvcc`` on ``PATH``. When either is missing,
:func:`cuda_kernel_reports` raises :class:`CudaReportUnavailable` saying which and how to fix it.

Example::

    for row in cuda_kernel_reports("sm_90a"):
        print(row["kernel"], row["config"], row["dtype"], row["registers"], row["spill_store_bytes"])
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from .ptxas import parse_ptxas_verbose

__all__ = ["cuda_kernel_reports", "find_cuda_sources", "find_nvcc", "parse_cuda_arch", "CudaReportUnavailable"]

STANDARD_CUDA_PREFIX = Path("/usr/local/cuda")
# csrc/ of the source tree this package was installed from (editable install or checkout).
REPO_CSRC = Path(__file__).resolve().parents[2] / "csrc"
# The copy of csrc/cuda and csrc/include inside an installed wheel (setup.py's BuildPyWithCudaSources).
PACKAGED_CSRC = Path(__file__).resolve().parents[1] / "_csrc"

# Keep in step with the nvcc flags of setup.py: the report describes the kernels that ship.
NVCC_FLAGS = ("-O3", "-std=c++20", "--use_fast_math", "-DSEMANTICGEN_WITH_CUDA")

# Functor of the elementwise kernel -> the op it implements.
_OP_OF_FUNCTOR = {
    "EulerOp": "euler_step",
    "CfgEulerOp": "cfg_euler_step",
    "NoisingOp": "flow_noising",
    "LossGradOp": "flow_matching_loss_backward",
}
_DTYPE_OF_CXX = {"float": "float32", "c10::Half": "float16", "c10::BFloat16": "bfloat16"}


class CudaReportUnavailable(FileNotFoundError):
    """The CUDA sources or ``nvcc`` are not on this machine, so no report can be compiled."""


def parse_cuda_arch(arch: str) -> str:
    """``"sm_90a"``, ``"90a"``, ``"9.0a"`` -> ``"sm_90a"``; ``"sm_80"``, ``"8.0"`` -> ``"sm_80"``.

    Raises:
        TypeError: ``arch`` is not a string.
        ValueError: it does not name a compute capability.
    """
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a str like 'sm_90a' or '8.0', got {type(arch).__name__}")
    text = arch.strip().lower()
    m = re.fullmatch(r"(\d+)\.(\d)([a-z]?)", text)
    if m:
        return f"sm_{m.group(1)}{m.group(2)}{m.group(3)}"
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})([a-z]?)", text)
    if not m:
        raise ValueError(f"arch must look like 'sm_80', 'sm_90a' or '9.0a', got {arch!r}")
    return f"sm_{m.group(1)}{m.group(2)}"


def find_cuda_sources() -> tuple[Path, list[Path]]:
    """The ``csrc`` directory and its ``cuda/*.cu`` files.

    Raises:
        CudaReportUnavailable: no ``csrc/cuda/*.cu`` found (a wheel install without sources).
    """
    candidates = []
    if os.environ.get("SEMANTICGEN_CSRC"):
        candidates.append(Path(os.environ["SEMANTICGEN_CSRC"]))
    # The checkout first: in an editable install it is what the extension is built from.
    candidates += [REPO_CSRC, PACKAGED_CSRC]
    for csrc in candidates:
        sources = sorted((csrc / "cuda").glob("*.cu"))
        if sources:
            return csrc, sources
    raise CudaReportUnavailable(
        "CUDA kernel sources (csrc/cuda/*.cu) not found in "
        + ", ".join(str(c) for c in candidates)
        + "; reinstall the package (its wheel ships them as semanticgen/_csrc), run from a source checkout"
        " (pip install -e .) or set SEMANTICGEN_CSRC to a csrc directory"
    )


def find_nvcc() -> str:
    """Path of ``nvcc``.

    Raises:
        CudaReportUnavailable: none found.
    """
    candidates = [Path(os.environ[e]) / "bin" / "nvcc" for e in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(e)]
    candidates.append(STANDARD_CUDA_PREFIX / "bin" / "nvcc")
    if on_path := shutil.which("nvcc"):
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise CudaReportUnavailable("nvcc not found: install the CUDA toolkit and set CUDA_HOME (e.g. /usr/local/cuda)")


def _torch_include_dirs(nvcc: str) -> list[str]:
    import torch

    # torch's own header folders (what cpp_extension.include_paths() lists; importing cpp_extension
    # would guess a CUDA_HOME and warn about it).
    torch_include = Path(torch.__file__).resolve().parent / "include"
    dirs = [str(torch_include), str(torch_include / "torch" / "csrc" / "api" / "include")]
    toolkit_include = Path(nvcc).resolve().parents[1] / "include"
    if toolkit_include.is_dir():
        dirs.append(str(toolkit_include))
    return dirs


def _demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled names through ``c++filt`` when available (identity otherwise)."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    proc = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines))


def _describe(demangled: str) -> tuple[str, str, str | None]:
    """``(kernel, config, dtype)`` for one kernel of csrc/cuda/flow_ops_cuda.cu (generic fallback otherwise)."""
    m = re.search(r"map_kernel<([^,]+), .*?(\w+), (true|false)>", demangled)
    if m:
        op = _OP_OF_FUNCTOR.get(m.group(2), m.group(2))
        config = "16-byte packs" if m.group(3) == "true" else "scalar (unaligned)"
        return op, config, _DTYPE_OF_CXX.get(m.group(1), m.group(1))
    m = re.search(r"loss_partial_kernel<([^,>]+), (true|false)>", demangled)
    if m:
        config = "partial sums, " + ("16-byte packs" if m.group(2) == "true" else "scalar (unaligned)")
        return "flow_matching_loss", config, _DTYPE_OF_CXX.get(m.group(1), m.group(1))
    if "loss_finalize_kernel" in demangled:
        return "flow_matching_loss", "finalize (fp64, one block)", None
    name = demangled.removeprefix("void ").split("(")[0].replace("(anonymous namespace)::", "")
    return name, "", None


@functools.lru_cache(maxsize=8)
def _compile_report(source: Path, csrc: Path, nvcc: str, target: str) -> str:
    includes = [f"-I{d}" for d in (str(csrc / "include"), *_torch_include_dirs(nvcc))]
    with tempfile.TemporaryDirectory(prefix="semanticgen-nvcc-") as tmp:
        cmd = [
            nvcc,
            "-cubin",
            f"-arch={target}",
            *NVCC_FLAGS,
            "-Xptxas",
            "-v",
            *includes,
            "-o",
            str(Path(tmp) / (source.stem + ".cubin")),
            str(source),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {source.name} ({target}, exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def cuda_kernel_reports(arch: str = "sm_90a") -> list[dict]:
    """Resource usage of every CUDA kernel of ``semanticgen._C`` compiled for ``arch``.

    Compiles each ``csrc/cuda/*.cu`` (about 40 s per file and target on 2 cores; cached per process).

    Args:
        arch: target such as ``"sm_90a"``, ``"sm_80"`` or ``"9.0a"``.

    Returns:
        One dict per kernel instantiation with keys ``kernel`` (the op), ``config`` (load width /
        phase), ``arch``, ``dtype`` (``"float32"``/``"bfloat16"``/``"float16"``, or None),
        ``head_dim`` (None), ``registers``, ``spill_store_bytes``, ``spill_load_bytes``,
        ``shared_bytes`` (static), ``source`` (``"cuda"``), plus ``file`` and ``symbol``.

    Raises:
        CudaReportUnavailable: sources or nvcc missing (the message says which).
        RuntimeError: nvcc rejected a source.
    """
    target = parse_cuda_arch(arch)
    csrc, sources = find_cuda_sources()
    nvcc = find_nvcc()
    rows = []
    for source in sources:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that no CUDA runtime is visible: expected here
            text = _compile_report(source, csrc, nvcc, target)
        records = parse_ptxas_verbose(text, arch=target)
        names = _demangle(sorted(records))
        for symbol in sorted(records, key=lambda s: names[s]):
            rec = records[symbol]
            kernel, config, dtype = _describe(names[symbol])
            rows.append(
                {
                    "kernel": kernel,
                    "config": config,
                    "arch": target,
                    "dtype": dtype,
                    "head_dim": None,
                    "registers": rec["registers"],
                    "spill_store_bytes": rec["spill_store_bytes"],
                    "spill_load_bytes": rec["spill_load_bytes"],
                    "shared_bytes": rec["shared_bytes"],
                    "source": "cuda",
                    "file": f"csrc/cuda/{source.name}",
                    "symbol": symbol,
                }
            )
    rows.sort(key=lambda r: (r["file"], r["kernel"], r["config"], r["dtype"] or ""))
    return rows
