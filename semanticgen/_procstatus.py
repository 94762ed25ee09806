"""Fields of this process's ``/proc/self/status`` (Linux), for values no portable call gives safely.

``Umask`` is the umask without setting it (``os.umask`` must set one to read it, which leaves a multi-threaded
process with a wrong umask for a moment); ``VmHWM`` is the process's own peak resident memory (``ru_maxrss``
carries a parent's peak across fork and exec). Elsewhere (macOS, Windows) the file does not exist and every field
is ``None``: callers fall back to the portable call.

This module imports nothing from ``semanticgen``, so any layer can use it.

Example:
    >>> umask = proc_status_field("Umask")  # "0022" on Linux, None elsewhere
    >>> peak_kib = proc_status_field("VmHWM")  # "123456 kB"
"""

from __future__ import annotations

__all__ = ["PROC_STATUS", "proc_status_field"]

PROC_STATUS = "/proc/self/status"


def proc_status_field(name: str, path: str = PROC_STATUS) -> str | None:
    """The value of field ``name`` of ``path`` as written there, stripped (``"Umask"`` -> ``"0022"``,
    ``"VmHWM"`` -> ``"123456 kB"``), or ``None`` when the file cannot be read or has no such field.

    ``path`` is for tests; the file holds one ``Name:<tab>value`` line per field.
    """
    prefix = name + ":"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
    except OSError:
        pass
    return None
