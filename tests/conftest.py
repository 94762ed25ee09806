"""Shared pytest fixtures, and the one place that decides whether a missing build or toolkit skips or fails.

A user without the CUDA toolkit, or with a CPU-only build, gets skips that say what is missing. CI
(``.ci/run``) sets ``SEMANTICGEN_REQUIRE_EXTENSION=1`` and ``SEMANTICGEN_REQUIRE_PTXAS=1``; then the same
tests fail, so a broken build cannot pass as a row of skips:

* ``SEMANTICGEN_REQUIRE_EXTENSION=1``: ``semanticgen._C`` must import, and carry its CUDA kernels.
* ``SEMANTICGEN_REQUIRE_PTXAS=1``: ``ptxas`` (the Triton resource reports) and ``nvcc`` with the CUDA
  sources (the CUDA resource reports) must be found.
* ``SEMANTICGEN_REQUIRE_DEV_EXTRAS=1``: the ``dev`` extra's optional libraries (diffusers, torchvision) must
  import; a broken or missing one fails the tests that use it instead of skipping whole files.

The package's own dependencies (transformers, PyAV, safetensors, ...) are imported plainly: a missing one
is an error, never a skip.

Test modules use the fixtures below, or import the helpers (``from conftest import require_ptxas``): pytest
puts ``tests/`` on ``sys.path`` and registers this file as the module ``conftest``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import NoReturn

import pytest
import torch

from semanticgen._extension import built_cuda_archs, extension_available, extension_error

REQUIRE_EXTENSION = "SEMANTICGEN_REQUIRE_EXTENSION"
REQUIRE_PTXAS = "SEMANTICGEN_REQUIRE_PTXAS"
REQUIRE_DEV_EXTRAS = "SEMANTICGEN_REQUIRE_DEV_EXTRAS"


def required(flag: str) -> bool:
    """Whether ``flag`` (one of the ``REQUIRE_*`` names above) is set to 1 in the environment."""
    value = os.environ.get(flag, "").strip()
    if value not in ("", "0", "1"):
        # A typo such as "yes" must not silently turn the requirement off.
        raise pytest.UsageError(f"{flag} must be 0 or 1 (or unset), got {value!r}")
    return value == "1"


def skip_or_fail(reason: str, flag: str) -> NoReturn:
    """Skip with ``reason``, or fail with it when ``flag`` is set (see the module docstring)."""
    if required(flag):
        pytest.fail(f"{reason} ({flag}=1: this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def require_extension(*, cuda: bool = False) -> None:
    """Skip, or fail under ``SEMANTICGEN_REQUIRE_EXTENSION=1``, unless ``semanticgen._C`` imported
    (and, with ``cuda=True``, was built with its CUDA kernels)."""
    if not extension_available():
        skip_or_fail(f"semanticgen._C is not built ({extension_error()})", REQUIRE_EXTENSION)
    if cuda and not built_cuda_archs():
        skip_or_fail("semanticgen._C was built without CUDA", REQUIRE_EXTENSION)


def require_dev_extra(module: str, why: str = ""):
    """Import and return ``module``, an optional library of the ``dev`` extra; skip, or fail under
    ``SEMANTICGEN_REQUIRE_DEV_EXTRAS=1``, when it does not import (missing, or broken by its own imports)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        skip_or_fail(f"{module} does not import ({exc}){': ' + why if why else ''}", REQUIRE_DEV_EXTRAS)


def require_ptxas() -> str:
    """Path of ``ptxas``; skips, or fails under ``SEMANTICGEN_REQUIRE_PTXAS=1``, when there is none."""
    from semanticgen.kernel_report.ptxas import PtxasError, find_ptxas

    try:
        return find_ptxas()
    except PtxasError as exc:
        skip_or_fail(str(exc), REQUIRE_PTXAS)


def require_cuda_kernel_reports(arch: str) -> list[dict]:
    """``cuda_kernel_reports(arch)``; skips, or fails under ``SEMANTICGEN_REQUIRE_PTXAS=1``, when nvcc or
    the CUDA sources are missing (the toolkit that also provides ptxas)."""
    from semanticgen.kernel_report import cuda_report

    try:
        return cuda_report.cuda_kernel_reports(arch)
    except cuda_report.CudaReportUnavailable as exc:
        skip_or_fail(str(exc), REQUIRE_PTXAS)


# The accuracy rule: a kernel's error against fp64 is at most twice that of the same computation in plain
# torch at the input dtype. Only where plain torch is exact (error 0) is there a floor, and then it is
# FLOOR_ULPS units in the last place of the output's magnitude, not a constant.
FLOOR_ULPS = 4


def error_bound(plain_error: float, magnitude: float, dtype: torch.dtype) -> float:
    """Largest error the rule allows: ``2 * plain_error``, or FLOOR_ULPS ulps of ``magnitude`` (the largest
    |fp64 value| of the output) when plain torch's error is 0."""
    if plain_error > 0:
        return 2 * plain_error
    return FLOOR_ULPS * torch.finfo(dtype).eps * magnitude


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> Iterator[torch.device]:
    """``cpu`` always; ``cuda`` when a GPU is present, so a GPU machine runs the same tests on its kernels.

    On ``cuda``, float32 means IEEE float32 for the test's duration: TF32 is off for cuDNN convolutions (torch
    turns it on by default there; diffusers' Wan patch embedding is a Conv3d) and for cuBLAS matmuls, then
    restored. TF32's 10-bit mantissa would put a ~1e-3 relative error into fp32 comparisons that hold to 1e-5.
    """
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA kernels run only on a GPU")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def compiled_ops(request):
    """Skips (or fails, see ``require_extension``) a test of the compiled ops: ``semanticgen._C`` must be
    built, with its CUDA kernels when the test also takes ``device`` and runs on ``cuda``."""
    cuda = "device" in request.fixturenames and request.getfixturevalue("device").type == "cuda"
    require_extension(cuda=cuda)


def _poisoned(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        out = factory(*args, **kwargs)
        if out.is_floating_point() or out.is_complex():
            out.fill_(float("nan"))
        return out

    return wrapper


@pytest.fixture
def poison_empty(monkeypatch):
    """Fill fresh ``torch.empty``/``empty_like``/``new_empty`` allocations with NaN.

    A kernel that returns memory it never wrote then fails loudly instead of passing on zeros.
    """
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
