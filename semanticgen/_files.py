"""Atomic safetensors writes with the permissions users expect.

Every weight, latent and shard file the package writes goes through :func:`save_safetensors_atomic`: the tensors go
to ``<name>.tmp`` next to the target and are renamed over it, so a reader (another rank, a sampler watching the run
directory, a crash mid-write) never sees half a file. safetensors creates its files with mode ``0600`` whatever the
umask; on a cluster where a run directory is shared with a team that hides every checkpoint from everyone but the
trainer, so the mode is set back to what ``open()`` would have given (``0666`` less the umask) before the rename.

This module imports nothing from ``semanticgen`` but :mod:`semanticgen._procstatus` (which imports nothing), so any
layer can use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from semanticgen._procstatus import proc_status_field

__all__ = ["META_KEY", "default_file_mode", "save_safetensors_atomic"]

META_KEY = "semanticgen"  # the metadata key of every safetensors file the package writes


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the process umask.

    The umask is read from ``/proc/self/status`` where Linux has it: the portable way (set it, then put it back)
    leaves the process with umask 0 for a moment, and a file another thread creates then (a data-loader thread,
    a checkpoint writer) would be world-writable.
    """
    umask = proc_status_field("Umask")
    if umask is not None:
        return 0o666 & ~int(umask, 8)
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``tensors`` (name -> tensor, contiguous, any device) to ``path`` atomically.

    Args:
        tensors: what to store; made contiguous here (safetensors refuses strided views).
        path: the target file; its parent directories are created.
        meta: JSON-serialisable metadata, stored as one JSON string under ``meta_key`` in the safetensors header
            under :data:`META_KEY` (``None`` stores no metadata).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    metadata = None if meta is None else {META_KEY: json.dumps(meta)}
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no stray .tmp next to the (untouched) previous file
        raise
    return path
