"""Contact sheet of judged clips: first, middle and last frame per prompt, the prompt and the verdict beneath."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["write_contact_sheet"]

COLUMNS = 7  # 84 prompts -> 7 x 12 cells; one row per shape-and-direction block of a colour's 12 prompts


def _strip(frames: torch.Tensor) -> torch.Tensor:
    """``frames [F, 3, H, W]`` -> ``[H, 3W + 2, 3]``: first, middle, last frame side by side, 1-pixel white gaps."""
    f, _, h, _ = frames.shape
    picks = [frames[i].permute(1, 2, 0) for i in (0, f // 2, f - 1)]
    gap = torch.ones(h, 1, 3)
    return torch.cat([picks[0], gap, picks[1], gap, picks[2]], dim=1).clamp(0, 1)


def write_contact_sheet(
    path: str | Path,
    clips: Sequence[torch.Tensor],
    prompts: Sequence[str],
    verdicts: Sequence[dict],
    *,
    title: str = "",
) -> Path:
    """Write a PNG with one cell per clip, atomically (temporary file + rename).

    Args:
        path: the ``.png`` to write.
        clips: ``[F, 3, H, W]`` float in ``[0, 1]`` per prompt.
        prompts: the prompt of each clip, printed beneath it.
        verdicts: per clip ``{"label": str, "correct": {"colour", "shape", "direction", "all": bool}}``: a tick when
            all three are right, else a cross and what the detector read.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(clips)
    cols = min(COLUMNS, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.45 * rows + 0.6), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        ax.imshow(_strip(clips[k].detach().float().cpu()).numpy(), interpolation="nearest")
        ok = verdicts[k]["correct"]["all"]
        # The read label only when it is wrong: a row of ticks reads at a glance, the misses say what was seen.
        seen = "\u2713" if ok else "\u2717 " + verdicts[k]["label"].removeprefix("a ").replace(" moving", "")
        ax.set_title(
            f"{prompts[k]}\n{seen}", fontsize=6.5, y=-0.02, pad=0, va="top", color="darkgreen" if ok else "firebrick"
        )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.5 / fig.get_figheight(), bottom=0.03, hspace=0.75, wspace=0.06)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)  # a reader never sees a half-written image
    return path
