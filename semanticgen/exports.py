"""The export format of a trained run: consolidated safetensors files of its models, written and read.

An export (``RUN_DIR/model.safetensors``, or a stage's ``RUN_DIR/<stage>.safetensors``) holds
``latent_generator.*``, ``semantic_generator.*`` and ``compressor.*`` in float32, unsharded, plus metadata key
``semanticgen``: JSON with the training config, each model's ``Config``, the sample shapes and the steps.

:func:`collect_run_weights` gathers a run's weights per stage from the stage's end-of-stage export
``RUN_DIR/<stage>.safetensors`` if the stage finished, else from its newest complete checkpoint. Checkpoints are
read with DCP, so a checkpoint saved by any number of ranks consolidates in one process. Nothing here needs the
training code: :mod:`semanticgen.runs` (inference) and :mod:`semanticgen.train` (which writes exports at the end
of each stage, and ``python -m semanticgen.train export``) both build on this module.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn

from semanticgen._files import META_KEY, save_safetensors_atomic
from semanticgen.checkpoint_layout import list_checkpoints
from semanticgen.errors import UsageError
from semanticgen.models import LatentGenerator, SemanticCompressor, SemanticGenerator

__all__ = [
    "MODEL_CLASSES",
    "STAGE_MODULES",
    "collect_run_weights",
    "export_run",
    "load_stage_checkpoint_weights",
    "model_configs",
    "models_from_meta",
    "read_export",
    "read_export_meta",
    "write_safetensors",
]

STAGE_MODULES = {"latent": ("latent_generator", "compressor"), "semantic": ("semantic_generator", "compressor")}

MODEL_CLASSES = {
    "compressor": SemanticCompressor,
    "semantic_generator": SemanticGenerator,
    "latent_generator": LatentGenerator,
}


def models_from_meta(meta: dict[str, Any]) -> dict[str, nn.Module]:
    """Unsharded, randomly initialised models from the ``model_configs`` of a checkpoint or export's metadata."""
    configs = meta.get("model_configs")
    if not configs:
        raise UsageError("metadata has no 'model_configs': not a checkpoint or export written by semanticgen.train")
    out = {}
    for name, values in configs.items():
        cls = MODEL_CLASSES[name]
        if name == "semantic_generator" and "abs_pos" not in values:
            # Written before the absolute position embedding existed: the model was trained without it.
            values = {**values, "abs_pos": False}
        out[name] = cls(cls.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}))
    return out


def model_configs(models: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """The ``model_configs`` metadata of ``models``: what :func:`models_from_meta` rebuilds them from."""
    return {name: dataclasses.asdict(m.config) for name, m in models.items()}


def write_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (temporary file + rename) with ``meta`` as JSON under the ``semanticgen`` metadata key."""
    return save_safetensors_atomic(tensors, path, meta)


def read_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of an export written by :func:`write_safetensors`.

    Raises:
        UsageError: ``path`` is not a file, not safetensors, or has no ``semanticgen`` metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"export file not found: {path}")
    with _open_export(path) as f:
        raw = (f.metadata() or {}).get(META_KEY)
        if raw is None:
            raise UsageError(f"{path} has no '{META_KEY}' metadata: not a semanticgen export")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return tensors, json.loads(raw)


def _open_export(path: Path):
    """``safe_open`` with a one-line error for a file that is not safetensors (a log, a config...)."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error type for a bad header
        raise UsageError(
            f"{path} is not a safetensors export ({exc}); pass a run directory or its model.safetensors"
        ) from None


def read_export_meta(path: str | Path) -> dict[str, Any]:
    """Only the metadata of an export (no tensors are read)."""
    with _open_export(Path(path)) as f:
        raw = (f.metadata() or {}).get(META_KEY)
    if raw is None:
        raise UsageError(f"{path} has no '{META_KEY}' metadata: not a semanticgen export")
    return json.loads(raw)


def load_stage_checkpoint_weights(ckpt_path: str | Path, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Read the named plain (unsharded) modules' weights from a DCP training checkpoint, in this one process.

    DCP flattens the saved ``{"train": {"model": {fqn: tensor}}}`` to ``train.model.<fqn>``; asking for just those
    keys loads them whatever the number of ranks that saved them.
    """
    sd = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    state = {"train": {"model": sd}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(ckpt_path), no_dist=True)
    return {k: v.detach().float().cpu() for k, v in state["train"]["model"].items()}


def collect_run_weights(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata of all models trained in ``run_dir`` (see the module docstring for the sources).

    Raises:
        UsageError: ``run_dir`` is not a directory, or holds no stage export and no complete checkpoint.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        problem = "not a directory" if run_dir.exists() else "no such directory"
        raise UsageError(f"{run_dir}: {problem}; pass a training run directory")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"stages": {}}
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    for stage, names in STAGE_MODULES.items():
        stage_file = run_dir / f"{stage}.safetensors"
        ckpts = [c for c in checkpoints if c.meta.get("stage") == stage]
        if stage_file.is_file():
            t, m = read_export(stage_file)
        elif ckpts:
            m = dict(ckpts[-1].meta)
            models = models_from_meta(m)
            t = load_stage_checkpoint_weights(ckpts[-1].path, {n: models[n] for n in names})
        else:
            continue
        # The semantic stage trains with the compressor frozen, so both stages hold the same compressor; the
        # semantic stage's copy is the one its generator was trained against.
        tensors.update(t)
        meta["stages"][stage] = {
            "step": m.get("step"),
            "source": str(stage_file if stage_file.is_file() else ckpts[-1].path),
        }
        for key in ("config", "model_configs", "shapes", "semantic_norm"):
            if key in m:
                if isinstance(m[key], dict) and isinstance(meta.get(key), dict):
                    meta[key] = {**meta[key], **m[key]}
                else:
                    meta[key] = m[key]
    if not meta["stages"]:
        raise UsageError(
            f"{run_dir}: no stage export (<stage>.safetensors) and no complete checkpoint: not a trained run directory"
        )
    return tensors, meta


def export_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the consolidated export of ``run_dir`` (default ``RUN_DIR/model.safetensors``) and return its path."""
    tensors, meta = collect_run_weights(run_dir)
    return write_safetensors(tensors, meta, out or Path(run_dir) / "model.safetensors")
