"""The learned video autoencoder: protocol, files, factory, training, and the run's autoencoder stage."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _train_helpers import REPO, metrics, run_train
from safetensors.torch import save_file

from semanticgen.data.synthetic import SyntheticShapes
from semanticgen.encoders import PixelVAE, VideoVAE, build_vae
from semanticgen.encoders.learned_vae import VAE_FILE, LearnedVAEConfig, LearnedVideoAE, run_vae_spec
from semanticgen.train.autoencoder import latent_stats, needs_autoencoder, train_autoencoder
from semanticgen.train.config import AutoencoderConfig, config_from_dict, read_config_file

LEARNED = REPO / "configs" / "tiny.toml"  # the demo trains a learned VAE first
SMALL_AE = LearnedVAEConfig(latent_channels=4, spatial_factor=4, temporal_factor=4, hidden=16)


def _video(b=1, f=9, h=16, w=24, seed=0):
    return torch.rand(b, f, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _trained_like(seed: int = 0) -> LearnedVideoAE:
    """A small AE with every weight random (as after training: the zero-initialised layers are not zero)."""
    ae = LearnedVideoAE(SMALL_AE, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 1.0, 2.0, 0.25])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ae.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return ae


# ------------------------------------------------------------------------------------------- protocol
@pytest.mark.parametrize(("frames", "latent_frames"), [(17, 5), (5, 2), (1, 1)], ids=["F=17", "F=5", "F=1"])
def test_shapes_and_frame_counts(frames, latent_frames):
    ae = _trained_like()
    assert isinstance(ae, VideoVAE)
    z = ae.encode(_video(2, frames, 16, 24))
    assert z.shape == (2, 4, latent_frames, 4, 6) and z.dtype == torch.float32
    assert ae.latent_frames(frames) == latent_frames and ae.video_frames(latent_frames) == frames
    out = ae.decode(z)
    assert out.shape == (2, frames, 3, 16, 24)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_untrained_ae_is_the_pixel_vae_with_linear_decode():
    """The learned parts start at zero: encode and decode start as PixelVAE's (what training improves on)."""
    ae, pixel = LearnedVideoAE(SMALL_AE), PixelVAE(4, 4, 4)
    video = _video(2, 9)
    torch.testing.assert_close(ae.encode(video), pixel.encode(video))
    z = pixel.encode(video)
    torch.testing.assert_close(ae.decode(z), pixel.decode(z))


def test_causal_first_frame_is_encoded_alone():
    """Changing frames after the first changes no part of latent frame 0 (Wan's causal time axis)."""
    ae = _trained_like()
    video = _video(1, 9)
    other = video.clone()
    other[:, 1:] = torch.rand(other[:, 1:].shape, generator=torch.Generator().manual_seed(5))
    z, z_other = ae.encode(video), ae.encode(other)
    torch.testing.assert_close(z[:, :, 0], z_other[:, :, 0])
    assert not torch.allclose(z[:, :, 1:], z_other[:, :, 1:])


def test_normalisation_is_undone_by_decode():
    ae = _trained_like()
    plain = _trained_like()
    plain.set_latent_stats([0.0] * 4, [1.0] * 4)
    video = _video()
    z, raw = ae.encode(video), plain.encode(video)
    mean, std = ae.latents_mean, ae.latents_std
    torch.testing.assert_close(z, (raw - mean) / std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ae.decode(z), plain.decode(raw), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 8, 3, 16, 24), "1 \\+ k \\* 4 frames"),
        ((1, 9, 3, 18, 24), "multiples of 4"),
        ((1, 9, 4, 16, 24), "\\[B, F, 3, H, W\\]"),
        ((9, 3, 16, 24), "\\[B, F, 3, H, W\\]"),
    ],
    ids=["F=8", "H=18", "C=4", "rank4"],
)
def test_rejects_bad_video(shape, match):
    with pytest.raises(ValueError, match=match):
        LearnedVideoAE(SMALL_AE).encode(torch.rand(shape))


def test_rejects_bad_latents_and_settings():
    ae = LearnedVideoAE(SMALL_AE)
    with pytest.raises(TypeError, match="floating-point"):
        ae.encode(torch.zeros(1, 9, 3, 16, 24, dtype=torch.uint8))
    with pytest.raises(TypeError, match="floating-point"):
        ae.decode(torch.zeros(1, 4, 2, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="expected latents \\[B, 4, T', h, w\\], got \\(1, 3, 2, 4, 4\\)"):
        ae.decode(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="num_frames must be 1 \\+ k \\* 4"):
        ae.latent_frames(16)
    with pytest.raises(ValueError, match="spatial_factor must be a power of 2, got 6"):
        LearnedVAEConfig(spatial_factor=6)
    with pytest.raises(ValueError, match="latent_channels must be a positive int, got 0"):
        LearnedVAEConfig(latent_channels=0)
    with pytest.raises(ValueError, match="latents_std must be one positive finite float or 4 of them"):
        LearnedVideoAE(SMALL_AE, latents_std=[1.0, 0.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------- files
def test_save_and_load_round_trip(tmp_path):
    ae = _trained_like()
    path = ae.save(tmp_path / "run" / VAE_FILE, {"note": "test"})
    assert not list(path.parent.glob("*.tmp"))
    for where in (path, path.parent):  # the file, or the run directory holding it
        loaded = LearnedVideoAE.from_pretrained(where)
        assert loaded.config == ae.config
        for (name, a), (_, b) in zip(ae.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
        assert torch.equal(loaded.latents_mean, ae.latents_mean) and torch.equal(loaded.latents_std, ae.latents_std)
        video = _video()
        torch.testing.assert_close(loaded.encode(video), ae.encode(video), atol=0, rtol=0)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors.*not found"):
        LearnedVideoAE.from_pretrained(missing)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(ValueError, match="notes.safetensors' is not a safetensors file"):
        LearnedVideoAE.from_pretrained(text)
    export = tmp_path / "model.safetensors"  # a semanticgen export of another kind
    save_file({"w": torch.zeros(2)}, str(export), metadata={"semanticgen": json.dumps({"stage": "latent"})})
    with pytest.raises(ValueError, match="model.safetensors' is not a learned VAE file \\(a semanticgen file"):
        LearnedVideoAE.from_pretrained(export)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="plain.safetensors' is not a learned VAE file \\(no 'semanticgen' metadata"):
        LearnedVideoAE.from_pretrained(plain)
    good = _trained_like().save(tmp_path / VAE_FILE)
    with pytest.raises(
        ValueError, match="vae.safetensors' holds a VAE with latent_channels = 4, the config asks for 8"
    ):
        LearnedVideoAE.from_pretrained(good, latent_channels=8)


def test_factory_and_run_vae_spec(tmp_path):
    path = _trained_like().save(tmp_path / VAE_FILE)
    spec = {"kind": "learned", "latent_channels": 4, "spatial_factor": 4, "temporal_factor": 4, "hidden": 16}
    assert run_vae_spec(spec, tmp_path) == {**spec, "path": str(path)}
    assert run_vae_spec(spec, tmp_path / "model.safetensors") == {**spec, "path": str(path)}  # a file: its dir
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert run_vae_spec(spec, tmp_path / "model.safetensors") == {**spec, "path": str(path)}
    assert (
        run_vae_spec({**spec, "path": "/elsewhere/vae.safetensors"}, tmp_path)["path"] == "/elsewhere/vae.safetensors"
    )
    assert run_vae_spec({"kind": "pixel"}, tmp_path) == {"kind": "pixel"}
    vae = build_vae(run_vae_spec(spec, tmp_path))
    assert isinstance(vae, LearnedVideoAE) and not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(ValueError, match="kind 'learned' needs key\\(s\\) \\['path'\\]"):
        build_vae(spec)
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['width'\\]"):
        build_vae({**spec, "path": str(path), "width": 3})
    assert needs_autoencoder(spec, tmp_path / "fresh") and not needs_autoencoder(spec, tmp_path)
    assert not needs_autoencoder({**spec, "path": "x"}, tmp_path / "fresh") and not needs_autoencoder(
        {"kind": "pixel"}, "x"
    )


# -------------------------------------------------------------------------------------------- training
def _clips(n=16, frames=5, seed=0) -> SyntheticShapes:
    return SyntheticShapes(n, height=16, width=16, vae_frames=frames, vae_fps=3.2, seed=seed)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, 2 threads made these small convs 7x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_short_training_lowers_reconstruction_error_and_stats_normalise(one_thread):
    torch.manual_seed(0)
    data = _clips()
    video = torch.stack([data[i]["vae_video"] for i in range(len(data))])
    ae = LearnedVideoAE(LearnedVAEConfig(spatial_factor=2, hidden=16))
    before = (ae.decode(ae.encode(video)) - video).square().mean()
    settings = AutoencoderConfig(steps=80, batch=8, lr=3e-3, warmup_steps=2, latent_noise=0.0)
    history = train_autoencoder(ae, data, settings, device=torch.device("cpu"))
    after = (ae.decode(ae.encode(video)) - video).square().mean()
    assert len(history) == 80 and after < 0.75 * before, (before, after)  # measured: 0.60 of it
    mean, std = latent_stats(ae, data, device=torch.device("cpu"), max_clips=len(data), batch=5)
    ae.set_latent_stats(mean, std)
    z = ae.encode(video)  # [16, 4, 2, 8, 8]
    torch.testing.assert_close(z.mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3, 4), unbiased=False), torch.ones(4), atol=1e-4, rtol=0)


def test_config_table_and_its_checks():
    raw = read_config_file(LEARNED)
    cfg = config_from_dict(raw)
    assert cfg.encoders["vae"]["kind"] == "learned" and cfg.autoencoder.steps > 0
    with pytest.raises(ValueError, match="unknown config key 'autoencoder.stepz'"):
        config_from_dict({**raw, "autoencoder": {"stepz": 3}})
    with pytest.raises(ValueError, match="autoencoder.batch must be >= 1, got 0"):
        config_from_dict({**raw, "autoencoder": {"batch": 0}})


# --------------------------------------------------------------------------------- the run's first stage
AE_RUN = [
    "--set=autoencoder.steps=3",
    "--set=autoencoder.batch=2",
    "--set=encoders.vae.hidden=16",
    "--set=stage=latent",
    "--set=latent.steps=2",
    "--set=semantic.steps=0",
]


@pytest.mark.distributed
def test_train_hook_trains_the_autoencoder_once(tmp_path):
    """1 rank: the AE trains first and is written; a resumed run reads it back instead of training it again, and
    refuses to resume once the file is gone (the trained stage's latents came from it)."""
    run_dir = tmp_path / "run"
    run_train(1, run_dir, *AE_RUN, "--steps=1", config=LEARNED, shared_vae=False)
    path = run_dir / VAE_FILE
    stamp = path.stat().st_mtime_ns
    records = metrics(run_dir, autoencoder=True) + metrics(run_dir)
    stages = [("autoencoder", -2), ("autoencoder", -1), ("autoencoder", 0), ("latent", 1)]
    assert [(r["stage"], r["step"]) for r in records] == stages
    assert [r["autoencoder_step"] for r in records[:3]] == [1, 2, 3]

    lost = tmp_path / "lost"
    shutil.copytree(run_dir, lost)
    (lost / VAE_FILE).unlink()
    with pytest.raises(AssertionError, match="vae.safetensors is missing but the run already has trained stages"):
        run_train(1, lost, *AE_RUN, "--resume", config=LEARNED, shared_vae=False)

    run_train(1, run_dir, *AE_RUN, "--resume", config=LEARNED, shared_vae=False)
    assert path.stat().st_mtime_ns == stamp  # not trained again
    assert [r["step"] for r in metrics(run_dir, autoencoder=True) + metrics(run_dir)] == [-2, -1, 0, 1, 2]
    # Inference rebuilds it from the run's config.
    cfg = json.loads((run_dir / "config.json").read_text())
    vae = build_vae(run_vae_spec(cfg["encoders"]["vae"], run_dir))
    assert isinstance(vae, LearnedVideoAE) and vae.config.hidden == 16
