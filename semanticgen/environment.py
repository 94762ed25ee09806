"""The machine, versions, build and commit that every result file records (``semanticgen bench``, ``selftest``).

One flat record, every value a string, number or ``None``, so a CSV row can carry the same columns as the
JSON's ``environment`` object. The keys are always present (``None`` where they do not apply, e.g. ``gpu`` on
a machine without one), so files from different machines have the same columns.

Example:
    >>> env = environment("cpu")
    >>> env["device"], env["torch"] == torch.__version__
    ('cpu', True)
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["environment", "cpu_model", "cpu_kernel_variant", "git_commit"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what :func:`platform.processor` says, or ``"unknown"``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """Commit of the source tree the package runs from (``-dirty`` with uncommitted changes to tracked files),
    or ``None`` outside a git checkout (an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def cpu_kernel_variant() -> str | None:
    """The variant of the CPU flow kernels this process runs, ``"avx2"`` or ``"avx512"``; ``"error: <why>"`` when
    ``SEMANTICGEN_CPU_CAPABILITY`` names one this CPU or build cannot run (a report still gets written), ``None``
    when ``semanticgen._C`` did not load."""
    from semanticgen._extension import cpu_capability

    try:
        return cpu_capability()
    except RuntimeError as exc:
        return f"error: {exc}"


def _extension() -> dict[str, str | None]:
    """Whether ``semanticgen._C`` loaded, what it was built with and which CPU kernel variant it runs."""
    from semanticgen._extension import built_cuda_archs, extension_error

    error = extension_error()
    if error is not None:
        missing = {"extension_build": None, "extension_cuda_archs": None, "cpu_capability": None}
        return {"extension": f"MISSING: {error}", **missing}
    return {
        "extension": "loaded",
        "extension_build": torch.ops.semanticgen.build_info(),  # "cuda=8.0;9.0a", or "cuda=" for a CPU-only build
        "extension_cuda_archs": ";".join(built_cuda_archs()),  # "" when built without CUDA
        "cpu_capability": cpu_kernel_variant(),
    }


def _gpu(device: str) -> dict[str, object]:
    """Name, compute capability and memory of the GPU ``device`` names (``cuda:1``), or of the current one when
    ``device`` is not a CUDA device; all ``None`` without a visible GPU."""
    if not torch.cuda.is_available():
        return {"gpu": None, "gpu_capability": None, "gpu_memory_gib": None}
    index = torch.device(device).index if device.startswith("cuda") else None
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    return {
        "gpu": props.name,
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
    }


def environment(device: str) -> dict[str, object]:
    """Machine, versions, build, commit and time of a run on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Keys: ``timestamp`` (UTC, ISO 8601), ``device``, ``machine``, ``arch``, ``cpu``, ``cpu_count``,
    ``torch_threads``, ``platform``, ``python``, ``torch``, ``torch_cuda`` (the CUDA version torch was built
    with, ``None`` for a CPU-only torch), ``triton``, ``semanticgen``, ``git_commit``, ``extension``
    (``"loaded"`` or ``"MISSING: <why>"``), ``extension_build`` (``_C``'s build info), ``extension_cuda_archs``
    (``"8.0;9.0a"``), ``cpu_capability`` (the CPU flow kernels' variant), ``gpu``, ``gpu_capability`` (``"9.0"``)
    and ``gpu_memory_gib``. Every value is a str, int, float or None.
    """
    import semanticgen

    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "machine": platform.node(),
        "arch": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "semanticgen": semanticgen.__version__,
        "git_commit": git_commit(),
        **_extension(),
        **_gpu(device),
    }
