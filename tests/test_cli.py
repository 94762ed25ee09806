"""The semanticgen command line: outputs, files written, and one-line errors for user mistakes."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import types

import pytest

from semanticgen import bench
from semanticgen.cli import main


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semanticgen.cli", *args], capture_output=True, text=True, timeout=300)


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["extension semanticgen._C"] == "loaded"
    assert info["swin_attention_backends"]["cpu"]["cpu"] == "available"
    assert "CPU" in info["compiled_ops"]["cfg_euler_step"]


@pytest.mark.usefixtures("compiled_ops")
def test_info_table_lists_kernel_ops_not_queries_of_the_build(capsys):
    """``cpu_capability`` (like ``build_info``) is a question to ``_C``, not a flow op: it used to be listed as
    ``op cpu_capability | no kernel``. The variant it answers has a row of its own."""
    assert main(["info"]) == 0
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in capsys.readouterr().out.splitlines()
        if line.count("│") == 3
    }
    assert "op cpu_capability" not in rows and "op build_info" not in rows
    assert rows["op euler_step"].startswith("CPU")
    assert re.fullmatch(
        r"(avx2|avx512) \((chosen from the CPU's features|forced by SEMANTICGEN_CPU_CAPABILITY=\w+)\)",
        rows["CPU flow kernels"],
    )


@pytest.mark.usefixtures("compiled_ops")
@pytest.mark.parametrize("forced", [None, "avx2"], ids=["detected", "forced-avx2"])
def test_info_says_which_cpu_kernels_run_and_why(forced):
    env = {k: v for k, v in os.environ.items() if k != "SEMANTICGEN_CPU_CAPABILITY"}
    if forced:
        env["SEMANTICGEN_CPU_CAPABILITY"] = forced
    proc = subprocess.run(
        [sys.executable, "-m", "semanticgen.cli", "info", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    if forced:
        assert info["CPU flow kernels"] == "avx2 (forced by SEMANTICGEN_CPU_CAPABILITY=avx2)"
    else:
        assert re.fullmatch(r"(avx2|avx512) \(chosen from the CPU's features\)", info["CPU flow kernels"])
    assert "cpu_capability" not in info["compiled_ops"] and "euler_step" in info["compiled_ops"]


def test_plan_json_matches_layout_maths(capsys):
    assert main(["plan", "--seconds", "60", "--height", "480", "--width", "832", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    text = json.dumps(plan)
    assert "561600" in text  # 360 latent frames x 1,560 tokens


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user mistakes (UsageError) become one line and exit 2; a ValueError from a bug propagates."""
    from semanticgen import planning

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(planning, "plan", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["plan", "--seconds", "60", "--height", "480", "--width", "832"])


def test_generate_from_a_file_that_is_not_an_export_is_one_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n')
    proc = _run_cli("generate", "--checkpoint", str(log), "--prompt", "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not a safetensors export" in proc.stderr


@pytest.mark.parametrize("kind", ["empty-run-dir", "latents-file"])
def test_generate_from_a_run_without_models_is_one_line(tmp_path, kind):
    """An empty run directory, or a semanticgen file that is no export (``--latents-out``'s), used to end in a
    FileNotFoundError or ValueError traceback."""
    if kind == "empty-run-dir":
        checkpoint, needle = tmp_path, "no complete checkpoint"
    else:
        import torch

        from semanticgen._files import save_safetensors_atomic

        checkpoint = save_safetensors_atomic({"latents": torch.zeros(2)}, tmp_path / "l.safetensors", {"seed": 0})
        needle = "no 'model_configs'"
    proc = _run_cli("generate", "--checkpoint", str(checkpoint), "--prompt", "x", "--out", str(tmp_path / "x.mp4"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert needle in proc.stderr and proc.stderr.startswith("semanticgen generate: error: ")


def test_train_export_through_the_cli_is_one_line(tmp_path, capsys):
    assert main(["train", "export", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m semanticgen.train export: error: ") and "no such directory" in err
    assert len(err.strip().splitlines()) == 1


def test_plan_context_parallel_json_and_refusal(capsys):
    args = ["plan", "--seconds", "60", "--height", "480", "--width", "832"]
    assert main([*args, "--context-parallel", "8", "--json"]) == 0
    cp = json.loads(capsys.readouterr().out)["context_parallel"]
    assert cp["size"] == 8 and sum(cp["tokens_per_rank"]) == 586_080 and sum(cp["windows_per_rank"]) == 18
    assert cp["bytes_per_layer"]["halo_hidden"] < cp["bytes_per_layer"]["ulysses"]
    assert main([*args[:2], "10", *args[3:], "--context-parallel", "8"]) == 2
    err = capsys.readouterr().err
    assert "needs at least 8 unshifted windows" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["plan", "--seconds", "-1", "--height", "480", "--width", "832"], "positive"),
        (["generate", "--checkpoint", "/nonexistent/run", "--prompt", "x"], "no such run directory"),
        (["bench", "--suite", "nope"], "invalid choice"),
        (["train", "/nonexistent/config.toml"], "config"),
        (["generate", "--checkpoint", ".", "--prompt", "x", "--guidance", "-1"], "guidance scale >= 0"),
    ],
    ids=["plan-negative", "generate-missing-run", "bench-unknown-suite", "train-missing-config", "negative-guidance"],
)
def test_user_errors_are_one_line_without_traceback(args, needle):
    proc = _run_cli(*args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error" in line]) == 1


def test_bench_writes_json_csv_and_plot(tmp_path, monkeypatch):
    rows = [
        {"suite": "attention", "impl": impl, "pass": p, "tokens": n, "ms": ms}
        for impl, scale in (("swin_attention", 1.0), ("sdpa_full", 3.0))
        for p in ("fwd", "fwd+bwd")
        for n, ms in ((1024, 1.0 * scale), (2048, 2.0 * scale * (2 if impl == "sdpa_full" else 1)))
    ]
    fake = types.SimpleNamespace(run=lambda quick, device, progress: [dict(r) for r in rows], steps=lambda quick: 1)
    skipping = types.SimpleNamespace(run=lambda **_: [], skip_reason=lambda device: "needs a GPU")
    modules = {"swin_attention_cpu": fake, "swin_attention_gpu": skipping}
    monkeypatch.setattr(bench, "_load_suite", lambda name: modules[name])
    assert (
        main(["bench", "--suite", "attention", "--suite", "attention-gpu", "--out", str(tmp_path), "--no-progress"])
        == 0
    )
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["rows"] == rows
    assert payload["skipped"] == {"attention-gpu": "needs a GPU"}
    env = payload["environment"]
    for key in ("timestamp", "cpu", "torch", "triton", "git_commit", "device"):
        assert key in env
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    png = (tmp_path / "attention_scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_silences_torchs_cuda_home_warning(tmp_path):
    """With a CUDA toolkit and no GPU, importing torch.utils.cpp_extension (torch.compile does) logs "No CUDA
    runtime is found"; every semanticgen bench printed it. The CLI silences that logger, nothing else."""
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available() or not os.path.isdir("/usr/local/cuda"):
        pytest.skip("the warning appears only with a CUDA toolkit and no GPU")
    env = dict(os.environ, CUDA_HOME="/usr/local/cuda")
    probe = "import torch.utils.cpp_extension"
    quiet = "from semanticgen.cli import _quiet_cuda_home_warning; _quiet_cuda_home_warning(); " + probe
    loud = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert "No CUDA runtime is found" in loud.stderr  # the control: torch does warn here
    silent = subprocess.run([sys.executable, "-c", quiet], env=env, capture_output=True, text=True, timeout=120)
    assert silent.returncode == 0 and "No CUDA runtime is found" not in silent.stderr, silent.stderr
