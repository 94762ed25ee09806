"""Shared pytest fixtures."""

from __future__ import annotations

import functools

import pytest
import torch


def _poisoned(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        out = factory(*args, **kwargs)
        if out.is_floating_point() or out.is_complex():
            out.fill_(float("nan"))
        return out

    return wrapper


@pytest.fixture
def poison_empty(monkeypatch):
    """Fill fresh ``torch.empty``/``empty_like``/``new_empty`` allocations with NaN.

    A kernel that returns memory it never wrote then fails loudly instead of passing on zeros.
    """
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
