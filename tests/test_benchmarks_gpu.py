"""The GPU attention benchmark's pure-Python parts (geometry, FLOPs, rows, targets) and its no-GPU path."""

from __future__ import annotations

import json

import pytest
import torch
from semanticgen.benchmarks import swin_attention_gpu as gpu

from semanticgen import bench
from semanticgen import timing as _timing
from semanticgen.ops import WindowLayout
from semanticgen.planning import plan


def _case(name="60s"):
    return {c.name: c for c in gpu.cases()}[name]


def test_cases_follow_the_plan():
    by_name = {c.name: c for c in gpu.cases()}
    assert list(by_name) == ["10s", "60s", "20s"]  # dense's size first: its rate is every ratio's denominator
    for case in by_name.values():
        p = plan(case.seconds, 480, 832)
        layout = case.layout
        assert layout.order == "blocked"
        assert layout.num_tokens == p.stage2_tokens
        assert (layout.vae_tokens_per_frame, layout.sem_tokens_per_frame, layout.window) == (1560, 510, 20)
        assert layout.num_windows(False) == p.windows and layout.num_windows(True) == p.windows_shifted
    big = by_name["60s"]
    assert (big.tokens, big.layout.num_windows(False), big.layout.num_windows(True)) == (586_080, 18, 19)
    assert big.tokens == gpu.PLAN_60S_TOKENS
    assert set(big.impls) == set(gpu.ALL_IMPLS)
    assert (by_name["10s"].tokens, by_name["20s"].tokens) == (97_680, 195_360)
    assert [c.name for c in gpu.cases() if c.dense] == ["10s"]
    assert by_name["10s"].heads == by_name["20s"].heads == 12


def test_quick_case_and_steps():
    (quick,) = gpu.cases(quick=True)
    assert quick.dense and set(quick.impls) == set(gpu.ALL_IMPLS)
    assert quick.tokens == plan(5, 480, 832).stage2_tokens
    assert gpu.steps(quick=True) == 1 + len(gpu.ALL_IMPLS) + 1
    assert gpu.steps() == 1 + (2 + 1) + 5 + 2


def test_flop_counts():
    layout = WindowLayout(vae_frames=7, vae_tokens_per_frame=5, sem_frames=3, sem_tokens_per_frame=4, window=3)
    lengths = {s: layout.window_lengths(s) for s in (False, True)}
    per_parity = [4 * 3 * 128 * sum(n * n for n in lengths[s]) for s in (False, True)]
    assert gpu.useful_flops(layout, 3, "fwd") == pytest.approx(sum(per_parity) / 2)
    assert gpu.useful_flops(layout, 3, "bwd") == pytest.approx(2.5 * sum(per_parity) / 2)
    assert gpu.useful_flops(layout, 3, "fwd+bwd") == pytest.approx(3.5 * sum(per_parity) / 2)
    assert gpu.full_flops(layout, 3, "fwd") == 4 * 3 * 128 * layout.num_tokens**2
    # The plan's 60 s video: full attention is ~18x the windowed FLOPs, so 15x needs ~82% of the dense rate.
    big = _case("60s").layout
    ratio = gpu.full_flops(big, 4, "fwd") / gpu.useful_flops(big, 4, "fwd")
    assert 17.5 < ratio < 19.0


def _timing_dict(ms, lo=None, hi=None):
    return {"ms": ms, "ms_min": lo if lo is not None else ms, "ms_max": hi if hi is not None else ms, "repeats": 3}


def test_rows_rates_ratios_and_speedups():
    small = _case("10s")
    # Dense at 10s: pick times so its rates are round numbers.
    dense_fwd_ms = gpu.full_flops(small.layout, small.heads, "fwd") / 500e12 * 1e3  # 500 TFLOP/s
    dense_fb_ms = gpu.full_flops(small.layout, small.heads, "fwd+bwd") / 350e12 * 1e3
    dense_t = {"fwd": _timing_dict(dense_fwd_ms), "fwd+bwd": _timing_dict(dense_fb_ms)}
    dense = gpu.dense_rate(small, dense_t)
    assert dense.tflops["fwd"] == pytest.approx(500)
    assert dense.tflops["fwd+bwd"] == pytest.approx(350)
    # bwd alone: 2.5 x fwd FLOPs in (fwd+bwd - fwd) ms
    full = gpu.full_flops(small.layout, small.heads, "fwd")
    assert dense.tflops["bwd"] == pytest.approx(2.5 * full / ((dense_fb_ms - dense_fwd_ms) * 1e-3) / 1e12)
    assert "N=97,680" in dense.describe()

    # A windowed implementation at 450 TFLOP/s forward, measured at the dense size: measured speedup.
    win_fwd_ms = gpu.useful_flops(small.layout, small.heads, "fwd") / 450e12 * 1e3
    rows = gpu.build_rows(
        small,
        "varlen",
        "blocked",
        {"fwd": _timing_dict(win_fwd_ms, 0.9 * win_fwd_ms, 1.2 * win_fwd_ms), "fwd+bwd": _timing_dict(3 * win_fwd_ms)},
        dense,
        dense_here=dense_t,
        base={"device": "fake"},
    )
    by_pass = {r["pass"]: r for r in rows}
    assert set(by_pass) == {"fwd", "fwd+bwd", "bwd"}
    fwd = by_pass["fwd"]
    assert fwd["device"] == "fake" and fwd["suite"] == "attention-gpu" and fwd["tokens"] == 97_680
    assert fwd["tflops"] == pytest.approx(450)
    assert fwd["flop_rate_vs_dense"] == pytest.approx(0.9) and fwd["dense_tflops"] == pytest.approx(500)
    assert fwd["speedup_vs_full"] == pytest.approx(dense_fwd_ms / win_fwd_ms) and not fwd["speedup_extrapolated"]
    assert (fwd["ms_min"], fwd["ms_max"]) == pytest.approx((0.9 * win_fwd_ms, 1.2 * win_fwd_ms))
    bwd = by_pass["bwd"]
    assert bwd["derived"] and bwd["ms"] == pytest.approx(2 * win_fwd_ms) and bwd["ms_min"] is None

    # At 60 s there is no dense measurement: the speedup is extrapolated from the dense rate.
    big = _case("60s")
    big_ms = gpu.useful_flops(big.layout, big.heads, "fwd") / 450e12 * 1e3
    (row,) = [
        r for r in gpu.build_rows(big, "triton", "blocked", {"fwd": _timing_dict(big_ms)}, dense) if r["pass"] == "fwd"
    ]
    assert row["speedup_extrapolated"]
    expected = gpu.full_flops(big.layout, big.heads, "fwd") / 500e12 / (big_ms * 1e-3)
    assert row["speedup_vs_full"] == pytest.approx(expected)


def test_rows_without_dense_have_no_ratios():
    rows = gpu.build_rows(_case("20s"), "varlen", "blocked", {"fwd": _timing_dict(10.0)}, None)
    assert rows[0]["flop_rate_vs_dense"] is None and rows[0]["speedup_vs_full"] is None


def _row(impl, pass_name, rate, speedup=None, order="blocked", tokens=586_080, case="60s"):
    return {
        "impl": impl,
        "order": order,
        "pass": pass_name,
        "tokens": tokens,
        "case": case,
        "flop_rate_vs_dense": rate,
        "speedup_vs_full": speedup,
        "speedup_extrapolated": True,
    }


def test_targets_met_missed_and_not_measured():
    rows = [
        _row("varlen", "fwd", 0.95, 16.0),
        _row("varlen", "bwd", 0.85, None),
        _row("varlen", "fwd+bwd", 0.9, 14.0),
        _row("triton", "fwd", 0.50, 10.0, order="streams"),  # streams rows carry no targets
        _row("varlen", "fwd", 0.99, 99.0, tokens=97_680, case="10s"),  # per-FLOP target at any size, speedup at 60 s
    ]
    lines = gpu.apply_targets(rows)
    assert rows[0]["target_met"] is True and "speedup_vs_full >= 15" in rows[0]["target"]
    assert rows[1]["target_met"] is False
    assert rows[2]["target_met"] is False  # 14x < 15x
    assert "target" not in rows[3]
    assert rows[4]["target"] == "flop_rate_vs_dense >= 0.9" and rows[4]["target_met"]
    text = "\n".join(lines)
    assert "MISSED        varlen bwd flop_rate_vs_dense >= 0.9: 0.85" in text
    assert "NOT MEASURED  triton fwd flop_rate_vs_dense >= 0.7" in text  # never hidden
    assert (
        "MET           varlen fwd/fwd+bwd speedup_vs_full >= 15 at 586,080 tokens: 16 (60s, fwd, extrapolated)" in text
    )
    assert len([ln for ln in lines if "speedup" in ln and "varlen" in ln]) == 2


def test_gather_overhead_and_table():
    rows = [
        {**_row("varlen", "fwd", 1.0), "ms": 10.0, "ms_min": 9.0, "ms_max": 11.0, "tflops": 400.0},
        {**_row("varlen", "fwd", 0.9, order="streams"), "ms": 12.5, "ms_min": 12.0, "ms_max": 13.0, "tflops": 360.0},
        {**_row("varlen", "bwd", 0.8), "ms": 20.0, "ms_min": None, "ms_max": None, "derived": "x", "tflops": 1.0},
    ]
    gpu.add_gather_overhead(rows)
    assert rows[1]["gather_ms"] == pytest.approx(2.5) and "gather_ms" not in rows[0]
    gpu.apply_targets(rows)
    rows.append(gpu.error_row(_case("60s"), "flex_attention", "blocked", "wrong result vs varlen/blocked: out"))
    table = gpu.format_rows(rows)
    assert "ERROR: wrong result" in table and "derived" in table and "MISSED" in table
    assert "12.5x extr" not in table  # speedups print only when known
    assert len(table.splitlines()) == 2 + len(rows)


def test_summarize():
    assert _timing.summarize([3.0, 1.0, 2.0, 10.0]) == {"ms": 2.5, "ms_min": 1.0, "ms_max": 10.0, "repeats": 4}
    with pytest.raises(ValueError, match="no timings"):
        _timing.summarize([])


def test_registered_as_the_attention_gpu_suite():
    assert bench.SUITES["attention-gpu"] == "swin_attention_gpu"
    assert bench._load_suite("swin_attention_gpu") is gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without a GPU")
def test_without_a_gpu_it_says_why_and_returns_no_rows(tmp_path, capsys):
    assert "needs a CUDA device" in gpu.skip_reason("cpu")
    assert gpu.skip_reason("cuda") == "no CUDA device is available on this machine"
    assert gpu.run(quick=True, device="cuda") == []
    out = tmp_path / "gpu.json"
    assert gpu.main(["--quick", "--out", str(out)]) == 0
    assert "skipped: no CUDA device" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {"skipped": "no CUDA device is available on this machine", "rows": []}


# ------------------------------------------------------------------- the GPU path, with CPU stand-ins
def _standins(monkeypatch, tiny_case):
    """Run the suite's control flow on CPU: backends -> the CPU backend, timing -> wall clock.

    ``triton`` in streams order is made wrong (always the unshifted windows) and FlexAttention raises, so the
    run must report both as errors and post no number for them.
    """
    from semanticgen.ops import swin_attention

    def impl_fn(impl, layout, device):
        if impl == "flex_attention":

            def broken(q, k, v, shifted):
                raise RuntimeError("no flex here")

            return broken
        if impl == gpu.DENSE:
            return gpu._dense_fn
        wrong = impl == "triton" and layout.order == "streams"

        def run(q, k, v, shifted):
            return swin_attention(q, k, v, layout, shifted=shifted and not wrong, backend="cpu")

        return run

    def wall_times(fn, **kwargs):
        times = []
        for _ in range(2):
            start = gpu.time.perf_counter()
            fn()
            times.append((gpu.time.perf_counter() - start) * 1e3)
        return times

    monkeypatch.setattr(gpu, "skip_reason", lambda device: None)
    monkeypatch.setattr(gpu, "environment", lambda device: {"device": "cpu stand-in", "torch": torch.__version__})
    monkeypatch.setattr(gpu, "cuda_event_times", wall_times)
    monkeypatch.setattr(gpu, "cases", lambda quick=False: [tiny_case])
    monkeypatch.setattr(gpu, "_impl_fn", impl_fn)


def test_run_end_to_end_with_cpu_standins(monkeypatch, capsys, tmp_path):
    layout = WindowLayout(
        vae_frames=6, vae_tokens_per_frame=8, sem_frames=2, sem_tokens_per_frame=4, window=2, order="blocked"
    )
    tiny = gpu.Case("tiny", 1.0, 2, layout, gpu.ALL_IMPLS, dense=True)
    _standins(monkeypatch, tiny)
    out = tmp_path / "rows.json"
    assert gpu.main(["--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    rows = payload["rows"]

    errors = {(r["impl"], r["order"]): r["error"] for r in rows if r.get("error")}
    assert set(errors) == {("triton", "streams"), ("flex_attention", "blocked")}
    # triton/streams passes nothing: the small-case check already catches the wrong parity.
    assert "failed the small-case check" in errors["triton", "streams"]
    assert "no flex here" in errors["flex_attention", "blocked"]
    timed = {(r["impl"], r["order"], r["pass"]) for r in rows if not r.get("error")}
    for impl, order in (("varlen", "blocked"), ("varlen", "streams"), ("triton", "blocked"), (gpu.DENSE, "-")):
        assert {(impl, order, p) for p in ("fwd", "fwd+bwd", "bwd")} <= timed
    for r in rows:
        if not r.get("error"):
            assert r["device"] == "cpu stand-in" and r["ms"] is not None
        if not r.get("error") and not r.get("derived"):  # a derived bwd of tiny CPU calls may come out <= 0
            assert r["flop_rate_vs_dense"] is not None and r["speedup_extrapolated"] is False
    assert any("gather_ms" in r for r in rows if r.get("order") == "streams")
    assert payload["checks"]["varlen/blocked"] == "ok" and payload["checks"]["triton/streams"] != "ok"
    assert "dense flash (SDPA) measured at N=" in printed and "targets:" in printed
    assert "NOT MEASURED" in printed  # the 586,080-token speedup targets: no such row here


def test_timed_size_mismatch_is_an_error_row(monkeypatch):
    """A backend that passes the small case but is wrong at the timed size posts no number."""
    layout = WindowLayout(
        vae_frames=6, vae_tokens_per_frame=8, sem_frames=2, sem_tokens_per_frame=4, window=2, order="blocked"
    )
    tiny = gpu.Case("tiny", 1.0, 2, layout, gpu.BACKENDS_BLOCKED, dense=False)
    _standins(monkeypatch, tiny)
    real_impl_fn = gpu._impl_fn

    def impl_fn(impl, lay, device):
        fn = real_impl_fn(impl, lay, device)
        if impl == "triton" and lay.num_tokens == layout.num_tokens:  # wrong only at the timed size
            return lambda q, k, v, shifted: fn(q, k, v, shifted) * 1.1
        return fn

    monkeypatch.setattr(gpu, "_impl_fn", impl_fn)
    monkeypatch.setattr(gpu, "small_case_check", lambda device: {})  # covered by the end-to-end test
    rows = gpu.run(device="cpu")
    (bad,) = [r for r in rows if r["impl"] == "triton"]
    assert "wrong result vs varlen/blocked" in bad["error"] and "ms" not in bad
    assert {r["pass"] for r in rows if r["impl"] == "varlen"} == {"fwd", "fwd+bwd", "bwd"}
    assert all(r["flop_rate_vs_dense"] is None for r in rows if r["impl"] == "varlen")  # no dense in this run


def test_a_wrong_first_implementation_does_not_become_the_reference(monkeypatch):
    layout = WindowLayout(
        vae_frames=6, vae_tokens_per_frame=8, sem_frames=2, sem_tokens_per_frame=4, window=2, order="blocked"
    )
    tiny = gpu.Case("tiny", 1.0, 2, layout, gpu.BACKENDS_BLOCKED, dense=False)
    _standins(monkeypatch, tiny)
    real_impl_fn = gpu._impl_fn

    def impl_fn(impl, lay, device):
        fn = real_impl_fn(impl, lay, device)
        if impl == "varlen" and lay.num_tokens == layout.num_tokens:
            return lambda q, k, v, shifted: fn(q, k, v, shifted) * 1.1
        return fn

    monkeypatch.setattr(gpu, "_impl_fn", impl_fn)
    monkeypatch.setattr(gpu, "small_case_check", lambda device: {})  # covered by the end-to-end test
    rows = gpu.run(device="cpu")
    (bad,) = [r for r in rows if r["impl"] == "varlen"]
    assert "window vs SDPA" in bad["error"]
    assert {r["pass"] for r in rows if r["impl"] == "triton"} == {"fwd", "fwd+bwd", "bwd"}  # checked, then timed


def test_time_budget_skips_what_would_overrun(monkeypatch):
    layout = WindowLayout(
        vae_frames=6, vae_tokens_per_frame=8, sem_frames=2, sem_tokens_per_frame=4, window=2, order="blocked"
    )
    tiny = gpu.Case("tiny", 1.0, 2, layout, (("varlen", "blocked"), ("flex_attention", "blocked")), dense=False)
    _standins(monkeypatch, tiny)
    monkeypatch.setattr(gpu, "small_case_check", lambda device: {})
    # 30 s: room for a backend (~10 s expected), not for FlexAttention's cold compile (~60 s).
    rows = gpu.run(device="cpu", budget_s=30.0)
    assert {r["pass"] for r in rows if r["impl"] == "varlen"} == {"fwd", "fwd+bwd", "bwd"}
    (flex,) = [r for r in rows if r["impl"] == "flex_attention"]
    assert flex["error"].startswith("skipped:") and "time budget 30 s" in flex["error"]
