"""Context-parallel training under torchrun on gloo: CP runs equal data-parallel runs of the same global batch.

``configs/tiny_long.toml`` (9 latent frames, window 2: 5 unshifted windows per clip, so CP 2 splits 3 + 2). The
KL weight is raised to 0.1 here so that counting the compressor's KL term once per CP rank instead of once per
clip would change the gradient norm well beyond the tolerance (at the config's 1e-5 it would be invisible).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_helpers import REPO, child_env, metrics, run_train, torchrun_cmd

from semanticgen.exports import read_export
from semanticgen.ops import WindowLayout
from semanticgen.parallel import ContextPlan
from semanticgen.train.stages import DataWidths

pytestmark = [pytest.mark.distributed]

LONG = REPO / "configs" / "tiny_long.toml"
STEPS = 10
COMMON = [
    f"--set=latent.steps={STEPS}",
    "--set=latent.kl_weight=0.1",
    "--set=latent.optim.warmup_steps=2",
    "--set=data.num_samples=64",
    "--set=data.micro_batch_size=2",
    "--set=log.progress=false",
    "--save-every=5",
]
CP1 = "--set=parallel.context_parallel=1"


def _train(nproc: int, run_dir: Path, *extra: str) -> None:
    run_train(nproc, run_dir, *COMMON, *extra, config=LONG, timeout=300)


def _by_step(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(run_dir)}


def _assert_same_losses(got: dict[int, dict], ref: dict[int, dict], steps, keys=("loss", "flow_loss", "kl")) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in steps:
        for key in keys:
            a, b = got[step][key], ref[step][key]
            assert abs(a - b) <= 1e-5 * abs(b), (step, key, a, b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One process without CP, and CP 2 on 2 processes, both with micro-batch 2 (the same global batch: the two
    CP ranks share their clips)."""
    root = tmp_path_factory.mktemp("cp")
    out = {"one": root / "one", "cp2": root / "cp2"}
    _train(1, out["one"], CP1)
    _train(2, out["cp2"])
    return out


@pytest.mark.slow
def test_cp2_matches_one_process(runs):
    """Per-step losses, gradient norms (before clipping: the scale of the gradient, so a wrong loss weight over
    the CP group shows) and the exported weights after 10 steps equal the single-process run."""
    ref, got = _by_step(runs["one"]), _by_step(runs["cp2"])
    _assert_same_losses(got, ref, range(1, STEPS + 1), keys=("loss", "flow_loss", "kl", "grad_norm"))
    assert got[1]["samples_per_s"] > 0 and got[1]["skipped_videos"] == 0
    a, _ = read_export(runs["one"] / "latent.safetensors")
    b, _ = read_export(runs["cp2"] / "latent.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_cp2_sends_only_the_halo_blocks(runs):
    """The bytes each rank sends per step (forward + backward, mean over ranks) are the plan's handed-over blocks:
    one per parity change and the way back, nothing proportional to the clip."""
    cfg = json.loads((runs["cp2"] / "config.json").read_text())
    lat = cfg["model"]["latent_generator"]
    shapes = read_export(runs["cp2"] / "latent.safetensors")[1]["shapes"]
    _, tv, hv, wv = shapes["latents"]
    ts, ss, _ = shapes["semantic"]
    pt, ph, pw = lat["patch"]
    layout = WindowLayout(tv // pt, (hv // ph) * (wv // pw), ts, ss, lat["window"] // pt, order="blocked")
    plan = ContextPlan.build(layout, 2)
    depth, hidden, batch = lat["depth"], lat["hidden"], cfg["data"]["micro_batch_size"]
    transitions = depth - 1 + (depth % 2 == 0)  # parity changes between layers, plus the way back
    per_rank = [transitions * sum(plan.handover(r)) * batch * hidden * 4 for r in range(2)]  # fp32, fwd + bwd
    assert 0 < max(per_rank) < layout.num_tokens * batch * hidden * 4  # less than one activation of the clip
    for record in metrics(runs["cp2"]):
        assert record["cp_bytes_sent"] == sum(per_rank) / 2, record["step"]
    assert "cp_bytes_sent" not in metrics(runs["one"])[0]


@pytest.mark.slow
def test_dp2_cp2_matches_dp2_cp1(runs, tmp_path):
    """(dp, cp) = (2, 2) on 4 processes equals (2, 1) on 2 processes, micro-batch 2 per data-parallel group.

    The CP run also recomputes its blocks in backward (activation checkpointing): the halo exchange sits between
    blocks, so recomputation must neither resend nor change anything."""
    four, two = tmp_path / "dp2cp2", tmp_path / "dp2cp1"
    _train(4, four, "--steps=4", "--set=parallel.activation_checkpointing=true")
    _train(2, two, "--steps=4", CP1)
    ref, got = _by_step(two), _by_step(four)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    cp2 = _by_step(runs["cp2"])  # the same clip shapes and micro-batch: the same halo bytes per rank
    assert all(got[s]["cp_bytes_sent"] == cp2[1]["cp_bytes_sent"] for s in got)
    for step in ref:
        for key in ("loss", "flow_loss", "kl", "grad_norm"):
            assert abs(got[step][key] - ref[step][key]) <= 1e-5 * abs(ref[step][key]), (step, key)


@pytest.mark.slow
@pytest.mark.parametrize("resume_nproc", [1, 2], ids=["resume-cp1", "resume-cp2"])
def test_resume_from_cp2_checkpoint(runs, tmp_path, resume_nproc):
    """Saved under CP 2 at step 5, resumed under CP 1 (1 process) or CP 2 (2 processes): steps 6-10 equal the
    straight CP 2 run."""
    half = tmp_path / "run"
    shutil.copytree(runs["cp2"], half)
    shutil.rmtree(half / "checkpoints" / "step_0000010")
    (half / "latent.safetensors").unlink()
    extra = [CP1] if resume_nproc == 1 else []
    _train(resume_nproc, half, "--resume", *extra)
    ref, got = _by_step(runs["cp2"]), _by_step(half)
    _assert_same_losses(got, ref, range(6, STEPS + 1))


# ------------------------------------------------------------------------------------------- bad input
BAD = {
    "not dividing the world": (["--context-parallel=3"], "parallel.context_parallel = 3 must divide the world size 1"),
    "too few windows": (
        ["--set=data.vae_frames=5", "--set=parallel.context_parallel=2"],
        "needs at least 2 unshifted windows per clip; this clip has 1 (2 latent frames, window 2)",
    ),
    "full attention": (
        ['--set=model.latent_generator.attention="full"'],
        "needs model.latent_generator.attention = 'swin'",
    ),
    "semantic stage": (['--set=stage="semantic"'], "applies to the latent stage only"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_context_parallel_settings_are_refused(case, tmp_path):
    """One process (no torchrun): one error line naming the problem, exit code 2, no run directory."""
    extra, needle = BAD[case]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "semanticgen.train", str(LONG), "--run-dir", str(run_dir), *COMMON[:-1], *extra]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("semanticgen.train: error: "), proc.stderr[-3000:]
    assert needle in lines[0]
    assert not run_dir.exists()


def test_too_few_windows_under_torchrun_is_one_line(tmp_path):
    """2 ranks, CP 2, a clip of one window: rank 0 alone prints the error (exit 2 from each worker), nothing written."""
    run_dir = tmp_path / "run"
    cmd = torchrun_cmd(2, [str(LONG), "--run-dir", str(run_dir), *COMMON[:-1], "--set=data.vae_frames=5"])
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "semanticgen.train: error:" in line]
    assert len(ours) == 1 and "needs at least 2 unshifted windows" in ours[0], proc.stderr[-3000:]
    assert "exitcode: 2" in proc.stderr or "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert not run_dir.exists()


# ------------------------------------------------------------------------------------ meta-device build
def test_meta_build_materialises_each_unit_from_its_own_seed():
    """Models built on the meta device get, per init unit, exactly what ``init_weights`` gives from the unit's
    seed (so the values cannot depend on how parameters are sharded); special inits (zeroed output layers) hold,
    blocks differ from each other, and a stage's buffers (the empty-prompt embedding) survive ``to_empty``."""
    from semanticgen.models import DiTBlock, init_weights
    from semanticgen.train.config import load_config
    from semanticgen.train.sharding import init_units, materialize, unit_seed
    from semanticgen.train.stages import build_models, build_stage

    cfg = load_config(LONG)
    widths = DataWidths(sem_features=32, latent_channels=4, text=32)
    with torch.device("meta"):
        models = build_models(cfg.model, widths)
    with pytest.raises(ValueError, match="meta device"):
        init_units(build_models(cfg.model, widths))
    units = init_units(models)
    assert [u.name for u in units][:5] == [
        "compressor",
        "semantic_generator.blocks.0",
        "semantic_generator.blocks.1",
        "semantic_generator",
        "latent_generator.blocks.0",
    ]
    null = (torch.randn(12, 32), torch.ones(12, dtype=torch.bool))
    stage = build_stage("latent", models, cfg.latent, 0, null)
    materialize(stage, units, torch.device("cpu"), seed=7)
    assert not any(p.is_meta for p in stage.parameters())
    torch.testing.assert_close(stage.null_text, null[0], rtol=0, atol=0)
    lat = stage.latent_generator
    block = lat.blocks[2]
    expected = DiTBlock(dataclasses.replace(block.config))
    with torch.random.fork_rng():
        torch.manual_seed(unit_seed(7, "latent_generator.blocks.2"))
        init_weights(expected)
    for (name, got), (_, want) in zip(block.named_parameters(), expected.named_parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert not block.modulation.any() and not lat.final.linear.weight.any()
    assert not torch.equal(lat.blocks[0].attn.qkv.weight, lat.blocks[1].attn.qkv.weight)
    assert lat.x_embed.weight.std() > 0
