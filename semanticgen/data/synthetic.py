"""Procedurally generated clips of a coloured shape moving over a plain background, with a caption.

Every clip is a pure function of ``(seed, index)``, so the dataset needs no files, is identical on every rank and
machine, and a data-loader position is just an integer. Captions name the colour, the shape and the direction
(``"a red square moving right"``), which is what the tiny text-to-video demo learns to follow.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "white": (0.95, 0.95, 0.95),
    "cyan": (0.1, 0.85, 0.9),
    "magenta": (0.9, 0.15, 0.85),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "down": (0.0, 1.0),
    "up": (0.0, -1.0),
}


def frame_times(num_frames: int, fps: float) -> torch.Tensor:
    """``[num_frames]`` timestamps in seconds of a stream sampled at ``fps`` starting at 0."""
    return torch.arange(num_frames, dtype=torch.float64) / fps


class SyntheticShapes(Dataset):
    """Moving-shape clips sampled as two streams of the same time span.

    Each item is a dict:
        ``vae_video``: ``[vae_frames, 3, H, W]`` float in [0, 1], frames at ``t = k / vae_fps``.
        ``sem_video``: ``[sem_frames, 3, H, W]`` float in [0, 1], frames at ``t = k / sem_fps``.
        ``caption``: str.

    The shape crosses about 60% of the frame over the longer of the two streams' spans, so motion is visible in
    both.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        height: int = 32,
        width: int = 32,
        vae_frames: int = 17,
        vae_fps: float = 24.0,
        sem_frames: int = 2,
        sem_fps: float = 1.6,
        seed: int = 0,
    ) -> None:
        for name, value in (("num_samples", num_samples), ("height", height), ("width", width)):
            if value < 1:
                raise ValueError(f"SyntheticShapes: {name} must be >= 1, got {value}")
        if vae_frames < 1 or sem_frames < 1 or vae_fps <= 0 or sem_fps <= 0:
            raise ValueError(
                f"SyntheticShapes: frame counts and fps must be positive, got vae {vae_frames}@{vae_fps}, "
                f"sem {sem_frames}@{sem_fps}"
            )
        self.num_samples, self.height, self.width = num_samples, height, width
        self.vae_t = frame_times(vae_frames, vae_fps)
        self.sem_t = frame_times(sem_frames, sem_fps)
        self.duration = max(float(self.vae_t[-1]), float(self.sem_t[-1]), 1e-3)
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def describe(self, index: int) -> dict:
        """The random choices behind clip ``index``: colour, shape, direction, size, start, speed, background."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"SyntheticShapes: index {index} out of range [0, {self.num_samples})")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        pick = lambda n: int(torch.randint(n, (1,), generator=g))
        uni = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))
        colour = list(COLOURS)[pick(len(COLOURS))]
        shape = SHAPES[pick(len(SHAPES))]
        direction = list(DIRECTIONS)[pick(len(DIRECTIONS))]
        size = uni(0.22, 0.32) * min(self.height, self.width)
        dx, dy = DIRECTIONS[direction]
        travel = 0.6  # fraction of the frame crossed over the clip
        # Start so the shape stays in frame: moving right starts on the left, etc.; the other axis is random.
        cx = 0.5 - dx * travel / 2 if dx else uni(0.3, 0.7)
        cy = 0.5 - dy * travel / 2 if dy else uni(0.3, 0.7)
        background = 0.05 + 0.15 * float(torch.rand((), generator=g))
        return {
            "colour": colour,
            "shape": shape,
            "direction": direction,
            "size": size,
            "start": (cx * self.width, cy * self.height),
            "velocity": (dx * travel * self.width / self.duration, dy * travel * self.height / self.duration),
            "background": background,
        }

    def caption(self, index: int) -> str:
        d = self.describe(index)
        return f"a {d['colour']} {d['shape']} moving {d['direction']}"

    def render(self, index: int, times: torch.Tensor) -> torch.Tensor:
        """Frames of clip ``index`` at ``times`` (seconds): ``[len(times), 3, H, W]`` float32 in [0, 1]."""
        d = self.describe(index)
        ys = torch.arange(self.height, dtype=torch.float64)[:, None] + 0.5
        xs = torch.arange(self.width, dtype=torch.float64)[None, :] + 0.5
        cx = d["start"][0] + d["velocity"][0] * times  # [F]
        cy = d["start"][1] + d["velocity"][1] * times
        rx = xs[None] - cx[:, None, None]  # [F, H, W]
        ry = ys[None] - cy[:, None, None]
        half = d["size"] / 2
        if d["shape"] == "square":
            inside = (rx.abs() <= half) & (ry.abs() <= half)
        elif d["shape"] == "circle":
            inside = rx.square() + ry.square() <= half * half
        else:  # upward triangle: apex at the top, base at the bottom
            inside = (ry <= half) & (ry >= -half) & (rx.abs() <= (ry + half) * 0.5)
        colour = torch.tensor(COLOURS[d["colour"]], dtype=torch.float32)[None, :, None, None]
        frames = torch.full((len(times), 3, self.height, self.width), d["background"], dtype=torch.float32)
        return torch.where(inside[:, None], colour, frames)

    def __getitem__(self, index: int) -> dict:
        return {
            "vae_video": self.render(index, self.vae_t),
            "sem_video": self.render(index, self.sem_t),
            "caption": self.caption(index),
        }
