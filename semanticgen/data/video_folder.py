"""Videos with captions from a directory, decoded with PyAV into the two streams SemanticGen trains on.

Layout: any tree of video files (``.mp4 .mkv .webm .mov .avi .m4v``) under ``root``; the caption of ``a/b.mp4`` is
``a/b.txt`` beside it, or comes from one JSON-lines file with ``{"video": "a/b.mp4", "caption": "..."}`` per line
(``captions=`` path, or ``root/captions.jsonl`` if present). Videos without a caption are left out (counted).

Each clip starts at the beginning of the video and yields the same time span twice: ``vae_frames`` frames at
``vae_fps`` (24 fps in the paper) for the VAE and ``sem_frames`` frames at ``sem_fps`` (1.6 fps) for the semantic
encoder. The decoded frame shown at each timestamp is taken (nearest earlier presentation time), so any source
frame rate works; a video shorter than the span repeats its last frame. Frames are resized (shorter side) and
centre-cropped to ``height x width``.

A video that cannot be opened or decoded is skipped with a logged warning (once per file and process; it is not
decoded again): the item falls through to the next index, and ``num_skipped`` / the item's ``skipped`` field count
how often that happened.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .synthetic import frame_times

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")


def read_captions_jsonl(path: Path) -> dict[str, str]:
    """``{"video": relative path, "caption": text}`` lines -> mapping; malformed lines raise ``ValueError``."""
    out = {}
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                out[str(rec["video"])] = str(rec["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f'{path}:{lineno}: expected {{"video": ..., "caption": ...}}, got {line[:80]!r}'
                ) from e
    return out


def decode_frames_at(path: str | Path, times: torch.Tensor) -> torch.Tensor:
    """Decode the frames shown at ``times`` (seconds, ascending): ``[len(times), H, W, 3]`` uint8.

    Raises whatever PyAV raises for unreadable files, and ``ValueError`` for a file with no video frames.
    """
    import av

    wanted = times.tolist()
    out: list[torch.Tensor | None] = [None] * len(wanted)
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        nxt = 0
        last = None
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else 0.0
            # Every wanted time before this frame's timestamp shows the previous frame.
            while nxt < len(wanted) and last is not None and wanted[nxt] < t - 1e-6:
                out[nxt] = last
                nxt += 1
            last = torch.from_numpy(frame.to_ndarray(format="rgb24"))
            if nxt >= len(wanted):
                break
        if last is None:
            raise ValueError(f"{path}: no decodable video frames")
        for i in range(nxt, len(wanted)):
            out[i] = last
    return torch.stack(out)  # type: ignore[arg-type]


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[F, H, W, 3]`` uint8 -> ``[F, 3, height, width]`` float32 in [0, 1] (scale the shorter side, crop)."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[:, :, top : top + height, left : left + width].clamp_(0.0, 1.0).contiguous()


class VideoFolder(Dataset):
    """Map-style dataset over a folder of captioned videos; items as in :class:`~semanticgen.data.SyntheticShapes`
    plus ``path`` and ``skipped`` (unreadable videos passed over to produce this item)."""

    def __init__(
        self,
        root: str | Path,
        *,
        captions: str | Path | None = None,
        height: int = 256,
        width: int = 256,
        vae_frames: int = 17,
        vae_fps: float = 24.0,
        sem_frames: int = 2,
        sem_fps: float = 1.6,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"VideoFolder: {self.root} is not a directory")
        self.height, self.width = height, width
        self.vae_t = frame_times(vae_frames, vae_fps)
        self.sem_t = frame_times(sem_frames, sem_fps)
        jsonl = Path(captions) if captions else self.root / "captions.jsonl"
        table = read_captions_jsonl(jsonl) if jsonl.is_file() else {}
        if captions and not jsonl.is_file():
            raise FileNotFoundError(f"VideoFolder: captions file {jsonl} not found")
        videos = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        self.items: list[tuple[Path, str]] = []
        self.num_uncaptioned = 0
        for p in videos:
            rel = p.relative_to(self.root).as_posix()
            txt = p.with_suffix(".txt")
            if rel in table:
                self.items.append((p, table[rel]))
            elif txt.is_file():
                self.items.append((p, txt.read_text().strip()))
            else:
                self.num_uncaptioned += 1
        if self.num_uncaptioned:
            logger.warning(
                "VideoFolder: %d videos under %s have no caption and are left out", self.num_uncaptioned, self.root
            )
        if not self.items:
            raise ValueError(f"VideoFolder: no captioned videos ({', '.join(VIDEO_SUFFIXES)}) under {self.root}")
        self.num_skipped = 0
        self._bad: set[int] = set()  # indices that failed to decode in this process

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int) -> dict:
        path, caption = self.items[index]
        both = torch.cat([self.vae_t, self.sem_t])
        order = torch.argsort(both, stable=True)
        decoded = decode_frames_at(path, both[order])
        frames = torch.empty_like(decoded)
        frames[order] = decoded
        video = resize_center_crop(frames, self.height, self.width)
        nv = len(self.vae_t)
        return {"vae_video": video[:nv], "sem_video": video[nv:], "caption": caption, "path": str(path)}

    def __getitem__(self, index: int) -> dict:
        skipped = 0
        for attempt in range(len(self.items)):
            i = (index + attempt) % len(self.items)
            if i in self._bad:  # failed before in this process: do not decode it again
                skipped += 1
                self.num_skipped += 1
                continue
            try:
                item = self._load(i)
            except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable video", never a crash
                skipped += 1
                self.num_skipped += 1
                self._bad.add(i)
                logger.warning(
                    "VideoFolder: skipping unreadable video %s (%s: %s); %d skipped so far in this process",
                    self.items[i][0],
                    type(e).__name__,
                    e,
                    self.num_skipped,
                )
                continue
            item["skipped"] = skipped
            return item
        raise RuntimeError(f"VideoFolder: none of the {len(self.items)} videos under {self.root} could be decoded")
