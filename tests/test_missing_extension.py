"""Importing semanticgen works without the compiled extension; compiled ops then fail with one actionable error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Runs in a fresh interpreter where `semanticgen._C` cannot be imported (as on a broken install).
_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "semanticgen._C":
                raise ImportError("simulated: semanticgen._C was not built")
            return None

    sys.meta_path.insert(0, BlockExtension())
    import torch
    import semanticgen
    from semanticgen.ops import WindowLayout, euler_step, swin_attention
    from semanticgen._extension import extension_available, extension_error

    assert not extension_available()
    assert "not built" in extension_error()
    layout = WindowLayout(vae_frames=2, vae_tokens_per_frame=2, sem_frames=1, sem_tokens_per_frame=1, window=1)
    q = torch.randn(1, layout.num_tokens, 1, 8)
    swin_attention(q, q, q, layout)  # pure-torch backends keep working
    try:
        euler_step(torch.zeros(4), torch.ones(4), -0.5)
    except RuntimeError as exc:
        print("ERROR:", exc)
    else:
        raise SystemExit("euler_step ran without the extension")
    """
)


def test_import_without_extension_and_actionable_error():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout
    assert "ERROR:" in message
    assert "semanticgen._C" in message and "pip install --no-build-isolation -e" in message


def test_info_reports_missing_extension():
    script = _SCRIPT.split("import torch")[0] + "from semanticgen.cli import main\nmain(['info', '--json'])\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert '"extension semanticgen._C": "MISSING: ImportError: simulated' in proc.stdout


# ----------------------------------------------------------------------------- skip, or fail in CI

# A pytest plugin for the child run below: blocks semanticgen._C before any test module imports it.
_BLOCK_PLUGIN = _SCRIPT.split("import torch")[0]


def _pytest_without_extension(tmp_path, require: str) -> subprocess.CompletedProcess:
    (tmp_path / "block_extension.py").write_text(_BLOCK_PLUGIN)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "SEMANTICGEN_REQUIRE_EXTENSION": require,
    }
    tests = Path(__file__).parent
    selection = [
        f"{tests / 'test_flow_ops.py'}::test_empty_tensors[cpu]",
        f"{tests / 'test_extension_build.py'}::test_every_flow_op_has_a_cpu_kernel",
    ]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "block_extension", "-p", "no:cacheprovider", *selection]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tests.parent)


def test_missing_extension_skips_with_the_reason(tmp_path):
    proc = _pytest_without_extension(tmp_path, "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" not in proc.stdout and "skipped" in proc.stdout
    assert "semanticgen._C is not built (ImportError: simulated" in proc.stdout


def test_missing_extension_fails_when_required(tmp_path):
    proc = _pytest_without_extension(tmp_path, "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert " passed" not in proc.stdout and "skipped" not in proc.stdout
    assert "SEMANTICGEN_REQUIRE_EXTENSION=1: this is a failure, not a skip" in proc.stdout


@pytest.mark.parametrize(
    "flag", ["SEMANTICGEN_REQUIRE_EXTENSION", "SEMANTICGEN_REQUIRE_PTXAS", "SEMANTICGEN_REQUIRE_DEV_EXTRAS"]
)
def test_require_flags(monkeypatch, flag):
    """Unset or 0: a skip with the reason; 1: a failure with it; anything else: a usage error."""
    from conftest import skip_or_fail

    for value, outcome in ((None, pytest.skip.Exception), ("0", pytest.skip.Exception), ("1", pytest.fail.Exception)):
        if value is None:
            monkeypatch.delenv(flag, raising=False)
        else:
            monkeypatch.setenv(flag, value)
        with pytest.raises(outcome, match="ptxas not found"):
            skip_or_fail("ptxas not found", flag)
    monkeypatch.setenv(flag, "yes")
    with pytest.raises(pytest.UsageError, match=f"{flag} must be 0 or 1"):
        skip_or_fail("ptxas not found", flag)


def test_a_dev_extra_that_does_not_import_skips_or_fails(monkeypatch):
    """diffusers and torchvision (the dev extra): a missing or broken one skips, or fails in CI."""
    import sys

    from conftest import require_dev_extra

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError, as when it is broken
    monkeypatch.delenv("SEMANTICGEN_REQUIRE_DEV_EXTRAS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="diffusers does not import"):
        require_dev_extra("diffusers")
    monkeypatch.setenv("SEMANTICGEN_REQUIRE_DEV_EXTRAS", "1")
    with pytest.raises(pytest.fail.Exception, match="SEMANTICGEN_REQUIRE_DEV_EXTRAS=1: this is a failure"):
        require_dev_extra("diffusers")
    assert require_dev_extra("json").dumps(1) == "1"  # one that imports is returned


def test_missing_ptxas_fails_when_required(monkeypatch):
    """The helpers the Triton and CUDA resource-report tests call, with no toolkit to be found."""
    from conftest import require_cuda_kernel_reports, require_ptxas

    from semanticgen.kernel_report import cuda_report, ptxas

    def no_ptxas():
        raise ptxas.PtxasError("ptxas not found (simulated)")

    def no_nvcc(arch):
        raise cuda_report.CudaReportUnavailable("nvcc not found (simulated)")

    monkeypatch.setattr(ptxas, "find_ptxas", no_ptxas)
    monkeypatch.setattr(cuda_report, "cuda_kernel_reports", no_nvcc)
    monkeypatch.setenv("SEMANTICGEN_REQUIRE_PTXAS", "1")
    with pytest.raises(pytest.fail.Exception, match=r"ptxas not found \(simulated\)"):
        require_ptxas()
    with pytest.raises(pytest.fail.Exception, match=r"nvcc not found \(simulated\)"):
        require_cuda_kernel_reports("sm_90a")
    monkeypatch.setenv("SEMANTICGEN_REQUIRE_PTXAS", "0")
    with pytest.raises(pytest.skip.Exception, match=r"ptxas not found \(simulated\)"):
        require_ptxas()
