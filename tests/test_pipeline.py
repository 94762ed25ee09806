"""The two-stage pipeline on tiny random models with the weight-free encoders."""

from __future__ import annotations

import pytest
import torch

from semanticgen.encoders import HashTextEncoder, PixelVAE
from semanticgen.models import LatentGenerator, SemanticGenerator, SemanticNorm
from semanticgen.pipeline import SemanticGenPipeline
from semanticgen.rectified_flow import euler_sample, noise_augment, randn_per_sample

SEM_SHAPE = (2, 4, 4)  # Ts, Ss, dim (SemanticGenerator.Config.tiny: dim=4)
LATENT_SHAPE = (4, 3, 4, 6)  # C, T, H, W -> 9 frames of 16x24 through PixelVAE(4, 4)


def _parts(attention: str = "full"):
    torch.manual_seed(0)
    sem = SemanticGenerator(SemanticGenerator.Config.tiny())
    lat = LatentGenerator(LatentGenerator.Config(**{**vars(LatentGenerator.Config.tiny()), "attention": attention}))
    # adaLN-zero initialisation makes a fresh model's velocity exactly 0, which would hide wiring mistakes
    # (a pipeline ignoring text or z_sem would still pass); give the zero-initialised weights random values.
    with torch.no_grad():
        for model in (sem, lat):
            for param in model.parameters():
                if not param.any():
                    param.normal_(0.0, 0.1)
    return sem, lat, HashTextEncoder(dim=16, max_len=8), PixelVAE(temporal_factor=4, spatial_factor=4)


def _pipeline(attention: str = "full", noise_level: float = 0.1) -> SemanticGenPipeline:
    sem, lat, text, vae = _parts(attention)
    return SemanticGenPipeline(
        sem, lat, text, vae, sem_shape=SEM_SHAPE, latent_shape=LATENT_SHAPE, noise_level=noise_level
    )


@pytest.mark.parametrize("attention", ["full", "swin"])
def test_output_shape_range_and_reproducibility(attention):
    pipe = _pipeline(attention)
    frames = pipe(["a red square", "a blue circle"], steps=3, guidance=2.0, seed=7, progress=False)
    assert frames.shape == (2, 9, 3, 16, 24) and frames.dtype == torch.float32
    assert torch.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1
    again = pipe(["a red square", "a blue circle"], steps=3, guidance=2.0, seed=7, progress=False)
    assert torch.equal(frames, again)
    other = pipe(["a red square", "a blue circle"], steps=3, guidance=2.0, seed=8, progress=False)
    assert not torch.equal(frames, other)
    assert not torch.equal(frames[0], frames[1])  # prompts (and noise) differ per sample


def test_one_seed_per_prompt_makes_each_video_independent_of_its_batch():
    """``seed=[s0, s1]``: each video is the one its prompt gives alone with its seed, whatever the batch."""
    pipe = _pipeline("swin")
    prompts = ["a red square", "a blue circle", "a green triangle"]
    batched = pipe(prompts, steps=3, guidance=2.0, seed=[5, 9, 2], progress=False)
    pairs = pipe(prompts[1:], steps=3, guidance=2.0, seed=[9, 2], progress=False)
    for i, (prompt, seed) in enumerate(zip(prompts, [5, 9, 2])):
        alone = pipe([prompt], steps=3, guidance=2.0, seed=seed, progress=False)[0]
        torch.testing.assert_close(batched[i], alone, rtol=0, atol=1e-5)  # only batched-matmul rounding differs
        if i:
            torch.testing.assert_close(pairs[i - 1], alone, rtol=0, atol=1e-5)
    # the single-int seed keeps drawing the whole batch from one generator: the second video differs
    shared = pipe(prompts[:2], steps=3, guidance=2.0, seed=5, progress=False)
    assert (shared[1] - pipe([prompts[1]], steps=3, guidance=2.0, seed=5, progress=False)[0]).abs().max() > 1e-3


def test_randn_per_sample_draws_each_sample_from_its_own_generator():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    noise = randn_per_sample((2, 3, 5), gens)
    for i, s in enumerate((1, 2)):
        assert torch.equal(noise[i : i + 1], torch.randn((1, 3, 5), generator=torch.Generator().manual_seed(s)))
    one = torch.Generator().manual_seed(1)
    assert torch.equal(
        randn_per_sample((2, 3, 5), one), torch.randn((2, 3, 5), generator=torch.Generator().manual_seed(1))
    )
    with pytest.raises(ValueError, match="one generator per sample"):
        randn_per_sample((3, 5), gens)
    with pytest.raises(TypeError, match="torch.Generator"):
        randn_per_sample((2, 5), [gens[0], 3])
    z = torch.zeros(2, 4)
    assert torch.equal(
        noise_augment(z, 1.0, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])[1],
        torch.randn((1, 4), generator=torch.Generator().manual_seed(2))[0],
    )


def test_matches_manual_two_stage_composition():
    """The pipeline equals stage 1 -> noise augmentation -> stage 2 -> decode written out by hand."""
    pipe = _pipeline(noise_level=0.3)
    frames, mid = pipe(
        ["a red square"], steps=(3, 2), guidance=(2.0, 1.5), seed=3, progress=False, return_intermediates=True
    )

    sem, lat, text_enc, vae = pipe.semantic_generator, pipe.latent_generator, pipe.text_encoder, pipe.vae
    text, mask = text_enc.encode(["a red square"])
    null, null_mask = text_enc.encode([""])
    gen = torch.Generator().manual_seed(3)
    z_sem = euler_sample(
        lambda z, t: sem(z, t, text, mask),
        torch.randn(1, *SEM_SHAPE, generator=gen),
        steps=3,
        guidance=2.0,
        uncond_fn=lambda z, t: sem(z, t, null, null_mask),
        progress=False,
    )
    z_aug = noise_augment(z_sem, 0.3, generator=gen)
    latents = euler_sample(
        lambda x, t: lat(x, t, text, mask, z_aug),
        torch.randn(1, *LATENT_SHAPE, generator=gen),
        steps=2,
        guidance=1.5,
        uncond_fn=lambda x, t: lat(x, t, null, null_mask, z_aug),
        progress=False,
    )
    torch.testing.assert_close(mid["z_sem"], z_sem, atol=0, rtol=0)
    torch.testing.assert_close(mid["z_sem_augmented"], z_aug, atol=0, rtol=0)
    torch.testing.assert_close(mid["latents"], latents, atol=0, rtol=0)
    torch.testing.assert_close(frames, vae.decode(latents).clamp(0, 1), atol=0, rtol=0)
    assert not torch.equal(z_aug, z_sem)


def test_stage_one_samples_are_denormalised_with_the_trained_statistics():
    """With ``sem_norm`` stage 1 samples in the normalised space it was trained in; what reaches stage 2 (and
    ``z_sem``) is mapped back to the compressor's space, channel by channel."""
    sem, lat, text, vae = _parts()
    norm = SemanticNorm((0.5, -1.0, 2.0, 0.0), (0.3, 2.0, 1.0, 0.1))
    plain = SemanticGenPipeline(sem, lat, text, vae, sem_shape=SEM_SHAPE, latent_shape=LATENT_SHAPE)
    normed = SemanticGenPipeline(sem, lat, text, vae, sem_shape=SEM_SHAPE, latent_shape=LATENT_SHAPE, sem_norm=norm)
    kw = {"steps": 2, "guidance": 2.0, "seed": 0, "progress": False, "return_intermediates": True, "decode": False}
    _, raw = plain(["a red square"], **kw)
    _, mapped = normed(["a red square"], **kw)
    torch.testing.assert_close(mapped["z_sem"], norm.denormalize(raw["z_sem"]), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(mapped["latents"], raw["latents"])  # stage 2 saw the de-normalised tokens


def test_prompt_and_guidance_change_the_result():
    pipe = _pipeline()
    kw = {"steps": 2, "seed": 0, "progress": False, "return_intermediates": True}
    _, red = pipe(["a red square"], guidance=1.0, **kw)
    _, blue = pipe(["a blue circle"], guidance=1.0, **kw)
    _, red_guided = pipe(["a red square"], guidance=3.0, **kw)
    for key in ("z_sem", "latents"):  # same seed, so only the text / guidance differ
        assert (red[key] - blue[key]).abs().max() > 1e-3
        assert (red[key] - red_guided[key]).abs().max() > 1e-3


def test_stage_two_depends_on_semantic_tokens():
    pipe = _pipeline()
    cond, _ = pipe.encode_prompts(["a red square"], guided=False)
    z_a, z_b = torch.randn(2, 1, *SEM_SHAPE).unbind(0)
    kw = {"steps": 2, "guidance": 1.0}
    lat_a = pipe.sample_latents(cond, None, z_a, generator=torch.Generator().manual_seed(0), **kw)
    lat_b = pipe.sample_latents(cond, None, z_b, generator=torch.Generator().manual_seed(0), **kw)
    assert (lat_a - lat_b).abs().max() > 1e-4


def test_progress_bar_counts_every_denoising_step(capsys):
    pipe = _pipeline()
    pipe(["a red square"], steps=(3, 2), guidance=2.0, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "stage 2 (latents)" in err and "5/5" in err


def test_writes_a_readable_video(tmp_path):
    from semanticgen.video import read_video, save_video

    frames = _pipeline()(["a red square"], steps=2, seed=0, progress=False)
    path = save_video(frames[0], tmp_path / "out.mp4", fps=24)
    decoded, fps = read_video(path)
    assert decoded.shape == (9, 3, 16, 24) and fps == pytest.approx(24)


def test_rejects_incompatible_parts():
    sem, lat, text, vae = _parts()
    with pytest.raises(ValueError, match="semantic_generator dim"):
        SemanticGenPipeline(sem, lat, text, vae, sem_shape=(2, 4, 8), latent_shape=LATENT_SHAPE)
    with pytest.raises(ValueError, match="text_dim"):
        SemanticGenPipeline(sem, lat, HashTextEncoder(dim=32), vae, sem_shape=SEM_SHAPE, latent_shape=LATENT_SHAPE)
    with pytest.raises(ValueError, match="VAE latent_channels"):
        SemanticGenPipeline(sem, lat, text, PixelVAE(latent_channels=3), sem_shape=SEM_SHAPE, latent_shape=LATENT_SHAPE)
    with pytest.raises(ValueError, match="patch"):
        SemanticGenPipeline(sem, lat, text, vae, sem_shape=SEM_SHAPE, latent_shape=(4, 3, 5, 6))
    with pytest.raises(ValueError, match="latent_shape"):
        SemanticGenPipeline(sem, lat, text, vae, sem_shape=SEM_SHAPE, latent_shape=(4, 3, 4))
    with pytest.raises(ValueError, match="noise_level"):
        SemanticGenPipeline(sem, lat, text, vae, sem_shape=SEM_SHAPE, latent_shape=LATENT_SHAPE, noise_level=1.5)
    with pytest.raises(ValueError, match="sem_shift"):
        SemanticGenPipeline(sem, lat, text, vae, sem_shape=SEM_SHAPE, latent_shape=LATENT_SHAPE, sem_shift=0.0)
    with pytest.raises(ValueError, match="latent_shift"):
        SemanticGenPipeline(sem, lat, text, vae, sem_shape=SEM_SHAPE, latent_shape=LATENT_SHAPE, latent_shift=True)
    with pytest.raises(TypeError, match="sem_norm"):
        SemanticGenPipeline(sem, lat, text, vae, sem_shape=SEM_SHAPE, latent_shape=LATENT_SHAPE, sem_norm=(0.0, 1.0))
    with pytest.raises(ValueError, match="sem_norm has 2 channels"):
        bad = SemanticNorm((0.0, 0.0), (1.0, 1.0))
        SemanticGenPipeline(sem, lat, text, vae, sem_shape=SEM_SHAPE, latent_shape=LATENT_SHAPE, sem_norm=bad)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"prompts": []}, TypeError),
        ({"prompts": [1]}, TypeError),
        ({"prompts": ["x"], "steps": 0}, ValueError),
        ({"prompts": ["x"], "steps": (1, 2, 3)}, ValueError),
        ({"prompts": ["x"], "guidance": "high"}, TypeError),
        ({"prompts": ["x"], "seed": 1.5}, TypeError),
        ({"prompts": ["x", "y"], "seed": [1]}, ValueError),
        ({"prompts": ["x"], "seed": [True]}, TypeError),
    ],
)
def test_rejects_bad_call_arguments(kwargs, error):
    pipe = _pipeline()
    prompts = kwargs.pop("prompts")
    with pytest.raises(error):
        pipe(prompts, progress=False, **kwargs)
