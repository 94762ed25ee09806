"""The convergence study's plumbing: its quick mode trains both methods with torchrun, judges them, and writes the
JSON and the plot with parameters matched within one block and FLOPs matched within a few percent."""

from __future__ import annotations

import json

import pytest
from semanticgen.benchmarks import convergence as conv

from semanticgen import bench


def test_suite_is_registered_but_not_in_the_default_list():
    assert bench.SUITES["convergence"] == "convergence"
    assert "convergence" not in bench.DEFAULT_SUITES
    assert set(bench.DEFAULT_SUITES) == set(bench.SUITES) - {"convergence"}
    assert conv.skip_reason("cuda") is not None and conv.skip_reason("cpu") is None
    assert conv.run(device="cuda") == []


def test_cli_without_suite_runs_the_default_list(monkeypatch):
    from semanticgen.cli import main

    seen = []
    monkeypatch.setattr(bench, "run", lambda names, **_: seen.append(list(names)) or {})
    assert main(["bench", "--device", "cpu", "--no-progress"]) == 0
    assert seen == [list(bench.DEFAULT_SUITES)]


def test_baseline_depth_is_the_closest_in_parameters():
    from semanticgen.train.stages import DataWidths

    widths = DataWidths(sem_features=32, latent_channels=4, text=32)
    cfg = conv.load(conv.QUICK)
    target = conv.semanticgen_params(conv.param_counts(cfg, widths))
    depth, params = conv.match_depth(conv.QUICK, widths, target, conv.BASELINE)
    block = conv.param_counts(cfg, widths)["latent_block"]
    assert abs(params - target) <= block / 2  # the nearest whole number of blocks
    for other in (depth - 1, depth + 1):
        cfg_o = conv.load(conv.QUICK, [*conv.BASELINE, f"model.latent_generator.depth={other}"])
        assert abs(conv.param_counts(cfg_o, widths)["latent_generator"] - target) >= abs(params - target)


@pytest.mark.distributed
@pytest.mark.slow
def test_quick_study_writes_both_methods_matched(tmp_path):
    payload = conv.study(conv.QUICK, tmp_path, log=lambda _: None)
    saved = json.loads((tmp_path / "convergence.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(payload["runs"]))
    assert (tmp_path / "convergence.png").stat().st_size > 10_000

    runs = {r["run"]: r for r in payload["runs"]}
    assert set(runs) == {
        "semanticgen-b0.50",
        "baseline-b0.50",
        "semanticgen-b1.00",
        "baseline-b1.00",
        "semanticgen-dim8-b1.00",
    }
    block = payload["params"]["semanticgen_dim4"]["latent_block"]
    for fraction in ("0.50", "1.00"):
        ours, base = runs[f"semanticgen-b{fraction}"], runs[f"baseline-b{fraction}"]
        assert base["method"] == "baseline" and base["semantic_steps"] == 0
        assert base["depth"] > payload["params"]["baseline"]["semanticgen_depth"]  # deeper to match the params
        assert abs(base["params"] - ours["params"]) <= block
        assert base["flops_vs_semanticgen"] == pytest.approx(1.0, abs=0.06)
        assert base["train_tflop"] == pytest.approx(ours["train_tflop"], rel=0.06)
        trained = json.loads((tmp_path / base["dir"] / "config.json").read_text())
        assert trained["stage"] == "latent" and trained["latent"]["semantic_tokens"] is False
        assert trained["model"]["latent_generator"]["abs_pos"] is True
        assert trained["model"]["latent_generator"]["depth"] == base["depth"]
    for r in payload["runs"]:
        assert r["train_s"] > 0 and r["train_tflop"] > 0
        assert all(0.0 <= r[a] <= 1.0 for a in conv.ASPECTS)
        # The one-stage baseline has no stage 2 to feed real semantic tokens: no ceiling.
        assert (r["stage2_ceiling_all"] is None) == (r["method"] == "baseline")
    assert runs["semanticgen-dim8-b1.00"]["compressor_dim"] == 8
    flops = payload["flops_per_step"]
    assert flops["baseline"]["latent"] > flops["semanticgen_dim4"]["latent"] > flops["semanticgen_dim4"]["semantic"] > 0

    # A second study into the same directory reuses every finished run.
    again = conv.study(conv.QUICK, tmp_path, log=lambda _: None)
    assert [r["train_s"] for r in again["runs"]] == [r["train_s"] for r in payload["runs"]]
