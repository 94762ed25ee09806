"""Build script for the compiled part of semanticgen, ``semanticgen._C``.

What gets built is decided from the toolchain, never from a visible GPU:

* the C++ CPU sources (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) always;
* the CUDA sources (``csrc/cuda/*.cu``) when torch is a CUDA build
  (``torch.version.cuda`` is set) and ``nvcc`` is found in the toolkit.

Environment flags (also tabled in the README):

=========================  ===========================================================
``CUDA_HOME``              CUDA toolkit prefix. Unset: ``/usr/local/cuda`` when it
                           holds ``bin/nvcc`` (torch's own guess from the ``nvcc`` on
                           PATH can land on a wrapper script outside the toolkit, and
                           the link then fails with ``cannot find -lcudart``).
``SEMANTICGEN_BUILD_CUDA``  ``1`` forces the CUDA sources (error if impossible),
                           ``0`` skips them; unset: automatic.
``SEMANTICGEN_CUDA_ARCHS``  ``;``-separated compute capabilities, default ``8.0;9.0a``.
``MAX_JOBS``               parallel compile jobs (read by torch's ninja builder).
=========================  ===========================================================

On Linux the CPU flow kernels are compiled twice: ``csrc/cpu/*_avx512.cpp`` files get the AVX-512
flags below on top of the common ones (every other C++ file is built for AVX2), and the extension
picks the variant at run time from what the CPU supports.

No downloads, no ``git`` calls, no ``nvidia-smi``.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
STANDARD_CUDA_PREFIX = "/usr/local/cuda"
DEFAULT_CUDA_ARCHS = "8.0;9.0a"
# Sources compiled with AVX512_FLAGS added; the extension calls into them only on AVX-512 CPUs.
AVX512_SUFFIX = "_avx512.cpp"
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]


def _resolve_cuda_home() -> str | None:
    """The toolkit prefix to build with; set in the environment before torch reads it."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit
    if os.path.exists(os.path.join(STANDARD_CUDA_PREFIX, "bin", "nvcc")):
        return STANDARD_CUDA_PREFIX
    return None


_cuda_home = _resolve_cuda_home()
if _cuda_home is not None:
    # torch.utils.cpp_extension computes CUDA_HOME at import time: set it first.
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _parse_archs(spec: str) -> list[str]:
    archs = [a.strip() for a in spec.split(";") if a.strip()]
    for arch in archs:
        base = arch[:-1] if arch.endswith("a") else arch
        major, _, minor = base.partition(".")
        if not (major.isdigit() and minor.isdigit()):
            raise ValueError(
                f"SEMANTICGEN_CUDA_ARCHS: expected entries like '8.0' or '9.0a' separated by ';', got {arch!r}"
            )
    if not archs:
        raise ValueError("SEMANTICGEN_CUDA_ARCHS is empty; expected e.g. '8.0;9.0a'")
    return archs


def _gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        suffix = "a" if arch.endswith("a") else ""
        num = arch.rstrip("a").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num}{suffix},code=sm_{num}{suffix}")
    return flags


def _want_cuda() -> bool:
    flag = os.environ.get("SEMANTICGEN_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"SEMANTICGEN_BUILD_CUDA must be 0 or 1, got {flag!r}")
    have_nvcc = _cuda_home is not None and os.path.exists(os.path.join(_cuda_home, "bin", "nvcc"))
    possible = torch.version.cuda is not None and have_nvcc
    if flag == "1" and not possible:
        raise RuntimeError(
            "SEMANTICGEN_BUILD_CUDA=1 but the CUDA sources cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc under CUDA_HOME={_cuda_home!r}: "
            f"{'found' if have_nvcc else 'not found'}"
        )
    if flag == "0":
        return False
    return possible


def _extensions():
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if sys.platform != "linux":
        cpp_sources = [s for s in cpp_sources if not s.endswith(AVX512_SUFFIX)]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-DPy_LIMITED_API=0x030b0000"]
    if sys.platform == "linux":
        cxx_flags.append("-march=native" if os.environ.get("SEMANTICGEN_NATIVE") == "1" else "-mavx2")
        # FMA and F16C come with every AVX2 CPU; F16C is what ATen's Vectorized<Half> converts with.
        cxx_flags += ["-mfma", "-mf16c", "-DSEMANTICGEN_WITH_AVX512_KERNELS"]
    build_cuda = _want_cuda() and bool(cuda_sources)
    if build_cuda:
        archs = _parse_archs(os.environ.get("SEMANTICGEN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
        arch_macro = ";".join(archs)
        cxx_flags += ["-DSEMANTICGEN_WITH_CUDA", f'-DSEMANTICGEN_CUDA_ARCHS="{arch_macro}"']
        nvcc_flags = [
            "-O3",
            "-std=c++20",
            "--use_fast_math",
            "-lineinfo",
            "-DSEMANTICGEN_WITH_CUDA",
            f'-DSEMANTICGEN_CUDA_ARCHS="{arch_macro}"',
            *_gencode_flags(archs),
        ]
        # Our own -gencode flags make torch skip its TORCH_CUDA_ARCH_LIST guess (which probes for a GPU).
        return [
            cpp_extension.CUDAExtension(
                "semanticgen._C",
                cpp_sources + cuda_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=["-fopenmp"],
                py_limited_api=True,
            )
        ]
    return [
        cpp_extension.CppExtension(
            "semanticgen._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]


class BuildExtensionPerIsa(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus AVX512_FLAGS for the ``*_avx512.cpp`` sources.

    setuptools gives one flag list per language to every source of an extension, so the AVX-512
    sources are compiled by a second call of the (ninja or plain) compiler with the extra flags.
    Their objects go last on the link line: where an inline function from a shared header is
    emitted by several objects, the linker keeps the first copy, which then is an AVX2 one.
    """

    def build_extension(self, ext):
        compile_all = self.compiler.compile

        def compile_per_isa(sources, *args, extra_postargs=None, **kwargs):
            wide = [s for s in sources if s.endswith(AVX512_SUFFIX)]
            rest = [s for s in sources if not s.endswith(AVX512_SUFFIX)]
            objects = compile_all(rest, *args, extra_postargs=extra_postargs, **kwargs) if rest else []
            if wide:
                if isinstance(extra_postargs, dict):
                    wide_args = {**extra_postargs, "cxx": [*extra_postargs.get("cxx", []), *AVX512_FLAGS]}
                else:
                    wide_args = [*(extra_postargs or []), *AVX512_FLAGS]
                objects += compile_all(wide, *args, extra_postargs=wide_args, **kwargs)
            return objects

        self.compiler.compile = compile_per_isa
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_all


# What `semanticgen kernels` compiles to report the CUDA kernels' registers, spills and shared memory
# (semanticgen/kernel_report/cuda_report.py): copied into the package as semanticgen/_csrc/ so that a wheel
# install reports them without a source checkout. Paths are relative to csrc/.
CUDA_REPORT_SOURCES = ("cuda/*.cu", "include/*.h")


class BuildPyWithCudaSources(build_py):
    """setuptools' build_py, plus csrc's CUDA sources and headers as ``semanticgen/_csrc`` package data.

    They live outside the package directory (the extension is built from csrc/), so package_data cannot
    name them. Editable installs skip the copy: the report reads ``<repo>/csrc`` there, which stays current.
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        csrc = os.path.join(HERE, "csrc")
        for pattern in CUDA_REPORT_SOURCES:
            for src in sorted(glob.glob(os.path.join(csrc, pattern))):
                dst = os.path.join(self.build_lib, "semanticgen", "_csrc", os.path.relpath(src, csrc))
                self.mkpath(os.path.dirname(dst))
                self.copy_file(src, dst)


# `benchmarks/` sits at the top of the repository and installs as `semanticgen.benchmarks`, so
# `semanticgen bench` works from a wheel. (The Triton sources live in `semanticgen/kernels/`: a top-level
# `kernels/` directory shadowed Hugging Face's `kernels` package, which `transformers` imports, whenever the
# repository root was on sys.path, e.g. under `python -m pytest`.)
_TOP_LEVEL_SUBPACKAGES = {"semanticgen.benchmarks": "benchmarks"}

setup(
    packages=find_packages(include=["semanticgen", "semanticgen.*"]) + sorted(_TOP_LEVEL_SUBPACKAGES),
    package_dir={"semanticgen": "semanticgen", **_TOP_LEVEL_SUBPACKAGES},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtensionPerIsa, "build_py": BuildPyWithCudaSources},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
