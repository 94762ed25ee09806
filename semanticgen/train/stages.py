"""The two SemanticGen training stages as modules whose ``forward(batch)`` returns the loss.

Each stage is one ``nn.Module`` so FSDP2 shards it as a whole (per block, per sub-model, then this root) and DCP
checkpoints it under stable names (``latent_generator.*``, ``semantic_generator.*``, ``compressor.*``).

Randomness is per sample: the noise, timestep, text dropout and compressor sample of a sample depend only on
``(seed, stage, sample_id)``, where ``sample_id`` is the sample's position in the data stream. So the losses do not
depend on how the global batch is split over ranks, and a resumed run draws exactly what the straight run drew.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from semanticgen.errors import UsageError
from semanticgen.models import LatentGenerator, SemanticCompressor, SemanticGenerator, SemanticNorm, patchify
from semanticgen.parallel import ContextGroup
from semanticgen.rectified_flow import flow_matching_loss, flow_noising, sample_timesteps

from .config import StageConfig

STAGE_INDEX = {"latent": 1, "semantic": 2}
_NOISE, _TIME, _DROP, _SEM_EPS, _SEM_AUG = range(5)


def sample_generator(seed: int, stage: str, sample_id: int, purpose: int) -> torch.Generator:
    """CPU generator seeded from ``(seed, stage, sample_id, purpose)``: independent streams per sample and use."""
    key = ((seed * 1_000_003 + STAGE_INDEX[stage]) * 1_000_000_007 + int(sample_id)) * 8 + purpose
    return torch.Generator().manual_seed(key % (2**63 - 1))


def per_sample_randn(shape: tuple[int, ...], ids: torch.Tensor, seed: int, stage: str, purpose: int) -> torch.Tensor:
    """``[B, *shape]`` standard normal, sample ``b`` drawn from its own generator (CPU, float32)."""
    return torch.stack([torch.randn(shape, generator=sample_generator(seed, stage, int(i), purpose)) for i in ids])


def per_sample_timesteps(ids: torch.Tensor, seed: int, stage: str, cfg: StageConfig) -> torch.Tensor:
    return torch.cat(
        [
            sample_timesteps(
                1,
                kind=cfg.timestep_kind,
                shift=cfg.timestep_shift,
                generator=sample_generator(seed, stage, int(i), _TIME),
            )
            for i in ids
        ]
    )


def per_sample_dropout(ids: torch.Tensor, seed: int, stage: str, p: float) -> torch.Tensor:
    """``[B]`` bool: True where the caption is replaced by the empty prompt."""
    if p <= 0:
        return torch.zeros(len(ids), dtype=torch.bool)
    return torch.cat([torch.rand(1, generator=sample_generator(seed, stage, int(i), _DROP)) < p for i in ids])


def build_model_config(cls: type, table: dict[str, Any], derived: dict[str, Any], name: str):
    """``cls.Config`` from a config table plus values implied by the encoders/other models.

    A derived value (e.g. ``latent_generator.in_channels`` = the VAE's latent channels) fills a missing key and must
    equal a given one; unknown keys are a :class:`~semanticgen.errors.UsageError` naming ``model.<name>.<key>``.
    """
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise UsageError(f"unknown config key 'model.{name}.{key}' (known: {', '.join(sorted(fields))})")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    for key, value in derived.items():
        if key in kwargs and kwargs[key] != value:
            raise UsageError(
                f"model.{name}.{key} = {kwargs[key]!r} does not match the value {value!r} the encoders/models imply"
            )
        kwargs[key] = value
    return cls.Config(**kwargs)


@dataclasses.dataclass(frozen=True)
class DataWidths:
    """Channel widths the data fixes: semantic-encoder features, VAE latent channels, text embeddings."""

    sem_features: int
    latent_channels: int
    text: int

    @classmethod
    def from_encoders(cls, encoders) -> DataWidths:
        return cls(encoders.semantic.out_dim, encoders.vae.latent_channels, encoders.text.dim)

    @classmethod
    def from_shapes(cls, shapes: dict[str, list[int]]) -> DataWidths:
        """From pre-encoded shard shapes (``latents [C, T, H, W]``, ``sem_features [Ts, Ss, d]``, ``text [L, D]``)."""
        return cls(shapes["sem_features"][-1], shapes["latents"][0], shapes["text"][-1])


GENERATORS = {"semantic_generator": SemanticGenerator, "latent_generator": LatentGenerator}


def init_from_paths(model_tables: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``[model.<generator>] init_from = "DIR"``: the Wan 2.1 checkpoint directory each generator starts from."""
    paths = {}
    for name in GENERATORS:
        path = model_tables.get(name, {}).get("init_from")
        if path is not None:
            if not isinstance(path, str) or not path:
                raise UsageError(f"model.{name}.init_from must be a directory path (a string), got {path!r}")
            paths[name] = path
    return paths


def _generator_table(name: str, table: dict[str, Any]) -> dict[str, Any]:
    """A generator's table without ``init_from``; with it, the Wan checkpoint's architecture (``flavor = "wan"``,
    widths, depth, heads, ...) fills every key the table does not set (one it sets must match, checked on load)."""
    table = dict(table)
    path = table.pop("init_from", None)
    if path is None:
        return table
    from semanticgen.models.wan import WanSource

    known = {f.name for f in dataclasses.fields(GENERATORS[name].Config)}
    wan = {k: v for k, v in WanSource(path).generator_config().items() if k in known}
    return {**wan, **table}


def model_configs_from_tables(model_tables: dict[str, dict[str, Any]], widths: DataWidths) -> dict[str, Any]:
    """The three models' ``Config`` objects, widths tied to the data: compressor.in_dim = semantic-encoder width,
    the generators' dim/sem_dim = compressor.dim, text_dim = text-encoder width, in_channels = VAE latent channels.
    A generator with ``init_from`` takes its architecture from that Wan checkpoint (:func:`init_from_paths`)."""
    init_from_paths(model_tables)
    comp_cfg = build_model_config(
        SemanticCompressor, model_tables.get("compressor", {}), {"in_dim": widths.sem_features}, "compressor"
    )
    sem_cfg = build_model_config(
        SemanticGenerator,
        _generator_table("semantic_generator", model_tables.get("semantic_generator", {})),
        {"dim": comp_cfg.dim, "text_dim": widths.text},
        "semantic_generator",
    )
    lat_cfg = build_model_config(
        LatentGenerator,
        _generator_table("latent_generator", model_tables.get("latent_generator", {})),
        {"in_channels": widths.latent_channels, "sem_dim": comp_cfg.dim, "text_dim": widths.text},
        "latent_generator",
    )
    return {"compressor": comp_cfg, "semantic_generator": sem_cfg, "latent_generator": lat_cfg}


MODELS = {"compressor": SemanticCompressor, **GENERATORS}  # [model.<name>] -> the model its table configures


def build_models(model_tables: dict[str, dict[str, Any]], widths: DataWidths) -> dict[str, nn.Module]:
    """All three models (see :func:`model_configs_from_tables`), on the current default device (``meta`` inside
    ``with torch.device("meta")``: no storage, see :func:`~semanticgen.train.sharding.materialize`)."""
    return {name: MODELS[name](config) for name, config in model_configs_from_tables(model_tables, widths).items()}


def build_stage(name: str, models: dict[str, nn.Module], cfg: StageConfig, seed: int, null_text) -> _Stage:
    if name == "latent":
        return LatentStage(models["latent_generator"], models["compressor"], cfg, seed, null_text)
    if name == "semantic":
        return SemanticStage(models["semantic_generator"], models["compressor"], cfg, seed, null_text)
    raise ValueError(f"stage must be 'latent' or 'semantic', got {name!r}")


class _Stage(nn.Module):
    name: str

    def __init__(self, cfg: StageConfig, seed: int, null_text: tuple[torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.register_buffer("null_text", null_text[0].float().clone(), persistent=False)
        self.register_buffer("null_mask", null_text[1].bool().clone(), persistent=False)

    def _text(self, batch: dict[str, Any], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings with per-sample dropout to the empty prompt (for classifier-free guidance)."""
        text, mask = batch["text"], batch["text_mask"]
        drop = per_sample_dropout(ids, self.seed, self.name, self.cfg.text_dropout).to(text.device)
        if drop.any():
            length = text.shape[1]
            if self.null_text.shape[0] != length:
                raise ValueError(
                    f"empty-prompt embedding has {self.null_text.shape[0]} tokens but the batch has {length}"
                )
            text = torch.where(drop[:, None, None], self.null_text.to(text.dtype), text)
            mask = torch.where(drop[:, None], self.null_mask, mask)
        return text, mask

    def _noise_and_time(self, x0: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = per_sample_randn(tuple(x0.shape[1:]), ids, self.seed, self.name, _NOISE).to(x0.device, x0.dtype)
        t = per_sample_timesteps(ids, self.seed, self.name, self.cfg).to(x0.device)
        return eps, t


class LatentStage(_Stage):
    """Stage 2 of the method, trained first: latent generator + semantic compressor, jointly.

    ``loss = flow_matching(latent_generator(z_t, t, text, z_sem), latents) + kl_weight * KL(compressor)`` with
    ``z_sem`` a reparameterised sample of the compressor, noise-augmented to a per-sample level in
    ``[0, sem_noise_level]`` so the generator learns to work from the noisy generated tokens it gets at inference.

    **Context parallel** (``self.cp``, a :class:`~semanticgen.parallel.ContextGroup` of size ``C > 1``): every rank
    of the CP group gets the same clips and computes the compressor, noise and conditioning of the whole clip, but
    the generator runs only on this rank's windows (:meth:`LatentGenerator.forward_context_parallel`). With
    ``fm_r`` this rank's squared error summed over its tokens divided by the number of elements of the whole batch
    (so ``sum_r fm_r`` is the clip's flow loss), each rank back-propagates ``C * fm_r + kl_weight * KL``. FSDP
    averages gradients over all ``D * C`` ranks, so the update is ``(1 / D) sum_groups d(fm + kl_weight * KL)``:
    the flow term summed over the group's ranks, and the KL (identical on every CP rank) counted once per group,
    not ``C`` times. The mean over the world of the returned loss is the global loss as well.
    """

    name = "latent"

    def __init__(self, latent_generator, compressor, cfg: StageConfig, seed: int, null_text) -> None:
        super().__init__(cfg, seed, null_text)
        self.latent_generator, self.compressor = latent_generator, compressor
        self.cp: ContextGroup | None = None

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["sample_id"]
        x0 = batch["latents"]  # [B, C, T, H, W]
        if not self.cfg.semantic_tokens:
            return self._text_to_latent(batch, ids, x0)
        comp = self.compressor(batch["sem_features"], sample=False)  # z = mean; the sample is drawn per sample below
        sem_eps = per_sample_randn(tuple(comp.mean.shape[1:]), ids, self.seed, self.name, _SEM_EPS)
        z_sem = comp.mean + torch.exp(0.5 * comp.logvar) * sem_eps.to(comp.mean.device, comp.mean.dtype)
        if self.cfg.sem_noise_level > 0:
            levels = torch.cat(
                [torch.rand(1, generator=sample_generator(self.seed, self.name, int(i), _SEM_AUG)) for i in ids]
            )
            aug_eps = per_sample_randn(tuple(z_sem.shape[1:]), ids, self.seed, self.name, _SEM_AUG)
            # The maths of rectified_flow.noise_augment, with each sample's eps from its own generator.
            level = (levels * self.cfg.sem_noise_level).to(z_sem.device)
            z_sem = flow_noising(z_sem, aug_eps.to(z_sem.device, z_sem.dtype), level)[0]
        text, mask = self._text(batch, ids)
        eps, t = self._noise_and_time(x0, ids)
        x_t, _ = flow_noising(x0, eps, t)
        cp_size = 1 if self.cp is None else self.cp.size
        if cp_size > 1:
            v_local, index = self.latent_generator.forward_context_parallel(x_t, t, text, mask, z_sem, self.cp)
            # The flow-matching target eps - x0 of this rank's VAE tokens, patchified as the velocity is.
            goal = patchify(eps - x0, self.latent_generator.patch).index_select(1, index)
            # Times C: FSDP averages over the C ranks of the group too (see the class docstring).
            fm = (v_local.float() - goal.float()).square().sum() * (cp_size / x0.numel())
        else:
            v = self.latent_generator(x_t, t, text, mask, z_sem)
            fm = flow_matching_loss(v.float(), x0, eps)  # loss in fp32 whatever the parameter dtype
        kl = comp.kl.float()
        loss = fm + self.cfg.kl_weight * kl
        pt, ph, pw = self.latent_generator.config.patch
        c, tv, hv, wv = x0.shape[1:]
        tokens = x0.shape[0] * ((tv // pt) * (hv // ph) * (wv // pw) + z_sem.shape[1] * z_sem.shape[2])
        # Each CP rank counts its share, so the loop's sum over ranks counts each clip once.
        tokens = torch.tensor(float(tokens) / cp_size)
        return loss, {"flow_loss": fm.detach(), "kl": kl.detach(), "tokens": tokens}

    def _text_to_latent(
        self, batch: dict[str, Any], ids: torch.Tensor, x0: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``latent.semantic_tokens = false``: the one-stage text-to-latent baseline. The generator sees no semantic
        token (``z_sem [B, 0, Ss, dim]``) and the compressor is not used; the loss is the flow-matching loss only."""
        if self.cp is not None and self.cp.size > 1:
            raise ValueError("the text-to-latent baseline (latent.semantic_tokens = false) has no context parallelism")
        b, _, ss = batch["sem_features"].shape[:3]
        z_sem = x0.new_zeros(b, 0, ss, self.compressor.config.dim)
        text, mask = self._text(batch, ids)
        eps, t = self._noise_and_time(x0, ids)
        x_t, _ = flow_noising(x0, eps, t)
        fm = flow_matching_loss(self.latent_generator(x_t, t, text, mask, z_sem).float(), x0, eps)
        pt, ph, pw = self.latent_generator.config.patch
        tv, hv, wv = x0.shape[2:]
        tokens = torch.tensor(float(x0.shape[0] * (tv // pt) * (hv // ph) * (wv // pw)))
        return fm, {"flow_loss": fm.detach(), "kl": torch.zeros((), device=fm.device), "tokens": tokens}


class SemanticStage(_Stage):
    """Stage 1 of the method, trained second: the semantic generator learns to produce the (frozen) compressor's
    posterior means of real videos from text. ``loss = flow_matching(semantic_generator(z_t, t, text), target)``
    with ``target = norm.normalize(mean)`` when ``self.norm`` (a :class:`~semanticgen.models.SemanticNorm` measured
    over the training data) is set, else the raw ``mean``."""

    name = "semantic"

    def __init__(self, semantic_generator, compressor, cfg: StageConfig, seed: int, null_text) -> None:
        super().__init__(cfg, seed, null_text)
        self.semantic_generator, self.compressor = semantic_generator, compressor
        self.compressor.requires_grad_(False)
        self.norm: SemanticNorm | None = None

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["sample_id"]
        with torch.no_grad():
            # forward (not encode_mean) so FSDP gathers the compressor and casts its input; z = mean with sample=False
            x0 = self.compressor(batch["sem_features"], sample=False).mean.float()  # [B, Ts, Ss, dim]
        if self.norm is not None:
            x0 = self.norm.normalize(x0)
        text, mask = self._text(batch, ids)
        eps, t = self._noise_and_time(x0, ids)
        x_t, _ = flow_noising(x0, eps, t)
        v = self.semantic_generator(x_t, t, text, mask)
        fm = flow_matching_loss(v.float(), x0, eps)  # loss in fp32 whatever the parameter dtype
        return fm, {"flow_loss": fm.detach(), "tokens": torch.tensor(float(x0[..., 0].numel()))}
