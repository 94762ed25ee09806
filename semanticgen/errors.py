"""Errors shared across the package, and how the command lines report them.

:class:`UsageError` marks a mistake in what the user asked for (a bad argument, a config that cannot work, a file
that is not what it should be, a split that cannot be done). It is a ``ValueError``, so library callers that catch
``ValueError`` keep working. Every command line runs its work through :func:`run_command`, which prints a
``UsageError`` as one line and exits 2, and lets every other exception keep its traceback: those are bugs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["EXIT_USAGE", "UsageError", "run_command"]

EXIT_USAGE = 2  # argparse's exit code for a bad command line; ours for every other user mistake


class UsageError(ValueError):
    """A mistake in what the user asked for; the CLI prints it as one line (exit code 2)."""


def run_command(prog: str, command: Callable[[], int | None], *, report: bool = True) -> int:
    """Run ``command()`` and return its exit code (``None`` counts as 0).

    A :class:`UsageError` becomes one ``PROG: error: MESSAGE`` line on stderr and :data:`EXIT_USAGE`, as argparse
    reports a bad flag. ``report=False`` returns the code without the line: under ``torchrun`` every rank makes the
    same mistake, and rank 0 alone says it. Any other exception propagates with its traceback.
    """
    try:
        return int(command() or 0)
    except UsageError as exc:
        if report:
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
