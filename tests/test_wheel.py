"""A wheel built from this tree works without the tree: ``pip wheel`` + ``pip install`` into a fresh venv, then
``semanticgen info``, ``kernels --arch sm_90a``, ``bench --quick`` and ``selftest --device cpu --quick`` from a
directory outside any checkout, after the copy the wheel was built from is deleted.

The wheel is built from a copy of the working tree (tracked and untracked-but-not-ignored files), so the
shared ``build/`` directory of the checkout is never touched. It is built with ``SEMANTICGEN_BUILD_CUDA=0``:
compiling the CUDA flow kernels takes minutes on 2 cores, and no command here can run them without a GPU.
That does not weaken the ``kernels`` check, which compiles the shipped ``.cu`` sources itself with nvcc;
what it leaves unchecked is that a CUDA-built ``_C`` loads from the wheel.

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


def test_wheel_works_in_a_fresh_venv_without_the_source_tree(tmp_path):
    src, dist, venv, work = (tmp_path / d for d in ("src", "dist", "venv", "work"))
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
    for expected in (
        "semanticgen/_csrc/cuda/flow_ops_cuda.cu",
        "semanticgen/_csrc/include/flow_args.h",
        "semanticgen/_csrc/include/flow_math.h",
        "semanticgen/benchmarks/flow_ops.py",
        "semanticgen/kernels/swin_attention_fwd.py",
    ):
        assert expected in names, f"{expected} missing from {wheel.name}"
    assert any(n.startswith("semanticgen/_C") and n.endswith(".so") for n in names), "no compiled _C in the wheel"

    shutil.rmtree(src)  # nothing left to fall back on: no csrc/, no benchmarks/ next to the package
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], cwd=work, env=env, timeout=300)
    python, cli = venv / "bin" / "python", venv / "bin" / "semanticgen"
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=work, env=env, timeout=300)

    where = _run(
        [python, "-c", "import semanticgen, semanticgen._C, semanticgen.benchmarks as b; print(semanticgen.__file__)"],
        cwd=work,
        env=env,
        timeout=120,
    )
    assert Path(where.stdout.strip()).resolve().is_relative_to(venv.resolve()), where.stdout

    _run([cli, "info"], cwd=work, env=env, timeout=300)
    kernels = _run([cli, "kernels", "--arch", "sm_90a", "--json"], cwd=work, env=env, timeout=900)
    report = json.loads(kernels.stdout)
    sources = {row["source"] for row in report["kernels"]}
    if shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists():
        assert "cuda" in sources, report["notes"]
    assert not any("csrc" in note for note in report["notes"]), report["notes"]
    _run([cli, "bench", "--quick", "--no-progress", "--out", work / "bench"], cwd=work, env=env, timeout=900)
    assert (work / "bench" / "results.json").exists()
    _run([cli, "selftest", "--device", "cpu", "--quick"], cwd=work, env=env, timeout=600)
