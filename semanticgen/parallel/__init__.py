"""Parallelism that no library provides: window-parallel context parallelism for stage 2."""

from __future__ import annotations

from .context import COMM_COUNTER, CommCounter, ContextGroup, ContextPlan, gather_tokens, shift_ownership

__all__ = ["ContextPlan", "ContextGroup", "shift_ownership", "gather_tokens", "CommCounter", "COMM_COUNTER"]
