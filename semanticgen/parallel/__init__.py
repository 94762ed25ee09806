"""Parallelism that no library provides: window-parallel context parallelism for stage 2."""

from __future__ import annotations

from .context import (
    COMM_COUNTER,
    CommCounter,
    ContextGroup,
    ContextPlan,
    HaloSplit,
    gather_tokens,
    shift_ownership,
)
from .overlap import shift_ownership_overlapped

__all__ = [
    "ContextPlan",
    "ContextGroup",
    "HaloSplit",
    "shift_ownership",
    "shift_ownership_overlapped",
    "gather_tokens",
    "CommCounter",
    "COMM_COUNTER",
]
