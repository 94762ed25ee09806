"""Video and text encoders: the semantic encoder, the video VAE and the text encoder of both stages.

Weight-free encoders (:class:`PixelVAE`, :class:`PixelSemanticEncoder`, :class:`HashTextEncoder`) need no
checkpoint; :class:`LearnedVideoAE` is trained by a run as its first stage; checkpoint-backed ones load from local
directories only. Classes that import heavy optional libraries are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .factory import build_semantic_encoder, build_text_encoder, build_vae, check_encoder_paths
from .learned_vae import LearnedVideoAE, run_vae_spec
from .pixel import PixelSemanticEncoder, PixelVAE
from .protocols import SemanticEncoder, TextEncoder, VideoVAE, check_video
from .text import HashTextEncoder, HFTextEncoder

_LAZY = {"QwenVisionEncoder": ".qwen_vision", "WanVAE": ".wan_vae"}

__all__ = [
    "SemanticEncoder",
    "VideoVAE",
    "TextEncoder",
    "check_video",
    "PixelVAE",
    "LearnedVideoAE",
    "run_vae_spec",
    "PixelSemanticEncoder",
    "HashTextEncoder",
    "HFTextEncoder",
    "build_vae",
    "build_semantic_encoder",
    "build_text_encoder",
    "check_encoder_paths",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
