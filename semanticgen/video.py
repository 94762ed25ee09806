"""Write and read video files with PyAV (FFmpeg bindings).

``save_video`` writes H.264 (``libx264``) in an mp4 container: ``yuv420p`` (what every player decodes)
when height and width are even, ``yuv444p`` otherwise (4:2:0 chroma needs even sizes).
"""

from __future__ import annotations

import os
from fractions import Fraction

import torch

from semanticgen._checks import check_int, check_number

__all__ = ["save_video", "read_video"]


def _as_uint8_frames(frames: object) -> torch.Tensor:
    """``[F, 3, H, W]`` or ``[F, H, W, 3]`` (float in [0, 1] or uint8) -> contiguous uint8 ``[F, H, W, 3]`` on CPU."""
    if not isinstance(frames, torch.Tensor):
        raise TypeError(
            f"save_video: frames must be a torch.Tensor [F, 3, H, W] or [F, H, W, 3], got {type(frames).__name__}"
        )
    if frames.dim() == 5:
        raise ValueError(
            f"save_video: frames must be one video [F, 3, H, W] or [F, H, W, 3], got a batch {tuple(frames.shape)}; "
            "save each video of the batch separately (frames[i])"
        )
    if frames.dim() != 4 or (frames.shape[1] != 3 and frames.shape[3] != 3):
        raise ValueError(f"save_video: frames must be [F, 3, H, W] or [F, H, W, 3], got {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("save_video: no frames to write (F = 0)")
    # channels-first wins when both dims are 3 ([F, 3, H, 3]): that is the layout the pipeline returns
    x = frames.permute(0, 2, 3, 1) if frames.shape[1] == 3 else frames
    if x.dtype == torch.uint8:
        return x.detach().cpu().contiguous()
    if not x.is_floating_point():
        raise TypeError(f"save_video: frames must be float in [0, 1] or uint8, got {frames.dtype}")
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("save_video: frames contain NaN or infinite values")
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).contiguous()


def save_video(
    frames: torch.Tensor,
    path: str | os.PathLike,
    fps: float,
    *,
    crf: int = 18,
    codec: str = "libx264",
) -> str:
    """Write ``frames`` to ``path`` (an ``.mp4``) at ``fps`` frames per second.

    Args:
        frames: ``[F, 3, H, W]`` or ``[F, H, W, 3]``, float in ``[0, 1]`` (clamped) or uint8.
        path: output file; its directory is created if missing.
        fps: frame rate (may be fractional, e.g. 23.976).
        crf: constant rate factor of ``libx264`` (0 = lossless, 18 = visually lossless, 23 = default).
        codec: any FFmpeg video encoder PyAV was built with.

    Returns:
        The path written, as a string.
    """
    import av

    check_number("fps", fps, positive=True, finite=True, who="save_video")
    check_int("crf", crf, minimum=0, maximum=51, who="save_video")
    if codec not in av.codecs_available:
        raise ValueError(f"save_video: codec {codec!r} is not available in this PyAV build")
    pixels = _as_uint8_frames(frames)
    _, height, width, _ = pixels.shape
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for frame in pixels.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return path


def read_video(path: str | os.PathLike) -> tuple[torch.Tensor, float]:
    """Decode every frame of the first video stream of ``path``.

    Returns:
        ``(frames float32 [F, 3, H, W] in [0, 1], fps)``.
    """
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_video: no such file {path!r}")
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"read_video: {path!r} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"read_video: {path!r} has no decodable frames")
    video = torch.stack(frames).permute(0, 3, 1, 2).float() / 255.0
    return video, float(rate) if rate else 0.0
