"""What a checkpoint-backed encoder's local directory must hold, said before any loader runs.

The loaders (``diffusers``, ``transformers``, safetensors) fail on a missing path or a directory without their
files deep inside, with a traceback that names neither the config key nor the path. Each loader's class has a
``checkpoint_problem(path)`` built from these helpers, next to the loader, that says in a few words what is
missing (``"no config.json in it"``), or ``None``; :mod:`semanticgen.encoders.factory` turns that into a
:class:`~semanticgen.errors.UsageError` naming the config key and the path. The checks look at file names only:
whether the files hold the right model is the loader's to say.
"""

from __future__ import annotations

import os

__all__ = ["directory_problem", "missing_one_of"]


def directory_problem(path: str | os.PathLike) -> str | None:
    """``"no such directory"`` or ``"not a directory"`` for ``path``, else ``None``."""
    if not os.path.exists(path):
        return "no such directory"
    if not os.path.isdir(path):
        return "not a directory"
    return None


def missing_one_of(folder: str | os.PathLike, names: tuple[str, ...], what: str = "files") -> str | None:
    """``None`` when ``folder`` holds a file named one of ``names``, else what is missing: ``"no config.json in
    <folder>"`` for one name, ``"no <what> in <folder> (none of <names>)"`` for several.

    Example:
        >>> missing_one_of("/an/empty/dir", ("model.safetensors", "model.safetensors.index.json"), "weights")
        'no weights in /an/empty/dir (none of model.safetensors, model.safetensors.index.json)'
    """
    if any(os.path.isfile(os.path.join(folder, name)) for name in names):
        return None
    if len(names) == 1:
        return f"no {names[0]} in {os.fspath(folder)}"
    return f"no {what} in {os.fspath(folder)} (none of {', '.join(names)})"
