"""The convergence study of issue 13: SemanticGen against the one-stage text-to-latent baseline, at equal parameter
count and equal training FLOPs, on the synthetic moving shapes with the tiny config.

Methods, both trained with ``torchrun`` (gloo, ``nproc`` CPU ranks) from the same config file:

* ``semanticgen``: the latent stage (latent generator + compressor), then the semantic stage;
* ``baseline``: the same latent generator with no semantic tokens (``stage = "latent"``,
  ``latent.semantic_tokens = false``), made deeper so that its parameter count matches SemanticGen's three models
  as closely as whole blocks allow, and trained for as many steps as makes its training FLOPs equal SemanticGen's.

FLOPs of one optimizer step of each stage are counted with ``torch.utils.flop_counter.FlopCounterMode`` over the
forward and backward of the stage module (built as :func:`semanticgen.train.stages.build_stage` builds it,
unsharded, in this process) on one batch of the run's global batch size. Attention runs on the math backend while
counting: the counter has no formula for the CPU flash kernel, whose FLOPs it would miss (a quarter of the latent
step here); the math backend's two matmuls per attention are the standard ``4 * B * H * N^2 * d`` forward count.
Not counted: AdamW's update (about 10 FLOPs per parameter: 0.3% of a step here), the frozen encoders (run by
both methods alike), the learned VAE when the config has one (trained once, its file shared by every run).

Each budget (a fraction of the config's ``latent.steps`` and ``semantic.steps``, scaled together; the baseline
gets the FLOP-matched step count) is a separate training run, so every cosine schedule decays to its end rather
than being cut mid-way. Every run is then judged with the prompt-adherence eval
(:func:`semanticgen.evaluation.prompt_eval.evaluate_run`) on a seeded subset of the 84 prompts. At one of the
budgets SemanticGen is also trained with other compressor widths (the paper's 8 vs 64 vs 2048 ablation).

Writes ``convergence.json`` (settings, parameter counts, FLOPs per step, every run with its steps, FLOPs, train
seconds and accuracies; rewritten after each run, so a stopped study keeps what it measured) and
``convergence.png`` into the study directory, with the runs under ``runs/``. A study directory that already holds
finished runs of the same config, overrides and eval settings reuses them.

Run alone: ``python -m semanticgen.benchmarks.convergence [--quick] [--out DIR] [--prompts N] [--fractions ...]``;
in the suite: ``semanticgen bench --suite convergence --device cpu`` (not in the default suite: about 35 minutes on
2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from semanticgen.timing import NullProgress

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "tiny.toml"
# Parent of the study directories when no output directory is given (as ``semanticgen bench``'s results).
DEFAULT_ROOT = Path("bench-results")
METHODS = ("semanticgen", "baseline")
ASPECTS = ("colour", "shape", "direction", "all")
STAGES = ("latent", "semantic")
# A uniform guess over the vocabulary: 7 colours, 3 shapes, 4 directions.
CHANCE = {"colour": 1 / 7, "shape": 1 / 3, "direction": 1 / 4, "all": 1 / 84}
_RUN_RECORD = "study_run.json"
# What makes a run the one-stage text-to-latent baseline (a run so trained has no semantic stage), with the fixed
# sin/cos position embedding: without semantic tokens its VAE tokens have only RoPE's relative positions, and
# from pure noise it cannot place anything (``LatentGenerator.Config.abs_pos``; no parameters, FLOPs not counted).
# Without it the baseline drew 7-21% of the directions right at every budget here (chance: 25%).
BASELINE = ("stage=latent", "latent.semantic_tokens=false", "model.latent_generator.abs_pos=true")


@dataclass(frozen=True)
class Settings:
    """What the study trains and how it judges.

    ``overrides``: ``--set`` values applied to every run (and to the FLOP and parameter counts) before the study's
    own; ``fractions``: budgets as fractions of the resulting ``latent.steps``/``semantic.steps``; ``widths``:
    compressor dims trained at the budget ``width_fraction`` (one of ``fractions``, default the largest; the
    config's own dim reuses that budget's run).

    With the defaults and the tiny config of commit c5fc97a (learned VAE, 1500 + 1500 steps) the study takes about
    32 minutes on 2 shared CPU cores (load average 1-6): training 26 (the full-budget runs 17), the autoencoder 2,
    the evals 3.5 (all 84 prompts: a third of that with 28, but one prompt is then 3.6 points).
    """

    config: Path = DEFAULT_CONFIG
    overrides: tuple[str, ...] = ()
    fractions: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)
    widths: tuple[int, ...] = (4, 8, 32)
    width_fraction: float | None = None
    prompts: int = 84
    sample_steps: int = 20
    seed: int = 0
    nproc: int = 2


# The plumbing in a minute or two: a small data set and batch, short schedules (long enough that rounding the
# baseline's step count leaves its FLOPs within 6% of SemanticGen's), 3 prompts, 2 sampling steps.
QUICK = Settings(
    overrides=(
        "data.micro_batch_size=2",
        "data.num_samples=64",
        "latent.steps=30",
        "semantic.steps=10",
        "latent.optim.warmup_steps=2",
        "semantic.optim.warmup_steps=2",
        "semantic.norm_clips=64",
        # Ignored unless the config trains a learned VAE: then a few steps, the plumbing only.
        "autoencoder.steps=10",
        "autoencoder.warmup_steps=2",
        "autoencoder.stats_clips=64",
    ),
    fractions=(0.5, 1.0),
    widths=(4, 8),
    prompts=3,
    sample_steps=2,
)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study and the ``--set`` values that make it."""

    name: str
    method: str
    budget: float
    latent_steps: int
    semantic_steps: int
    compressor_dim: int | None = None
    depth: int | None = None  # the latent generator's

    def overrides(self) -> list[str]:
        steps = [f"latent.steps={self.latent_steps}", f"semantic.steps={self.semantic_steps}"]
        if self.method == "baseline":
            return [*BASELINE, f"model.latent_generator.depth={self.depth}", *steps]
        return [f"model.compressor.dim={self.compressor_dim}", *steps]


# ------------------------------------------------------------------------------------------------ counting


def load(settings: Settings, extra: Sequence[str] = ()):
    """The :class:`~semanticgen.train.config.TrainConfig` of ``settings.config`` with its and ``extra`` overrides."""
    from semanticgen.train.config import load_config

    return load_config(settings.config, [*settings.overrides, *extra])


def _encoders(cfg, vae_dir: Path):
    """The run's encoders; a learned VAE from ``vae_dir`` (an untrained stand-in of the same shapes until it is
    trained: only shapes matter for counting)."""
    from semanticgen.train.autoencoder import run_encoders

    return run_encoders(cfg.encoders, vae_dir)[0]


def param_counts(cfg, widths) -> dict[str, int]:
    """Parameters of the three models the config builds (``build_models``, on the meta device), and of one
    latent-generator block."""
    from semanticgen.train.stages import build_models

    with torch.device("meta"):
        models = build_models(cfg.model, widths)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    counts["latent_block"] = sum(p.numel() for p in models["latent_generator"].blocks[0].parameters())
    return counts


def semanticgen_params(counts: dict[str, int]) -> int:
    return counts["latent_generator"] + counts["semantic_generator"] + counts["compressor"]


def match_depth(settings: Settings, widths, target: int, extra: Sequence[str] = ()) -> tuple[int, int]:
    """``(depth, params)``: the baseline latent generator's depth whose parameter count is closest to ``target``
    (the smaller depth on a tie), and that count. Its unused semantic-token embedding is counted: it is in the
    exported weights."""
    best = None
    depth = 1
    while True:
        cfg = load(settings, [*extra, f"model.latent_generator.depth={depth}"])
        params = param_counts(cfg, widths)["latent_generator"]
        if best is None or abs(params - target) < abs(best[1] - target):
            best = (depth, params)
        if params > target:  # parameters grow with depth: deeper only moves away
            return best
        depth += 1


def global_batch(cfg, stage: str, nproc: int) -> int:
    """Clips per optimizer step of ``stage``: micro-batch x ranks x gradient accumulation."""
    return cfg.data.micro_batch_size * nproc * getattr(cfg, stage).optim.grad_accum


def _encoded_batch(cfg, encoders, size: int) -> dict[str, Any]:
    """The first ``size`` clips of the run's data stream, encoded as training encodes them."""
    from semanticgen.data import StreamDataset, build_dataset, collate

    stream = StreamDataset(build_dataset(cfg.data, seed=cfg.seed), cfg.seed)
    return encoders.encode_batch(collate([stream[i] for i in range(size)]), torch.device("cpu"))


def step_flops(cfg, stage_name: str, encoders, nproc: int) -> int:
    """FLOPs of one optimizer step of ``stage_name`` (forward + backward of the stage module on one global batch)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from semanticgen.train.stages import DataWidths, build_models, build_stage

    torch.manual_seed(cfg.seed)
    models = build_models(cfg.model, DataWidths.from_encoders(encoders))
    null = encoders.null_text(torch.device("cpu"))
    stage = build_stage(stage_name, models, getattr(cfg, stage_name), cfg.seed, null)
    batch = _encoded_batch(cfg, encoders, global_batch(cfg, stage_name, nproc))
    counter = FlopCounterMode(display=False)
    # Math attention: FlopCounterMode counts its matmuls; it has no formula for the CPU flash kernel.
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss, _ = stage(batch)
        loss.backward()
    return int(counter.get_total_flops())


def compressor_dim(cfg) -> int:
    """The config's compressor width (the model's default when the config leaves it out)."""
    from semanticgen.models import SemanticCompressor

    return int(cfg.model.get("compressor", {}).get("dim", SemanticCompressor.Config.dim))


@dataclass
class Budget:
    """Parameter counts and per-step FLOPs: ``semanticgen_dim<D>`` per compressor width, and ``baseline``."""

    params: dict[str, Any] = field(default_factory=dict)
    flops: dict[str, Any] = field(default_factory=dict)
    baseline_depth: int = 0


def count(settings: Settings, vae_dir: Path) -> Budget:
    """Parameters and FLOPs per step of SemanticGen (each width) and of the matched-depth baseline (matched to
    SemanticGen with the config's own width)."""
    from semanticgen.train.stages import DataWidths, build_models

    cfg = load(settings)
    encoders = _encoders(cfg, vae_dir)
    widths = DataWidths.from_encoders(encoders)
    base_dim = compressor_dim(cfg)
    out = Budget()
    for dim in dict.fromkeys([base_dim, *settings.widths]):
        cfg_w = load(settings, [f"model.compressor.dim={dim}"])
        counts = param_counts(cfg_w, widths)
        out.params[f"semanticgen_dim{dim}"] = {**counts, "total": semanticgen_params(counts)}
        out.flops[f"semanticgen_dim{dim}"] = {s: step_flops(cfg_w, s, encoders, settings.nproc) for s in STAGES}
    target = out.params[f"semanticgen_dim{base_dim}"]["total"]
    depth, params = match_depth(settings, widths, target, BASELINE)
    cfg_b = load(settings, [*BASELINE, f"model.latent_generator.depth={depth}"])
    with torch.device("meta"):
        generator = build_models(cfg_b.model, widths)["latent_generator"]
    out.baseline_depth = depth
    out.params["baseline"] = {
        "latent_generator": params,
        "latent_block": sum(p.numel() for p in generator.blocks[0].parameters()),
        "depth": depth,
        "semanticgen_depth": int(cfg.model.get("latent_generator", {}).get("depth", 0)),
        # Counted in its total (the exported weights hold it) though the baseline never feeds it a token.
        "unused_sem_embed": sum(p.numel() for n, p in generator.named_parameters() if n.startswith("sem_embed.")),
        "total": params,
        "minus_semanticgen": params - target,
    }
    out.flops["baseline"] = {"latent": step_flops(cfg_b, "latent", encoders, settings.nproc)}
    return out


def plan_runs(settings: Settings, budget: Budget) -> list[RunSpec]:
    """Both methods at every budget (the baseline's steps FLOP-matched), then SemanticGen's other widths."""
    cfg = load(settings)
    base_dim = compressor_dim(cfg)
    sem_flops = budget.flops[f"semanticgen_dim{base_dim}"]
    runs = []
    for fraction in settings.fractions:
        lat = max(1, round(cfg.latent.steps * fraction))
        sem = max(1, round(cfg.semantic.steps * fraction))
        total = lat * sem_flops["latent"] + sem * sem_flops["semantic"]
        steps_b = max(1, round(total / budget.flops["baseline"]["latent"]))
        tag = f"b{fraction:.2f}"
        runs.append(RunSpec(f"semanticgen-{tag}", "semanticgen", fraction, lat, sem, compressor_dim=base_dim))
        runs.append(RunSpec(f"baseline-{tag}", "baseline", fraction, steps_b, 0, depth=budget.baseline_depth))
    fraction = width_fraction(settings)
    lat, sem = max(1, round(cfg.latent.steps * fraction)), max(1, round(cfg.semantic.steps * fraction))
    for dim in settings.widths:
        if dim != base_dim:
            name = f"semanticgen-dim{dim}-b{fraction:.2f}"
            runs.append(RunSpec(name, "semanticgen", fraction, lat, sem, compressor_dim=dim))
    return runs


def width_fraction(settings: Settings) -> float:
    """The budget of the compressor-width runs: one of the curves' budgets, whose run of the config's own width
    is reused."""
    fraction = max(settings.fractions) if settings.width_fraction is None else settings.width_fraction
    if fraction not in settings.fractions:
        raise ValueError(f"width_fraction {fraction} must be one of the fractions {settings.fractions}")
    return fraction


def run_flops(spec: RunSpec, budget: Budget) -> int:
    if spec.method == "baseline":
        return spec.latent_steps * budget.flops["baseline"]["latent"]
    per_step = budget.flops[f"semanticgen_dim{spec.compressor_dim}"]
    return spec.latent_steps * per_step["latent"] + spec.semantic_steps * per_step["semantic"]


def run_params(spec: RunSpec, budget: Budget) -> int:
    key = "baseline" if spec.method == "baseline" else f"semanticgen_dim{spec.compressor_dim}"
    return budget.params[key]["total"]


# ------------------------------------------------------------------------------------------------ running


def child_env(device: str) -> dict[str, str]:
    """One intra-op thread per rank (torchrun's own choice for several ranks), no stale rank variables, and no
    visible GPU for a CPU study (several ranks on one GPU would fail in NCCL)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def train_cmd(settings: Settings, run_dir: Path, overrides: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    sets = [a for o in (*settings.overrides, *overrides, "log.progress=false") for a in ("--set", o)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={settings.nproc}",
        "-m",
        "semanticgen.train",
        str(settings.config),
        "--run-dir",
        str(run_dir),
        *sets,
        *extra,
    ]


# Rank 0's last line of a run that got to its end (``semanticgen.train.loop.train``).
_FINISHED = "semanticgen.train.loop: training finished at step"


def _train(cmd: list[str], run_dir: Path, device: str, product: str) -> tuple[float, str | None]:
    """Run ``cmd`` to completion (output in ``RUN/train.log``); ``(wall seconds, note)``. A failure raises with the
    log's end, except a rank aborting at exit after the run finished (rank 0 logged its end and ``RUN/product``
    exists): that happened in 1 of 9 runs here ("terminate called without an active exception" after the last
    export), and the finished run is kept, with a note."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(device), cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return seconds, None
    text = log.read_text()
    if _FINISHED in text and (run_dir / product).is_file():
        return seconds, f"torchrun exited {proc.returncode} after the run finished (a rank aborted at exit)"
    raise RuntimeError(f"training failed ({proc.returncode}): {' '.join(cmd)}\n{text[-4000:]}")


def step_seconds(run_dir: Path) -> float:
    """Sum of the logged optimizer-step times (no start-up, encoder statistics or exports)."""
    path = run_dir / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(r["step_time_s"] for r in recs if r.get("stage") in ("latent", "semantic"))


def config_digest(settings: Settings) -> str:
    """Hash of the config file's text: a changed ``configs/tiny.toml`` does not reuse old runs."""
    return hashlib.sha256(Path(settings.config).read_bytes()).hexdigest()[:16]


def learned_vae(cfg) -> bool:
    """True when the config trains a learned VAE itself (``kind = "learned"`` and no ``path``)."""
    spec = cfg.encoders.get("vae", {})
    return spec.get("kind") == "learned" and not spec.get("path")


def prepare_vae(settings: Settings, study: Path, device: str) -> tuple[Path, float | None]:
    """A config with a learned VAE: train it once (``--steps 0``, the autoencoder stage alone) into
    ``runs/vae``; every run then starts from a copy of that file, so both methods see the same latents and the
    study trains the VAE once. Returns the VAE's directory and its training seconds (None: nothing trained)."""
    from semanticgen.encoders.learned_vae import VAE_FILE

    vae_dir = study / "runs" / "vae"
    if (vae_dir / VAE_FILE).is_file() and _reusable(vae_dir, {"config": config_digest(settings), "vae": True}):
        return vae_dir, json.loads((vae_dir / _RUN_RECORD).read_text()).get("train_seconds")
    seconds, _ = _train(train_cmd(settings, vae_dir, [], ["--steps", "0"]), vae_dir, device, VAE_FILE)
    _write_json(
        vae_dir / _RUN_RECORD, {"key": {"config": config_digest(settings), "vae": True}, "train_seconds": seconds}
    )
    return vae_dir, seconds


def _reusable(run_dir: Path, key: dict) -> bool:
    path = run_dir / _RUN_RECORD
    return path.is_file() and json.loads(path.read_text()).get("key") == key


def train_run(settings: Settings, spec: RunSpec, run_dir: Path, vae_dir: Path | None, device: str) -> dict:
    """Train one run (or reuse a finished one with the same config, overrides and ranks); its record."""
    key = {
        "config": config_digest(settings),
        "overrides": [*settings.overrides, *spec.overrides()],
        "nproc": settings.nproc,
    }
    if (run_dir / _RUN_RECORD).is_file():
        if _reusable(run_dir, key) and (run_dir / "model.safetensors").is_file():
            return json.loads((run_dir / _RUN_RECORD).read_text())
        raise ValueError(f"{run_dir} holds a finished run of other settings: use a new --out, or remove it")
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a run stopped before it finished: its checkpoints would refuse a fresh start
    if vae_dir is not None:
        from semanticgen.encoders.learned_vae import VAE_FILE

        run_dir.mkdir(parents=True)
        shutil.copy2(vae_dir / VAE_FILE, run_dir / VAE_FILE)
    seconds, note = _train(train_cmd(settings, run_dir, spec.overrides()), run_dir, device, "model.safetensors")
    record = {"key": key, "train_seconds": seconds, "step_seconds": step_seconds(run_dir), "exit_note": note}
    _write_json(run_dir / _RUN_RECORD, record)
    return record


@contextlib.contextmanager
def _eval_threads():
    """As ``semanticgen eval`` sets them (one thread on 2 shared CPUs, see ``configure_threads``), restored after."""
    from semanticgen.threads import configure_threads

    previous = torch.get_num_threads()
    configure_threads()
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def evaluate(settings: Settings, run_dir: Path, record: dict, device: str) -> dict:
    """The prompt-adherence eval of a run (reused when the run's record holds one with the same settings)."""
    from semanticgen.evaluation.prompt_eval import evaluate_run

    key = {"prompts": settings.prompts, "steps": settings.sample_steps, "seed": settings.seed}
    if record.get("eval", {}).get("key") == key:
        return record["eval"]
    start = time.perf_counter()
    with _eval_threads():
        payload = evaluate_run(
            run_dir,
            run_dir / "eval",
            num_prompts=settings.prompts,
            steps=settings.sample_steps,
            seed=settings.seed,
            device=device,
            progress=False,
        )
    accuracy = payload["accuracy"]
    record["eval"] = {
        "key": key,
        "seconds": time.perf_counter() - start,
        "generated": accuracy["generated"],
        "stage2_ceiling": accuracy.get("stage2_ceiling"),
        "detector_vae_roundtrip": accuracy.get("detector_vae_roundtrip"),
        "guidance": payload["settings"]["guidance"],
    }
    _write_json(run_dir / _RUN_RECORD, record)
    return record["eval"]


# ------------------------------------------------------------------------------------------------ output


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)  # a reader never sees a half-written file


def environment(device: str) -> dict[str, Any]:
    """The machine record every result file carries (:func:`semanticgen.environment.environment`), plus the load
    average: the study's runs take half an hour, and a busy machine slows them without changing their results."""
    from semanticgen.environment import environment as machine_record

    return {**machine_record(device), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def row(spec: RunSpec, budget: Budget, record: dict, reference_flops: dict[float, int]) -> dict[str, Any]:
    """One run's entry of ``convergence.json`` (and, flattened, of the bench table)."""
    flops = run_flops(spec, budget)
    acc = (record.get("eval") or {}).get("generated") or {}
    return {
        "suite": "convergence",
        "run": spec.name,
        "method": spec.method,
        "budget": round(spec.budget, 4),
        "compressor_dim": spec.compressor_dim,
        "depth": spec.depth,
        "latent_steps": spec.latent_steps,
        "semantic_steps": spec.semantic_steps,
        "params": run_params(spec, budget),
        "train_tflop": flops / 1e12,
        "flops_vs_semanticgen": flops / reference_flops[spec.budget] if spec.budget in reference_flops else None,
        "train_s": record.get("train_seconds"),
        "step_s": record.get("step_seconds"),
        **{a: acc.get(a) for a in ASPECTS},
        "stage2_ceiling_all": ((record.get("eval") or {}).get("stage2_ceiling") or {}).get("all"),
    }


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Accuracy (colour, direction, shape, all three) against training FLOPs for both methods, and the widths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["runs"] if r.get("all") is not None]
    curves = [r for r in rows if r["run"].startswith(("semanticgen-b", "baseline-b"))]
    fig = plt.figure(figsize=(12, 6.5))
    grid = fig.add_gridspec(2, 3)
    styles = {"semanticgen": ("-o", "SemanticGen (semantic + latent stage)"), "baseline": ("--s", "one-stage baseline")}
    for i, aspect in enumerate(("colour", "direction", "shape", "all")):
        ax = fig.add_subplot(grid[i // 2, i % 2])
        for method in METHODS:
            pts = sorted((r["train_tflop"], r[aspect]) for r in curves if r["method"] == method)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, [100 * y for y in ys], styles[method][0], label=styles[method][1])
        ax.axhline(100 * CHANCE[aspect], color="grey", lw=0.8, ls=":", label="chance")
        ax.set_title(f"{aspect} accuracy" if aspect != "all" else "all three right", fontsize=10)
        ax.set_xlabel("training TFLOP")
        ax.set_ylabel("% of prompts")
        ax.set_ylim(-3, 103)
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[:, 2])
    fraction = payload["settings"]["width_budget"]
    widths = sorted(
        (r for r in rows if r["method"] == "semanticgen" and r["budget"] == round(fraction, 4)),
        key=lambda r: r["compressor_dim"],
    )
    if widths:
        bar = 0.2
        for j, aspect in enumerate(ASPECTS):
            ax.bar(
                [k + (j - 1.5) * bar for k in range(len(widths))],
                [100 * r[aspect] for r in widths],
                bar,
                label=aspect,
            )
        ax.set_xticks(range(len(widths)), [f"dim {r['compressor_dim']}" for r in widths])
        ax.set_ylim(0, 118)  # room for the legend above the bars
        ax.set_ylabel("% of prompts")
        budget = "the full schedule" if fraction == 1 else f"{fraction:g} of the schedule"
        ax.set_title(f"compressor width, {budget}", fontsize=10)
        ax.legend(fontsize=8, ncol=2, loc="upper center")
        ax.grid(True, axis="y", alpha=0.3)
    s = payload["settings"]
    fig.suptitle(
        f"Convergence at equal parameters and training FLOPs ({s['prompts']} of 84 prompts, {s['sample_steps']} "
        f"sampling steps, seed {s['seed']}; {payload['environment']['device']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def new_study_dir(quick: bool, root: Path = DEFAULT_ROOT) -> Path:
    """``root/convergence-<UTC timestamp>[-quick]`` that does not exist yet."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = root / f"convergence-{stamp}{'-quick' if quick else ''}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def study(settings: Settings, out: Path, *, device: str = "cpu", progress=None, log=print) -> dict[str, Any]:
    """Count, train, evaluate and write ``convergence.json`` and ``convergence.png`` into ``out``; the payload."""
    progress = progress or NullProgress()
    out = Path(out).resolve()  # the ranks run in the repository root
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Every count and run reads one copy of the config, so an edit to the original during a long study cannot make
    # its runs disagree with each other or with the counts; the copy also records what was trained.
    snapshot = out / "config.toml" if Path(settings.config).suffix == ".toml" else out / "config.yaml"
    if Path(settings.config).resolve() != snapshot.resolve():
        text = Path(settings.config).read_bytes()
        if snapshot.is_file() and snapshot.read_bytes() != text:
            raise ValueError(
                f"{out} holds a study of another version of {settings.config} (its copy: {snapshot}); "
                "use a new --out, or remove that directory"
            )
        snapshot.write_bytes(text)
    source, settings = settings.config, dataclasses.replace(settings, config=snapshot)
    cfg = load(settings)
    vae_dir, vae_seconds = (out / "runs" / "vae", None)
    if learned_vae(cfg):
        vae_dir, vae_seconds = prepare_vae(settings, out, device)
        log(f"convergence: learned VAE in {vae_dir} ({vae_seconds or 0:.0f} s)")
    budget = count(settings, vae_dir)
    progress.advance("convergence: parameters and FLOPs counted")
    specs = plan_runs(settings, budget)
    reference = {s.budget: run_flops(s, budget) for s in specs if s.name.startswith("semanticgen-b")}
    payload: dict[str, Any] = {
        "environment": environment(device),
        "settings": {
            **dataclasses.asdict(settings),
            "config": snapshot.name,  # the copy in this directory
            "config_source": str(source),
            "width_budget": width_fraction(settings),
            "config_sha256_16": config_digest(settings),
            "global_batch": {s: global_batch(cfg, s, settings.nproc) for s in ("latent", "semantic")},
            "schedule": {"latent_steps": cfg.latent.steps, "semantic_steps": cfg.semantic.steps},
            "learned_vae_seconds": vae_seconds,
        },
        "params": budget.params,
        "flops_per_step": budget.flops,
        "runs": [],
        "notes": [
            "FLOPs: FlopCounterMode over forward + backward of the stage module on one global batch, attention on "
            "the math backend; AdamW's update, the frozen encoders and a learned VAE are not counted",
            "each budget is a separate training run, so every cosine schedule decays to its end",
            "baseline params include its unused semantic-token embedding (in its exported weights); SemanticGen's "
            "are latent generator + semantic generator + compressor",
            f"accuracies: {settings.prompts} of the 84 prompts (seeded sample, seed {settings.seed}), "
            f"{settings.sample_steps} sampling steps per stage, guidance as semanticgen generate's; one prompt = "
            f"{100 / settings.prompts:.1f} points; one training seed per run",
        ],
    }
    for spec in specs:
        run_dir = out / "runs" / spec.name
        t0 = time.perf_counter()
        record = train_run(settings, spec, run_dir, vae_dir if learned_vae(cfg) else None, device)
        evaluate(settings, run_dir, record, device)
        entry = {
            **row(spec, budget, record, reference),
            "eval_s": record["eval"]["seconds"],
            "dir": str(run_dir.relative_to(out)),
            "exit_note": record.get("exit_note"),
        }
        payload["runs"].append(entry)
        _seconds(payload, started)
        _write_json(out / "convergence.json", payload)
        log(
            f"convergence: {spec.name}: {spec.latent_steps}+{spec.semantic_steps} steps, {entry['train_tflop']:.3g} "
            f"TFLOP, colour {entry['colour']:.0%} shape {entry['shape']:.0%} direction {entry['direction']:.0%} "
            f"all {entry['all']:.0%} ({time.perf_counter() - t0:.0f} s)"
        )
        progress.advance(f"convergence: {spec.name}")
    plot(payload, out / "convergence.png")
    _seconds(payload, started)
    _write_json(out / "convergence.json", payload)
    return payload


def _seconds(payload: dict[str, Any], started: float) -> None:
    """This invocation's wall time, and the study's from its runs' records (reused runs keep their own times)."""
    runs = payload["runs"]
    train = sum(r["train_s"] or 0.0 for r in runs)
    evals = sum(r["eval_s"] or 0.0 for r in runs)
    vae = payload["settings"]["learned_vae_seconds"] or 0.0
    payload["seconds"] = {
        "this_invocation": time.perf_counter() - started,
        "training": train,
        "evals": evals,
        "learned_vae": vae,
        "from_scratch": train + evals + vae,  # what one uninterrupted study spends, less the counting
    }


# ------------------------------------------------------------------------------------------------ suite


def steps(quick: bool = False) -> int:
    """Progress steps of :func:`run`: the counting, then one per run."""
    s = QUICK if quick else Settings()
    if not s.config.is_file():  # skipped: see skip_reason
        return 1
    return 1 + 2 * len(s.fractions) + len(set(s.widths) - {compressor_dim(load(s))})


def skip_reason(device: str) -> str | None:
    """A CPU study (gloo ranks) on the repository's tiny config."""
    if not device.startswith("cpu"):
        return "a CPU/gloo study (torchrun ranks on the tiny config): run it with --device cpu"
    if not DEFAULT_CONFIG.is_file():
        return f"needs {DEFAULT_CONFIG} from a source checkout"
    return None


def run(quick: bool = False, device: str = "cpu", progress=None, out: str | Path | None = None) -> list[dict]:
    """The study (``quick``: :data:`QUICK`) into ``out`` (default: a new ``bench-results/convergence-<time>``);
    one row per training run."""
    reason = skip_reason(device)
    if reason is not None:
        print(f"convergence: {reason}")
        return []
    out = Path(out) if out is not None else new_study_dir(quick)
    payload = study(QUICK if quick else Settings(), out, device=device, progress=progress)
    print(f"convergence: study written to {out}")
    return [{k: v for k, v in r.items() if k != "dir"} for r in payload["runs"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the plumbing: tiny budgets, 3 prompts, 2 steps")
    parser.add_argument("--out", default=None, help="study directory (an existing one reuses its finished runs)")
    parser.add_argument("--config", default=None, help=f"training config (default {DEFAULT_CONFIG})")
    parser.add_argument("--fractions", type=float, nargs="+", default=None, help="budgets, fractions of the config's")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="compressor dims to compare")
    parser.add_argument("--width-fraction", type=float, default=None, help="their budget, one of the fractions")
    parser.add_argument("--prompts", type=int, default=None, help="prompts of the 84 judged per run")
    parser.add_argument("--sample-steps", type=int, default=None, help="sampling steps per stage in the eval")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--replot", action="store_true", help="only redraw OUT/convergence.png from its JSON")
    args = parser.parse_args(argv)
    if args.replot:
        if not args.out:
            parser.error("--replot needs --out")
        print(plot(json.loads((Path(args.out) / "convergence.json").read_text()), Path(args.out) / "convergence.png"))
        return 0
    settings = QUICK if args.quick else Settings()
    changes = {
        "config": Path(args.config) if args.config else None,
        "fractions": tuple(args.fractions) if args.fractions else None,
        "widths": tuple(args.widths) if args.widths else None,
        "width_fraction": args.width_fraction,
        "prompts": args.prompts,
        "sample_steps": args.sample_steps,
        "overrides": (*settings.overrides, *args.set) if args.set else None,
    }
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    out = Path(args.out) if args.out else new_study_dir(args.quick)
    payload = study(settings, out)
    for r in payload["runs"]:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "dir"})
    print(
        f"study: {out} ({payload['seconds']['this_invocation']:.0f} s; {payload['seconds']['from_scratch']:.0f} s of "
        "training, evals and autoencoder in all)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
