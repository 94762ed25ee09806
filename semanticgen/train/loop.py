"""The training run: both stages in order, each an FSDP2-sharded loop with checkpoints, metrics and resume.

Global steps run through the stages: with ``stage = "both"`` the latent stage takes steps ``1..latent.steps`` and
the semantic stage ``latent.steps + 1 .. latent.steps + semantic.steps``. At the end of a stage its weights are
exported to ``RUN_DIR/<stage>.safetensors`` (the semantic stage reads its frozen compressor from there), and at the
end of the run the consolidated ``RUN_DIR/model.safetensors`` is written for ``semanticgen generate``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semanticgen.checkpoint_layout import CheckpointInfo, list_checkpoints, resolve_checkpoint
from semanticgen.data import Encoders, MicroBatchStream, ShardDataset, build_dataset
from semanticgen.encoders import check_encoder_paths
from semanticgen.errors import UsageError
from semanticgen.exports import (
    STAGE_MODULES,
    export_run,
    model_configs,
    read_export,
    read_export_meta,
    write_safetensors,
)
from semanticgen.models import SemanticCompressor, SemanticNorm
from semanticgen.models.wan import load_wan
from semanticgen.ops import WindowLayout
from semanticgen.parallel import COMM_COUNTER, ContextGroup, ContextPlan

from .autoencoder import VAE_FILE, run_encoders, train_run_autoencoder
from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .config import ENCODER_TABLES, MODEL_TABLES, ConfigSources, TrainConfig, config_tables
from .distributed import DistInfo, all_reduce_mean, barrier, broadcast_object, init_distributed, join_process_group
from .export import full_state_dict
from .metrics import MetricsWriter, Progress, peak_memory_mb
from .optim import build_optimizer, build_scheduler, clip_grad_norm
from .semantic_norm import measure_semantic_norm
from .sharding import InitUnit, check_loaded, init_units, load_full_state, materialize, set_gradient_sync, shard_model
from .stages import MODELS, DataWidths, build_models, build_stage, init_from_paths, model_configs_from_tables

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpan:
    """Global steps ``(begin, end]`` of one stage."""

    name: str
    begin: int
    end: int


def stage_spans(cfg: TrainConfig, run_dir: Path | None = None) -> list[StageSpan]:
    """Global step ranges of the configured stages.

    ``stage = "semantic"`` alone continues the numbering of a latent stage trained into the same run directory
    (read from ``RUN_DIR/latent.safetensors``), so ``latent`` then ``semantic`` runs equal one ``both`` run.
    """
    spans, step = [], 0
    if cfg.stage == "semantic" and run_dir is not None and (run_dir / "latent.safetensors").is_file():
        step = int(read_export_meta(run_dir / "latent.safetensors").get("step") or 0)
    for name in cfg.stage_list():
        steps = getattr(cfg, name).steps
        spans.append(StageSpan(name, step, step + steps))
        step += steps
    return spans


@dataclass
class RunContext:
    cfg: TrainConfig
    run_dir: Path
    info: DistInfo
    encoders: Encoders | None
    dataset: Any
    widths: DataWidths
    null_text: tuple[torch.Tensor, torch.Tensor]
    metrics: MetricsWriter
    stop_step: int

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"


def _prepare(ctx: RunContext, batch: dict[str, Any]) -> dict[str, Any]:
    """Encode a raw batch on this rank (or move a pre-encoded one to the device)."""
    if "latents" in batch:
        out = {
            k: (v.to(ctx.info.device) if isinstance(v, torch.Tensor) and k != "sample_id" else v)
            for k, v in batch.items()
        }
        out["text_mask"] = out["text_mask"].bool()
        return out
    return ctx.encoders.encode_batch(batch, ctx.info.device)


def _latent_stage_compressor(ctx: RunContext) -> dict[str, torch.Tensor]:
    """The semantic stage's frozen compressor: its full state dict from ``RUN_DIR/latent.safetensors``."""
    path = ctx.run_dir / "latent.safetensors"
    if not path.is_file():
        raise UsageError(
            f"the semantic stage needs the trained compressor from the latent stage: {path} not found "
            "(train with stage = 'both', or train stage 'latent' into this run directory first)"
        )
    tensors, _ = read_export(path)
    return {k[len("compressor.") :]: v for k, v in tensors.items() if k.startswith("compressor.")}


def _semantic_norm(ctx: RunContext, compressor_sd: dict[str, torch.Tensor], resume_meta: dict | None) -> SemanticNorm:
    """Stage 1's token statistics: those of the checkpoint being resumed, else measured now on an unsharded copy of
    the (small) compressor, so the sharded stage's FSDP units run no forward outside the stage's own."""
    saved = (resume_meta or {}).get("semantic_norm")
    if saved is not None:
        return SemanticNorm.from_dict(saved)
    cfg, info = ctx.cfg, ctx.info
    comp_cfg = model_configs_from_tables(cfg.model, ctx.widths)["compressor"]
    compressor = SemanticCompressor(comp_cfg)
    compressor.load_state_dict(compressor_sd)
    compressor.to(info.device).eval()

    def features(batch: dict[str, Any]) -> torch.Tensor:
        if "sem_features" in batch:  # pre-encoded shards
            return batch["sem_features"].to(info.device).float()
        return ctx.encoders.semantic.encode(batch["sem_video"].to(info.device)).float()

    t0 = time.perf_counter()
    norm = measure_semantic_norm(
        compressor,
        ctx.dataset,
        features,
        clips=cfg.semantic.norm_clips,
        micro_batch_size=cfg.data.micro_batch_size,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.seed,
        device=info.device,
    )
    if info.is_main:
        logger.info(
            "semantic token statistics over %d clips in %.1f s: mean %s, std %s",
            min(cfg.semantic.norm_clips, len(ctx.dataset)),
            time.perf_counter() - t0,
            [round(v, 4) for v in norm.mean],
            [round(v, 4) for v in norm.std],
        )
    return norm


def _stage_meta(
    ctx: RunContext,
    span: StageSpan,
    models: dict[str, nn.Module],
    shapes: dict | None,
    norm: SemanticNorm | None = None,
) -> dict[str, Any]:
    meta = {
        "stage": span.name,
        "config": ctx.cfg.to_dict(),
        "model_configs": model_configs({n: models[n] for n in STAGE_MODULES[span.name]}),
        "shapes": shapes or {},
    }
    if norm is not None:
        meta["semantic_norm"] = norm.to_dict()
    return meta


def _loaded_units(units: list[InitUnit], resume: CheckpointInfo | None, wan: dict[str, str]) -> frozenset[str]:
    """The init units whose initial values are overwritten before training: all of them when resuming (the
    checkpoint holds every parameter, frozen ones included), else the blocks of the generators loaded from Wan
    (entirely Wan's; what Wan lacks, such as ``sem_embed``, sits outside the blocks and is initialised)."""
    if resume is not None:
        return frozenset(unit.name for unit in units)
    return frozenset(unit.name for unit in units if unit.name.startswith(tuple(f"{name}.blocks." for name in wan)))


def run_stage(ctx: RunContext, span: StageSpan, resume: CheckpointInfo | None) -> bool:
    """Train one stage from ``resume`` (a checkpoint of this stage) or from scratch; True if it reached its end."""
    cfg, info = ctx.cfg, ctx.info
    stage_cfg = getattr(cfg, span.name)
    # On the meta device, sharded, then each rank materialises its own shards of one common initialisation (seeded
    # per block, so it does not depend on the number of ranks); no rank ever holds the whole model.
    with torch.device("meta"):
        models = build_models(cfg.model, ctx.widths)
    units = init_units(models)
    stage = build_stage(span.name, models, stage_cfg, cfg.seed, ctx.null_text)
    shard_model(stage, info.mesh, cfg.parallel, info.device)
    wan = (
        {}
        if resume is not None
        else {n: p for n, p in init_from_paths(cfg.model).items() if n in STAGE_MODULES[span.name]}
    )
    loaded = _loaded_units(units, resume, wan)
    materialize(stage, units, info.device, cfg.seed, loaded=loaded)
    del units
    for name, path in wan.items():  # a resumed run loads its own checkpoint below
        # Each rank reads only its own shards' slices of the Wan tensors (no full copy on any rank).
        source = load_wan(models[name], path)
        if info.is_main:
            logger.info("%s: loaded Wan weights from %s (%d bytes on rank 0)", name, path, source.bytes_read)
    compressor_sd = None
    if span.name == "semantic":
        compressor_sd = _latent_stage_compressor(ctx)
        load_full_state(stage.compressor, compressor_sd)  # each rank keeps its shard
    # Context parallelism is for the latent stage; the semantic stage is data parallel over the whole world.
    cp_size = info.cp_size if span.name == "latent" else 1
    if cp_size > 1:
        stage.cp = ContextGroup(info.cp_rank, info.cp_size, info.cp_group)
    data_rank, data_world = (info.dp_rank, info.dp_size) if cp_size > 1 else (info.rank, info.world_size)
    torch.manual_seed(cfg.seed * 1000 + info.rank + 1)  # per-rank stream for anything a model draws itself
    params = [p for p in stage.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, stage_cfg.optim)
    scheduler = build_scheduler(optimizer, stage_cfg.steps, stage_cfg.optim)
    counters = {"step": span.begin, "data_position": 0}
    state = TrainState(stage, optimizer, scheduler, counters)
    shapes = resume_meta = None
    if resume is not None:
        resume_meta = meta = load_checkpoint(resume.path, state)
        shapes = meta.get("shapes") or None
        if info.is_main:
            logger.info("resumed %s stage from %s (step %d)", span.name, resume.path, counters["step"])
    if loaded:
        check_loaded(stage)  # every parameter materialize left as NaN for a load got its value
    norm = None
    if span.name == "semantic" and stage_cfg.normalize_tokens:
        norm = _semantic_norm(ctx, compressor_sd, resume_meta)
        stage.norm = norm
    del compressor_sd
    step = counters["step"]
    end = min(span.end, ctx.stop_step)
    accum = stage_cfg.optim.grad_accum
    stream = MicroBatchStream(
        ctx.dataset,
        seed=cfg.seed + 17 * (span.name == "semantic"),
        micro_batch_size=cfg.data.micro_batch_size,
        rank=data_rank,
        world_size=data_world,
        position=counters["data_position"],
        num_workers=cfg.data.num_workers,
    )
    progress = Progress(
        info.is_main and cfg.log.progress,
        total=span.end - span.begin,
        initial=step - span.begin,
        desc=f"{span.name} stage",
    )
    stage.train()
    skipped_total = 0
    while step < end:
        t0 = time.perf_counter()
        COMM_COUNTER.reset()
        # Device tensors, read once per step: no host sync between micro-batches.
        sums: dict[str, torch.Tensor] = {}
        tokens = 0.0
        for micro in range(accum):
            batch = _prepare(ctx, next(stream))
            skipped_total += int(batch.get("skipped", 0))
            if shapes is None:
                shapes = _batch_shapes(batch, stage)
            set_gradient_sync(stage, micro == accum - 1)
            loss, parts = stage(batch)
            (loss / accum).backward()
            sums["loss"] = sums.get("loss", 0.0) + loss.detach().double() / accum
            for k, v in parts.items():
                if k == "tokens":
                    tokens += float(v)  # a CPU tensor: no sync
                else:
                    sums[k] = sums.get(k, 0.0) + v.detach().to(info.device, torch.float64) / accum
        grad_norm = clip_grad_norm(params, stage_cfg.optim.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        counters["step"], counters["data_position"] = step, stream.position
        elapsed = time.perf_counter() - t0
        per_rank = {**sums, "tokens": tokens, "skipped": float(skipped_total)}
        if cp_size > 1:
            # Halo bytes this rank sent this step (forward and backward): the mean over ranks is logged.
            per_rank["cp_bytes_sent"] = float(COMM_COUNTER.bytes_sent)
        means = all_reduce_mean(per_rank, info.device)
        world_tokens = means.pop("tokens") * info.world_size
        # The C ranks of a CP group read the same clips: count each skipped video once.
        skipped_videos = int(round(means.pop("skipped") * info.world_size / cp_size))
        record = {
            "step": step,
            "stage": span.name,
            **means,
            "skipped_videos": skipped_videos,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": world_tokens / elapsed,
            "samples_per_s": cfg.data.micro_batch_size * accum * data_world / elapsed,
            "step_time_s": elapsed,
            "peak_memory_mb": peak_memory_mb(info.device),
        }
        if step % cfg.log.every == 0 or step == end:
            ctx.metrics.write(record)
        progress.update({"loss": f"{record['loss']:.4f}", "lr": f"{lr:.2e}"})
        if step % cfg.checkpoint.save_every == 0 or step == end:
            save_checkpoint(
                ctx.ckpt_root, step, state, _stage_meta(ctx, span, models, shapes, norm), cfg.checkpoint.keep_last
            )
    progress.close()
    finished = step >= span.end
    if finished:
        sd = full_state_dict(stage)
        if info.is_main:
            meta = dict(_stage_meta(ctx, span, models, shapes, norm), step=step)
            write_safetensors(sd, meta, ctx.run_dir / f"{span.name}.safetensors")
        barrier()
    del stage, optimizer, state
    return finished


def _batch_shapes(batch: dict[str, Any], stage: nn.Module) -> dict[str, list[int]]:
    """Per-sample shapes the pipeline needs: latents ``[C, T, H, W]``, semantic tokens ``[Ts, Ss, dim]``."""
    comp = stage.compressor
    dim = comp.config.dim
    ts, ss = batch["sem_features"].shape[1:3]
    return {
        "latents": list(batch["latents"].shape[1:]),
        "semantic": [int(ts), int(ss), int(dim)],
        "text": list(batch["text"].shape[1:]),
    }


def _check_shard_encoders(used: dict, configured: dict) -> None:
    """Inference rebuilds the VAE and text encoder from ``[encoders]``: they must be the ones the shards used."""
    for name in ("vae", "semantic", "text"):
        a, b = used.get(name, {}), configured.get(name, {})
        for key in sorted(set(a) | set(b)):
            if key not in ("device", "dtype", "batch_chunk") and a.get(key) != b.get(key):
                raise UsageError(
                    f"the shards were encoded with encoders.{name}.{key} = {a.get(key)!r} but the config says "
                    f"{b.get(key)!r}; use the [encoders] the shards were written with"
                )


def check_model_tables(raw: dict[str, Any], widths: DataWidths) -> None:
    """Build each model of the ``[model.*]`` tables of ``raw`` (a config as read) once, on the meta device (no
    storage, no initialisation), so that a bad value is a one-line :class:`UsageError` naming the table before
    anything runs, not a traceback after the autoencoder stage has trained.

    Takes the config as read, not a :class:`TrainConfig`, so that :meth:`ConfigSources.check` can run it on the
    config after each source and name the file or the ``--set`` at fault.
    """
    tables = config_tables("model", raw.get("model", {}), MODEL_TABLES)
    try:
        configs = model_configs_from_tables(tables, widths)  # its UsageErrors name model.<name>.<key>
    except UsageError:
        raise
    except (ValueError, TypeError) as e:  # init_from: a directory that holds no Wan checkpoint
        raise UsageError(f"[model]: {e}") from e
    for name, config in configs.items():
        try:
            with torch.device("meta"):
                MODELS[name](config)
        except (ValueError, TypeError) as e:  # the model's checks of its Config ("LatentGenerator: depth must ...")
            raise UsageError(f"[model.{name}]: {e}") from e


def check_encoder_tables(raw: dict[str, Any]) -> None:
    """The checkpoints the ``[encoders.*]`` tables of ``raw`` (a config as read) point at: a one-line
    :class:`UsageError` naming the key and the path when one is missing or lacks the files its loader reads.
    On the config as read, for :meth:`ConfigSources.check`, as :func:`check_model_tables`."""
    check_encoder_paths(config_tables("encoders", raw.get("encoders", {}), ENCODER_TABLES))


def check_encoder_checkpoints(cfg: TrainConfig, sources: ConfigSources) -> None:
    """:func:`check_encoder_tables` on ``cfg`` as ``sources`` read it, naming the file or the ``--set`` at fault;
    nothing for data already pre-encoded (``data.kind = "shards"``): shards hold what the encoders made, and a run
    on them loads no encoder. Run before any rank does work and before any clip is built: a wrong checkpoint path
    used to fail inside ``transformers`` or ``diffusers``."""
    if cfg.data.kind != "shards":
        sources.check(check_encoder_tables)


def check_context_parallel(cfg: TrainConfig, widths: DataWidths, latent_frames: int) -> None:
    """Refuse (``UsageError``, naming the numbers) a latent stage whose clips have fewer unshifted windows than
    ``parallel.context_parallel`` ranks. Only the time axis decides the windows, so no model is built."""
    size = cfg.parallel.context_parallel
    if size == 1 or "latent" not in cfg.stage_list():
        return
    lat = model_configs_from_tables(cfg.model, widths)["latent_generator"]
    pt = lat.patch[0]
    if latent_frames % pt:
        raise UsageError(f"the clips' {latent_frames} latent frames are not divisible by the temporal patch {pt}")
    layout = WindowLayout(latent_frames // pt, 1, 0, 0, lat.window // pt, order="blocked")
    try:
        ContextPlan.build(layout, size)
    except ValueError as e:
        raise UsageError(str(e)) from e


def train(
    cfg: TrainConfig,
    *,
    run_dir: str | Path,
    stop_step: int | None = None,
    resume: str | bool | None = None,
    sources: ConfigSources | None = None,
) -> int:
    """Run the configured stages. ``resume``: ``True`` for the newest checkpoint in ``run_dir``, a path, or None.

    Every check of the config, the data and the launch (context parallelism included) happens before anything is
    written to ``run_dir``. ``sources``: where ``cfg`` was read from; the checks that need the encoders (the
    ``[model]`` tables) then name the file or the ``--set`` at fault, as the config's own checks do.
    """
    sources = sources or ConfigSources.of(cfg)
    check_encoder_checkpoints(cfg, sources)
    # Join the process group first: building and running the encoders (the null text) before joining it made a
    # rank abort at exit about once in ten 2-rank runs here ("terminate called without an active exception",
    # after training had finished); joined first, 58 runs in a row exited cleanly. Then the data (on the CPU),
    # so a clip too short for the context-parallel split is refused before the mesh is checked and before
    # anything is written.
    join_process_group()
    encoders, ae_pending = None, False
    dataset = build_dataset(cfg.data, seed=cfg.seed)
    if isinstance(dataset, ShardDataset):
        widths = DataWidths.from_shapes(dataset.shapes)
        _check_shard_encoders(dataset.encoders, cfg.encoders)
        null = dataset.null_text()
        if null is None:
            raise FileNotFoundError(f"{dataset.root}: null_text.safetensors missing; re-run preencode")
        latent_frames = int(dataset.shapes["latents"][1])
    else:
        # A learned VAE comes from RUN_DIR/vae.safetensors; until the run has trained it, an untrained stand-in.
        try:  # the [encoders] tables, and a VAE file already in the run directory, checked against each other
            encoders, ae_pending = run_encoders(cfg.encoders, run_dir)
        except (ValueError, TypeError) as e:
            raise UsageError(f"[encoders]: {e}") from e
        widths = DataWidths.from_encoders(encoders)
        null = encoders.null_text(torch.device("cpu"))
        try:
            latent_frames = encoders.vae.latent_frames(cfg.data.vae_frames)
        except ValueError as e:  # a clip length the VAE cannot encode
            raise UsageError(f"data.vae_frames: {e}") from e
    sources.check(lambda raw: check_model_tables(raw, widths))
    check_context_parallel(cfg, widths, latent_frames)

    info = init_distributed(cfg.parallel.context_parallel)
    if encoders is not None:
        encoders = encoders.to(info.device)
    null = (null[0].to(info.device), null[1].to(info.device))
    run_dir = Path(run_dir)
    spans = stage_spans(cfg, run_dir)
    total = spans[-1].end
    stop = total if stop_step is None else min(stop_step, total)

    resume_info: CheckpointInfo | None = None
    if resume:
        where = run_dir if resume is True else Path(resume)
        try:
            resume_info = resolve_checkpoint(where)
        except FileNotFoundError as e:
            if resume is not True:
                raise UsageError(f"--resume {resume}: {e}") from e
            # --resume on a run directory without checkpoints starts from scratch (convenient for requeued jobs).
            if info.is_main:
                logger.info("--resume: no complete checkpoint in %s yet, starting from scratch", run_dir)
        resume_info = broadcast_object(resume_info)
    else:
        later = [c.step for c in list_checkpoints(run_dir / "checkpoints") if c.step > spans[0].begin]
        if later:
            raise UsageError(
                f"{run_dir} already holds checkpoints up to step {max(later)}: pass --resume to continue that run, "
                "or use a new --run-dir"
            )
    if ae_pending and (resume_info is not None or spans[0].begin > 0):
        raise UsageError(
            f"{run_dir / VAE_FILE} is missing but the run already has trained stages, whose latents came from it: "
            "put it back, or start a new --run-dir"
        )
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    barrier()
    if ae_pending:  # the first stage: the learned VAE the later stages' latents come from
        encoders.vae = train_run_autoencoder(cfg, run_dir, dataset, info)

    keep_until = resume_info.step if resume_info else spans[0].begin
    metrics = MetricsWriter(run_dir / "metrics.jsonl", info.is_main, resume_step=keep_until)
    ctx = RunContext(cfg, run_dir, info, encoders, dataset, widths, null, metrics, stop)
    t_start = time.perf_counter()
    try:
        for span in spans:
            if span.end == span.begin:
                continue  # a stage with 0 steps
            if stop <= span.begin:
                break
            stage_resume = None
            if resume_info is not None:
                r_stage, r_step = resume_info.meta.get("stage"), resume_info.step
                if r_step >= span.end and r_stage != span.name:
                    continue  # a later stage's checkpoint: this stage is done
                if r_stage == span.name:
                    stage_resume = resume_info
                    if r_step >= span.end and (run_dir / f"{span.name}.safetensors").is_file():
                        continue
            finished = run_stage(ctx, span, stage_resume)
            if not finished:
                break
        if stop >= total and info.is_main:
            export_run(run_dir)
        barrier()
    finally:
        metrics.close()
    if info.is_main:
        logger.info("training finished at step %d in %.1f s", stop, time.perf_counter() - t_start)
    return 0
