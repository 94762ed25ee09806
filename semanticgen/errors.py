"""Errors shared across the package.

:class:`UsageError` marks a mistake in what the user asked for (a bad argument, a file that is not what it should
be, a split that cannot be done). It is a ``ValueError``, so library callers that catch ``ValueError`` keep
working; the command line prints it as one line and exits 2, and lets every other exception keep its traceback.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A mistake in what the user asked for; the CLI prints it as one line (exit code 2)."""
