"""``semanticgen selftest``: the CPU quick run passes and reports every section; a wrong or crashing backend,
or a wrong gradient, fails it; only a declared capability may skip a check; a spent time budget makes the
verdict INCOMPLETE; timing rows cannot make a run pass; asking for a missing device is a one-line user error."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from semanticgen import selftest
from semanticgen._extension import extension_available
from semanticgen.cli import main
from semanticgen.ops import WindowLayout
from semanticgen.ops.swin_attention import Backend, interface
from semanticgen.ops.swin_attention import cpu as swin_cpu

STATUSES = set(selftest.STATUSES)
FLOW_OPS = ("euler_step", "euler_step_", "cfg_euler_step", "flow_noising", "flow_matching_loss")
GRAD_OPS = ("euler_step grad", "cfg_euler_step grad", "flow_noising grad", "flow_matching_loss grad")


@pytest.fixture(autouse=True)
def _no_time_budget(monkeypatch):
    """Sections stop starting checks past their time budget; on a loaded CI machine that would turn checks
    these tests assert on into SKIP rows, so the budgets are lifted here."""
    monkeypatch.setattr(
        selftest, "_BUDGET_S", {key: dict.fromkeys(budget, 3600) for key, budget in selftest._BUDGET_S.items()}
    )


def _rows(path) -> list[dict]:
    report = json.loads(path.read_text())
    rows = report["rows"]
    assert rows and all(r["status"] in STATUSES for r in rows)
    return rows


def test_cpu_quick_run_passes_and_writes_every_section(tmp_path, capsys):
    out = tmp_path / "selftest.json"
    code = main(["selftest", "--device", "cpu", "--quick", "--json", str(out)])
    report = json.loads(out.read_text())
    rows = _rows(out)
    by_section = {s: [r for r in rows if r["section"] == s] for s in selftest.SECTIONS}

    assert not any(r["status"] == "CUT" for r in rows) and report["cut"] == []
    if extension_available():
        assert code == 0, [r for r in rows if r["status"] == "FAIL"]
        assert report["verdict"] == "PASS" and report["exit_code"] == 0
        flow_rows = [r for r in by_section["flow"] if r["status"] == "PASS"]
        assert {(r["name"], r["dtype"]) for r in flow_rows} == {
            (op, dt) for op in FLOW_OPS + GRAD_OPS for dt in ("fp32", "bf16", "fp16")
        }
        grads = {
            tag.split(" ", 1)[1]
            for r in flow_rows
            if r["name"] == "cfg_euler_step grad"
            for tag in r["data"]["sub_checks"]
        }
        assert grads == {"d z", "d v_cond", "d v_uncond", "d guidance", "d dt"}  # every input, scalars included
    else:  # the selftest exists to catch a broken build: a missing _C is a failure, not a skip
        assert code == 1
        assert any(r["status"] == "FAIL" and r["name"] == "semanticgen._C" for r in by_section["flow"])

    attention = [r for r in by_section["attention"] if r["name"] == "cpu fwd+bwd"]
    assert {r["dtype"] for r in attention if r["status"] == "PASS"} == {"bf16", "fp16", "fp32"}
    for r in attention:
        assert r["error"] <= r["bound"]
        assert len(r["data"]["sub_checks"]) == 16  # out, dq, dk, dv x both parities x both orders
    (tf32,) = [r for r in by_section["attention"] if r["name"] == "cpu fwd+bwd, TF32"]
    assert tf32["status"] == "SKIP" and "CUDA only" in tf32["detail"]
    assert all(r["status"] == "SKIP" and r["detail"] for r in by_section["int64"] + by_section["graph"])

    timed = [r for r in by_section["timing"] if r["name"].startswith("cpu fwd")]
    assert len(timed) == 6  # 3 sizes x 2 token orders
    assert all(r["status"] == "INFO" and r["data"]["kind"] == "info" for r in timed)  # never PASS, no CPU target
    full = [r for r in by_section["timing"] if r["name"].startswith("full attention")]
    assert len(full) == 3 and all(r["status"] == "INFO" for r in full)
    for r in timed + full:
        d = r["data"]
        assert 0 < d["ms_min"] <= d["ms"] <= d["ms_max"] and d["repeats"] >= 3
        assert d["spread"] == pytest.approx(d["ms_max"] / d["ms_min"])
        assert d["noisy"] == (d["spread"] > selftest.SPREAD_BOUND)
    assert any(r["data"]["extrapolated"] for r in timed)  # full attention at the largest size is extrapolated
    assert all(r["data"]["speedup"] > 0 for r in timed)
    env = report["environment"]
    assert env["torch"] == torch.__version__ and "semanticgen" in env and "git_commit" in env

    printed = capsys.readouterr().out
    assert "selftest PASS" in printed or not extension_available()
    assert "timing" in printed and "attention" in printed and "not part of the verdict" in printed


def _wrong_parity(q, k, v, layout, shifted, scale):
    """A plausible bug: the other parity's windows."""
    out, _ = swin_cpu.swin_attention_cpu_fwd(q, k, v, [x for s in layout.segments(not shifted) for x in s], scale)
    return out


def _crashing(q, k, v, layout, shifted, scale):
    raise RuntimeError("kernel launch failed")


@pytest.mark.parametrize("fn", [_wrong_parity, _crashing], ids=["wrong-parity", "crash"])
def test_broken_backend_fails_the_run(fn, tmp_path, monkeypatch):
    good = interface._BACKENDS["cpu"]
    monkeypatch.setitem(interface._BACKENDS, "cpu", Backend("cpu", fn, good.devices, good.dtypes, good.priority))
    out = tmp_path / "broken.json"
    assert main(["selftest", "--device", "cpu", "--quick", "--only", "attention", "--json", str(out)]) == 1
    rows = [r for r in _rows(out) if r["name"] == "cpu fwd+bwd"]
    failed = [r for r in rows if r["status"] == "FAIL"]
    assert failed and all(r["detail"] for r in failed)
    if fn is _wrong_parity:
        # Where both parities have the same windows (Tw=1 has no shift; Tv<Tw is one window either way) the
        # wrong parity is the right one and only there does the check pass; elsewhere the error is far above
        # the bound.
        same = {
            name
            for name, dims in selftest.LAYOUTS.items()
            if torch.equal(WindowLayout(*dims).window_ids(False), WindowLayout(*dims).window_ids(True))
        }
        assert same == {"Tw=1", "Tv<Tw"}
        assert {r["layout"].split()[0] for r in rows if r["status"] == "PASS"} == same
        assert all(r["error"] > 10 * r["bound"] for r in failed)
    else:
        assert len(failed) == len(rows) and "kernel launch failed" in failed[0]["detail"]


def _replace_cpu_backend(monkeypatch, fn, accepts=None):
    good = interface._BACKENDS["cpu"]
    backend = Backend("cpu", fn, good.devices, good.dtypes, good.priority, accepts=accepts)
    monkeypatch.setitem(interface._BACKENDS, "cpu", backend)
    return good


def test_exception_after_the_backend_accepted_is_a_failure_not_a_skip(tmp_path, monkeypatch):
    """The audit's demonstration: a TypeError in the fp16 path used to become 11 SKIP rows and exit 0."""
    good = interface._BACKENDS["cpu"]

    def buggy(q, k, v, layout, shifted, scale):
        if q.dtype == torch.float16:
            raise TypeError("oops: a bug in the fp16 path")
        return good.fn(q, k, v, layout, shifted, scale)

    _replace_cpu_backend(monkeypatch, buggy)
    out = tmp_path / "buggy.json"
    assert main(["selftest", "--device", "cpu", "--quick", "--only", "attention", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["verdict"] == "FAIL" and report["exit_code"] == 1
    rows = [r for r in _rows(out) if r["name"] == "cpu fwd+bwd"]
    fp16 = [r for r in rows if r["dtype"] == "fp16"]
    assert fp16 and all(r["status"] == "FAIL" for r in fp16)
    assert all("TypeError: oops: a bug in the fp16 path" in r["detail"] for r in fp16)
    # every sub-check ran and says what it raised
    assert all(len(r["data"]["sub_checks"]) == 4 and "TypeError" in str(r["data"]["sub_checks"]) for r in fp16)
    assert all(r["status"] == "PASS" for r in rows if r["dtype"] != "fp16")
    assert not any(r["status"] == "SKIP" for r in rows)


def test_only_the_declared_capability_may_decline_a_check(tmp_path, monkeypatch):
    good = interface._BACKENDS["cpu"]
    _replace_cpu_backend(monkeypatch, good.fn, accepts=lambda q: "no head dim 80 here" if q.shape[-1] == 80 else None)
    out = tmp_path / "declined.json"
    assert main(["selftest", "--device", "cpu", "--quick", "--only", "attention", "--json", str(out)]) == 0
    rows = [r for r in _rows(out) if r["name"] == "cpu fwd+bwd"]
    d80 = [r for r in rows if " D80" in r["layout"]]
    assert d80 and all(r["status"] == "SKIP" and r["detail"] == "declined: no head dim 80 here" for r in d80)
    assert all(r["status"] == "PASS" for r in rows if r not in d80)


def test_a_backend_that_declines_everything_fails_coverage(tmp_path, monkeypatch):
    good = interface._BACKENDS["cpu"]
    _replace_cpu_backend(monkeypatch, good.fn, accepts=lambda q: "nothing")
    rows, _ = selftest.run_selftest("cpu", quick=True, sections=["attention"], log=lambda _: None)
    assert selftest.verdict_word(rows) == "FAIL"
    assert any(r.name == "cpu coverage" and r.status == "FAIL" for r in rows)


def test_triton_declares_its_limits_so_they_are_asked_not_raised():
    from semanticgen.ops.swin_attention import registered_backends
    from semanticgen.ops.swin_attention import triton_backend as tb

    triton = registered_backends()["triton"]
    assert triton.accepts is tb.triton_rejects
    probe = selftest._probe
    assert "head dim must be <= 128" in triton.rejects(probe((1, 40, 2, 160), torch.bfloat16, "cpu"))
    assert "batch * heads" in triton.rejects(probe((2, 40, 40_000, 64), torch.bfloat16, "cpu"))
    assert "dtypes" in triton.rejects(probe((1, 40, 2, 64), torch.float64, "cpu"))
    assert triton.rejects(probe((1, 40, 2, 128), torch.float32, "cpu")) is None


def _budget(monkeypatch, device, quick, **seconds):
    monkeypatch.setitem(selftest._BUDGET_S, (device, quick), {**selftest._BUDGET_S[(device, quick)], **seconds})


def test_spent_time_budget_makes_the_run_incomplete(monkeypatch):
    from rich.console import Console

    _budget(monkeypatch, "cpu", True, attention=0)
    rows, elapsed = selftest.run_selftest("cpu", quick=True, sections=["attention"], log=lambda _: None)
    cut = [r for r in rows if r.status == "CUT"]
    assert cut and all(r.name.startswith("cpu fwd+bwd") and "time budget (0 s)" in r.detail for r in cut)
    assert not any(r.status in ("PASS", "FAIL") for r in rows)
    assert selftest.verdict_word(rows) == "INCOMPLETE"
    assert selftest.exit_code(rows) == 3 and 3 not in (0, 1, 2)
    report = selftest.report_json(rows, elapsed, "cpu", True, "cpu")
    assert report["verdict"] == "INCOMPLETE" and report["exit_code"] == 3
    assert len(report["cut"]) == len(cut) and {c["section"] for c in report["cut"]} == {"attention"}
    console = Console(width=250, record=True)
    selftest.print_report(rows, elapsed, "cpu", console)
    text = console.export_text()
    assert "selftest INCOMPLETE:" in text and f"{len(cut)} cut" in text and "(exit 3)" in text
    assert "cut by a section time budget (not run, so not passed): attention" in text

    # A failure wins over a cut; a cut wins over a pass.
    failed = selftest.Row("flow", "x", "cpu", status="FAIL")
    assert selftest.verdict_word([*rows, failed]) == "FAIL" and selftest.exit_code([*rows, failed]) == 1
    assert selftest.exit_code([selftest.Row("flow", "x", "cpu")]) == 0


def test_cli_exits_3_when_incomplete(monkeypatch, tmp_path):
    _budget(monkeypatch, "cpu", True, attention=0)
    out = tmp_path / "cut.json"
    code = main(["selftest", "--device", "cpu", "--quick", "--only", "attention", "--json", str(out)])
    assert json.loads(out.read_text())["exit_code"] == 3
    assert code == 3


def test_timing_rows_cannot_make_a_run_pass_and_a_missed_target_says_missed():
    from rich.console import Console

    layout = selftest._plan_layout(60.0, 480, 832)
    assert layout.num_tokens == 586_080
    blocked = layout.with_order("blocked")
    assert selftest._speedup_target("varlen", blocked, "cuda") == (15.0, "speedup >= 15x")
    assert selftest._speedup_target("triton", blocked, "cuda") == (15.0, "speedup >= 15x")
    assert selftest._speedup_target("varlen", layout, "cuda") is None  # streams order: informational
    assert selftest._speedup_target("varlen", blocked, "cpu") is None
    assert (
        selftest._speedup_target("varlen", selftest._plan_layout(30.0, 480, 832).with_order("blocked"), "cuda") is None
    )

    timing = dict(ms=80.0, ms_min=70.0, ms_max=140.0, repeats=5, spread=2.0, noisy=True, tokens=586_080)
    missed = selftest.Row(
        "timing", "varlen fwd, blocked order", "cuda", "bf16", "60 s", status="MISSED",
        detail="0.6x full attention; target speedup >= 15x: missed",
        data={**timing, "full_ms": 48.0, "speedup": 0.6, "kind": "target", "target": "speedup >= 15x"},
    )  # fmt: skip
    info = selftest.Row("timing", "full attention (sdpa-flash)", "cuda", "bf16", "60 s", status="INFO",
                        data={**timing, "noisy": False, "spread": 1.1, "kind": "info"})  # fmt: skip
    failed = selftest.Row("attention", "triton fwd+bwd", "cuda", "bf16", "odd-Tw", status="FAIL", detail="dq")
    assert selftest.verdict_word([failed, missed, info]) == "FAIL"  # timing rows do not outvote a failure
    assert selftest.verdict_word([missed, info]) == "PASS"  # and a missed target is reported, not a failure
    console = Console(width=250, record=True)
    selftest.print_report([failed, missed, info], {"timing": 1.0}, "NVIDIA H200", console)
    text = console.export_text()
    (line,) = [ln for ln in text.splitlines() if "varlen fwd, blocked order" in ln]
    assert "missed" in line and "PASS" not in line and "2.00x noisy" in line and "target: speedup >= 15x" in line
    assert "selftest FAIL: 0 passed, 1 failed" in text and "targets 0 met, 1 missed, 1 noisy" in text
    report = selftest.report_json([failed, missed, info], {"timing": 1.0}, "cpu", False, "cpu")
    assert report["timing"]["targets_missed"] == [
        {"section": "timing", "name": "varlen fwd, blocked order", "dtype": "bf16", "layout": "60 s"}
    ]


def test_tf32_case_runs_backend_and_plain_torch_under_tf32_and_restores_the_flag(monkeypatch):
    # The dense reference as the backend: TF32 does nothing on CPU, so a blocked kernel here would be judged
    # against fp32 SDPA math with no TF32 rounding on either side; on CUDA TF32 dominates both errors.
    dense = interface._BACKENDS["reference"]
    seen = {"backend": [], "sdpa": []}

    def spy(q, k, v, layout, shifted, scale):
        seen["backend"].append(torch.backends.cuda.matmul.allow_tf32)
        return dense.fn(q, k, v, layout, shifted, scale)

    sdpa = selftest._sdpa

    def sdpa_spy(*args):
        seen["sdpa"].append(torch.backends.cuda.matmul.allow_tf32)
        return sdpa(*args)

    _replace_cpu_backend(monkeypatch, spy)
    monkeypatch.setattr(selftest, "_sdpa", sdpa_spy)
    assert torch.backends.cuda.matmul.allow_tf32 is False
    case = selftest.AttnCase("odd-Tw", 1, 2, 16, torch.float32, tf32=True)
    # TF32 does not touch CPU matmuls, so this runs the check's logic (flag, baselines, bound) on CPU tensors.
    row = selftest._attention_row("cpu", case, "cpu")
    assert row.status == "PASS" and row.name == "cpu fwd+bwd, TF32" and len(row.data["sub_checks"]) == 16
    assert seen["backend"] and all(seen["backend"]) and seen["sdpa"] and all(seen["sdpa"])
    assert torch.backends.cuda.matmul.allow_tf32 is False

    # The other fp32 cases pin TF32 off even if something turned it on, and the caller's value comes back.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    seen["backend"].clear()
    selftest._attention_row("cpu", selftest.AttnCase("odd-Tw", 1, 2, 16, torch.float32), "cpu")
    assert seen["backend"] and not any(seen["backend"])
    assert torch.backends.cuda.matmul.allow_tf32 is True
    with pytest.raises(RuntimeError), selftest._tf32(False):
        raise RuntimeError("a failing check")
    assert torch.backends.cuda.matmul.allow_tf32 is True

    section = selftest._Section("attention", 3600)
    skipped = selftest._attention_case_row("cpu", case, "cpu", section)
    assert skipped.status == "SKIP" and skipped.detail.startswith("CUDA only: TF32")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, backward scaled by 1.02: a plausible wrong gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.02


@pytest.mark.usefixtures("compiled_ops")
def test_a_wrong_flow_gradient_fails_the_run(monkeypatch):
    from semanticgen.ops import flow

    good = flow.flow_noising

    def wrong(z0, eps, t):
        z_t, u = good(z0, eps, t)
        return _ScaleGrad.apply(z_t), u

    monkeypatch.setattr(flow, "flow_noising", wrong)
    rows = selftest.flow_section("cpu", True, selftest._Section("flow", 3600))
    status = {(r.name, r.dtype): r.status for r in rows}
    for dtype in ("fp32", "bf16", "fp16"):
        assert status[("flow_noising grad", dtype)] == "FAIL"
        assert status[("flow_noising", dtype)] == "PASS"  # the values are right; only the gradient is wrong
    assert all(s == "PASS" for (name, _), s in status.items() if name != "flow_noising grad")
    (fp32,) = [r for r in rows if r.name == "flow_noising grad" and r.dtype == "fp32"]
    assert {"2x5x7x1001 d t", "3x37 d z0"} <= set(fp32.data["sub_checks"])  # the per-batch t gradient is checked


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_one_line_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "semanticgen.cli", "selftest", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "semanticgen selftest: error: --device cuda: no CUDA device is available on this machine"
    ]


def test_error_rule():
    ref = torch.tensor([2.0, -4.0, 1.0], dtype=torch.float64)
    assert selftest.rel_error(torch.tensor([2.0, -4.5, 1.0]), ref) == pytest.approx(0.5 / 4.0)
    assert selftest.rel_error(torch.tensor([2.0, float("nan"), 1.0]), ref) == math.inf
    assert selftest.bound_from_plain(1e-3, torch.bfloat16) == 2e-3
    # Plain torch exact: the floor is a few ulps of the output's magnitude, not 0.
    assert selftest.bound_from_plain(0.0, torch.float32) == 4 * torch.finfo(torch.float32).eps


# The CUDA-only sections cannot run here; their building blocks run on CPU tensors instead.
def _refuses_streams(q, k, v, layout, shifted, scale):
    """Declines streams order by raising instead of declaring it: a failure, never a skip."""
    if layout.order == "streams":
        raise ValueError("streams order is not supported")
    return interface._BACKENDS["reference"].fn(q, k, v, layout, shifted, scale)


@pytest.mark.parametrize(
    "broken", [None, _wrong_parity, _refuses_streams], ids=["cpu-backend", "wrong-parity", "raises"]
)
def test_int64_window_check_on_a_small_layout(broken, monkeypatch):
    if broken is not None:
        _replace_cpu_backend(monkeypatch, broken)
    layout = WindowLayout(40, 8, 10, 1, 4)  # 10 windows per parity, semantic tokens last in streams order
    row = selftest._int64_row("cpu", layout, torch.float32, "cpu fwd", "small", "cpu", 2, 16)
    if broken is _refuses_streams:
        assert row.status == "FAIL" and "ValueError: streams order is not supported" in row.detail
        assert row.error <= row.bound  # the blocked-order windows were still checked, and are right
        assert {t for t, c in row.data["sub_checks"].items() if "exception" in c} == {
            "unshifted/streams",
            "shifted/streams",
        }
        return
    # first, middle and last window, 2 parities x 2 orders, plus the window of the tensor's last rows where that
    # is not the last window (streams order, shifted: the last semantic frame's window is the 10th of 11)
    assert len(row.data["sub_checks"]) == 13
    assert any(f"..{layout.num_tokens - 1:,})" in tag for tag in row.data["sub_checks"])
    if broken is _wrong_parity:
        assert row.status == "FAIL" and row.error > 10 * row.bound
    else:
        assert row.status == "PASS" and row.error <= row.bound


@pytest.mark.usefixtures("compiled_ops")
def test_sampling_loop_is_deterministic_and_as_accurate_as_plain_torch():
    z_init, sample, sample_plain = selftest.sampling_loop("cpu", torch.bfloat16)
    z = sample(z_init.clone())
    assert torch.isfinite(z).all() and not torch.equal(z, z_init)
    assert torch.equal(sample(z_init.clone()), z)  # what the CUDA-graph replay is compared against, bitwise
    exact = sample_plain(z_init.double())
    ours, plain = selftest.rel_error(z, exact), selftest.rel_error(sample_plain(z_init.clone()), exact)
    assert 0 < ours <= selftest.bound_from_plain(plain, torch.bfloat16)


def test_missing_extension_is_a_failure_with_the_rebuild_hint(tmp_path, monkeypatch):
    from semanticgen import _extension

    monkeypatch.setattr(_extension, "_IMPORT_ERROR", ImportError("simulated: _C.abi3.so not found"))
    out = tmp_path / "no_ext.json"
    assert main(["selftest", "--device", "cpu", "--only", "flow", "--json", str(out)]) == 1
    (row,) = _rows(out)
    assert row["status"] == "FAIL" and row["name"] == "semanticgen._C"
    assert "simulated" in row["detail"] and "pip install" in row["detail"]


def test_report_renders_cuda_style_rows_and_non_finite_errors():
    from rich.console import Console

    rows = [
        selftest.Row(
            "attention",
            "triton fwd+bwd",
            "cuda",
            "bf16",
            "odd-Tw",
            error=math.inf,
            bound=1e-2,
            status="FAIL",
            detail="dq shifted/streams: inf > 0.01",
            data={"sub_checks": {"x": {"error": math.inf}}},
        ),
        selftest.Row("graph", "graph replay == eager", "cuda", "bf16", "2x4x3x17x29", error=0.0, bound=0.0),
        selftest.Row(
            "timing",
            "full attention (sdpa-flash)",
            "cuda",
            "bf16",
            "60 s",
            status="INFO",
            detail="extrapolated",
            data={"ms": 1234.5, "tokens": 586080, "extrapolated": True},
        ),
        selftest.Row(
            "timing",
            "varlen fwd, blocked order",
            "cuda",
            "bf16",
            "60 s",
            status="MISSED",
            data={
                "ms": 140.2,
                "full_ms": 1234.5,
                "speedup": 8.8,
                "tokens": 586080,
                "extrapolated": True,
                "kind": "target",
                "target": "speedup >= 15x",
            },
        ),
    ]
    console = Console(width=200, record=True)
    selftest.print_report(rows, {"attention": 1.0, "timing": 2.0}, "NVIDIA H200", console)
    text = console.export_text()
    assert "first failure: attention / triton fwd+bwd" in text
    assert "8.8x" in text and "1,234*" in text and "selftest FAIL: 1 passed, 1 failed" in text
    report = selftest.report_json(rows, {"attention": 1.0}, "cpu", True, "cpu")
    assert report["verdict"] == "FAIL"
    assert report["rows"][0]["error"] == "inf" and report["rows"][0]["data"]["sub_checks"]["x"]["error"] == "inf"
    json.dumps(report, allow_nan=False)  # strict JSON: no bare Infinity / NaN
