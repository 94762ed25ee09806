"""Every Triton kernel compiles ahead of time for sm_80 and sm_90a without a GPU; default configs do not spill.

``triton_kernel_reports`` lowers each kernel/config to PTX with ``triton.compile`` for the target
and reads registers, spills and shared memory from ``ptxas -v``. The ptxas parser is also checked on
fixed text, including the multi-target output of ``nvcc -Xptxas -v``.
"""

from __future__ import annotations

import pytest
import torch

from semanticgen.kernel_report.ptxas import PtxasError, find_ptxas, parse_ptxas_verbose
from semanticgen.kernel_report.triton_report import parse_arch

PTXAS_SAMPLE = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'swin_attn_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for swin_attn_fwd_kernel
    8 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 331.490 ms
ptxas info    : Compiling entry function '_Z6euler_kernelPfS_f' for 'sm_90a'
ptxas info    : Function properties for _Z6euler_kernelPfS_f
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 16 registers, 380 bytes cmem[0]
"""


def test_parse_ptxas_verbose_reads_registers_spills_and_smem():
    report = parse_ptxas_verbose(PTXAS_SAMPLE)
    assert set(report) == {"swin_attn_fwd_kernel", "_Z6euler_kernelPfS_f"}
    fwd = report["swin_attn_fwd_kernel"]
    assert fwd["arch"] == "sm_90a"
    assert (fwd["registers"], fwd["spill_store_bytes"], fwd["spill_load_bytes"]) == (255, 24, 20)
    assert (fwd["stack_frame_bytes"], fwd["shared_bytes"], fwd["constant_bytes"], fwd["barriers"]) == (8, 1024, 400, 1)
    euler = report["_Z6euler_kernelPfS_f"]
    assert (euler["registers"], euler["spill_store_bytes"], euler["shared_bytes"], euler["barriers"]) == (16, 0, 0, 0)


def test_parse_ptxas_verbose_multi_target_needs_arch():
    two_targets = PTXAS_SAMPLE + PTXAS_SAMPLE.replace("sm_90a", "sm_80").replace("Used 255", "Used 128")
    with pytest.raises(ValueError, match="pass arch="):
        parse_ptxas_verbose(two_targets)
    assert parse_ptxas_verbose(two_targets, arch="sm_80")["swin_attn_fwd_kernel"]["registers"] == 128
    assert parse_ptxas_verbose(two_targets, arch="sm_90a")["swin_attn_fwd_kernel"]["registers"] == 255


@pytest.mark.parametrize(
    ("arch", "expected"),
    [("sm_90a", (90, "sm_90a")), ("sm_90", (90, "sm_90a")), ("sm80", (80, "sm_80")), ("86", (86, "sm_86"))],
)
def test_parse_arch(arch, expected):
    assert parse_arch(arch) == expected


@pytest.mark.parametrize("bad", ["sm_70", "hopper", "sm_9x", ""])
def test_parse_arch_rejects(bad):
    with pytest.raises(ValueError):
        parse_arch(bad)


def _ptxas_or_skip():
    try:
        return find_ptxas()
    except PtxasError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_all_triton_kernels_compile_and_defaults_do_not_spill(arch):
    _ptxas_or_skip()
    from semanticgen.kernel_report.triton_report import kernel_specs, triton_kernel_reports

    rows = triton_kernel_reports(arch)
    kernels = {spec.name for spec in kernel_specs()}
    assert {(r["kernel"], r["head_dim"]) for r in rows} == {(k, d) for k in kernels for d in (64, 128)}
    for row in rows:
        assert row["arch"] == parse_arch(arch)[1] and row["source"] == "triton" and row["dtype"] == "bf16"
        assert 0 < row["registers"] <= 255, row
        assert row["shared_bytes"] <= row["shared_limit_bytes"], f"{row['kernel']} {row['config']} exceeds smem"
    defaults = [r for r in rows if r["default"]]
    assert {(r["kernel"], r["head_dim"]) for r in defaults} == {(k, d) for k in kernels for d in (64, 128)}
    spilling = [f"{r['kernel']} D={r['head_dim']} {r['config']}" for r in defaults if r["spill_store_bytes"]]
    assert not spilling, f"default configs spill on {arch}: {spilling}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_fp32_and_fp16_defaults_do_not_spill(arch):
    """fp32 runs full-precision dots on FMA units with its own small tiles; fp16 shares bf16's configs."""
    _ptxas_or_skip()
    from semanticgen.kernel_report.triton_report import triton_kernel_reports

    rows = triton_kernel_reports(arch, dtypes=("fp32", "fp16"), head_dims=(80, 128), defaults_only=True)
    assert {r["dtype"] for r in rows} == {"fp32", "fp16"} and all(r["default"] for r in rows)
    spilling = [f"{r['kernel']} {r['dtype']} D={r['head_dim']}" for r in rows if r["spill_store_bytes"]]
    assert not spilling, f"default configs spill on {arch}: {spilling}"
    assert all(r["shared_bytes"] <= r["shared_limit_bytes"] for r in rows)


class _CudaTensorStub:
    """What the pruner reads from ``Q``: a CUDA device and a 2-byte element (bf16)."""

    device = torch.device("cuda")

    def element_size(self) -> int:
        return 2


def _key(config) -> tuple:
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


@pytest.mark.parametrize(("capability", "arch"), [((8, 0), "sm80"), ((9, 0), "sm90")])
def test_autotuner_prunes_to_the_devices_configs(monkeypatch, capability, arch):
    """The autotuner holds every arch's configs; a launch keeps only its device's list (default first)."""
    from semanticgen.kernels import swin_attention_fwd as fwd

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    tuner = fwd.swin_attn_fwd_kernel_tuned
    expected = fwd.FWD_CONFIGS.lookup(arch, 128)[1]
    kept = tuner.early_config_prune(tuner.configs, {"Q": _CudaTensorStub()}, BLOCK_D=128)
    assert sorted(_key(c) for c in kept) == sorted(c.key() for c in expected)
    monkeypatch.setenv("SEMANTICGEN_TRITON_AUTOTUNE", "0")
    (only,) = tuner.early_config_prune(tuner.configs, {"Q": _CudaTensorStub()}, BLOCK_D=128)
    assert _key(only) == expected[0].key()
