"""Input checks shared by the models: clear errors that name what was expected and what came."""

from __future__ import annotations

import torch

from semanticgen._checks import check_bool, check_int, check_number


def check_tensor(name: str, x: object, ndim: int, layout: str) -> torch.Tensor:
    """Raise unless ``x`` is a floating-point tensor with ``ndim`` dims (``layout`` names them)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {layout} ({ndim}-D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def check_conditioning(
    who: str,
    batch: int,
    t: object,
    text: object,
    text_mask: object,
    text_dim: int,
) -> None:
    """Check ``t [B]``, ``text [B, L, text_dim]`` and ``text_mask [B, L] bool`` against batch size ``B``."""
    check_tensor(f"{who}: t", t, 1, "[B]")
    if t.shape[0] != batch:
        raise ValueError(f"{who}: t must have one timestep per batch element ({batch}), got shape {tuple(t.shape)}")
    check_tensor(f"{who}: text", text, 3, "[B, L, text_dim]")
    if text.shape[0] != batch or text.shape[2] != text_dim:
        raise ValueError(f"{who}: text must be [B={batch}, L, text_dim={text_dim}], got shape {tuple(text.shape)}")
    if not isinstance(text_mask, torch.Tensor):
        raise TypeError(f"{who}: text_mask must be a bool torch.Tensor [B, L], got {type(text_mask).__name__}")
    if text_mask.dtype != torch.bool:
        raise TypeError(f"{who}: text_mask must be a bool tensor, got {text_mask.dtype}")
    if tuple(text_mask.shape) != tuple(text.shape[:2]):
        raise ValueError(
            f"{who}: text_mask must be [B, L] = {tuple(text.shape[:2])} like text, got {tuple(text_mask.shape)}"
        )


def check_config(
    who: str,
    config: object,
    *,
    positive_ints: tuple[str, ...] = (),
    numbers: tuple[str, ...] = (),
    positive_numbers: tuple[str, ...] = (),
    bools: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
) -> None:
    """Check the fields of a model ``Config`` dataclass by kind, naming the model and the field on error.

    Args:
        positive_ints: fields that must be ints >= 1 (``window=2.0`` or ``depth=True`` is an error, not 2 or 1).
        numbers, positive_numbers: fields that must be finite real numbers (``> 0`` for the second).
        bools: fields that must be bools.
        optional: fields among those above that may also be ``None``.

    Raises:
        TypeError: a bool field is not a bool. ValueError: any other field is not what its kind says.
    """
    for name in positive_ints:
        check_int(name, getattr(config, name), minimum=1, allow_none=name in optional, who=who)
    for name in numbers:
        check_number(name, getattr(config, name), finite=True, allow_none=name in optional, who=who)
    for name in positive_numbers:
        check_number(name, getattr(config, name), positive=True, finite=True, allow_none=name in optional, who=who)
    for name in bools:
        value = getattr(config, name)
        if not (value is None and name in optional):
            check_bool(name, value, who=who)
