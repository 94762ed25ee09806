"""Prompt adherence of a run trained on the synthetic moving shapes (``semanticgen eval``).

For a seeded sample of the 84 captions (7 colours x 3 shapes x 4 directions) it judges, with the analytic
:func:`~semanticgen.evaluation.detector.detect`:

* ``generated``: one clip per prompt from the run's two-stage pipeline;
* ``stage2_ceiling``: stage 2 alone, conditioned on the compressed semantic tokens of a real clip of the prompt
  (what the latent stage can do when stage 1 is perfect);
* ``detector_real``: the real clips themselves (the detector's ceiling);
* ``detector_vae_roundtrip``: the real clips encoded and decoded by the run's VAE (the ceiling through the decoder).

Clips that went through the run's VAE (all but ``detector_real``) are judged with the VAE round trip as the
detector's ``degrade``, so a blocky decode is compared with templates decoded the same way.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from semanticgen._checks import check_int
from semanticgen.data import build_dataset
from semanticgen.data.synthetic import COLOURS, DIRECTIONS, SHAPES, SyntheticShapes
from semanticgen.errors import UsageError
from semanticgen.pipeline import seeded_generators

from .contact_sheet import write_contact_sheet
from .detector import Detection, detect, judge

__all__ = [
    "VOCABULARY",
    "sample_prompts",
    "check_run",
    "evaluate_run",
    "generate_default",
    "single_threaded",
    "summary_rows",
]

# Every caption the synthetic data can produce, in a fixed order (colour, then shape, then direction).
VOCABULARY: tuple[str, ...] = tuple(f"a {c} {s} moving {d}" for c in COLOURS for s in SHAPES for d in DIRECTIONS)
KINDS = ("generated", "stage2_ceiling", "detector_real", "detector_vae_roundtrip")
ASPECTS = ("colour", "shape", "direction", "all")
# How far past the training set to look for a real clip of a caption it lacks (64 training clips hold about half
# of the 84 captions).
_SEARCH_PAST_TRAINING = 100_000


def sample_prompts(num_prompts: int | None, seed: int) -> list[str]:
    """A seeded sample of ``num_prompts`` captions (all 84 when ``None``), in vocabulary order."""
    total = len(VOCABULARY)
    if num_prompts is None:
        return list(VOCABULARY)
    check_int("--prompts", num_prompts, minimum=1, maximum=total, error=UsageError)
    picked = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num_prompts]
    return [VOCABULARY[i] for i in sorted(picked.tolist())]


def check_run(run_dir: str | Path) -> dict[str, Any]:
    """The metadata of a run that ``semanticgen eval`` can judge; :class:`UsageError` naming what is wrong else."""
    from semanticgen.runs import run_meta

    path = Path(run_dir)
    if not path.exists():
        raise UsageError(f"--checkpoint: no such run directory or file: {path}")
    meta = run_meta(path)
    kind = (meta.get("config") or {}).get("data", {}).get("kind")
    if kind != "synthetic":
        raise UsageError(
            f"{path}: trained on data.kind = {kind!r}; semanticgen eval judges runs on the synthetic shapes only"
        )
    return meta


def _dataset(cfg: dict[str, Any]) -> SyntheticShapes:
    """The run's synthetic dataset, built as training built it (``semanticgen.data.build_dataset``), extended past
    its ``num_samples`` (clips are a pure function of ``(seed, index)``, so the training set is its first
    ``num_samples`` clips and later indices are real clips the run never saw)."""
    data_cfg = SimpleNamespace(**dict(cfg["data"], num_samples=int(cfg["data"]["num_samples"]) + _SEARCH_PAST_TRAINING))
    return build_dataset(data_cfg, seed=int(cfg.get("seed", 0)))


def _real_clip_indices(data: SyntheticShapes, num_samples: int, prompts: Sequence[str]) -> dict[str, tuple[int, bool]]:
    """``prompt -> (index, in the training set)``: the first index of ``data`` with that caption; past the training
    set (``num_samples``) for captions it lacks."""
    wanted, found = set(prompts), {}
    for index in range(len(data)):
        caption = data.caption(index)
        if caption in wanted and caption not in found:
            found[caption] = (index, index < num_samples)
            if len(found) == len(wanted):
                break
    missing = wanted - set(found)
    if missing:  # 84 equally likely captions: not seeing one in 100k draws does not happen
        raise RuntimeError(f"no synthetic clip with caption(s) {sorted(missing)}")
    return found


def _record(det: Detection, prompt: str) -> dict[str, Any]:
    return {
        "colour": det.colour,
        "shape": det.shape,
        "direction": det.direction,
        "label": det.label(),
        "correct": judge(det, prompt),
        "displacement": list(det.displacement) if det.displacement is not None else None,
    }


def _accuracy(records: Sequence[dict[str, Any] | None]) -> dict[str, float] | None:
    if any(r is None for r in records):
        return None
    return {a: sum(r["correct"][a] for r in records) / len(records) for a in ASPECTS}


def _batches(items: Sequence[Any], size: int) -> list[tuple[int, Sequence[Any]]]:
    return [(start, items[start : start + size]) for start in range(0, len(items), size)]


def _seeds(seed: int, start: int, batch: Sequence[Any]) -> list[int]:
    """One seed per prompt of the batch starting at prompt ``start``: prompt ``i`` gets ``seed + i``."""
    return [seed + start + i for i in range(len(batch))]


@torch.no_grad()
def evaluate_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    num_prompts: int | None = None,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Judge a synthetic-data run; writes ``eval.json``, ``eval.png`` and ``eval_stage2_ceiling.png`` to ``out_dir``
    (default ``RUN/eval/``) and returns the ``eval.json`` payload.

    ``steps`` and ``guidance`` default to those of ``semanticgen generate``. Prompt ``i`` (of the sampled list) is
    drawn from its own generator seeded ``seed + i``, so its clip does not depend on ``batch_size`` (up to batched
    matmul rounding) and ``semanticgen generate --prompt P --seed SEED+i`` draws the same noise. A one-stage
    text-to-latent run (a pipeline without a semantic generator) has no stage-2 ceiling: its entries are ``None``.

    Raises:
        UsageError: a missing or unreadable run, a run not trained on the synthetic data or missing a stage, bad
            settings.
    """
    from semanticgen.runs import build_pipeline_from_run

    prompts = sample_prompts(num_prompts, seed)
    check_int("--batch-size", batch_size, minimum=1, error=UsageError)
    device = _device(device)
    steps = generate_default("steps") if steps is None else steps
    guidance = float(generate_default("guidance") if guidance is None else guidance)
    run_dir = Path(run_dir)
    meta = check_run(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else (run_dir if run_dir.is_dir() else run_dir.parent) / "eval"

    pipe = build_pipeline_from_run(run_dir, device=device)  # UsageError when a stage is missing
    vae = pipe.vae

    def roundtrip(video: torch.Tensor) -> torch.Tensor:
        """``[B, F, 3, H, W]`` through the run's VAE, on its device: the decoder's forward model for the detector."""
        return vae.decode(vae.encode(video.to(device))).float().clamp(0.0, 1.0).cpu()

    data = _dataset(meta["config"])
    indices = _real_clip_indices(data, int(meta["config"]["data"]["num_samples"]), prompts)
    batches = _batches(prompts, batch_size)
    real = [data.render(indices[p][0], data.vae_t) for p in prompts]

    started = time.perf_counter()
    generated = [
        clip
        for start, batch in tqdm(batches, desc="generate", unit="batch", disable=not progress)
        for clip in pipe(list(batch), steps=steps, guidance=guidance, seed=_seeds(seed, start, batch), progress=False)
        .float()
        .cpu()
    ]
    generate_seconds = time.perf_counter() - started
    clips = {
        "generated": generated,
        "stage2_ceiling": None,
        "detector_real": real,
        "detector_vae_roundtrip": [c for _, b in _batches(real, batch_size) for c in roundtrip(torch.stack(list(b)))],
    }
    if pipe.semantic_generator is not None:
        real_sem = [data.render(indices[p][0], data.sem_t) for p in prompts]
        clips["stage2_ceiling"] = _stage2_ceiling(
            pipe, run_dir, meta, prompts, real_sem, batch_size, steps, guidance, seed, progress
        )

    per_prompt = [{"prompt": p, "real_index": indices[p][0], "real_in_training_set": indices[p][1]} for p in prompts]
    with single_threaded():
        for kind in tqdm(KINDS, desc="judge", unit="set", disable=not progress):
            degrade = None if kind == "detector_real" else roundtrip
            for k, entry in enumerate(per_prompt):
                detection = detect(clips[kind][k], degrade=degrade) if clips[kind] is not None else None
                entry[kind] = _record(detection, entry["prompt"]) if detection is not None else None

    payload = {
        "run": str(run_dir.resolve()),
        "out": str(out_dir.resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "steps": steps,
            "guidance": guidance,
            "seed": seed,
            "batch_size": batch_size,
            "device": str(device),
            "noise_level": pipe.noise_level,
            "num_prompts": len(prompts),
            "prompts": prompts,
        },
        "accuracy": {kind: _accuracy([e[kind] for e in per_prompt]) for kind in KINDS},
        "timing": {
            "generate_seconds": generate_seconds,
            "seconds_per_generated_clip": generate_seconds / len(prompts),
            "note": f"both stages, {steps} steps each, guidance {guidance:g}, batches of up to {batch_size} clips, "
            f"prompt i seeded {seed} + i",
        },
        "per_prompt": per_prompt,
    }
    _write_outputs(out_dir, payload, clips, run_dir)
    return payload


def _stage2_ceiling(
    pipe,
    run_dir: Path,
    meta: dict[str, Any],
    prompts: Sequence[str],
    sem_videos: Sequence[torch.Tensor],
    batch_size: int,
    steps: int,
    guidance: float,
    seed: int,
    progress: bool,
) -> list[torch.Tensor]:
    """Stage 2 alone, conditioned on the compressed semantic tokens of real clips ``sem_videos`` (``[Fs, 3, H, W]``
    each), noise-augmented as the pipeline augments stage 1's: decoded frames ``[F, 3, H, W]`` per prompt."""
    from semanticgen.encoders import build_semantic_encoder
    from semanticgen.rectified_flow import noise_augment
    from semanticgen.runs import load_run_models

    device = pipe.device
    models, _ = load_run_models(run_dir)
    if "compressor" not in models:
        raise UsageError(f"{run_dir}: the run has no trained compressor; train the latent stage first")
    compressor = models["compressor"].to(device)
    dtype = next(compressor.parameters()).dtype
    encoder = build_semantic_encoder(meta["config"]["encoders"]["semantic"])
    if isinstance(encoder, torch.nn.Module):
        encoder.to(device)
    out: list[torch.Tensor] = []
    for start, batch in tqdm(_batches(prompts, batch_size), desc="stage 2 ceiling", unit="batch", disable=not progress):
        video = torch.stack(list(sem_videos[start : start + len(batch)])).to(device)
        # The compressor's posterior mean: what stage 2 was trained on, and what the pipeline hands it from stage 1.
        z_sem = compressor.encode_mean(encoder.encode(video).to(dtype)).float()
        generator = seeded_generators(_seeds(seed, start, batch), len(batch), device)
        z_aug = noise_augment(z_sem, pipe.noise_level, generator=generator)
        cond, uncond = pipe.encode_prompts(list(batch), guidance != 1.0)
        latents = pipe.sample_latents(cond, uncond, z_aug, steps=steps, guidance=guidance, generator=generator)
        out += list(pipe.vae.decode(latents).float().clamp(0.0, 1.0).cpu())
    return out


def _write_outputs(out_dir: Path, payload: dict[str, Any], clips: dict[str, Any], run_dir: Path) -> None:
    """The contact sheets, then ``eval.json`` (last, so a complete ``eval.json`` means a complete directory)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = payload["settings"]
    name = run_dir.name if run_dir.is_dir() else run_dir.parent.name
    for kind, png in (("generated", "eval.png"), ("stage2_ceiling", "eval_stage2_ceiling.png")):
        acc = payload["accuracy"][kind]
        if acc is None:
            continue
        write_contact_sheet(
            out_dir / png,
            clips[kind],
            settings["prompts"],
            [e[kind] for e in payload["per_prompt"]],
            title=f"{name}: {kind.replace('_', ' ')}, {settings['steps']} steps, guidance {settings['guidance']:g}, "
            f"seed {settings['seed']} - colour {acc['colour']:.0%}, shape {acc['shape']:.0%}, direction "
            f"{acc['direction']:.0%}, all three {acc['all']:.0%}",
        )
    tmp = out_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out_dir / "eval.json")  # a reader never sees a half-written file


@contextmanager
def single_threaded() -> Iterator[None]:
    """One intra-op thread for the detector's small tensors (32x32 frames): on a loaded 2-core machine one detection
    took 0.1-2 s with 2 threads, waiting on each other, against 55 ms with one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def generate_default(name: str) -> Any:
    """The default of ``semanticgen generate``'s option ``name`` (``"steps"``, ``"guidance"``): one source for both
    commands."""
    from semanticgen.generate import build_parser

    return build_parser().get_default(name)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device: not a torch device: {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available on this machine")
    return dev


def summary_rows(payload: dict[str, Any]) -> list[tuple[str, ...]]:
    """``(set, colour, shape, direction, all)`` rows of percentages, for the table the CLI prints (``-`` for a set
    the run has none of: the stage-2 ceiling of a one-stage run)."""
    rows = []
    for kind in KINDS:
        acc = payload["accuracy"][kind]
        rows.append((kind.replace("_", " "), *(f"{acc[a]:.0%}" if acc is not None else "-" for a in ASPECTS)))
    return rows
