"""Plan a long video: token counts of both streams, attention windows and attention FLOPs, without weights or GPU.

Stage 2 sees ``[VAE tokens, semantic tokens]``. With a Wan-style VAE (4x time, 8x8 space) and 2x2 patches,
one 480x832 latent frame is ``(480 / 16) * (832 / 16) = 1,560`` tokens, and a minute at 24 fps is 360 latent
frames, ~562K VAE tokens. The semantic stream (Qwen2.5-VL tower at 1.6 fps: frame pairs, 28x28 pixels per
token) adds ~4% more.

Default window ``Tw = 20`` latent frames (80 video frames, 3.3 s at 24 fps). The paper leaves ``Tw`` open; 20
makes one 480p window (~31.2K VAE + ~1.5K semantic tokens) about as large as a 5 s, 81-frame clip
(21 latent frames, 32.8K tokens), the clip length Wan-style base models are trained on with full attention,
so each window costs what a short clip costs and the long model starts from a short model's context length.
It is even, so shifted layers move windows by a whole ``Tw / 2 = 10`` frames.

Default attention size (``heads=40``, ``head_dim=128``, ``layers=40``) is that of Wan 2.1 14B, a base of the
size the paper's comparisons use.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from semanticgen._checks import check_int, check_number
from semanticgen.errors import UsageError
from semanticgen.ops.swin_attention.layout import WindowLayout

__all__ = ["Plan", "plan", "format_plan", "DEFAULT_WINDOW"]

DEFAULT_WINDOW = 20


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and attention cost of one generated video (see :func:`plan`). FLOPs are forward, per sample."""

    # inputs
    seconds: float
    height: int
    width: int
    fps: float
    sem_fps: float
    vae_temporal: int
    vae_spatial: int
    patch: int
    sem_patch: int
    sem_temporal: int
    window: int
    heads: int
    head_dim: int
    layers: int
    # VAE stream
    video_frames: int
    latent_frames: int
    latent_height: int
    latent_width: int
    vae_tokens_per_frame: int
    vae_tokens: int
    # semantic stream
    sem_video_frames: int
    sem_frames: int
    sem_grid: tuple[int, int]
    sem_tokens_per_frame: int
    sem_tokens: int
    sem_ratio: float
    # stage 2 sequence and windows
    stage2_tokens: int
    windows: int
    windows_shifted: int
    max_window_tokens: int
    window_seconds: float
    # attention FLOPs
    stage1_attention_flops: int
    full_attention_flops: int
    windowed_attention_flops: int
    flops_ratio: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        out["sem_grid"] = list(self.sem_grid)
        return out


def _int(name: str, value: object, minimum: int = 1) -> int:
    return check_int(name, value, minimum=minimum, who="plan", error=UsageError)


def _positive(name: str, value: object) -> float:
    return check_number(name, value, positive=True, finite=True, who="plan", error=UsageError)


def plan(
    seconds: float,
    height: int,
    width: int,
    *,
    fps: float = 24.0,
    sem_fps: float = 1.6,
    vae_temporal: int = 4,
    vae_spatial: int = 8,
    patch: int = 2,
    sem_patch: int = 28,
    sem_temporal: int = 2,
    window: int = DEFAULT_WINDOW,
    heads: int = 40,
    head_dim: int = 128,
    layers: int = 40,
) -> Plan:
    """Token counts, windows and attention FLOPs of a ``seconds``-long ``height x width`` video.

    Args:
        seconds: video length.
        height, width: pixels; multiples of ``vae_spatial * patch``.
        fps: VAE-stream frame rate (paper: 24).
        sem_fps: semantic-stream frame rate (paper: 1.6).
        vae_temporal, vae_spatial: VAE compression (Wan: 4 and 8). The VAE is causal: ``1 + 4k`` frames give
            ``1 + k`` latent frames; the video uses the largest such count within ``seconds * fps`` frames.
        patch: spatial patch of the latent generator (2x2).
        sem_patch: pixels per semantic token side (Qwen2.5-VL: 14x14 patches, 2x2 merge = 28). The semantic
            encoder sees frames resized to the nearest multiple of ``sem_patch`` (as Qwen's processor does).
        sem_temporal: frames per semantic token frame (Qwen2.5-VL: 2).
        window: ``Tw`` in latent frames.
        heads, head_dim, layers: attention size, for FLOPs.

    Returns:
        :class:`Plan`. ``windowed_attention_flops`` and ``full_attention_flops`` are for the whole stage-2 model
        (``layers`` layers; even layers unshifted, odd layers shifted), ``stage1_attention_flops`` for full
        attention over the semantic tokens with the same attention size. Forward FLOPs count both attention
        matmuls, ``4 * N^2 * head_dim`` per head (``4 * L^2 * head_dim`` per window).
    """
    seconds = _positive("seconds", seconds)
    fps, sem_fps = _positive("fps", fps), _positive("sem_fps", sem_fps)
    height, width = _int("height", height), _int("width", width)
    for name, value in (
        ("vae_temporal", vae_temporal),
        ("vae_spatial", vae_spatial),
        ("patch", patch),
        ("sem_patch", sem_patch),
        ("sem_temporal", sem_temporal),
        ("window", window),
        ("heads", heads),
        ("head_dim", head_dim),
        ("layers", layers),
    ):
        _int(name, value)
    step = vae_spatial * patch
    if height % step or width % step:
        raise UsageError(
            f"plan: height and width must be multiples of vae_spatial * patch = {step}, got {height}x{width}"
        )
    if height < sem_patch / 2 or width < sem_patch / 2:
        raise UsageError(f"plan: {height}x{width} is smaller than one semantic token ({sem_patch} px)")

    # Frame counts are floored with a little slack so 60 s * 24 fps counts 1440 frames, not 1439.
    video_frames_available = math.floor(seconds * fps + 1e-9)
    if video_frames_available < 1:
        raise UsageError(f"plan: {seconds:g} s at {fps:g} fps is less than one frame")
    latent_frames = 1 + (video_frames_available - 1) // vae_temporal
    video_frames = 1 + (latent_frames - 1) * vae_temporal
    latent_h, latent_w = height // vae_spatial, width // vae_spatial
    vae_tokens_per_frame = (latent_h // patch) * (latent_w // patch)
    vae_tokens = latent_frames * vae_tokens_per_frame

    sem_video_frames = (math.ceil(seconds * sem_fps - 1e-9) // sem_temporal) * sem_temporal
    sem_frames = sem_video_frames // sem_temporal
    sem_grid = (max(1, round(height / sem_patch)), max(1, round(width / sem_patch)))
    sem_tokens_per_frame = sem_grid[0] * sem_grid[1]
    sem_tokens = sem_frames * sem_tokens_per_frame

    layout = WindowLayout(
        latent_frames, vae_tokens_per_frame, sem_frames, sem_tokens_per_frame if sem_frames else 1, window
    )
    shifted_layers, unshifted_layers = layers // 2, layers - layers // 2
    windowed = unshifted_layers * layout.attention_flops(head_dim, heads, shifted=False)
    windowed += shifted_layers * layout.attention_flops(head_dim, heads, shifted=True)
    full = layers * layout.full_attention_flops(head_dim, heads)
    stage1 = layers * 4 * heads * head_dim * sem_tokens**2
    return Plan(
        seconds=seconds,
        height=height,
        width=width,
        fps=fps,
        sem_fps=sem_fps,
        vae_temporal=vae_temporal,
        vae_spatial=vae_spatial,
        patch=patch,
        sem_patch=sem_patch,
        sem_temporal=sem_temporal,
        window=window,
        heads=heads,
        head_dim=head_dim,
        layers=layers,
        video_frames=video_frames,
        latent_frames=latent_frames,
        latent_height=latent_h,
        latent_width=latent_w,
        vae_tokens_per_frame=vae_tokens_per_frame,
        vae_tokens=vae_tokens,
        sem_video_frames=sem_video_frames,
        sem_frames=sem_frames,
        sem_grid=sem_grid,
        sem_tokens_per_frame=sem_tokens_per_frame,
        sem_tokens=sem_tokens,
        sem_ratio=sem_tokens / vae_tokens,
        stage2_tokens=layout.num_tokens,
        windows=layout.num_windows(shifted=False),
        windows_shifted=layout.num_windows(shifted=True),
        max_window_tokens=max(max(layout.window_lengths(False)), max(layout.window_lengths(True))),
        window_seconds=window * vae_temporal / fps,
        stage1_attention_flops=stage1,
        full_attention_flops=full,
        windowed_attention_flops=windowed,
        flops_ratio=full / windowed,
    )


def _flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:,.2f} {unit}"
    return f"{value:,.0f} FLOP"


def format_plan(p: Plan) -> str:
    """A readable table of a :class:`Plan`."""
    rows: list[tuple[str, str]] = [
        ("video", f"{p.seconds:g} s, {p.height}x{p.width}"),
        (
            "VAE stream",
            f"{p.video_frames} frames at {p.fps:g} fps -> {p.latent_frames} latent frames of "
            f"{p.latent_height}x{p.latent_width} ({p.vae_temporal}x time, {p.vae_spatial}x{p.vae_spatial} space)",
        ),
        ("VAE tokens", f"{p.vae_tokens:,} ({p.vae_tokens_per_frame:,} per latent frame, {p.patch}x{p.patch} patches)"),
        (
            "semantic stream",
            f"{p.sem_video_frames} frames at {p.sem_fps:g} fps -> {p.sem_frames} token frames of "
            f"{p.sem_grid[0]}x{p.sem_grid[1]} ({p.sem_patch} px per token, {p.sem_temporal} frames per token frame)",
        ),
        ("semantic tokens", f"{p.sem_tokens:,} ({p.sem_ratio:.1%} of the VAE tokens)"),
        ("stage-2 sequence", f"{p.stage2_tokens:,} tokens"),
        (
            "windows",
            f"Tw = {p.window} latent frames ({p.window_seconds:.2f} s): {p.windows} windows, "
            f"{p.windows_shifted} on shifted layers (shift {p.window // 2}), "
            f"at most {p.max_window_tokens:,} tokens each",
        ),
        ("attention size", f"{p.layers} layers x {p.heads} heads x head_dim {p.head_dim} (forward FLOPs per sample)"),
        ("stage 1, full", _flops(p.stage1_attention_flops)),
        ("stage 2, full", _flops(p.full_attention_flops)),
        ("stage 2, windowed", _flops(p.windowed_attention_flops)),
        ("full / windowed", f"{p.flops_ratio:,.1f}x"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# ------------------------------------------------------------------------------- context parallel
@dataclasses.dataclass(frozen=True)
class ContextParallelPlan:
    """Per-rank cost of stage 2 split over ``size`` ranks by whole windows (see ``semanticgen.parallel``).

    Bytes and times are per layer, forward, for the busiest rank, averaged over a pair of layers (one of each
    window parity); the backward moves the same bytes again. Times are ``bytes / link_bytes_per_s`` and
    ``attention FLOPs / attention_flops_per_s``: stated assumptions, not measurements.
    """

    size: int
    hidden: int
    element_size: int
    link_bytes_per_s: float
    attention_flops_per_s: float
    tokens_per_rank: tuple[int, ...]
    windows_per_rank: tuple[int, ...]
    activation_bytes_per_rank: int
    """One ``[N_rank, hidden]`` activation of the busiest rank, the unit a stage-2 block keeps per tensor."""
    bytes_per_layer: dict[str, float]
    seconds_per_layer: dict[str, float]
    attention_seconds_per_layer: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_context_parallel(
    p: Plan,
    size: int,
    *,
    hidden: int = 5120,
    element_size: int = 2,
    link_gbytes_per_s: float = 50.0,
    attention_tflops: float = 600.0,
) -> ContextParallelPlan:
    """Context-parallel costs of :func:`plan`'s stage-2 sequence over ``size`` ranks.

    Args:
        p: the video's :class:`Plan` (its heads and head dim set the attention FLOPs).
        size: CP ranks; at most the number of unshifted windows.
        hidden: model width (Wan 2.1 14B: 5120).
        element_size: bytes per activation element (bf16: 2).
        link_gbytes_per_s: per-GPU bandwidth between neighbouring ranks, GB/s (default 50: one 400 Gb/s
            InfiniBand NDR port per GPU, the inter-node case; NVLink within a node is several times faster).
        attention_tflops: attention rate per GPU for the time estimate (default 600, about FlashAttention-3's
            bf16 forward on an H100).
    """
    from semanticgen.parallel import ContextPlan  # planning stays importable without torch.distributed users

    _int("size", size)
    _int("hidden", hidden)
    _int("element_size", element_size)
    link = _positive("link_gbytes_per_s", link_gbytes_per_s) * 1e9
    rate = _positive("attention_tflops", attention_tflops) * 1e12
    layout = WindowLayout(
        p.latent_frames,
        p.vae_tokens_per_frame,
        p.sem_frames,
        p.sem_tokens_per_frame if p.sem_frames else 1,
        p.window,
        order="blocked",
    )
    try:
        cp = ContextPlan.build(layout, size)
    except ValueError as exc:
        raise UsageError(f"plan: {exc}") from None
    tokens = tuple(e - s for s, e in (cp.token_range(r, False) for r in range(size)))
    windows = tuple(cp.shard(r, False).num_windows(False) for r in range(size))
    moved = cp.bytes_per_layer(hidden, element_size=element_size)
    attention = max(
        (
            cp.shard(r, False).attention_flops(p.head_dim, p.heads)
            + cp.shard(r, True).attention_flops(p.head_dim, p.heads)
        )
        / 2
        for r in range(size)
    )
    return ContextParallelPlan(
        size=size,
        hidden=hidden,
        element_size=element_size,
        link_bytes_per_s=link,
        attention_flops_per_s=rate,
        tokens_per_rank=tokens,
        windows_per_rank=windows,
        activation_bytes_per_rank=max(tokens) * hidden * element_size,
        bytes_per_layer=moved,
        seconds_per_layer={k: v / link for k, v in moved.items()},
        attention_seconds_per_layer=attention / rate,
    )


def format_context_parallel(c: ContextParallelPlan) -> str:
    """A readable table of a :class:`ContextParallelPlan`, with its assumptions."""

    def gb(x: float) -> str:
        return f"{x / 1e9:,.3f} GB"

    def ms(x: float) -> str:
        return f"{x * 1e3:,.2f} ms"

    rows = [
        ("context parallel", f"{c.size} ranks, windows per rank {list(c.windows_per_rank)}"),
        ("tokens per rank", f"{min(c.tokens_per_rank):,} to {max(c.tokens_per_rank):,}"),
        ("one activation", f"{gb(c.activation_bytes_per_rank)} per rank ([N_rank, {c.hidden}] at {c.element_size} B)"),
        (
            "assumed",
            f"link {c.link_bytes_per_s / 1e9:g} GB/s per GPU, attention {c.attention_flops_per_s / 1e12:g} TFLOP/s",
        ),
        ("attention per layer", f"{ms(c.attention_seconds_per_layer)} (busiest rank, forward)"),
    ]
    names = {
        "halo_hidden": "window halo (ours)",
        "halo_kv": "K/V halo",
        "ulysses": "Ulysses all-to-all",
        "ring": "ring attention",
    }
    for key, name in names.items():
        rows.append((name, f"{gb(c.bytes_per_layer[key])} per layer, {ms(c.seconds_per_layer[key])}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
