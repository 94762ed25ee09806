"""What the compiled extension registers, and the CUDA kernels' static resource report.

No GPU is needed: kernel registration is read from the dispatcher, and registers/spills come from
compiling csrc/cuda/*.cu with nvcc (skipped, with the reason, where nvcc or the sources are absent).
"""

from __future__ import annotations

import os

import pytest
import torch

from semanticgen._extension import built_cuda_archs, extension_available
from semanticgen.kernel_report import cuda_report

pytestmark = pytest.mark.skipif(not extension_available(), reason="semanticgen._C is not built")

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


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"semanticgen::{op}", key)


@pytest.mark.parametrize("op", FLOW_OPS)
def test_every_flow_op_has_a_cpu_kernel(op):
    assert _has_kernel(op, "CPU")


@pytest.mark.parametrize("op", FLOW_OPS)
def test_every_flow_op_has_a_cuda_kernel_when_built_with_cuda(op):
    if not built_cuda_archs():
        pytest.skip("semanticgen._C was built without CUDA")
    assert _has_kernel(op, "CUDA")


def test_default_build_targets_ampere_and_hopper():
    if not built_cuda_archs():
        pytest.skip("semanticgen._C was built without CUDA")
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


def _reports_or_skip(arch: str) -> list[dict]:
    try:
        return cuda_report.cuda_kernel_reports(arch)
    except cuda_report.CudaReportUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_cuda_kernels_compile_without_spills(arch):
    rows = _reports_or_skip(arch)
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
