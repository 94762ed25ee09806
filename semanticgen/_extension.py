"""Guarded import of the compiled extension ``semanticgen._C``.

Importing :mod:`semanticgen` never fails because the extension is missing; calling a compiled
op then raises one actionable error (see :func:`require_extension`).
"""

from __future__ import annotations

import functools

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

_IMPORT_ERROR: BaseException | None = None
try:
    from semanticgen import _C  # noqa: F401  (importing registers torch.ops.semanticgen.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _IMPORT_ERROR = exc

REBUILD_HINT = (
    "Rebuild it from the repository root with\n"
    "    pip install --no-build-isolation -e '.[dev]'\n"
    "(set CUDA_HOME to the CUDA toolkit, or SEMANTICGEN_BUILD_CUDA=0 for a CPU-only build)."
)


def extension_available() -> bool:
    """Whether ``semanticgen._C`` imported."""
    return _IMPORT_ERROR is None


def extension_error() -> str | None:
    """Why ``semanticgen._C`` is unavailable, or ``None`` when it loaded."""
    return None if _IMPORT_ERROR is None else f"{type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}"


def require_extension(what: str) -> None:
    """Raise a ``RuntimeError`` that says how to fix a missing extension before ``what`` runs."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(
            f"{what} needs the compiled extension semanticgen._C, which failed to import "
            f"({extension_error()}). {REBUILD_HINT}"
        )


@functools.lru_cache(maxsize=1)
def built_cuda_archs() -> list[str]:
    """CUDA architectures compiled into ``_C`` (empty when built without CUDA or not built)."""
    if _IMPORT_ERROR is not None:
        return []
    info = torch.ops.semanticgen.build_info()
    archs = info.partition("cuda=")[2]
    return [a for a in archs.split(";") if a]


def cpu_capability() -> str | None:
    """Variant of the CPU flow kernels in use, ``"avx2"`` or ``"avx512"`` (``None`` when ``_C`` is not built).

    Chosen once per process, at the first call of a CPU flow op: AVX-512 when the CPU has
    AVX512F/BW/VL/DQ, AVX2 otherwise. ``SEMANTICGEN_CPU_CAPABILITY=avx2`` or ``avx512`` forces one
    (a ``RuntimeError`` when the forced variant cannot run on this CPU or the value is neither).
    """
    if _IMPORT_ERROR is not None:
        return None
    return torch.ops.semanticgen.cpu_capability()
