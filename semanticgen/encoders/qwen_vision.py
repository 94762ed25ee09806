"""The Qwen2.5-VL vision tower as a :class:`~semanticgen.encoders.SemanticEncoder`.

:meth:`QwenVisionEncoder.from_pretrained` reads a local Hugging Face Qwen2.5-VL checkpoint directory
(``config.json`` plus ``model.safetensors`` or a sharded ``model.safetensors.index.json``). It builds the
vision model from ``config.vision_config`` alone and reads only tensors named ``visual.*`` or
``model.visual.*``: the language model is never instantiated and its tensors (and shards holding
only them) are never opened. Nothing is fetched from the network.

The patch layout is done here, with the same maths as ``transformers``' Qwen2-VL video processor for an
input that needs no resizing: rescale to ``[0, 1]`` (the caller's job), normalise per channel, group
frames in temporal pairs, cut ``14 x 14`` patches and order them in ``2 x 2`` merge groups. The vision
tower's merged output is then already in raster order of the ``(H / 28) x (W / 28)`` grid of each pair.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch
from torch import nn

from semanticgen._checks import as_dtype, check_int

from .checkpoint_files import directory_problem, missing_one_of
from .protocols import check_video

__all__ = ["QwenVisionEncoder", "load_vision_state_dict", "VISION_PREFIXES", "CLIP_MEAN", "CLIP_STD"]

# OpenAI CLIP statistics: what Qwen2.5-VL's processors use, and the default when a directory has no
# preprocessor config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Original checkpoints name the tower "visual.*"; checkpoints saved by transformers' own Qwen2_5_VLModel
# layout use "model.visual.*". The longer prefix is tried first.
VISION_PREFIXES = ("model.visual.", "visual.")

_PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


def _vision_key(name: str) -> str | None:
    for prefix in VISION_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


def _checkpoint_files(path: str) -> Iterator[tuple[str, list[str] | None]]:
    """``(file, vision tensor names or None for "scan the file")`` for the files that hold vision tensors."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    single_path = os.path.join(path, "model.safetensors")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            if _vision_key(name) is not None:
                by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            yield os.path.join(path, file), names
    elif os.path.isfile(single_path):
        yield single_path, None
    else:
        raise FileNotFoundError(f"QwenVisionEncoder: no model.safetensors or model.safetensors.index.json in {path!r}")


def load_vision_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read only the vision tower's tensors from a Qwen2.5-VL checkpoint directory, prefixes stripped.

    Sharded checkpoints: only the shards that the index lists for vision tensors are opened, and only
    those tensors are read. Single file: the safetensors header is scanned and only vision tensors are read.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    state: dict[str, torch.Tensor] = {}
    for file, names in _checkpoint_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names if names is not None else f.keys():
                key = _vision_key(name)
                if key is None:
                    continue
                if key in state:
                    raise ValueError(f"QwenVisionEncoder: vision tensor {key!r} appears twice in {path!r}")
                state[key] = f.get_tensor(name)
    if not state:
        raise ValueError(
            f"QwenVisionEncoder: no vision tensors (names starting with {' or '.join(VISION_PREFIXES)}) in {path!r}"
        )
    return state


def _read_normalisation(path: str) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    for name in _PREPROCESSOR_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                cfg = json.load(f)
            if not cfg.get("do_normalize", True):
                return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), name
            mean = tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN))
            std = tuple(float(v) for v in cfg.get("image_std", CLIP_STD))
            if len(mean) != 3 or len(std) != 3:
                raise ValueError(f"QwenVisionEncoder: {file} has image_mean/std of length != 3")
            return mean, std, name
    return CLIP_MEAN, CLIP_STD, "default (OpenAI CLIP)"


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _no_init():
    """Skip random initialisation of parameters that the checkpoint overwrites anyway."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise, then overwrite
        return contextlib.nullcontext()
    return no_init_weights()


class QwenVisionEncoder(nn.Module):
    """Qwen2.5-VL vision tower: ``encode(video [B, F, 3, H, W] in [0, 1]) -> [B, F / 2, (H / 28) * (W / 28), d]``.

    ``H`` and ``W`` must be multiples of ``patch_size * merge_size`` (28) and ``F`` a multiple of the
    temporal patch size (2): the video is not resized or padded, so resize/crop beforehand.
    ``d`` is the tower's ``out_hidden_size`` (2048 for the 3B tower, 8192 for 72B).

    Args:
        vision_model: a ``transformers`` ``Qwen2_5_VisionTransformerPretrainedModel``.
        mean, std: per-channel normalisation applied to ``[0, 1]`` input.
        batch_chunk: at most this many videos per tower call (``None``: all at once), to bound memory.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        *,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
        batch_chunk: int | None = None,
    ) -> None:
        super().__init__()
        cfg = vision_model.config
        self.model = vision_model.eval().requires_grad_(False)
        self.patch_size = int(cfg.patch_size)
        self.merge_size = int(cfg.spatial_merge_size)
        self.temporal_factor = int(cfg.temporal_patch_size)
        self.spatial_factor = self.patch_size * self.merge_size
        self.out_dim = int(cfg.out_hidden_size)
        check_int("batch_chunk", batch_chunk, minimum=1, allow_none=True, who="QwenVisionEncoder")
        self.batch_chunk = batch_chunk
        self.normalisation_source = "given"  # or the preprocessor file it was read from (from_pretrained)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        batch_chunk: int | None = None,
    ) -> QwenVisionEncoder:
        """Build the tower from ``path/config.json``'s ``vision_config`` and load only its tensors.

        Args:
            path: local checkpoint directory.
            dtype: parameter dtype; ``None`` keeps the checkpoint config's dtype (float32 if it has none).
            device: where to put the tower.
            batch_chunk: see the class docstring.

        Normalisation comes from ``video_preprocessor_config.json`` or ``preprocessor_config.json`` in
        ``path`` when present, else Qwen's OpenAI-CLIP mean/std.
        """
        from transformers import AutoConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"QwenVisionEncoder.from_pretrained: {path!r} is not a directory")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        vision_config = getattr(config, "vision_config", None)
        if vision_config is None or getattr(vision_config, "model_type", None) != "qwen2_5_vl_vision":
            raise ValueError(
                f"QwenVisionEncoder: {path!r} is not a Qwen2.5-VL checkpoint "
                f"(config model_type {getattr(config, 'model_type', None)!r} has no qwen2_5_vl vision_config)"
            )
        name = "dtype"
        if dtype is None:
            dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
            name = "the checkpoint config's dtype"
        dtype = as_dtype(name, dtype, who="QwenVisionEncoder.from_pretrained")
        state = load_vision_state_dict(path)
        with _default_dtype(dtype), _no_init():
            model = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config, dtype=dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"QwenVisionEncoder: checkpoint {path!r} does not match its vision_config: "
                f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
            )
        mean, std, source = _read_normalisation(path)
        encoder = cls(model.to(device), mean=mean, std=std, batch_chunk=batch_chunk)
        encoder.normalisation_source = source
        return encoder

    @staticmethod
    def checkpoint_problem(path: str | os.PathLike) -> str | None:
        """What keeps :meth:`from_pretrained` from loading ``path`` (``"no config.json in it"``), or ``None``: a
        directory with ``config.json`` and ``model.safetensors`` or its shards' index. Whether the config is a
        Qwen2.5-VL's is :meth:`from_pretrained`'s to say (it needs ``transformers`` to read it)."""
        return (
            directory_problem(path)
            or missing_one_of(path, ("config.json",))
            or missing_one_of(path, ("model.safetensors", "model.safetensors.index.json"), "weights")
        )

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def patchify(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``video [B, F, 3, H, W]`` -> ``(patches [B * T * gh * gw, 3 * 2 * 14 * 14], grid_thw [B, 3])``.

        Patch rows run over ``(b, t, h // 2, w // 2, h % 2, w % 2)`` (2x2 merge groups in raster order);
        each row is ``(channel, frame-in-pair, y, x)``, the layout the tower's Conv3d patch embedding expects.
        """
        b, f, c, h, w = video.shape
        tp, p, m = self.temporal_factor, self.patch_size, self.merge_size
        gt, gh, gw = f // tp, h // p, w // p
        x = video.reshape(b, gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        patches = x.reshape(b * gt * gh * gw, c * tp * p * p)
        grid = torch.tensor([[gt, gh, gw]], dtype=torch.long, device=video.device).expand(b, 3)
        return patches, grid

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``video [B, F, 3, H, W]`` in ``[0, 1]`` -> ``[B, F / 2, (H / 28) * (W / 28), out_dim]`` (tower dtype)."""
        check_video(
            video, "QwenVisionEncoder.encode", frame_multiple=self.temporal_factor, spatial_multiple=self.spatial_factor
        )
        b, f, _, h, w = video.shape
        chunk = self.batch_chunk or b
        outputs = []
        for start in range(0, b, chunk):
            part = video[start : start + chunk].to(device=self.device, dtype=torch.float32)
            part = (part - self.mean) / self.std
            patches, grid = self.patchify(part)
            merged = self.model(patches.to(self.dtype), grid_thw=grid).pooler_output
            outputs.append(merged.reshape(part.shape[0], f // self.temporal_factor, -1, self.out_dim))
        return torch.cat(outputs)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.encode(video)
