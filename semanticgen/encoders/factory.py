"""Build encoders from config dicts: ``{"kind": ..., **keyword arguments of that kind}``.

Kinds:
    ``build_vae``: ``"pixel"`` (:class:`PixelVAE`), ``"wan"`` (:meth:`WanVAE.from_pretrained`, needs ``path``),
    ``"learned"`` (:meth:`LearnedVideoAE.from_pretrained`, needs ``path``: a ``vae.safetensors`` a run trained;
    training fills it in from the run directory, see ``semanticgen.encoders.learned_vae.run_vae_spec``).
    ``build_semantic_encoder``: ``"pixel"`` (:class:`PixelSemanticEncoder`), ``"qwen"``
    (:meth:`QwenVisionEncoder.from_pretrained`, needs ``path``).
    ``build_text_encoder``: ``"hash"`` (:class:`HashTextEncoder`), ``"hf"`` (:meth:`HFTextEncoder.from_pretrained`,
    needs ``path``).

A ``path`` is checked before its loader runs (:func:`check_encoder_paths`; each loader's class says what it needs
in ``checkpoint_problem``): a missing path, or a directory without the files the loader reads, is a
:class:`~semanticgen.errors.UsageError` naming the config key and the path (``encoders.text.path =
'/ckpt/umt5': no config.json in /ckpt/umt5``), not a traceback from inside ``transformers`` or
``diffusers``.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from semanticgen.errors import UsageError

__all__ = ["build_vae", "build_semantic_encoder", "build_text_encoder", "check_encoder_paths"]


class _Kind(NamedTuple):
    module: str  # relative to this package
    builder: str  # attribute path of the builder in the module
    checkpoint_problem: str | None = None  # that of the check of its `path`, for the kinds that load one


_VAES = {
    "pixel": _Kind(".pixel", "PixelVAE"),
    "wan": _Kind(".wan_vae", "WanVAE.from_pretrained", "WanVAE.checkpoint_problem"),
    "learned": _Kind(".learned_vae", "LearnedVideoAE.from_pretrained", "LearnedVideoAE.checkpoint_problem"),
}
_SEMANTIC = {
    "pixel": _Kind(".pixel", "PixelSemanticEncoder"),
    "qwen": _Kind(".qwen_vision", "QwenVisionEncoder.from_pretrained", "QwenVisionEncoder.checkpoint_problem"),
}
_TEXT = {
    "hash": _Kind(".text", "HashTextEncoder"),
    "hf": _Kind(".text", "HFTextEncoder.from_pretrained", "HFTextEncoder.checkpoint_problem"),
}
_TABLES = {"vae": _VAES, "semantic": _SEMANTIC, "text": _TEXT}  # [encoders.<name>] -> the kinds it may name


def _resolve(module: str, attribute: str) -> Callable[..., Any]:
    obj: Any = importlib.import_module(module, __package__)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def _check_path(table: str, kind: _Kind, kwargs: Mapping[str, Any]) -> None:
    """Raise a :class:`UsageError` naming ``<table>.path`` and the path when the checkpoint there is not what the
    loader of ``kind`` reads. Nothing for the kinds that load nothing, or without a ``path``."""
    if kind.checkpoint_problem is None or "path" not in kwargs:
        return
    path = kwargs["path"]
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise UsageError(f"{table}.path must be a path (a non-empty string), got {path!r}")
    check = _resolve(kind.module, kind.checkpoint_problem)
    params = inspect.signature(check).parameters
    problem = check(**{k: v for k, v in kwargs.items() if k in params})  # path, and a Wan VAE's subfolder
    if problem is not None:
        path = os.fspath(path)
        shown = repr(path) if os.path.isabs(path) else f"{path!r} (under {os.getcwd()})"
        raise UsageError(f"{table}.path = {shown}: {problem}")


def check_encoder_paths(specs: Mapping[str, Any]) -> None:
    """Check the checkpoints that the ``[encoders]`` tables ``specs`` (``{"vae": {...}, "semantic": {...},
    "text": {...}}``) point at, before any loads: a :class:`UsageError` naming the key and the path for a missing
    path or a directory without the files its loader reads. The ``build_*`` functions check the same when they
    build; this lets a run refuse before it starts. Tables this cannot read (no ``kind``, an unknown one) are left
    to the ``build_*`` functions, which say what is wrong with them."""
    for name, registry in _TABLES.items():
        spec = specs.get(name)
        if isinstance(spec, Mapping) and spec.get("kind") in registry:
            _check_path(f"encoders.{name}", registry[spec["kind"]], spec)


def _build(what: str, table: str, registry: dict[str, _Kind], spec: object) -> Any:
    if not isinstance(spec, Mapping):
        raise TypeError(f"{what}: spec must be a dict with a 'kind' key, got {type(spec).__name__}")
    kwargs = dict(spec)
    kind = kwargs.pop("kind", None)
    if kind not in registry:
        raise ValueError(f"{what}: unknown kind {kind!r}; expected one of {sorted(registry)}")
    builder = _resolve(registry[kind].module, registry[kind].builder)
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
    _check_path(table, registry[kind], kwargs)
    return builder(**kwargs)


def build_vae(spec: Mapping[str, Any]):
    """``{"kind": "pixel" | "wan" | "learned", ...}`` -> a :class:`~semanticgen.encoders.VideoVAE`."""
    return _build("build_vae", "encoders.vae", _VAES, spec)


def build_semantic_encoder(spec: Mapping[str, Any]):
    """``{"kind": "pixel" | "qwen", ...}`` -> a :class:`~semanticgen.encoders.SemanticEncoder`."""
    return _build("build_semantic_encoder", "encoders.semantic", _SEMANTIC, spec)


def build_text_encoder(spec: Mapping[str, Any]):
    """``{"kind": "hash" | "hf", ...}`` -> a :class:`~semanticgen.encoders.TextEncoder`."""
    return _build("build_text_encoder", "encoders.text", _TEXT, spec)
