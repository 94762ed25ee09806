"""QwenVisionEncoder against transformers' own Qwen2.5-VL video processor and vision tower.

A tiny randomly initialised Qwen2.5-VL checkpoint is written by the test; nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import require_dev_extra

require_dev_extra("torchvision", "transformers' Qwen2-VL video processor needs it")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # noqa: E402

from semanticgen.encoders import SemanticEncoder, build_semantic_encoder  # noqa: E402
from semanticgen.encoders.qwen_vision import CLIP_MEAN, CLIP_STD, QwenVisionEncoder  # noqa: E402

CUSTOM_MEAN = [0.5, 0.4, 0.3]
CUSTOM_STD = [0.2, 0.25, 0.3]


def _tiny_config() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        vision_config={
            "depth": 3,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 48,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            # 56 px = 2x2 merged tokens per window, so windowed layers reorder tokens on the test frames
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        text_config={
            "hidden_size": 48,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": 128,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        },
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Directory with a tiny Qwen2.5-VL checkpoint and a video processor using non-default mean/std."""
    path = tmp_path_factory.mktemp("qwen25vl")
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(_tiny_config())
    with torch.no_grad():  # larger weights than the default init, so a layout error shows as a large difference
        for name, param in model.named_parameters():
            if "visual" in name and param.dim() > 1:
                param.normal_(0.0, 0.15)
    model.save_pretrained(path)
    Qwen2VLVideoProcessor(image_mean=CUSTOM_MEAN, image_std=CUSTOM_STD).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference_model(checkpoint):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()


def _frames(b: int, f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, f, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _reference(model, frames_u8: torch.Tensor, mean, std) -> torch.Tensor:
    """transformers' processor (videos input, no resize) + the model's vision tower -> [B, F/2, S, d]."""
    processor = Qwen2VLVideoProcessor(image_mean=mean, image_std=std)
    feats = processor(videos=list(frames_u8), do_resize=False, cap_pixels_per_frame=False, return_tensors="pt")
    with torch.no_grad():
        per_video = model.get_video_features(feats["pixel_values_videos"], feats["video_grid_thw"]).pooler_output
    b, f, _, h, w = frames_u8.shape
    return torch.stack(list(per_video)).reshape(b, f // 2, (h // 28) * (w // 28), -1)


# Tight tolerance: both sides run the same float32 ops; measured max difference ~1e-7 on outputs of size ~1.
TOL = {"atol": 2e-5, "rtol": 2e-5}


@pytest.mark.parametrize(("b", "f", "h", "w"), [(1, 2, 56, 56), (2, 4, 112, 168), (1, 6, 84, 140)])
def test_matches_transformers_processor_and_tower(checkpoint, reference_model, b, f, h, w):
    enc = QwenVisionEncoder.from_pretrained(checkpoint)
    assert isinstance(enc, SemanticEncoder)
    assert (enc.out_dim, enc.temporal_factor, enc.spatial_factor) == (48, 2, 28)
    frames = _frames(b, f, h, w)
    out = enc.encode(frames.float() / 255.0)
    assert out.shape == (b, f // 2, (h // 28) * (w // 28), 48)
    expected = _reference(reference_model, frames, CUSTOM_MEAN, CUSTOM_STD)
    torch.testing.assert_close(out, expected, **TOL)
    # The comparison can fail: CLIP statistics instead of the checkpoint's give a clearly different result.
    wrong = _reference(reference_model, frames, list(CLIP_MEAN), list(CLIP_STD))
    assert (wrong - expected).abs().max() > 100 * TOL["atol"]


def test_bfloat16_matches_transformers_in_bfloat16(checkpoint):
    """Loading in bf16 keeps the RoPE frequencies in fp32 like transformers does; measured difference: 0."""
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    enc = QwenVisionEncoder.from_pretrained(checkpoint, dtype="bfloat16")
    assert enc.dtype == torch.bfloat16 and enc.model.rotary_pos_emb.inv_freq.dtype == torch.float32
    frames = _frames(1, 4, 56, 84, seed=4)
    out = enc.encode(frames.float() / 255.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _reference(reference, frames, CUSTOM_MEAN, CUSTOM_STD))  # bf16 default tolerance


def test_batch_chunking_gives_same_result(checkpoint):
    frames = _frames(3, 2, 56, 84, seed=1).float() / 255.0
    full = QwenVisionEncoder.from_pretrained(checkpoint).encode(frames)
    chunked = QwenVisionEncoder.from_pretrained(checkpoint, batch_chunk=2).encode(frames)
    torch.testing.assert_close(chunked, full, **TOL)


def test_default_normalisation_without_preprocessor_config(checkpoint, reference_model, tmp_path):
    for name in ("config.json", "model.safetensors"):
        os.symlink(checkpoint / name, tmp_path / name)
    enc = QwenVisionEncoder.from_pretrained(tmp_path)
    assert enc.normalisation_source == "default (OpenAI CLIP)"
    assert QwenVisionEncoder.from_pretrained(checkpoint).normalisation_source == "video_preprocessor_config.json"
    frames = _frames(1, 2, 56, 84, seed=2)
    expected = _reference(reference_model, frames, list(CLIP_MEAN), list(CLIP_STD))
    torch.testing.assert_close(enc.encode(frames.float() / 255.0), expected, **TOL)


def _split_checkpoint(checkpoint, target, *, rename=None):
    """Write the checkpoint as two shards (vision / everything else) with an index; return the LM shard path."""
    state = load_file(checkpoint / "model.safetensors")
    if rename is not None:
        state = {rename(k): v for k, v in state.items()}
    vision = {k: v for k, v in state.items() if "visual." in k}
    other = {k: v for k, v in state.items() if "visual." not in k}
    assert vision and other
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_file(vision, target / names[0])
    save_file(other, target / names[1])
    weight_map = {k: names[0] for k in vision} | {k: names[1] for k in other}
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", "video_preprocessor_config.json"):
        os.symlink(checkpoint / name, target / name)
    return target / names[1]


@pytest.mark.parametrize("prefix", ["visual.", "model.visual."])
def test_sharded_checkpoint_never_reads_language_model_shard(checkpoint, tmp_path, prefix):
    def rename(key):
        if key.startswith("visual."):
            return prefix + key[len("visual.") :]
        return "model.language_model." + key[len("model.") :] if key.startswith("model.") else key

    lm_shard = _split_checkpoint(checkpoint, tmp_path, rename=rename)
    lm_shard.write_bytes(b"not a safetensors file")  # any attempt to open it would raise
    frames = _frames(1, 2, 56, 56, seed=3).float() / 255.0
    expected = QwenVisionEncoder.from_pretrained(checkpoint).encode(frames)
    torch.testing.assert_close(QwenVisionEncoder.from_pretrained(tmp_path).encode(frames), expected, atol=0, rtol=0)


def test_single_file_reads_only_vision_tensors(checkpoint, monkeypatch):
    import safetensors

    read: list[str] = []
    real_safe_open = safetensors.safe_open

    class CountingSafeOpen:
        def __init__(self, *args, **kwargs):
            self._inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self._file = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def keys(self):
            return self._file.keys()

        def get_tensor(self, name):
            read.append(name)
            return self._file.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", CountingSafeOpen)
    QwenVisionEncoder.from_pretrained(checkpoint)
    with real_safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        all_names = list(f.keys())
    vision_names = sorted(n for n in all_names if n.startswith("visual."))
    assert len(vision_names) < len(all_names)
    assert sorted(read) == vision_names


def test_factory_builds_qwen(checkpoint):
    enc = build_semantic_encoder({"kind": "qwen", "path": str(checkpoint), "dtype": "float32"})
    assert isinstance(enc, QwenVisionEncoder) and enc.out_dim == 48


@pytest.mark.parametrize(
    ("shape", "match"),
    [((1, 3, 3, 56, 56), "multiple of 2"), ((1, 2, 3, 56, 60), "multiples of 28"), ((1, 2, 1, 56, 56), "3, H, W")],
    ids=["F=3", "W=60", "C=1"],
)
def test_rejects_bad_video(checkpoint, shape, match):
    enc = QwenVisionEncoder.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match=match):
        enc.encode(torch.rand(shape))


def test_rejects_missing_or_wrong_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        QwenVisionEncoder.from_pretrained(tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a Qwen2.5-VL checkpoint"):
        QwenVisionEncoder.from_pretrained(tmp_path)


def test_from_pretrained_rejects_an_unknown_dtype_name(checkpoint):
    with pytest.raises(ValueError, match=r"QwenVisionEncoder.from_pretrained: dtype must be one of .*got 'bf17'"):
        QwenVisionEncoder.from_pretrained(checkpoint, dtype="bf17")
    assert QwenVisionEncoder.from_pretrained(checkpoint, dtype="bf16").dtype == torch.bfloat16
