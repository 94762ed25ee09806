"""Weight-free encoders, the text encoders and the factories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import require_dev_extra

from semanticgen.encoders import (
    HashTextEncoder,
    PixelSemanticEncoder,
    PixelVAE,
    SemanticEncoder,
    TextEncoder,
    VideoVAE,
    build_semantic_encoder,
    build_text_encoder,
    build_vae,
)


def _video(b=1, f=9, h=32, w=48, seed=0):
    return torch.rand(b, f, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- PixelVAE
@pytest.mark.parametrize(("causal", "frames", "latent_frames"), [(True, 17, 5), (True, 1, 1), (False, 16, 4)])
def test_pixel_vae_shapes(causal, frames, latent_frames):
    vae = PixelVAE(causal=causal)
    assert isinstance(vae, VideoVAE)
    z = vae.encode(_video(2, frames, 32, 48))
    assert z.shape == (2, 4, latent_frames, 4, 6)
    assert vae.latent_frames(frames) == latent_frames
    assert vae.video_frames(latent_frames) == frames
    assert vae.decode(z).shape == (2, frames, 3, 32, 48)


def test_pixel_vae_nearest_decode_matches_pooled_reference():
    """Nearest decoding returns each frame group's space-time average, computed here independently in float64."""
    video = _video(1, 9, 16, 24).double()
    vae = PixelVAE(temporal_factor=4, spatial_factor=8, latent_channels=3, decode_mode="nearest")
    out = vae.decode(vae.encode(video))
    pooled = F.avg_pool2d(video[0], 8)  # [F, 3, 2, 3]
    groups = [pooled[0:1], pooled[1:5].mean(0, keepdim=True), pooled[5:9].mean(0, keepdim=True)]
    expected = torch.cat([groups[0], groups[1].expand(4, -1, -1, -1), groups[2].expand(4, -1, -1, -1)])
    expected = expected.repeat_interleave(8, -2).repeat_interleave(8, -1)
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)


def test_pixel_vae_nearest_latents_roundtrip_exactly():
    vae = PixelVAE(latent_channels=6, decode_mode="nearest")
    z = vae.encode(_video())
    torch.testing.assert_close(vae.encode(vae.decode(z)), z, atol=1e-5, rtol=0)


def _smooth_reference(z: torch.Tensor) -> torch.Tensor:
    """What re-encoding a linear decode does to causal ``tf = 4`` latents with ``T' = 5``, written out by hand.

    Space: ``[1/8, 3/4, 1/8]`` along each axis, edges replicated (bilinear up-sampling, then 4x4 means). Time: frame
    0 is latent 0's own; frames 1-2 lie between centres 0 and 2.5, frames 3..14 between centres ``4k - 1.5``, and
    frames 15-16 continue the last segment's line, so the group means are these rows.
    """
    time = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0, 0.0],
            [0.2, 0.675, 0.125, 0.0, 0.0],
            [0.0, 0.125, 0.75, 0.125, 0.0],
            [0.0, 0.0, 0.125, 0.75, 0.125],
            [0.0, 0.0, 0.0, 0.0, 1.0],
        ],
        dtype=torch.float64,
    )
    out = torch.einsum("st,bcthw->bcshw", time, z.double())
    kernel = torch.tensor([0.125, 0.75, 0.125], dtype=torch.float64)
    for dim in (3, 4):
        padded = torch.cat([out.narrow(dim, 0, 1), out, out.narrow(dim, out.shape[dim] - 1, 1)], dim=dim)
        n = out.shape[dim]
        out = sum(kernel[i] * padded.narrow(dim, i, n) for i in range(3))
    return out


def test_pixel_vae_linear_decode_reencodes_to_smoothed_latents():
    """Linear decode, then encode: the fixed low-pass of the docstring (no clamping: colours stay inside [0, 1])."""
    vae = PixelVAE(temporal_factor=4, spatial_factor=4, latent_channels=3)
    z = 0.2 * torch.rand(2, 3, 5, 4, 6, generator=torch.Generator().manual_seed(1)) - 0.1
    decoded = vae.decode(z)
    assert decoded.shape == (2, 17, 3, 16, 24) and decoded.min() > 0.0 and decoded.max() < 1.0
    torch.testing.assert_close(vae.encode(decoded), _smooth_reference(z).float(), atol=1e-6, rtol=0)
    # Latents constant over space and time come back exactly, as a constant video.
    flat = torch.full_like(z, 0.05)
    torch.testing.assert_close(vae.encode(vae.decode(flat)), flat.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(vae.decode(flat), vae.decode(flat)[:, :1, :, :1, :1].expand_as(vae.decode(flat)))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_pixel_vae_linear_decode_of_a_moving_shape_changes_every_frame(causal):
    """No two consecutive decoded frames are equal (the nearest decode repeats each latent frame 4 times)."""
    from semanticgen.data.synthetic import SyntheticShapes

    frames = 17 if causal else 16
    data = SyntheticShapes(4, height=32, width=32, vae_frames=frames, vae_fps=6.4, seed=3)
    video = torch.stack([data[i]["vae_video"] for i in range(4)])
    for mode, all_differ in (("linear", True), ("nearest", False)):
        vae = PixelVAE(spatial_factor=4, causal=causal, decode_mode=mode)
        out = vae.decode(vae.encode(video))
        step = (out[:, 1:] - out[:, :-1]).abs().amax(dim=(2, 3, 4))  # [B, F - 1]
        assert bool((step > 1e-3).all()) == all_differ, (mode, step.min())


def test_pixel_vae_rejects_unknown_decode_mode():
    with pytest.raises(ValueError, match="decode_mode must be one of \\('linear', 'nearest'\\), got 'cubic'"):
        PixelVAE(decode_mode="cubic")


@pytest.mark.parametrize(
    ("shape", "error", "match"),
    [
        ((1, 8, 3, 32, 48), ValueError, "1 \\+ k \\* 4"),
        ((1, 9, 3, 30, 48), ValueError, "multiples of 8"),
        ((1, 9, 4, 32, 48), ValueError, "\\[B, F, 3, H, W\\]"),
        ((9, 3, 32, 48), ValueError, "\\[B, F, 3, H, W\\]"),
    ],
    ids=["F=8", "H=30", "C=4", "rank4"],
)
def test_pixel_vae_rejects_bad_video(shape, error, match):
    with pytest.raises(error, match=match):
        PixelVAE().encode(torch.rand(shape))


def test_pixel_vae_rejects_integer_video_and_bad_latents():
    with pytest.raises(TypeError, match="floating-point"):
        PixelVAE().encode(torch.zeros(1, 9, 3, 32, 48, dtype=torch.uint8))
    with pytest.raises(ValueError, match="latents"):
        PixelVAE().decode(torch.zeros(1, 3, 2, 4, 4))


def test_pixel_vae_latent_normalisation_scales_encode_and_inverts_in_decode():
    """Per-channel ``(pooled - mean) / std`` on encode, computed here from an unnormalised VAE; decode undoes it."""
    video = _video(2, 9, 16, 24)
    mean, std = [-0.7, 0.05, -0.02, 0.24], [0.2, 0.095, 0.1, 0.175]
    plain = PixelVAE(spatial_factor=8)
    normed = PixelVAE(spatial_factor=8, latents_mean=mean, latents_std=std)
    z = normed.encode(video)
    expected = (plain.encode(video) - torch.tensor(mean).view(1, 4, 1, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normed.decode(z), plain.decode(plain.encode(video)), atol=1e-5, rtol=0)
    # One float applies to every channel.
    scalar = PixelVAE(spatial_factor=8, latents_mean=0.5, latents_std=0.25)
    torch.testing.assert_close(scalar.encode(video), (plain.encode(video) - 0.5) * 4.0, atol=1e-5, rtol=1e-5)


def test_pixel_vae_normalised_latents_of_synthetic_clips_are_unit_scale():
    """The statistics set in configs/tiny_long.toml bring the synthetic shapes' latents to about zero mean, unit std."""
    from semanticgen.data.synthetic import SyntheticShapes
    from semanticgen.train.config import read_config_file

    cfg = read_config_file(Path(__file__).resolve().parents[1] / "configs" / "tiny_long.toml")
    data = cfg["data"]
    ds = SyntheticShapes(
        128,
        height=data["height"],
        width=data["width"],
        vae_frames=data["vae_frames"],
        vae_fps=data["vae_fps"],
        seed=cfg["seed"],
    )
    vae = build_vae(cfg["encoders"]["vae"])
    z = torch.cat([vae.encode(ds[i]["vae_video"][None]) for i in range(len(ds))])
    per_channel_mean, per_channel_std = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
    assert per_channel_mean.abs().max() < 0.2, per_channel_mean
    assert ((per_channel_std > 0.8) & (per_channel_std < 1.25)).all(), per_channel_std


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"latents_std": 0.0}, ValueError, "latents_std must be positive finite"),
        ({"latents_std": [1.0, 1.0, -1.0, 1.0]}, ValueError, "latents_std must be positive finite"),
        ({"latents_mean": float("nan")}, ValueError, "latents_mean must be finite"),
        ({"latents_mean": [0.0, 0.0, 0.0]}, ValueError, "4 floats \\(one per latent channel\\), got \\[0.0"),
        ({"latents_std": [1.0, 1.0, True, 1.0]}, ValueError, "4 floats"),
        ({"latents_std": "1.0"}, TypeError, "sequence of floats, got str"),
        ({"latents_mean": None}, TypeError, "got NoneType"),
    ],
    ids=["std=0", "std<0", "mean=nan", "mean-3-of-4", "std-bool", "std-str", "mean-None"],
)
def test_pixel_vae_rejects_bad_normalisation(kwargs, error, match):
    with pytest.raises(error, match=match):
        PixelVAE(**kwargs)


# ----------------------------------------------------------------------------------- PixelSemanticEncoder
def test_pixel_semantic_encoder_shape_and_determinism():
    enc = PixelSemanticEncoder(out_dim=16)
    assert isinstance(enc, SemanticEncoder)
    video = _video(2, 4, 56, 84)
    out = enc.encode(video)
    assert out.shape == (2, 2, 2 * 3, 16)
    torch.testing.assert_close(PixelSemanticEncoder(out_dim=16).encode(video), out, atol=0, rtol=0)
    assert not torch.equal(PixelSemanticEncoder(out_dim=16, seed=1).encode(video), out)


def test_pixel_semantic_encoder_is_local_and_raster_ordered():
    """Changing one 28x28 cell of one frame pair changes exactly that token."""
    enc = PixelSemanticEncoder(out_dim=8)
    video = _video(1, 4, 56, 84)
    edited = video.clone()
    edited[0, 2:4, :, 28:56, 56:84] = 1.0 - edited[0, 2:4, :, 28:56, 56:84]  # frame pair 1, row 1, column 2
    changed = (enc.encode(edited) - enc.encode(video)).abs().amax(-1) > 1e-6
    expected = torch.zeros(1, 2, 6, dtype=torch.bool)
    expected[0, 1, 1 * 3 + 2] = True
    assert torch.equal(changed, expected)


def test_pixel_semantic_encoder_sees_motion():
    enc = PixelSemanticEncoder(out_dim=8)
    still = _video(1, 2, 28, 28)[:, :1].expand(1, 2, 3, 28, 28).contiguous()
    moving = still.clone()
    moving[:, 1] = moving[:, 1].roll(7, dims=-1)
    assert not torch.allclose(enc.encode(still), enc.encode(moving))


def _shape_clips(n: int = 60):
    from semanticgen.data.synthetic import SyntheticShapes

    data = SyntheticShapes(n, height=32, width=32, vae_frames=5, sem_frames=4, seed=7)
    return [data[i]["sem_video"] for i in range(n)], [data.describe(i)["shape"] for i in range(n)]


def test_object_descriptors_tell_the_three_shapes_apart():
    """Fill ratio and vertical asymmetry of rendered squares, discs and upward triangles fall in disjoint ranges,
    so a frame's shape is read off its two descriptors without error."""
    from semanticgen.encoders.pixel import object_descriptors

    videos, shapes = _shape_clips()
    desc = object_descriptors(torch.stack(videos))  # [n, 4, 2]
    assert desc.shape == (len(videos), 4, 2)
    fill, asym = desc[..., 0], desc[..., 1]
    by = {s: [i for i, x in enumerate(shapes) if x == s] for s in ("square", "circle", "triangle")}
    assert all(len(v) >= 10 for v in by.values())
    sq, ci, tr = (by[s] for s in ("square", "circle", "triangle"))
    assert fill[sq].min() > 0.99 and asym[sq].abs().max() < 1e-6
    assert fill[ci].min() > 0.65 and fill[ci].max() < 0.95 and asym[ci].abs().max() < 0.05
    assert fill[tr].max() < 0.7 and asym[tr].min() > 0.08
    # Circle and triangle fills meet near 0.68 on the smallest, coarsest-rastered shapes; asymmetry parts them.
    predicted = torch.where(fill > 0.97, 0, torch.where(asym > 0.065, 2, 1))
    truth = torch.tensor([("square", "circle", "triangle").index(s) for s in shapes])[:, None]
    assert torch.equal(predicted, truth.expand_as(predicted))


def test_object_descriptors_of_an_empty_frame_are_zero():
    from semanticgen.encoders.pixel import object_descriptors

    assert torch.equal(object_descriptors(torch.full((1, 2, 3, 16, 16), 0.1)), torch.zeros(1, 2, 2))


def test_pixel_semantic_encoder_object_context_reaches_every_token():
    """With ``object_context`` the tokens of cells far from the object change with its shape; without, they do not."""
    video = torch.full((1, 2, 3, 32, 32), 0.1)
    video[..., 2:10, 2:10] = 0.9  # a square inside the top-left 16 x 16 cell
    edited = torch.full_like(video, 0.1)
    for row in range(8):  # an upward triangle in the same box
        half = (row + 1) // 2
        edited[..., 2 + row, 6 - half : 6 + half] = 0.9
    local = PixelSemanticEncoder(out_dim=8, patch=16)
    context = PixelSemanticEncoder(out_dim=8, patch=16, object_context=True)
    assert context.encode(video).shape == local.encode(video).shape == (1, 1, 4, 8)
    changed_local = (local.encode(edited) - local.encode(video)).abs().amax(-1)[0, 0] > 1e-6
    changed_context = (context.encode(edited) - context.encode(video)).abs().amax(-1)[0, 0] > 1e-6
    assert changed_local.tolist() == [True, False, False, False]
    assert changed_context.tolist() == [True, True, True, True]


def test_pixel_semantic_encoder_rejects_non_bool_object_context():
    with pytest.raises(TypeError, match="object_context must be a bool"):
        PixelSemanticEncoder(object_context=1)


@pytest.mark.parametrize(("shape", "match"), [((1, 3, 3, 56, 56), "multiple of 2"), ((1, 4, 3, 56, 60), "28")])
def test_pixel_semantic_encoder_rejects_bad_video(shape, match):
    with pytest.raises(ValueError, match=match):
        PixelSemanticEncoder().encode(torch.rand(shape))


# -------------------------------------------------------------------------------------- HashTextEncoder
def test_hash_text_encoder_distinguishes_prompts_and_is_deterministic():
    enc = HashTextEncoder(dim=32, max_len=16)
    assert isinstance(enc, TextEncoder)
    emb, mask = enc.encode(["red square", "blue circle", "square red", ""])
    assert emb.shape == (4, 16, 32) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [3, 3, 3, 1]
    assert (emb[0] - emb[1]).abs().max() > 0.5
    assert (emb[0] - emb[2]).abs().max() > 0.1  # word order matters
    assert torch.all(emb[~mask] == 0)
    emb2, mask2 = HashTextEncoder(dim=32, max_len=16).encode(["red square", "blue circle", "square red", ""])
    assert torch.equal(emb, emb2) and torch.equal(mask, mask2)
    # case and spacing do not matter; the seed does
    torch.testing.assert_close(enc.encode(["Red   SQUARE"])[0], emb[:1], atol=0, rtol=0)
    assert not torch.equal(HashTextEncoder(dim=32, max_len=16, seed=3).encode(["red square"])[0], emb[:1])


def test_hash_text_encoder_truncates_keeping_end_token():
    enc = HashTextEncoder(dim=8, max_len=4)
    emb, mask = enc.encode(["one two three four five six"])
    assert mask.tolist() == [[True, True, True, True]]
    torch.testing.assert_close(emb[0, 3] - enc.positions[3], enc.token_embedding("</s>"))


def test_text_encoders_reject_bad_prompts():
    enc = HashTextEncoder(dim=8, max_len=4)
    with pytest.raises(TypeError, match="single str"):
        enc.encode("a cat")
    with pytest.raises(ValueError, match="empty"):
        enc.encode([])
    with pytest.raises(TypeError, match="list of str"):
        enc.encode([1, 2])


# ------------------------------------------------------------------------------------------- factories
def test_factories_build_weight_free_encoders():
    vae = build_vae({"kind": "pixel", "temporal_factor": 2, "spatial_factor": 4, "latent_channels": 3})
    assert (vae.temporal_factor, vae.spatial_factor, vae.latent_channels) == (2, 4, 3)
    sem = build_semantic_encoder({"kind": "pixel", "out_dim": 12})
    assert sem.out_dim == 12 and sem.temporal_factor == 2 and sem.spatial_factor == 28
    text = build_text_encoder({"kind": "hash", "dim": 24, "max_len": 8})
    assert text.dim == 24 and text.max_len == 8


@pytest.mark.parametrize(
    ("builder", "spec", "match"),
    [
        (build_vae, {"kind": "sd"}, "unknown kind 'sd'"),
        (build_vae, {"temporal_factor": 4}, "unknown kind None"),
        (build_vae, {"kind": "pixel", "tempral_factor": 4}, "unknown key\\(s\\) \\['tempral_factor'\\]"),
        (build_text_encoder, {"kind": "hf"}, "needs key\\(s\\) \\['path'\\]"),
        (build_semantic_encoder, {"kind": "qwen"}, "needs key\\(s\\) \\['path'\\]"),
        (build_text_encoder, {"kind": "hash", "width": 3}, "'width'"),
        (build_text_encoder, {"kind": "t5"}, "unknown kind 't5'"),
    ],
)
def test_factories_reject_bad_specs(builder, spec, match):
    with pytest.raises(ValueError, match=match):
        builder(spec)


def test_factories_reject_non_dict():
    with pytest.raises(TypeError, match="dict"):
        build_vae("pixel")


# ---------------------------------------------------------------------------------------- HFTextEncoder
WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "square", "blue", "circle", "moving", "right"]


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    """A tiny random T5 encoder and a word-level tokenizer, written locally (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    path = tmp_path_factory.mktemp("t5")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    T5EncoderModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_hf_text_encoder_matches_direct_t5_encoder(tiny_t5_dir):
    from transformers import T5EncoderModel

    from semanticgen.encoders import HFTextEncoder

    enc = HFTextEncoder.from_pretrained(tiny_t5_dir, max_len=8)
    assert isinstance(enc, TextEncoder) and enc.dim == 16
    assert type(enc.model).__name__ == "T5EncoderModel"
    prompts = ["a red square", "blue circle moving right", ""]
    emb, mask = enc.encode(prompts)
    assert emb.shape == (3, 8, 16) and emb.dtype == torch.float32
    assert mask.sum(1).tolist() == [4, 5, 1]  # words + </s>

    ids = torch.tensor(
        [[WORDS.index(w) for w in p.split()] + [1] + [0] * (7 - len(p.split())) for p in prompts], dtype=torch.long
    )
    model = T5EncoderModel.from_pretrained(tiny_t5_dir).eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state * mask[..., None]
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=1e-5)
    assert torch.all(emb[~mask] == 0)


def test_hf_text_encoder_via_factory_and_errors(tiny_t5_dir, tmp_path):
    from semanticgen.encoders import HFTextEncoder

    enc = build_text_encoder({"kind": "hf", "path": str(tiny_t5_dir), "max_len": 6})
    assert isinstance(enc, HFTextEncoder) and enc.encode(["a"])[0].shape == (1, 6, 16)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        HFTextEncoder.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="max_len"):
        HFTextEncoder.from_pretrained(tiny_t5_dir, max_len=0)


# ----------------------------------------------------------------------------------------------- WanVAE
LATENTS_MEAN = [0.1, -0.2, 0.3, 0.0]
LATENTS_STD = [1.5, 0.5, 2.0, 1.0]


@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    """A tiny random AutoencoderKLWan (4x time, 8x space, 4 latent channels) saved as a pipeline's ``vae/``."""
    diffusers = require_dev_extra("diffusers")
    path = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    )
    vae.save_pretrained(path / "vae")
    return path


def test_wan_vae_matches_diffusers_with_normalisation(tiny_wan_dir):
    from diffusers import AutoencoderKLWan

    from semanticgen.encoders import WanVAE

    vae = WanVAE.from_pretrained(tiny_wan_dir)  # finds the vae/ folder
    assert isinstance(vae, VideoVAE)
    assert (vae.latent_channels, vae.temporal_factor, vae.spatial_factor) == (4, 4, 8)
    video = _video(1, 5, 16, 24)
    latents = vae.encode(video)
    assert latents.shape == (1, 4, 2, 2, 3) and vae.latent_frames(5) == 2

    ref = AutoencoderKLWan.from_pretrained(tiny_wan_dir / "vae").eval()
    mean = torch.tensor(LATENTS_MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        raw = ref.encode(video.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()
        torch.testing.assert_close(latents, (raw - mean) / std, atol=1e-5, rtol=1e-5)
        decoded = vae.decode(latents)
        expected = (ref.decode(raw).sample.permute(0, 2, 1, 3, 4) + 1) / 2
    assert decoded.shape == (1, 5, 3, 16, 24) and vae.video_frames(2) == 5
    torch.testing.assert_close(decoded, expected.clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_wan_vae_factory_and_errors(tiny_wan_dir, tmp_path):
    from semanticgen.encoders import WanVAE

    vae = build_vae({"kind": "wan", "path": str(tiny_wan_dir), "subfolder": "vae"})
    assert isinstance(vae, WanVAE)
    with pytest.raises(ValueError, match="1 \\+ k \\* 4"):
        vae.encode(torch.rand(1, 4, 3, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.rand(1, 5, 3, 12, 16))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        WanVAE.from_pretrained(tmp_path)
