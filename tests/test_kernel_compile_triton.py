"""Every Triton kernel compiles ahead of time for sm_80 and sm_90a without a GPU; default configs do not spill.

``triton_kernel_reports`` lowers each kernel/config to PTX with ``triton.compile`` for the target
and reads registers, spills and shared memory from ``ptxas -v``. The ptxas parser is also checked on
fixed text, including the multi-target output of ``nvcc -Xptxas -v``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_ptxas

from semanticgen.kernel_report.ptxas import parse_ptxas_verbose
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
    """ptxas, or a skip with the reason (a failure under SEMANTICGEN_REQUIRE_PTXAS=1, as in CI)."""
    return require_ptxas()


# Synthetic PTX loops: a cp.async pipeline that keeps 2 groups in flight, one that drains them all, a
# TMA loop with prologue prefetches, and a TMA loop that issues and waits in the same iteration.
_PTX_PIPELINED = """
\tcp.async.commit_group;
$L__BB0_2:
\tcp.async.wait_group \t2;
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};
\twgmma.wait_group.sync.aligned 0;
\tcp.async.commit_group;
\t@%p16 bra \t$L__BB0_2;
$L__BB0_3:
\tcp.async.wait_group \t0;
"""
_PTX_DRAINS = _PTX_PIPELINED.replace("wait_group \t2;", "wait_group \t0;")
_PTX_TMA_PREFETCH = """
\t@%p14 cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes [%r75], [%rd27, {%r1, %r2}], [%r69];
$L__BB0_2:
{
waitLoop:
\tmbarrier.try_wait.parity.shared::cta.b64 complete, [%r132], %r3;
\t@!complete bra.uni waitLoop;
}
\t@%p43 cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes [%r300], [%rd27, {%r4, %r5}], [%r299];
\t@%p52 bra \t$L__BB0_2;
"""
_PTX_TMA_NO_PREFETCH = _PTX_TMA_PREFETCH.split("\n", 2)[2]


def test_loop_waits_all_on_fixed_ptx():
    from semanticgen.kernel_report.triton_report import loop_waits_all

    assert not loop_waits_all(_PTX_PIPELINED)  # the wait_group 0 after the loop does not count
    assert loop_waits_all(_PTX_DRAINS)
    assert not loop_waits_all(_PTX_TMA_PREFETCH)
    assert loop_waits_all(_PTX_TMA_NO_PREFETCH)
    assert not loop_waits_all("ld.global.f32 %f1, [%rd1];")  # no loop at all


def test_ctas_per_sm():
    from semanticgen.kernel_report.triton_report import ctas_per_sm

    # 8 warps x 255 regs (256 allocated): 65536 / (8 * 32 * 256) = 1 block; shared allows 2.
    assert ctas_per_sm(90, 255, 100_000, 8) == 1
    # 4 warps x 128 regs: registers allow 4, shared (64 KiB + 1 KiB reserved) allows 3 on sm_90.
    assert ctas_per_sm(90, 128, 65536, 4) == 3
    # Shared memory over the SM's capacity: nothing fits.
    assert ctas_per_sm(80, 64, 200_000, 4) == 0


def test_config_tables_fix_block_sizes_per_entry():
    """Autotune alternatives differ only in warps and stages, so results do not depend on the winner."""
    from semanticgen.kernels._triton_utils import ConfigTable, KernelConfig
    from semanticgen.kernels.swin_attention_bwd import DKDV_CONFIGS, DQ_CONFIGS
    from semanticgen.kernels.swin_attention_fwd import FWD_CONFIGS

    for table in (FWD_CONFIGS, DKDV_CONFIGS, DQ_CONFIGS):
        for _, configs in [*table.entries.values(), *table.fp32_entries.values(), *table.variant_entries.values()]:
            assert len({c.blocks for c in configs}) == 1, table.kernel
    assert FWD_CONFIGS.lookup("sm90", 64)[1][0].kwargs == {"BLOCK_N": 128}
    assert FWD_CONFIGS.lookup("sm90", 128)[1][0].kwargs == {"BLOCK_N": 128}
    bad = {("sm90", 64): (64, (KernelConfig.make(4, 2, BLOCK_N=64), KernelConfig.make(4, 2, BLOCK_N=32)))}
    with pytest.raises(ValueError, match="differ in block sizes"):
        ConfigTable(kernel="k", tile_name="BLOCK_M", entries=bad)


def test_window_bucket():
    from semanticgen.kernels._triton_utils import MAX_WINDOW_BUCKET, window_bucket

    assert window_bucket(1) == 64 and window_bucket(65) == 128 and window_bucket(4352) == 8192
    assert window_bucket(10**6) == MAX_WINDOW_BUCKET


def _assert_common(rows, arch):
    for row in rows:
        assert row["arch"] == parse_arch(arch)[1] and row["source"] == "triton"
        assert 0 < row["registers"] <= 255, row
        assert row["shared_bytes"] <= row["shared_limit_bytes"], f"{row['kernel']} {row['config']} exceeds smem"
        assert row["ctas_per_sm"] >= 1, row
        assert isinstance(row["wgmma"], bool) and isinstance(row["tma"], bool)
        assert isinstance(row["loop_waits_all"], bool)
    # Every default config spills nothing: primary builds, the pointer fallback, the atomic-dQ build.
    spilling = [
        f"{r['kernel']} {r['dtype']} D={r['head_dim']} {r['config']}"
        for r in rows
        if r["default"] and (r["spill_store_bytes"] or r["spill_load_bytes"])
    ]
    assert not spilling, f"default configs spill on {arch}: {spilling}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_all_triton_kernels_compile_and_defaults_do_not_spill(arch):
    """Every shipped config (bf16, fp16, fp32; D = 64, 128; int32 and int64 strides) compiles; defaults
    never spill; on sm_90a the bf16/fp16 defaults use wgmma, keep copies in flight across loop
    iterations (``loop_waits_all`` false) and the forward loads through TMA."""
    _ptxas_or_skip()
    from semanticgen.kernel_report.triton_report import kernel_specs, triton_kernel_reports
    from semanticgen.kernels._triton_utils import tma_available

    rows = triton_kernel_reports(arch)
    kernels = {spec.name for spec in kernel_specs()}
    expected = {
        (k, dt, d, bits) for k in kernels for dt in ("bf16", "fp16", "fp32") for d in (64, 128) for bits in (32, 64)
    }
    assert {(r["kernel"], r["dtype"], r["head_dim"], r["index_bits"]) for r in rows} == expected
    defaults = {(r["kernel"], r["dtype"], r["head_dim"], r["index_bits"]) for r in rows if r["default"]}
    assert defaults == expected
    _assert_common(rows, arch)
    if arch != "sm_90a":
        assert not any(r["wgmma"] or r["tma"] for r in rows)
        return
    dots = {spec.name for spec in kernel_specs() if spec.has_dot}
    half = [r for r in rows if r["default"] and r["dtype"] != "fp32" and r["kernel"] in dots]
    assert half
    no_wgmma = [f"{r['kernel']} {r['dtype']} D={r['head_dim']} {r['config']}" for r in half if not r["wgmma"]]
    assert not no_wgmma, f"defaults without wgmma on sm_90a: {no_wgmma}"
    waits = [f"{r['kernel']} {r['dtype']} D={r['head_dim']} {r['config']}" for r in half if r["loop_waits_all"]]
    assert not waits, f"defaults whose main loop waits on every copy on sm_90a: {waits}"
    fwd = [r for r in half if r["kernel"] == "swin_attn_fwd" and r["primary"]]
    assert fwd and all(r["tma"] is tma_available() for r in fwd)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_padded_head_dim_defaults_do_not_spill(arch):
    """D = 80 pads to 128 with masked head-dim loads; fp32 runs full-precision dots with its own small tiles."""
    _ptxas_or_skip()
    from semanticgen.kernel_report.triton_report import triton_kernel_reports

    rows = triton_kernel_reports(arch, dtypes=("fp32", "fp16"), head_dims=(80,), defaults_only=True, index_bits=(32,))
    assert {r["dtype"] for r in rows} == {"fp32", "fp16"} and all(r["default"] for r in rows)
    _assert_common(rows, arch)


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


def test_autotuner_prunes_to_the_variants_configs(monkeypatch):
    """The pointer forward and the atomic-dQ dK/dV kernel get their own configs (and autotune keys)."""
    from semanticgen.kernels import swin_attention_bwd as bwd
    from semanticgen.kernels import swin_attention_fwd as fwd

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cases = [
        (fwd.swin_attn_fwd_kernel_tuned, fwd.FWD_CONFIGS, {"TMA": False}, "pointer"),
        (bwd.swin_attn_bwd_dkdv_kernel_tuned, bwd.DKDV_CONFIGS, {"ATOMIC_DQ": True}, "atomic_dq"),
    ]
    for tuner, table, flags, variant in cases:
        assert set(flags) <= set(tuner.keys)
        expected = table.lookup("sm90", 128, variant=variant)[1]
        assert expected != table.lookup("sm90", 128)[1]  # the variant really has its own entry
        kept = tuner.early_config_prune(tuner.configs, {"Q": _CudaTensorStub()}, BLOCK_D=128, **flags)
        assert sorted(_key(c) for c in kept) == sorted(c.key() for c in expected)
