"""End-to-end training under torchrun on CPU with gloo (2 processes): learning, resume, crash safety, FSDP."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _train_helpers import (
    REPO,
    SMALL,
    TINY,
    child_env,
    losses,
    metrics,
    run_train,
    shared_vae_override,
    torchrun_cmd,
)

from semanticgen.checkpoint_layout import list_checkpoints

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Global steps 1-4 latent, 5-8 semantic; the stages' timestep shifts differ so a test can tell which one sampling used.
STEPS = ["--set=latent.steps=4", "--set=semantic.steps=4", "--set=semantic.timestep_shift=2.0"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """8 steps (both stages) on 2 ranks without interruption; the reference the other runs are compared with."""
    run_dir = tmp_path_factory.mktemp("straight")
    run_dir = run_dir / "run"
    run_train(2, run_dir, *STEPS, "--save-every=2")
    return run_dir


def test_loss_goes_down(tmp_path):
    run_dir = tmp_path / "run"
    run_train(
        2,
        run_dir,
        "--set=latent.steps=30",
        "--set=semantic.steps=0",
        "--set=stage=latent",
        "--set=latent.optim.lr=3e-3",
    )
    recs = metrics(run_dir)
    assert [r["step"] for r in recs] == list(range(1, 31))
    for key in ("loss", "flow_loss", "kl", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb"):
        assert all(isinstance(r[key], float) for r in recs), key
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_straight_run_writes_checkpoints_and_exports(straight_run):
    steps = [c.step for c in list_checkpoints(straight_run / "checkpoints")]
    assert steps == [6, 8]  # keep_last = 2 of the tiny config
    assert [c.meta["stage"] for c in list_checkpoints(straight_run / "checkpoints")] == ["semantic", "semantic"]
    for name in ("latent.safetensors", "semantic.safetensors", "model.safetensors"):
        assert (straight_run / name).is_file(), name
    assert sorted(losses(straight_run)) == list(range(1, 9))


def test_resume_gives_identical_losses(straight_run, tmp_path):
    """Stopped in the semantic stage (step 6), resumed: its compressor comes back from latent.safetensors, model,
    optimizer, schedule and data position from the checkpoint. (Resume inside the latent stage: the tests below.)"""
    stop = 6
    run_dir = tmp_path / "run"
    run_train(2, run_dir, *STEPS, "--save-every=2", f"--steps={stop}")
    assert max(losses(run_dir)) == stop
    run_train(2, run_dir, *STEPS, "--save-every=2", "--resume")
    ref, got = losses(straight_run), losses(run_dir)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])


def test_reshard_on_resume_two_ranks_to_one(straight_run, tmp_path):
    """Saved by 2 ranks, resumed by 1 rank with the same global batch: same losses within fp32 reduction error."""
    run_dir = tmp_path / "run"
    run_train(2, run_dir, *STEPS, "--save-every=2", "--steps=3")
    run_train(1, run_dir, *STEPS, "--save-every=2", "--resume", "--set=data.micro_batch_size=4")
    ref, got = losses(straight_run), losses(run_dir)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5 * max(1.0, abs(ref[step])), (step, got[step], ref[step])


def test_fsdp_two_ranks_match_one_rank(straight_run, tmp_path):
    """The same global batch (2 ranks x 2 samples vs 1 rank x 4) gives the same losses and gradient norms.

    The 1-rank run also recomputes activations (activation checkpointing), which must not change the numbers."""
    run_dir = tmp_path / "run"
    run_train(
        1,
        run_dir,
        *STEPS,
        "--save-every=2",
        "--set=data.micro_batch_size=4",
        "--set=parallel.activation_checkpointing=true",
    )
    ref = {r["step"]: r for r in metrics(straight_run)}
    got = {r["step"]: r for r in metrics(run_dir)}
    assert sorted(got) == sorted(ref)
    for step in ref:
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_gradient_accumulation_matches_larger_micro_batch(straight_run, tmp_path):
    """2 ranks x 2 micro-batches of 1 sample == 2 ranks x 1 micro-batch of 2 samples (same samples per step)."""
    run_dir = tmp_path / "run"
    # With micro_batch_size=1 the stream assigns samples to ranks in a different order, but each step's global set
    # of samples is the same, and so are the averaged loss and the update.
    run_train(
        2,
        run_dir,
        *STEPS,
        "--save-every=100",
        "--set=data.micro_batch_size=1",
        "--set=latent.optim.grad_accum=2",
        "--set=semantic.optim.grad_accum=2",
    )
    ref, got = losses(straight_run), losses(run_dir)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


def test_sigkill_mid_run_then_resume(straight_run, tmp_path):
    """SIGKILL the whole process group while it trains and saves every step; the newest complete checkpoint loads,
    half-written ones are never picked, and the resumed run ends with the straight run's losses."""
    run_dir = tmp_path / "run"
    args = [str(TINY), "--run-dir", str(run_dir), *SMALL, shared_vae_override(), *STEPS, "--save-every=1"]
    cmd = torchrun_cmd(2, args)
    proc = subprocess.Popen(
        cmd, env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if list_checkpoints(run_dir / "checkpoints"):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        assert list_checkpoints(run_dir / "checkpoints"), "no checkpoint appeared within 120 s"
        time.sleep(0.3)  # land somewhere in the following steps or saves
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    complete = list_checkpoints(run_dir / "checkpoints")
    assert complete, "no complete checkpoint survived"
    killed_at = complete[-1].step
    assert killed_at < 8, "the run was not killed mid-way"
    run_train(2, run_dir, *STEPS, "--save-every=1", "--resume")
    ref, got = losses(straight_run), losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(killed_at + 1, 9):
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "a stale temporary checkpoint was left behind"


def test_export_from_two_rank_checkpoint_equals_stage_export(straight_run, tmp_path):
    """Without the end-of-stage file, export consolidates the newest DCP checkpoint (saved by 2 ranks) in one
    process; the weights must be exactly those the training run exported itself."""
    import shutil

    from semanticgen.exports import export_run, read_export

    run_copy = tmp_path / "run"
    shutil.copytree(straight_run, run_copy)
    (run_copy / "semantic.safetensors").unlink()
    (run_copy / "model.safetensors").unlink()
    out = export_run(run_copy, tmp_path / "model.safetensors")
    tensors, meta = read_export(out)
    assert {k.split(".")[0] for k in tensors} == {"latent_generator", "semantic_generator", "compressor"}
    assert meta["stages"]["semantic"]["source"].endswith("step_0000008")
    assert meta["shapes"]["latents"][0] == 4 and len(meta["shapes"]["semantic"]) == 3
    own, _ = read_export(straight_run / "model.safetensors")
    assert own.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(own[k], tensors[k]), k


def test_pipeline_from_run_generates_video(straight_run):
    from semanticgen.exports import read_export
    from semanticgen.runs import build_pipeline_from_run, load_run_models, run_video_fps

    pipe = build_pipeline_from_run(straight_run, device="cpu")
    frames = pipe(["a red square moving right"], steps=2, guidance=2.0, seed=0, progress=False)
    assert frames.shape == (1, 17, 3, 32, 32)
    assert torch.isfinite(frames).all() and float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0
    assert run_video_fps(straight_run) == pytest.approx(6.4)
    models, _ = load_run_models(straight_run)
    tensors, _ = read_export(straight_run / "model.safetensors")
    for name, model in models.items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, tensors[f"{name}.{key}"]), (name, key)


def test_latent_then_semantic_runs_equal_one_both_run(straight_run, tmp_path):
    """``stage = "latent"`` then ``stage = "semantic"`` into one run directory continue the global step numbering and
    give the losses of the single ``both`` run; starting over in a directory with checkpoints is refused."""
    run_dir = tmp_path / "run"
    run_train(2, run_dir, *STEPS, "--save-every=2", "--set=stage=latent")
    with pytest.raises(AssertionError, match="already holds checkpoints up to step 4"):
        run_train(1, run_dir, *STEPS, "--set=stage=latent")
    run_train(2, run_dir, *STEPS, "--save-every=2", "--set=stage=semantic")
    ref, got = losses(straight_run), losses(run_dir)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])


def test_semantic_norm_round_trips_through_the_run(straight_run):
    """The statistics stage 1 trained on are measured over the training clips, saved with the semantic stage's
    checkpoints and exports, and handed to the pipeline unchanged."""
    from semanticgen.data import build_dataset
    from semanticgen.encoders import build_semantic_encoder
    from semanticgen.exports import read_export_meta
    from semanticgen.models import SemanticNorm
    from semanticgen.runs import build_pipeline_from_run, load_run_models
    from semanticgen.train.config import config_from_dict

    metas = [read_export_meta(straight_run / n) for n in ("semantic.safetensors", "model.safetensors")]
    metas += [c.meta for c in list_checkpoints(straight_run / "checkpoints")]
    norms = {SemanticNorm.from_dict(m["semantic_norm"]) for m in metas}
    assert len(norms) == 1
    (norm,) = norms
    assert "semantic_norm" not in read_export_meta(straight_run / "latent.safetensors")

    # Measured independently: every clip of the (64-clip) dataset through the encoder and the trained compressor.
    models, meta = load_run_models(straight_run)
    cfg = config_from_dict(meta["config"])
    ds = build_dataset(cfg.data, seed=cfg.seed)  # the training clips, built as training built them
    encoder = build_semantic_encoder(cfg.encoders["semantic"])
    videos = torch.stack([ds[i]["sem_video"] for i in range(len(ds))])
    with torch.no_grad():
        z = models["compressor"].encode_mean(encoder.encode(videos)).double().flatten(0, -2)
    assert torch.allclose(torch.tensor(norm.mean, dtype=torch.float64), z.mean(0), rtol=0, atol=1e-5)
    assert torch.allclose(torch.tensor(norm.std, dtype=torch.float64), z.std(0, unbiased=False), rtol=1e-4, atol=0)

    pipe = build_pipeline_from_run(straight_run, device="cpu")
    assert pipe.sem_norm == norm


def test_pipeline_samples_each_stage_with_its_trained_shift(straight_run, monkeypatch):
    import semanticgen.pipeline as pipeline_module
    from semanticgen.runs import build_pipeline_from_run

    seen = []
    real = pipeline_module.euler_sample

    def spy(*args, **kwargs):
        seen.append(kwargs["shift"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "euler_sample", spy)
    pipe = build_pipeline_from_run(straight_run, device="cpu")
    pipe(["a red square moving right"], steps=2, seed=0, progress=False)
    assert seen == [2.0, 3.0]  # semantic.timestep_shift of STEPS, latent.timestep_shift of the tiny config
