"""The benchmark runner's noise flags, result directories and CSV columns, and the flow-op suite's
triad roof, fp32-upcast baseline and shape sweep (small sizes, torch.compile replaced by the eager function)."""

from __future__ import annotations

import csv
import json
import types

import pytest
import torch
from conftest import require_extension
from semanticgen.benchmarks import _timing
from semanticgen.benchmarks import swin_attention_cpu as attn

from semanticgen import bench


def test_spread_above_bound_is_flagged_and_within_bound_is_not():
    noisy = _timing.spread_fields(_timing.summarize([1.0, 1.1, 2.0]))
    assert noisy["ms_min"] == 1.0 and noisy["ms_max"] == 2.0 and noisy["ms"] == 1.1 and noisy["spread"] == 2.0
    assert noisy["noise"] == "spread 2.00x > 1.5x"
    quiet = _timing.spread_fields(_timing.summarize([1.0, 1.1, 1.4]), scale=0.5)
    assert quiet["noise"] is None and quiet["ms_max"] == pytest.approx(0.7)


def test_attention_growth_below_one_per_doubling_is_flagged():
    rows = []
    for n, swin_ms, full_ms in ((1024, 2.0, 1.0), (2048, 1.5, 4.0)):  # the windowed time falls: impossible
        for impl, ms in (("swin_attention", swin_ms), ("sdpa_full", full_ms)):
            rows.append({"impl": impl, "pass": "fwd", "tokens": n, "ms": ms, "noise": None})
    attn._add_growth(rows)
    by = {(r["impl"], r["tokens"]): r for r in rows}
    assert by["swin_attention", 2048]["time_vs_half_n"] == 0.75
    assert by["swin_attention", 2048]["noise"] == "time fell as N doubled (0.75x)"
    assert by["sdpa_full", 2048]["noise"] is None and by["sdpa_full", 2048]["time_vs_half_n"] == 4.0
    assert by["swin_attention", 1024]["noise"] is None


def test_last_level_cache_is_the_largest_data_level(tmp_path):
    for index, (level, kind, size) in enumerate(
        ((1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"), (3, "Unified", "32768K"))
    ):
        d = tmp_path / f"index{index}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert _timing.last_level_cache_bytes("cpu", sysfs=str(tmp_path)) == 32 * 2**20
    assert _timing.last_level_cache_bytes("cpu", sysfs=str(tmp_path / "missing")) == 32 * 2**20


def _fake_suites(monkeypatch, rows):
    fake = types.SimpleNamespace(run=lambda quick, device, progress: [dict(r) for r in rows], steps=lambda quick: 1)
    monkeypatch.setattr(bench, "_load_suite", lambda name: fake)


def test_run_without_out_dir_never_overwrites_and_warns_about_noise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [
        {"suite": "flow", "op": "x", "impl": "fused", "ms": 1.0, "ms_min": 0.9, "ms_max": 1.0, "noise": None},
        {"suite": "flow", "op": "x", "impl": "eager", "ms": 2.0, "ms_min": 1.0, "ms_max": 3.0, "noise": "spread"},
    ]
    _fake_suites(monkeypatch, rows)
    from rich.console import Console

    console = Console(record=True, width=200)
    first = bench.run(["flow"], quick=True, device="cpu", show_progress=False, console=console)
    second = bench.run(["flow"], quick=True, device="cpu", show_progress=False, console=console)
    assert first["json"].parent != second["json"].parent
    for paths in (first, second):
        assert paths["json"].resolve().parent.parent == (tmp_path / "bench-results").resolve()
        assert "-cpu-quick" in paths["json"].parent.name
    payload = json.loads(first["json"].read_text())
    assert payload["noise"]["flagged_rows"] == 1 and payload["noise"]["spread_bound"] == _timing.SPREAD_BOUND
    assert set(payload["suite_seconds"]) == {"flow"} and payload["suite_seconds"]["flow"] >= 0
    assert "rerun on a quiet machine" in console.export_text()

    explicit = bench.run(["flow"], quick=False, device="cpu", out_dir=tmp_path / "mine", show_progress=False)
    assert explicit["json"] == tmp_path / "mine" / "results.json"


def test_rows_with_a_spread_but_no_noise_field_are_judged_too(tmp_path, monkeypatch):
    _fake_suites(monkeypatch, [{"suite": "attention-gpu", "ms": 2.0, "ms_min": 1.0, "ms_max": 3.0}])
    paths = bench.run(["attention-gpu"], quick=True, device="cpu", out_dir=tmp_path, show_progress=False)
    (row,) = json.loads(paths["json"].read_text())["rows"]
    assert row["noise"] == "spread 3.00x > 1.5x"


def test_quiet_run_has_no_warning(tmp_path, monkeypatch):
    _fake_suites(monkeypatch, [{"suite": "flow", "op": "x", "impl": "fused", "ms": 1.0, "noise": None}])
    from rich.console import Console

    console = Console(record=True, width=200)
    paths = bench.run(["flow"], quick=True, device="cpu", out_dir=tmp_path, show_progress=False, console=console)
    assert "rerun" not in console.export_text()
    assert json.loads(paths["json"].read_text())["noise"]["warning"] is None


ENVIRONMENT_KEYS = (
    "timestamp", "device", "machine", "arch", "cpu", "cpu_count", "torch_threads", "platform", "python", "torch",
    "torch_cuda", "triton", "semanticgen", "git_commit", "extension", "extension_build", "extension_cuda_archs",
    "cpu_capability", "gpu", "gpu_capability", "gpu_memory_gib",
)  # fmt: skip


def test_environment_records_versions_build_and_gpu():
    from semanticgen._extension import built_cuda_archs, extension_available
    from semanticgen.environment import environment

    assert bench.environment is environment  # one record for bench and selftest
    env = environment("cpu")
    assert tuple(env) == ENVIRONMENT_KEYS  # always every key, so every machine's CSV has the same columns
    assert all(v is None or isinstance(v, (str, int, float)) for v in env.values())  # a CSV cell holds it as is
    assert env["torch"] == torch.__version__ and env["torch_cuda"] == torch.version.cuda
    if extension_available():
        assert env["extension"] == "loaded" and env["extension_build"].startswith("cuda=")
        assert env["extension_cuda_archs"] == ";".join(built_cuda_archs())
        assert env["cpu_capability"] in ("avx2", "avx512")
    else:
        assert env["extension"].startswith("MISSING: ") and env["extension_build"] is None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        assert env["gpu"] == torch.cuda.get_device_name() and env["gpu_capability"] == f"{major}.{minor}"
    else:
        assert env["gpu"] is env["gpu_capability"] is env["gpu_memory_gib"] is None


def test_csv_carries_the_json_environment(tmp_path, monkeypatch):
    _fake_suites(monkeypatch, [{"suite": "flow", "device": "cpu", "op": "x", "impl": "fused", "ms": 1.0}] * 2)
    paths = bench.run(["flow"], quick=True, device="cpu", out_dir=tmp_path, show_progress=False)
    env = json.loads(paths["json"].read_text())["environment"]
    assert tuple(env) == ENVIRONMENT_KEYS
    with open(paths["csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 2
    for row in csv_rows:
        for key, value in env.items():
            assert row[key] == ("" if value is None else str(value)), key
        assert row["op"] == "x"


@pytest.fixture
def small_flow(monkeypatch):
    """flow_ops at 2^14 elements, a 64 KiB 'cache', no inductor compiles (the suite's structure is under test)."""
    from semanticgen.benchmarks import flow_ops

    require_extension()  # a skip, or a failure in CI, when semanticgen._C is not built
    monkeypatch.setattr(flow_ops, "NUMEL", 1 << 14)
    monkeypatch.setattr(flow_ops, "SWEEP_BATCHES", (0, 1, 4, 256))
    monkeypatch.setattr(flow_ops, "last_level_cache_bytes", lambda device: 64 * 2**10)
    monkeypatch.setattr(torch, "compile", lambda fn: fn)
    torch.manual_seed(0)
    return flow_ops


def test_triad_buffers_are_at_least_four_times_the_cache():
    from semanticgen.benchmarks import flow_ops

    for llc in (1, 32 * 2**20, 50 * 10**6, 256 * 2**20):
        assert flow_ops.triad_numel(llc) * 4 >= 4 * llc


def test_flow_rows_have_triad_roof_upcast_baseline_and_shape_sweep(small_flow):
    rows = small_flow.run(quick=False, device="cpu")
    main = [r for r in rows if r["op"] != small_flow.SWEEP_OP]
    for op in small_flow.OPS:
        impls = {(r["dtype"], r["impl"]) for r in main if r["op"] == op}
        assert {("float32", "triad roof"), ("float32", "fused"), ("bfloat16", "eager fp32")} <= impls, op
        assert ("float32", "eager fp32") not in impls  # only below fp32 does the upcast differ from eager
    for r in rows:
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert "noise" in r and r["roof_fraction"] > 0
    roofs = [r for r in main if r["impl"] == "triad roof"]
    assert all(r["roof_fraction"] == 1.0 for r in roofs)
    assert all(r["numel"] * 4 >= 4 * 64 * 2**10 for r in roofs)
    sweep = {(r["shape"], r["impl"]) for r in rows if r["op"] == small_flow.SWEEP_OP}
    assert {s for s, _ in sweep} == {"(16384,)", "(1, 16384)", "(4, 4096)", "(256, 64)"}
    assert {i for _, i in sweep} == {"fused", "eager"}


def test_fp32_upcast_eager_matches_the_fused_ops_accuracy_and_bf16_eager_does_not(small_flow):
    rows = small_flow.run(quick=False, device="cpu")
    err = {r["impl"]: r["err_ulps"] for r in rows if r["op"] == "cfg_euler_step" and r["dtype"] == "bfloat16"}
    # Computed in fp32 and rounded once to bf16: half an ulp, plus fp32's own error (2^-16 of a bf16 ulp per step).
    assert err["fused"] <= 0.51 and err["eager fp32"] <= 0.51
    # As written, every intermediate rounds to bf16: where z is small the update's error is many ulps of the output.
    assert err["eager"] > 1.0
