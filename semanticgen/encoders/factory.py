"""Build encoders from config dicts: ``{"kind": ..., **keyword arguments of that kind}``.

Kinds:
    ``build_vae``: ``"pixel"`` (:class:`PixelVAE`), ``"wan"`` (:meth:`WanVAE.from_pretrained`, needs ``path``),
    ``"learned"`` (:meth:`LearnedVideoAE.from_pretrained`, needs ``path``: a ``vae.safetensors`` a run trained;
    training fills it in from the run directory, see ``semanticgen.encoders.learned_vae.run_vae_spec``).
    ``build_semantic_encoder``: ``"pixel"`` (:class:`PixelSemanticEncoder`), ``"qwen"``
    (:meth:`QwenVisionEncoder.from_pretrained`, needs ``path``).
    ``build_text_encoder``: ``"hash"`` (:class:`HashTextEncoder`), ``"hf"`` (:meth:`HFTextEncoder.from_pretrained`,
    needs ``path``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["build_vae", "build_semantic_encoder", "build_text_encoder"]

# kind -> (module relative to this package, attribute path of the builder)
_VAES = {
    "pixel": (".pixel", "PixelVAE"),
    "wan": (".wan_vae", "WanVAE.from_pretrained"),
    "learned": (".learned_vae", "LearnedVideoAE.from_pretrained"),
}
_SEMANTIC = {"pixel": (".pixel", "PixelSemanticEncoder"), "qwen": (".qwen_vision", "QwenVisionEncoder.from_pretrained")}
_TEXT = {"hash": (".text", "HashTextEncoder"), "hf": (".text", "HFTextEncoder.from_pretrained")}


def _resolve(where: tuple[str, str]) -> Callable[..., Any]:
    module = importlib.import_module(where[0], __package__)
    obj: Any = module
    for part in where[1].split("."):
        obj = getattr(obj, part)
    return obj


def _build(what: str, registry: dict[str, tuple[str, str]], spec: object) -> Any:
    if not isinstance(spec, Mapping):
        raise TypeError(f"{what}: spec must be a dict with a 'kind' key, got {type(spec).__name__}")
    kwargs = dict(spec)
    kind = kwargs.pop("kind", None)
    if kind not in registry:
        raise ValueError(f"{what}: unknown kind {kind!r}; expected one of {sorted(registry)}")
    builder = _resolve(registry[kind])
    params = inspect.signature(builder).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown and not accepts_any:
        raise ValueError(f"{what}: unknown key(s) {unknown} for kind {kind!r}; allowed keys: {allowed}")
    missing = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in kwargs
    ]
    if missing:
        raise ValueError(f"{what}: kind {kind!r} needs key(s) {missing}")
    return builder(**kwargs)


def build_vae(spec: Mapping[str, Any]):
    """``{"kind": "pixel" | "wan" | "learned", ...}`` -> a :class:`~semanticgen.encoders.VideoVAE`."""
    return _build("build_vae", _VAES, spec)


def build_semantic_encoder(spec: Mapping[str, Any]):
    """``{"kind": "pixel" | "qwen", ...}`` -> a :class:`~semanticgen.encoders.SemanticEncoder`."""
    return _build("build_semantic_encoder", _SEMANTIC, spec)


def build_text_encoder(spec: Mapping[str, Any]):
    """``{"kind": "hash" | "hf", ...}`` -> a :class:`~semanticgen.encoders.TextEncoder`."""
    return _build("build_text_encoder", _TEXT, spec)
