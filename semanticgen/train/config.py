"""Typed training configuration loaded from TOML or YAML.

A config file maps onto :class:`TrainConfig`; every table is a dataclass and every unknown key is an error that names
the key (``UsageError: unknown config key 'optim.lrr'``). Command-line overrides ``--set key=value`` use dotted keys
and TOML value syntax (``--set optim.lr=3e-4 --set stage='"latent"'``; bare words are taken as strings).

Every mistake in a config is a :class:`~semanticgen.errors.UsageError` (a ``ValueError``), which the command lines
print as one line. :func:`load_config` names where the mistake is: the file (``configs/x.toml: config key 'seed'
must be an integer, got 'x'``) or the override that made it (``--set seed=x: ...``).

Model tables (``[model.latent_generator]`` etc.) are passed as keyword arguments to that model's nested ``Config``
dataclass, and encoder tables (``[encoders.vae]`` etc.) to ``semanticgen.encoders.build_*``; both are checked by
those constructors, which need what the data and the encoders fix (widths), so training checks them later, before
its first step. :class:`ConfigSources` keeps the raw config after the file and after each ``--set``, so those later
checks name where the mistake is as :func:`load_config` does (:meth:`ConfigSources.check`).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from semanticgen._checks import check_number, is_int, is_real
from semanticgen.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

STAGES = ("latent", "semantic", "both")
MODEL_TABLES = ("latent_generator", "semantic_generator", "compressor")
ENCODER_TABLES = ("vae", "semantic", "text")

_T = TypeVar("_T")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine (or constant) decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 10
    schedule: str = "cosine"  # "cosine" | "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping (the norm is still logged)
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class StageConfig:
    """Settings of one training stage.

    ``steps`` counts optimizer steps of this stage. For ``stage = "both"`` the global step runs through the latent
    stage (steps 1..latent.steps) and then the semantic stage.
    """

    steps: int = 100
    optim: OptimConfig = field(default_factory=OptimConfig)
    timestep_kind: str = "logit_normal"  # passed to rectified_flow.sample_timesteps
    timestep_shift: float = 1.0
    text_dropout: float = 0.1  # probability of an empty caption per sample (classifier-free guidance)
    kl_weight: float = 1e-3  # latent stage: weight of the compressor KL term
    sem_noise_level: float = (
        0.1  # latent stage: noise mixed into z_sem during training (the paper adds it at inference)
    )
    # Semantic stage: train on tokens normalised per channel by their mean and std over the first
    # ``norm_clips`` training clips (measured with the frozen compressor before the first step).
    normalize_tokens: bool = True
    norm_clips: int = 1024
    # Latent stage: false trains the one-stage text-to-latent baseline (no semantic tokens in context, no compressor),
    # the "VAE latent space" comparison of the paper; such a run has no semantic stage.
    semantic_tokens: bool = True


@dataclass
class AutoencoderConfig:
    """Training of a learned VAE, the run's first stage when ``[encoders.vae]`` has ``kind = "learned"`` and no
    ``path`` (see ``semanticgen.train.autoencoder``): AdamW with linear warm-up then cosine decay to ``lr / 10``.

    ``batch`` is per rank. ``latent_noise``: Gaussian noise, in units of each latent channel's std in the batch,
    added to the latents before decoding, so the decoder tolerates latents that are a little off (as generated ones
    are). ``residual_weight``: L2 penalty on the learned part of the latents, which keeps them near the pooled
    colours. ``stats_clips``: clips whose latents give the per-channel mean and std that normalise them.
    """

    steps: int = 600
    batch: int = 8
    lr: float = 3e-3  # 5e-3 diverged back to the PixelVAE (the learned parts died)
    warmup_steps: int = 20
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    latent_noise: float = 0.1
    residual_weight: float = 1e-3
    stats_clips: int = 1024


@dataclass
class DataConfig:
    """Where training clips come from and how they are shaped.

    ``kind``: ``"synthetic"`` (procedural moving shapes), ``"video_folder"`` (videos + captions under ``path``) or
    ``"shards"`` (pre-encoded safetensors shards under ``path``, see ``python -m semanticgen.train preencode``).
    ``micro_batch_size`` is per rank: the global batch of one optimizer step is
    ``micro_batch_size * world_size * grad_accum``.
    """

    kind: str = "synthetic"
    path: str = ""
    captions: str = ""  # video_folder: optional .jsonl with {"video": relative path, "caption": text} per line
    num_samples: int = 256  # synthetic: dataset length
    height: int = 32
    width: int = 32
    vae_frames: int = 17  # frames of the 24 fps stream fed to the VAE
    vae_fps: float = 24.0
    sem_fps: float = 1.6
    sem_frames: int = 2  # frames of the 1.6 fps stream fed to the semantic encoder
    micro_batch_size: int = 2
    num_workers: int = 0


@dataclass
class ParallelConfig:
    """FSDP2 settings. ``mixed_precision``: ``"auto"`` is bf16 params / fp32 reduce on CUDA and fp32 on CPU.

    ``context_parallel = C``: the world forms a ``(dp, cp) = (world / C, C)`` mesh. FSDP2 shards parameters over
    all ``dp x cp`` ranks; in the latent stage the ``C`` ranks of a ``cp`` group share one clip, split by whole
    windows (``attention = "swin"`` only). The semantic stage stays data parallel over the whole world.
    """

    mixed_precision: str = "auto"  # "auto" | "bf16" | "fp32"
    context_parallel: int = 1  # ranks sharing one clip in the latent stage; must divide the world size
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block


@dataclass
class CheckpointConfig:
    save_every: int = 100  # steps; the last step of every stage is always saved
    keep_last: int = 3


@dataclass
class LogConfig:
    progress: bool = True  # progress bar on rank 0
    every: int = 1  # write metrics.jsonl every N steps


@dataclass
class TrainConfig:
    """Everything one training run needs; see ``configs/tiny.toml`` for a complete example."""

    stage: str = "both"
    seed: int = 0
    run_dir: str = "runs/default"
    model: dict[str, dict[str, Any]] = field(default_factory=dict)  # latent_generator / semantic_generator / compressor
    encoders: dict[str, dict[str, Any]] = field(default_factory=dict)  # vae / semantic / text
    data: DataConfig = field(default_factory=DataConfig)
    latent: StageConfig = field(default_factory=StageConfig)
    semantic: StageConfig = field(default_factory=StageConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        """Raise :class:`~semanticgen.errors.UsageError` naming the first setting that cannot work."""
        if self.stage not in STAGES:
            raise UsageError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.data.kind not in ("synthetic", "video_folder", "shards"):
            raise UsageError(f"data.kind must be 'synthetic', 'video_folder' or 'shards', got {self.data.kind!r}")
        if self.data.kind != "synthetic" and not self.data.path:
            raise UsageError(f"data.path is required for data.kind={self.data.kind!r}")
        if self.data.micro_batch_size < 1:
            raise UsageError(f"data.micro_batch_size must be >= 1, got {self.data.micro_batch_size}")
        if self.parallel.mixed_precision not in ("auto", "bf16", "fp32"):
            raise UsageError(
                f"parallel.mixed_precision must be 'auto', 'bf16' or 'fp32', got {self.parallel.mixed_precision!r}"
            )
        if self.parallel.context_parallel < 1:
            raise UsageError(f"parallel.context_parallel must be >= 1, got {self.parallel.context_parallel}")
        if self.parallel.context_parallel > 1:
            attention = self.model.get("latent_generator", {}).get("attention", "full")
            if attention != "swin":
                raise UsageError(
                    f"parallel.context_parallel = {self.parallel.context_parallel} needs "
                    f"model.latent_generator.attention = 'swin' (windows split the clip over ranks), got {attention!r}"
                )
            if not self.latent.semantic_tokens:
                raise UsageError(
                    "latent.semantic_tokens = false (the text-to-latent baseline) has no context parallelism: set "
                    "parallel.context_parallel = 1"
                )
            if "latent" not in self.stage_list():
                raise UsageError(
                    f"parallel.context_parallel = {self.parallel.context_parallel} applies to the latent stage only; "
                    f"stage = {self.stage!r} trains the semantic stage, which is data parallel over the whole world: "
                    "set context_parallel = 1"
                )
        if not self.latent.semantic_tokens and self.stage != "latent":
            raise UsageError(
                "latent.semantic_tokens = false trains the one-stage text-to-latent baseline, which has no semantic "
                f"stage: set stage = 'latent' (got {self.stage!r})"
            )
        for name in ("latent", "semantic"):
            stage: StageConfig = getattr(self, name)
            if stage.steps < 0:
                raise UsageError(f"{name}.steps must be >= 0, got {stage.steps}")
            if stage.optim.grad_accum < 1:
                raise UsageError(f"{name}.optim.grad_accum must be >= 1, got {stage.optim.grad_accum}")
            if stage.optim.schedule not in ("cosine", "constant"):
                raise UsageError(f"{name}.optim.schedule must be 'cosine' or 'constant', got {stage.optim.schedule!r}")
            if stage.norm_clips < 1:
                raise UsageError(f"{name}.norm_clips must be >= 1, got {stage.norm_clips}")
            if not 0.0 <= stage.text_dropout < 1.0:
                raise UsageError(f"{name}.text_dropout must be in [0, 1), got {stage.text_dropout}")
            # Checked here, not where the stage is built: a bad value there surfaced as a traceback after the
            # stages before it (the autoencoder, the latent stage) had trained.
            optim = stage.optim
            check_number(f"{name}.timestep_shift", stage.timestep_shift, positive=True, finite=True, error=UsageError)
            for key, value in (
                ("optim.lr", optim.lr),  # 0 is allowed: a run that must not move the weights
                ("optim.weight_decay", optim.weight_decay),
                ("optim.warmup_steps", optim.warmup_steps),
                ("optim.eps", optim.eps),
                ("kl_weight", stage.kl_weight),
            ):
                check_number(f"{name}.{key}", value, minimum=0, finite=True, error=UsageError)
            for key, value in (("optim.min_lr_ratio", optim.min_lr_ratio), ("sem_noise_level", stage.sem_noise_level)):
                check_number(f"{name}.{key}", value, minimum=0, maximum=1, error=UsageError)
            if len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
                raise UsageError(f"{name}.optim.betas must be two numbers in [0, 1), got {list(optim.betas)}")
        data = self.data
        for key in ("num_samples", "height", "width", "vae_frames", "sem_frames"):
            if getattr(data, key) < 1:
                raise UsageError(f"data.{key} must be >= 1, got {getattr(data, key)}")
        for key in ("vae_fps", "sem_fps"):
            check_number(f"data.{key}", getattr(data, key), positive=True, finite=True, error=UsageError)
        ae = self.autoencoder
        for name in ("steps", "batch", "stats_clips"):
            if getattr(ae, name) < 1:
                raise UsageError(f"autoencoder.{name} must be >= 1, got {getattr(ae, name)}")
        if not ae.lr > 0:
            raise UsageError(f"autoencoder.lr must be > 0, got {ae.lr}")
        for name in ("warmup_steps", "latent_noise", "residual_weight"):
            if getattr(ae, name) < 0:
                raise UsageError(f"autoencoder.{name} must be >= 0, got {getattr(ae, name)}")
        if self.checkpoint.keep_last < 1:
            raise UsageError(f"checkpoint.keep_last must be >= 1, got {self.checkpoint.keep_last}")
        if self.checkpoint.save_every < 1:
            raise UsageError(f"checkpoint.save_every must be >= 1, got {self.checkpoint.save_every}")
        config_tables("model", self.model, MODEL_TABLES)
        config_tables("encoders", self.encoders, ENCODER_TABLES)

    def stage_list(self) -> list[str]:
        """The stages this run trains, in order."""
        return ["latent", "semantic"] if self.stage == "both" else [self.stage]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_tables(section: str, value: object, known: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``value``, the ``section`` of a config that holds named tables (``[model.<name>]``, ``[encoders.<name>]``),
    once checked: a :class:`~semanticgen.errors.UsageError` names a ``<name>`` not in ``known`` or a value that is
    not a table (which used to reach the model code and fail there with a traceback)."""
    if not isinstance(value, dict):
        raise UsageError(f"config key '{section}' must be a table, got {type(value).__name__}")
    for name in sorted(value):
        if name not in known:
            raise UsageError(f"unknown config key '{section}.{name}' (known keys of [{section}]: {', '.join(known)})")
        if not isinstance(value[name], dict):
            raise UsageError(f"config key '{section}.{name}' must be a table, got {value[name]!r}")
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats, lists for tuples)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UsageError(f"config key '{key}' must be a table, got {type(value).__name__}")
        return _from_dict(tp, value, key + ".")
    if tp is float:
        if not is_real(value):
            raise UsageError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if not is_int(value):
            raise UsageError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UsageError(f"config key '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"config key '{key}' must be a table, got {type(value).__name__}")
        return copy.deepcopy(value)
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise UsageError(
                f"unknown config key '{prefix}{key}' (known keys of [{prefix.rstrip('.') or 'top level'}]: "
                f"{', '.join(sorted(names))})"
            )
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> ``(["optim", "lr"], 3e-4)``; the value uses TOML syntax, a bare word is a string."""
    if "=" not in text:
        raise UsageError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UsageError(f"--set expects a dotted key before '=', got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw config dict with each ``key=value`` override applied."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--set {text!r}: '{part}' is not a table")
            node = child
        node[path[-1]] = value
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Raw dict from a ``.toml``, ``.yaml`` or ``.yml`` file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    if path.suffix == ".toml":
        with path.open("rb") as f:
            try:
                return tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:  # the parser's message names the line, not the file
                raise UsageError(f"{path}: not valid TOML: {exc}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        with path.open() as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise UsageError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return data
    raise UsageError(f"config file must end in .toml, .yaml or .yml, got {path.name!r}")


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a raw dict."""
    cfg = _from_dict(TrainConfig, data)
    cfg.validate()
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read ``path`` (TOML or YAML), apply ``--set`` overrides, check and return the config.

    Raises:
        UsageError: the file is missing or unreadable, or the config cannot work. The message starts with where the
            mistake is: ``path`` when the file alone has it, else ``--set key=value`` for the first override after
            which the config has it (an override can also repair the file, or clash with it).
    """
    return ConfigSources.read(path, overrides).load()


@dataclass(frozen=True)
class ConfigSources:
    """Where a config comes from: ``(name, raw)`` for the file, then for each ``--set`` in order, ``raw`` being
    the config as read (a dict of TOML values) after that source. Keeps the sources so that a check run later
    (the ``[model]`` tables once the encoders' widths are known) names where its mistake is, as
    :func:`load_config` does.

    Example:
        >>> sources = ConfigSources.read("configs/tiny.toml", ["seed=x"])
        >>> sources.load()
        Traceback (most recent call last):
        ...
        semanticgen.errors.UsageError: --set seed=x: config key 'seed' must be an integer, got 'x'
    """

    steps: tuple[tuple[str, dict[str, Any]], ...]

    @classmethod
    def read(cls, path: str | Path, overrides: list[str] | None = None) -> ConfigSources:
        """The file at ``path``, then each ``key=value`` of ``overrides`` (a :class:`UsageError` naming the file
        when it cannot be read, or the ``--set`` that cannot be applied)."""
        steps = [(str(path), read_config_file(path))]
        for text in overrides or []:
            steps.append((f"--set {text}", apply_overrides(steps[-1][1], [text])))
        return cls(tuple(steps))

    @classmethod
    def of(cls, cfg: TrainConfig) -> ConfigSources:
        """A config built in code: one source without a name, so errors name none."""
        return cls((("", cfg.to_dict()),))

    def load(self) -> TrainConfig:
        """The checked :class:`TrainConfig` of the last source (see :func:`load_config`)."""
        return self.check(config_from_dict)

    def check(self, check: Callable[[dict[str, Any]], _T]) -> _T:
        """``check(raw)`` of the config after the last source, and what it returns.

        A :class:`UsageError` it raises is raised again with where the mistake is in front: the first source after
        which ``check`` raises the same message (the file when it alone has the mistake, else the ``--set`` that
        made it). ``check`` must not change ``raw``; any other exception (a bug) keeps its traceback.
        """
        try:
            return check(self.steps[-1][1])
        except UsageError as exc:
            error = str(exc)
        source = next(name for name, raw in self.steps if _usage_error(check, raw) == error)  # the last at the latest
        raise UsageError(f"{source}: {error}" if source else error)


def _usage_error(check: Callable[[dict[str, Any]], Any], raw: dict[str, Any]) -> str | None:
    """The message of the :class:`UsageError` that ``check(raw)`` raises, or ``None``."""
    try:
        check(raw)
    except UsageError as exc:
        return str(exc)
    return None
