"""A wheel built from this tree works without the tree: ``pip wheel`` + ``pip install`` into a fresh venv, then
``semanticgen info``, ``kernels --arch sm_90a``, ``bench --quick`` and ``selftest --device cpu --quick`` from a
directory outside any checkout, after the copy the wheel was built from is deleted.

The wheel is built from a copy of the working tree (tracked and untracked-but-not-ignored files), so the
shared ``build/`` directory of the checkout is never touched. It is built with ``SEMANTICGEN_BUILD_CUDA=0``:
compiling the CUDA flow kernels takes minutes on 2 cores, and no command here can run them without a GPU.
That does not weaken the ``kernels`` check, which compiles the shipped ``.cu`` sources itself with nvcc (without
nvcc that check skips, or fails under ``SEMANTICGEN_REQUIRE_PTXAS=1`` as CI sets it); what it leaves unchecked
is that a CUDA-built ``_C`` loads from the wheel. One wheel and venv serve the module's tests.

The venv uses ``--system-site-packages`` so torch is not reinstalled; the test checks that ``semanticgen``
is imported from the venv, not from the editable install underneath it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REQUIRE_PTXAS, skip_or_fail

from semanticgen.kernel_report import cuda_report

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list, *, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# Build outputs and caches left out when the tree is copied without git.
_NOT_SOURCE = shutil.ignore_patterns(
    ".*", "build", "dist", "*.so", "*.egg-info", "__pycache__", "bench-results", "runs"
)


def _copy_tree(dest: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files (no build outputs, no .git)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        shutil.copytree(REPO, dest, ignore=_NOT_SOURCE, dirs_exist_ok=True)
        return
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (name.decode() for name in listed)):
        src = REPO / rel
        if src.is_file():  # ls-files --cached still lists files deleted in the working tree
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> dict:
    """A wheel built from a copy of this tree and installed into a fresh venv; the copy is deleted after.

    ``{"wheel", "names", "python", "cli", "work", "env"}``; ``names`` lists the wheel's files.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, venv, work = (tmp / d for d in ("src", "dist", "venv", "work"))
    for d in (src, work):
        d.mkdir()
    _copy_tree(src)
    env = {k: v for k, v in os.environ.items() if k not in ("SEMANTICGEN_CSRC", "PYTHONPATH")}
    env["SEMANTICGEN_BUILD_CUDA"] = "0"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", dist, "."],
        cwd=src,
        env=env,
        timeout=1200,
    )
    (wheel,) = dist.glob("semanticgen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shutil.rmtree(src)  # nothing left to fall back on: no csrc/, no benchmarks/ next to the package
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], cwd=work, env=env, timeout=300)
    python, cli = venv / "bin" / "python", venv / "bin" / "semanticgen"
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=work, env=env, timeout=300)
    return {"wheel": wheel, "names": names, "python": python, "cli": cli, "venv": venv, "work": work, "env": env}


def test_wheel_ships_sources_and_imports_from_the_venv(installed_wheel):
    w = installed_wheel
    for expected in (
        "semanticgen/_csrc/cuda/flow_ops_cuda.cu",
        "semanticgen/_csrc/include/flow_args.h",
        "semanticgen/_csrc/include/flow_math.h",
        "semanticgen/benchmarks/flow_ops.py",
        "semanticgen/kernels/swin_attention_fwd.py",
    ):
        assert expected in w["names"], f"{expected} missing from {w['wheel'].name}"
    assert any(n.startswith("semanticgen/_C") and n.endswith(".so") for n in w["names"]), "no compiled _C in the wheel"
    where = _run(
        [
            w["python"],
            "-c",
            "import semanticgen, semanticgen._C, semanticgen.benchmarks as b; print(semanticgen.__file__)",
        ],
        cwd=w["work"],
        env=w["env"],
        timeout=120,
    )
    assert Path(where.stdout.strip()).resolve().is_relative_to(w["venv"].resolve()), where.stdout
    _run([w["cli"], "info"], cwd=w["work"], env=w["env"], timeout=300)


def test_wheel_kernel_report_compiles_the_shipped_cuda_sources(installed_wheel):
    """``semanticgen kernels`` from the wheel reports the CUDA kernels, compiled from the ``.cu`` files it ships.

    Without nvcc that part cannot run: a skip, or under ``SEMANTICGEN_REQUIRE_PTXAS=1`` (CI) a failure, as for
    every other test that needs the CUDA toolkit (``conftest.skip_or_fail``).
    """
    w = installed_wheel
    kernels = _run([w["cli"], "kernels", "--arch", "sm_90a", "--json"], cwd=w["work"], env=w["env"], timeout=900)
    report = json.loads(kernels.stdout)
    assert not any("csrc" in note for note in report["notes"]), report["notes"]
    sources = {row["source"] for row in report["kernels"]}
    if "cuda" in sources:
        return
    try:  # where the command looks for nvcc (its environment has this process's CUDA_HOME and PATH)
        nvcc = cuda_report.find_nvcc()
    except cuda_report.CudaReportUnavailable as exc:
        skip_or_fail(f"no CUDA kernel report from the wheel: {exc}", REQUIRE_PTXAS)
    pytest.fail(f"nvcc is at {nvcc}, but the wheel's kernel report has no CUDA kernels: {report['notes']}")


def test_wheel_runs_bench_and_selftest_outside_the_tree(installed_wheel):
    w = installed_wheel
    bench = w["work"] / "bench"
    _run([w["cli"], "bench", "--quick", "--no-progress", "--out", bench], cwd=w["work"], env=w["env"], timeout=900)
    assert (bench / "results.json").exists()
    _run([w["cli"], "selftest", "--device", "cpu", "--quick"], cwd=w["work"], env=w["env"], timeout=600)
