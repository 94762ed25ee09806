"""Two-stage SemanticGen generation: text -> semantic tokens -> VAE latents -> frames.

1. The text encoder embeds the prompts (and the empty prompt, for classifier-free guidance).
2. Stage 1: the :class:`~semanticgen.models.SemanticGenerator` integrates compressed semantic tokens
   ``z_sem [B, Ts, Ss, dim]`` from noise with Euler steps; with ``sem_norm`` (the statistics stage 1 was trained
   on) they are mapped back from the normalised space stage 1 generates in to the compressor's space.
3. ``z_sem`` is noise-augmented to ``noise_level`` (the level the latent generator was trained with), which
   hides the gap between semantic tokens of real videos (training) and generated ones (inference).
4. Stage 2: the :class:`~semanticgen.models.LatentGenerator` integrates VAE latents ``[B, C, T, H, W]`` with
   ``z_sem`` in context. Guidance in stage 2 is on the text only: both branches see the same ``z_sem``.
5. The VAE decodes the latents to frames ``[B, F, 3, H, W]`` in ``[0, 1]``.

Context parallel sampling (``context_parallel=ContextGroup``, e.g. under ``torchrun``, see
``python -m semanticgen.generate``): every rank of the group runs stage 1 with the same seed, the augmented
``z_sem`` is broadcast from the group's first rank (so the ranks agree bitwise even where kernels are not
deterministic), and each stage-2 step runs the latent generator on this rank's windows only and gathers the
velocity (:meth:`~semanticgen.models.LatentGenerator.forward_gathered`), so every rank takes the same Euler step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from semanticgen._checks import check_int, check_number, is_int, is_real
from semanticgen.errors import UsageError
from semanticgen.models import SemanticNorm
from semanticgen.parallel import ContextGroup
from semanticgen.rectified_flow import Generators, euler_sample, noise_augment, randn_per_sample

__all__ = ["SemanticGenPipeline"]


def _positive_int_shape(name: str, shape: object, length: int, layout: str, *, first: int = 1) -> tuple[int, ...]:
    """``shape`` as a tuple of ``length`` ints, each ``>= 1`` (the first ``>= first``)."""
    if (
        not isinstance(shape, Sequence)
        or len(shape) != length
        or not all(is_int(s) for s in shape)
        or shape[0] < first
        or not all(s >= 1 for s in shape[1:])
    ):
        raise ValueError(f"SemanticGenPipeline: {name} must be {length} positive ints {layout}, got {shape!r}")
    return tuple(shape)


def seeded_generators(seed: int | Sequence[int], batch: int, device: torch.device | str) -> Generators:
    """One ``torch.Generator`` on ``device`` seeded with ``seed``, or, for a sequence of ``batch`` seeds, one
    generator per sample (see :func:`~semanticgen.rectified_flow.randn_per_sample`).

    Raises:
        TypeError: a seed is not an int. ValueError: a sequence whose length is not ``batch``.
    """
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        seeds = list(seed)
        if len(seeds) != batch:
            raise ValueError(
                f"SemanticGenPipeline: seed must be an int or one int per prompt ({batch}), got {len(seeds)}"
            )
        for s in seeds:
            check_int("seed", s, who="SemanticGenPipeline", error=TypeError)
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]
    check_int("seed", seed, who="SemanticGenPipeline", error=TypeError)
    return torch.Generator(device=device).manual_seed(seed)


def _pair(name: str, value: object) -> tuple:
    """A value for both stages, or a ``(stage 1, stage 2)`` pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(
                f"SemanticGenPipeline: {name} must be one value or a (stage 1, stage 2) pair, got {value!r}"
            )
        return tuple(value)
    return (value, value)


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class SemanticGenPipeline:
    """Text-to-video with a semantic generator, a latent generator, a text encoder and a VAE.

    Args:
        semantic_generator: stage-1 velocity model ``(x [B, Ts, Ss, dim], t, text, mask) -> velocity``; ``None``
            with ``sem_shape = (0, Ss, dim)`` for a one-stage text-to-latent model (trained with
            ``latent.semantic_tokens = false``), which gets no semantic tokens.
        latent_generator: stage-2 velocity model ``(x [B, C, T, H, W], t, text, mask, z_sem) -> velocity``.
        text_encoder: ``encode(prompts) -> (emb [B, L, text_dim], mask [B, L] bool)``. With ``flavor="wan"``
            generators the text conditioning must be Wan's: umT5 states zero-padded to 512 tokens (an HF text
            encoder with ``max_len=512``, or :func:`~semanticgen.models.wan.wan_text_states`); the Wan blocks attend
            to all 512 tokens with no mask, so the encoder's mask is not used.
        vae: ``decode(latents [B, C, T, H, W]) -> frames [B, F, 3, H', W']`` in ``[0, 1]``.
        sem_shape: ``(Ts, Ss, dim)`` of the semantic tokens of one video.
        latent_shape: ``(C, T, H, W)`` of the latents of one video.
        noise_level: noise augmentation of ``z_sem`` before stage 2 (flow time in ``[0, 1]``).
        sem_shift, latent_shift: timestep shift of each stage's sampling time grid (use the shift the stage was
            trained with; :func:`~semanticgen.runs.build_pipeline_from_run` reads it from the run).
        sem_norm: the :class:`~semanticgen.models.SemanticNorm` stage 1 was trained with (its samples are
            de-normalised before stage 2); ``None``: stage 1 generates the compressor's space directly.
        negative_prompt: the unconditional prompt for guidance (``""``: what text dropout trains on).
        context_parallel: a :class:`~semanticgen.parallel.ContextGroup` to split stage 2 over (the latent
            generator must use ``attention="swin"`` and the clip have at least as many windows as ranks);
            ``None``: one process.

    Both generators are put in eval mode. Example::

        pipe = SemanticGenPipeline(sem_gen, lat_gen, HashTextEncoder(16, 8), PixelVAE(4, 4),
                                   sem_shape=(2, 4, 4), latent_shape=(4, 3, 4, 4), noise_level=0.1)
        frames = pipe(["a red square moving right"], steps=20, guidance=3.0, seed=0)  # [1, 9, 3, 16, 16]
    """

    def __init__(
        self,
        semantic_generator: nn.Module | None,
        latent_generator: nn.Module,
        text_encoder,
        vae,
        *,
        sem_shape: Sequence[int],
        latent_shape: Sequence[int],
        noise_level: float = 0.0,
        sem_shift: float = 1.0,
        latent_shift: float = 1.0,
        sem_norm: SemanticNorm | None = None,
        negative_prompt: str = "",
        context_parallel: ContextGroup | None = None,
    ) -> None:
        self.semantic_generator = semantic_generator.eval() if semantic_generator is not None else None
        self.latent_generator = latent_generator.eval()
        self.text_encoder = text_encoder
        self.vae = vae
        one_stage = semantic_generator is None
        self.sem_shape = _positive_int_shape("sem_shape", sem_shape, 3, "(Ts, Ss, dim)", first=0 if one_stage else 1)
        if one_stage and self.sem_shape[0] != 0:
            raise ValueError(
                f"SemanticGenPipeline: without a semantic_generator sem_shape must be (0, Ss, dim), got {sem_shape!r}"
            )
        self.latent_shape = _positive_int_shape("latent_shape", latent_shape, 4, "(C, T, H, W)")
        who = "SemanticGenPipeline"
        self.noise_level = check_number("noise_level", noise_level, minimum=0, maximum=1, who=who)
        self.sem_shift = check_number("sem_shift", sem_shift, positive=True, finite=True, who=who)
        self.latent_shift = check_number("latent_shift", latent_shift, positive=True, finite=True, who=who)
        if sem_norm is not None and not isinstance(sem_norm, SemanticNorm):
            raise TypeError(
                f"SemanticGenPipeline: sem_norm must be a SemanticNorm or None, got {type(sem_norm).__name__}"
            )
        if sem_norm is not None and len(sem_norm.mean) != self.sem_shape[2]:
            raise ValueError(
                f"SemanticGenPipeline: sem_norm has {len(sem_norm.mean)} channels, sem_shape dim is {self.sem_shape[2]}"
            )
        self.sem_norm = sem_norm
        if not isinstance(negative_prompt, str):
            raise TypeError(f"SemanticGenPipeline: negative_prompt must be a str, got {type(negative_prompt).__name__}")
        self.negative_prompt = negative_prompt
        if context_parallel is not None and not isinstance(context_parallel, ContextGroup):
            raise TypeError(
                f"SemanticGenPipeline: context_parallel must be a ContextGroup or None, got "
                f"{type(context_parallel).__name__}"
            )
        self.cp = context_parallel if context_parallel is not None and context_parallel.size > 1 else None
        self._check_compatible()
        if self.cp is not None:
            self._check_context_parallel()

    # ------------------------------------------------------------------------------------------- checks
    def _check_compatible(self) -> None:
        """Catch mismatched parts at construction, not halfway through sampling."""
        text_dim = getattr(self.text_encoder, "dim", None)
        sem_cfg = getattr(self.semantic_generator, "config", None)
        lat_cfg = getattr(self.latent_generator, "config", None)
        problems = []
        if sem_cfg is not None:
            if getattr(sem_cfg, "dim", self.sem_shape[2]) != self.sem_shape[2]:
                problems.append(f"sem_shape dim {self.sem_shape[2]} != semantic_generator dim {sem_cfg.dim}")
            if text_dim is not None and getattr(sem_cfg, "text_dim", text_dim) != text_dim:
                problems.append(f"text encoder dim {text_dim} != semantic_generator text_dim {sem_cfg.text_dim}")
        if lat_cfg is not None:
            if getattr(lat_cfg, "in_channels", self.latent_shape[0]) != self.latent_shape[0]:
                problems.append(
                    f"latent_shape C {self.latent_shape[0]} != latent_generator in_channels {lat_cfg.in_channels}"
                )
            if getattr(lat_cfg, "sem_dim", self.sem_shape[2]) != self.sem_shape[2]:
                problems.append(f"sem_shape dim {self.sem_shape[2]} != latent_generator sem_dim {lat_cfg.sem_dim}")
            if text_dim is not None and getattr(lat_cfg, "text_dim", text_dim) != text_dim:
                problems.append(f"text encoder dim {text_dim} != latent_generator text_dim {lat_cfg.text_dim}")
            patch = getattr(lat_cfg, "patch", None)
            if patch is not None and any(s % p for s, p in zip(self.latent_shape[1:], patch)):
                problems.append(f"latent_shape (T, H, W) {self.latent_shape[1:]} not divisible by patch {tuple(patch)}")
        vae_channels = getattr(self.vae, "latent_channels", self.latent_shape[0])
        if vae_channels != self.latent_shape[0]:
            problems.append(f"latent_shape C {self.latent_shape[0]} != VAE latent_channels {vae_channels}")
        if problems:
            raise ValueError("SemanticGenPipeline: incompatible parts: " + "; ".join(problems))

    def _check_context_parallel(self) -> None:
        """Refuse, before sampling, a latent generator or clip that cannot be split over ``self.cp``."""
        from semanticgen.parallel import ContextPlan

        lat_cfg = getattr(self.latent_generator, "config", None)
        if getattr(lat_cfg, "attention", None) != "swin" or not hasattr(self.latent_generator, "forward_gathered"):
            raise UsageError(
                "SemanticGenPipeline: context parallelism needs a LatentGenerator with attention='swin', got "
                f"attention={getattr(lat_cfg, 'attention', None)!r}"
            )
        _, t_len, h, w = self.latent_shape
        pt, ph, pw = lat_cfg.patch
        layout = self.latent_generator.window_layout(t_len // pt, (h // ph) * (w // pw), *self.sem_shape[:2])
        ContextPlan.build(layout, self.cp.size)  # raises naming the windows and ranks

    @property
    def device(self) -> torch.device:
        return next(self.latent_generator.parameters()).device

    # ---------------------------------------------------------------------------------------- stages
    def encode_prompts(
        self, prompts: Sequence[str], guided: bool
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """``(cond (emb, mask), uncond (emb, mask) or None)`` on the pipeline's device."""
        device = self.device
        emb, mask = self.text_encoder.encode(list(prompts))
        cond = (emb.to(device, torch.float32), mask.to(device, torch.bool))
        if not guided:
            return cond, None
        n_emb, n_mask = self.text_encoder.encode([self.negative_prompt])
        uncond = (
            n_emb.to(device, torch.float32).expand(len(prompts), -1, -1),
            n_mask.to(device, torch.bool).expand(len(prompts), -1),
        )
        return cond, uncond

    def sample_semantic(
        self,
        cond: tuple[torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor] | None,
        *,
        steps: int,
        guidance: float,
        generator: Generators,
        on_step: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Stage 1: ``z_sem [B, Ts, Ss, dim]`` float32 from the text embeddings, in the compressor's space (the
        space stage 2 reads), de-normalised with ``sem_norm`` when set. ``[B, 0, Ss, dim]`` without a semantic
        generator."""
        if self.semantic_generator is None:
            return torch.zeros((cond[0].shape[0], *self.sem_shape), device=self.device)
        z = self._sample(
            self.semantic_generator,
            (),
            cond,
            uncond,
            self.sem_shape,
            self.sem_shift,
            steps=steps,
            guidance=guidance,
            generator=generator,
            on_step=on_step,
        )
        return self.sem_norm.denormalize(z) if self.sem_norm is not None else z

    def sample_latents(
        self,
        cond: tuple[torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor] | None,
        z_sem: torch.Tensor,
        *,
        steps: int,
        guidance: float,
        generator: Generators,
        on_step: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Stage 2: latents ``[B, C, T, H, W]`` float32 conditioned on (already noise-augmented) ``z_sem``."""
        z_sem_in = z_sem.to(self.device, _param_dtype(self.latent_generator))
        model = self.latent_generator
        if self.cp is not None:
            cp, generator_model = self.cp, self.latent_generator

            def model(x, t, text, text_mask, z):  # each rank its windows; every rank gets the whole velocity
                return generator_model.forward_gathered(x, t, text, text_mask, z, cp)

        return self._sample(
            model,
            (z_sem_in,),
            cond,
            uncond,
            self.latent_shape,
            self.latent_shift,
            steps=steps,
            guidance=guidance,
            generator=generator,
            on_step=on_step,
        )

    def _sample(
        self,
        model: torch.nn.Module,
        extra: tuple[torch.Tensor, ...],
        cond: tuple[torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor] | None,
        shape: tuple[int, ...],
        shift: float,
        *,
        steps: int,
        guidance: float,
        generator: Generators,
        on_step: Callable[[], None] | None,
    ) -> torch.Tensor:
        """Euler-sample ``model(x, t, text, text_mask, *extra)`` from seeded noise of ``[B, *shape]``.

        Flow times stay float32 (the models cast after the timestep embedding); ``on_step`` is called
        once per step, on the conditional branch.
        """
        dtype = _param_dtype(model) if isinstance(model, nn.Module) else _param_dtype(self.latent_generator)

        def velocity(text: tuple[torch.Tensor, torch.Tensor]):
            def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                if on_step is not None and text is cond:
                    on_step()
                return model(x.to(dtype), t, text[0].to(dtype), text[1], *extra)

            return fn

        noise = randn_per_sample((cond[0].shape[0], *shape), generator, device=self.device)
        return euler_sample(
            velocity(cond),
            noise,
            steps=steps,
            guidance=guidance,
            uncond_fn=velocity(uncond) if uncond is not None else None,
            progress=False,
            shift=shift,
        )

    # ------------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str] | str,
        *,
        steps: int | tuple[int, int] = 20,
        guidance: float | tuple[float, float] = 1.0,
        seed: int | Sequence[int] = 0,
        progress: bool = True,
        return_intermediates: bool = False,
        decode: bool = True,
    ):
        """Generate one video per prompt.

        Args:
            prompts: a list of prompts (a single str is one prompt).
            steps: Euler steps, for both stages or ``(stage 1, stage 2)``.
            guidance: classifier-free guidance scale (1 = off), for both stages or ``(stage 1, stage 2)``.
            seed: seeds one ``torch.Generator`` on the pipeline's device that draws every noise tensor, so the
                same seed on the same device and software gives the same video. A list of one seed per prompt
                seeds one generator per video instead: video ``i`` then depends on ``seed[i]`` only, not on the
                other prompts of the batch (``pipe(prompts, seed=[s0, s1])`` gives the videos of
                ``pipe([p0], seed=s0)`` and ``pipe([p1], seed=s1)``, up to batched-matmul rounding).
            progress: show a progress bar over the denoising steps of both stages.
            return_intermediates: also return ``z_sem``, the augmented ``z_sem`` and the latents.
            decode: ``False`` skips the VAE (``frames`` is then ``None``): the other ranks of a context-parallel
                run, where only one rank writes the video.

        Returns:
            ``frames float32 [B, F, 3, H, W]`` in ``[0, 1]``; with ``return_intermediates``,
            ``(frames, {"z_sem", "z_sem_augmented", "latents"})``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"SemanticGenPipeline: prompts must be a non-empty list of str, got {prompts!r}")
        sem_steps, lat_steps = _pair("steps", steps)
        for s in (sem_steps, lat_steps):
            if not is_int(s) or s < 1:
                raise ValueError(f"SemanticGenPipeline: steps must be positive ints, got {steps!r}")
        sem_guidance, lat_guidance = _pair("guidance", guidance)
        for g in (sem_guidance, lat_guidance):
            if not is_real(g):
                raise TypeError(f"SemanticGenPipeline: guidance must be floats, got {guidance!r}")
        device = self.device
        generator = seeded_generators(seed, len(prompts), device)
        guided = float(sem_guidance) != 1.0 or float(lat_guidance) != 1.0
        cond, uncond = self.encode_prompts(prompts, guided)

        if self.semantic_generator is None:
            sem_steps = 0  # one-stage model: no semantic tokens to sample
        bar = tqdm(total=sem_steps + lat_steps, desc="stage 1 (semantic)", unit="step", disable=not progress)
        try:
            z_sem = self.sample_semantic(
                cond,
                uncond if float(sem_guidance) != 1.0 else None,
                steps=sem_steps,
                guidance=float(sem_guidance),
                generator=generator,
                on_step=lambda: bar.update(1),
            )
            z_aug = noise_augment(z_sem, self.noise_level, generator=generator)
            if self.cp is not None:
                import torch.distributed as dist

                src = dist.get_global_rank(self.cp.group, 0) if self.cp.group is not None else 0
                dist.broadcast(z_aug, src=src, group=self.cp.group)
            bar.set_description("stage 2 (latents)")
            latents = self.sample_latents(
                cond,
                uncond if float(lat_guidance) != 1.0 else None,
                z_aug,
                steps=lat_steps,
                guidance=float(lat_guidance),
                generator=generator,
                on_step=lambda: bar.update(1),
            )
        finally:
            bar.close()
        frames = self.vae.decode(latents).float().clamp(0.0, 1.0) if decode else None
        if return_intermediates:
            return frames, {"z_sem": z_sem, "z_sem_augmented": z_aug, "latents": latents}
        return frames
