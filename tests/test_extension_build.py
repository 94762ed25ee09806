"""What the compiled extension registers, and the CUDA kernels' static resource report.

No GPU is needed: kernel registration is read from the dispatcher, and registers/spills come from
compiling csrc/cuda/*.cu with nvcc. Where ``_C``, its CUDA kernels, nvcc or the sources are absent the tests
that need them skip with the reason, or fail under ``SEMANTICGEN_REQUIRE_EXTENSION=1`` /
``SEMANTICGEN_REQUIRE_PTXAS=1`` (CI; see tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_cuda_kernel_reports, require_extension

from semanticgen._extension import built_cuda_archs, cpu_capability
from semanticgen.kernel_report import cuda_report

FLOW_OPS = (
    "euler_step",
    "euler_step_out",
    "euler_step_",
    "cfg_euler_step",
    "cfg_euler_step_out",
    "cfg_euler_step_",
    "flow_noising",
    "flow_noising_out",
    "flow_matching_loss",
    "flow_matching_loss_backward",
)
DEFAULT_ARCHS = ["8.0", "9.0a"]


AVX512_FEATURES = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def cpu_has_avx512() -> bool:
    """Whether the CPU reports every AVX-512 subset the AVX-512 flow kernels are built with (Linux)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return words >= AVX512_FEATURES


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"semanticgen::{op}", key)


@pytest.mark.usefixtures("compiled_ops")
@pytest.mark.parametrize("op", FLOW_OPS)
def test_every_flow_op_has_a_cpu_kernel(op):
    assert _has_kernel(op, "CPU")


@pytest.mark.parametrize("op", FLOW_OPS)
def test_every_flow_op_has_a_cuda_kernel_when_built_with_cuda(op):
    require_extension(cuda=True)
    assert _has_kernel(op, "CUDA")


def test_default_build_targets_ampere_and_hopper():
    require_extension(cuda=True)
    requested = os.environ.get("SEMANTICGEN_CUDA_ARCHS")
    expected = [a.strip() for a in requested.split(";") if a.strip()] if requested else DEFAULT_ARCHS
    assert built_cuda_archs() == expected


@pytest.mark.parametrize("arch", ["sm_90a", "9.0a", "90a", "sm90a"])
def test_parse_cuda_arch_hopper_spellings(arch):
    assert cuda_report.parse_cuda_arch(arch) == "sm_90a"


def test_parse_cuda_arch_rejects_garbage():
    assert cuda_report.parse_cuda_arch("8.0") == "sm_80"
    with pytest.raises(ValueError, match="sm_80"):
        cuda_report.parse_cuda_arch("ampere")
    with pytest.raises(TypeError):
        cuda_report.parse_cuda_arch(90)


def test_missing_sources_and_nvcc_are_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("SEMANTICGEN_CSRC", str(tmp_path))
    monkeypatch.setattr(cuda_report, "REPO_CSRC", tmp_path / "csrc")
    with pytest.raises(cuda_report.CudaReportUnavailable, match="csrc/cuda/\\*.cu"):
        cuda_report.cuda_kernel_reports("sm_90a")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cuda_report, "STANDARD_CUDA_PREFIX", tmp_path)
    with pytest.raises(cuda_report.CudaReportUnavailable, match="nvcc not found"):
        cuda_report.find_nvcc()


def test_kernel_names_map_to_ops():
    describe = cuda_report._describe
    anon = "semanticgen::flow::(anonymous namespace)::"
    name = f"void {anon}map_kernel<c10::BFloat16, {anon}CfgEulerOp, true>({anon}Pointers<c10::BFloat16, 3, 1>, long)"
    assert describe(name) == ("cfg_euler_step", "16-byte packs", "bfloat16")
    name = f"void {anon}loss_partial_kernel<float, false>(float const*, float const*, float const*, long, double*)"
    assert describe(name) == ("flow_matching_loss", "partial sums, scalar (unaligned)", "float32")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_cuda_kernels_compile_without_spills(arch):
    rows = require_cuda_kernel_reports(arch)
    ops = {r["kernel"] for r in rows}
    assert {"euler_step", "cfg_euler_step", "flow_noising", "flow_matching_loss", "flow_matching_loss_backward"} <= ops
    for row in rows:
        assert row["arch"] == arch and row["source"] == "cuda"
        assert 0 < row["registers"] <= 255, row
        assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, row
    # Every elementwise op in every dtype, packed and unaligned.
    for op in ("euler_step", "cfg_euler_step", "flow_noising", "flow_matching_loss_backward"):
        variants = {(r["dtype"], r["config"]) for r in rows if r["kernel"] == op}
        assert len(variants) == 6, (op, variants)


@pytest.mark.usefixtures("compiled_ops")
def test_cpu_capability_follows_the_cpu():
    forced = os.environ.get("SEMANTICGEN_CPU_CAPABILITY")
    expected = forced or ("avx512" if cpu_has_avx512() else "avx2")
    assert cpu_capability() == expected


def _capability_in_subprocess(value: str) -> subprocess.CompletedProcess:
    script = "from semanticgen._extension import cpu_capability; print(cpu_capability())"
    env = {**os.environ, "SEMANTICGEN_CPU_CAPABILITY": value}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.usefixtures("compiled_ops")
def test_cpu_capability_can_be_forced_to_avx2():
    proc = _capability_in_subprocess("avx2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "avx2"


@pytest.mark.usefixtures("compiled_ops")
def test_bad_cpu_capability_is_a_clear_error():
    proc = _capability_in_subprocess("sse2")
    assert proc.returncode != 0
    assert "SEMANTICGEN_CPU_CAPABILITY must be 'avx2' or 'avx512'" in proc.stderr and "'sse2'" in proc.stderr


@pytest.mark.usefixtures("compiled_ops")
def test_forcing_avx512_without_it_is_a_clear_error():
    if cpu_has_avx512():
        pytest.skip("this CPU has AVX-512")
    proc = _capability_in_subprocess("avx512")
    assert proc.returncode != 0 and "SEMANTICGEN_CPU_CAPABILITY=avx512" in proc.stderr


# ----------------------------------------------------------------------------- CPU variants

# Runs every CPU flow op on fixed inputs (odd inner size, per-batch scalars, every dtype) in a
# fresh process and saves the outputs with the variant that produced them.
_VARIANT_SCRIPT = """
import sys
import torch
from semanticgen._extension import cpu_capability
from semanticgen.ops import flow

torch.manual_seed(0)
outputs = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    z, a, b = (torch.randn(4, 4099).to(dtype) for _ in range(3))
    dt, g, t = torch.rand(4) - 1.0, torch.rand(4) * 5.0, torch.rand(4)
    name = str(dtype)
    outputs[name + " euler_step"] = flow.euler_step(z, a, dt)
    outputs[name + " cfg_euler_step"] = flow.cfg_euler_step(z, a, b, g, -0.02)
    outputs[name + " flow_noising"] = torch.stack(flow.flow_noising(z, a, t))
    v = b.clone().requires_grad_(True)
    loss = flow.flow_matching_loss(v, z, a)
    loss.backward()
    outputs[name + " flow_matching_loss"] = loss.detach()
    outputs[name + " flow_matching_loss grad"] = v.grad
torch.save({"capability": cpu_capability(), "outputs": outputs}, sys.argv[1])
"""


def _run_variant(capability: str, path) -> dict:
    env = {**os.environ, "SEMANTICGEN_CPU_CAPABILITY": capability}
    proc = subprocess.run(
        [sys.executable, "-c", _VARIANT_SCRIPT, str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return torch.load(path)


@pytest.mark.usefixtures("compiled_ops")
def test_avx2_and_avx512_kernels_give_identical_results(tmp_path):
    if not cpu_has_avx512():
        pytest.skip("this CPU lacks AVX512F/BW/VL/DQ: only the AVX2 kernels can run")
    avx2 = _run_variant("avx2", tmp_path / "avx2.pt")
    avx512 = _run_variant("avx512", tmp_path / "avx512.pt")
    assert avx2["capability"] == "avx2" and avx512["capability"] == "avx512"
    assert avx2["outputs"].keys() == avx512["outputs"].keys()
    for name, expected in avx2["outputs"].items():
        got = avx512["outputs"][name]
        # Bitwise: both variants run the same fp32 expression per element, and the loss reduction
        # visits the elements in the same lane order whatever the vector width.
        assert torch.equal(got, expected), f"{name}: AVX-512 and AVX2 kernels differ"
