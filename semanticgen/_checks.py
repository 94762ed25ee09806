"""Argument checks shared by the whole package: ints that are not bools, finite numbers, bools.

Python's ``bool`` is a subclass of ``int``, so ``isinstance(True, int)`` holds and ``steps=True`` would run one
step. Every check here rejects bools where an int or a number is expected. Each error names the argument, what
was expected and what was given (``"sample_timesteps: batch must be a positive int, got True"``).

This module imports nothing from ``semanticgen``, so any layer (kernels and ops included) can use it.
"""

from __future__ import annotations

import math

__all__ = ["as_dtype", "check_bool", "check_int", "check_number", "is_int", "is_real"]


def is_int(value: object) -> bool:
    """``True`` for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """``True`` for an ``int`` or a ``float`` that is not a ``bool`` (NaN and inf included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _prefix(who: str | None) -> str:
    return f"{who}: " if who else ""


def _bounds(minimum: float | None, maximum: float | None) -> str:
    """``"in [lo, hi]"``, ``">= lo"``, ``"<= hi"`` or ``""``; ints in full (``10000000``, not ``1e+07``)."""
    lo, hi = (v if v is None or isinstance(v, int) else f"{v:g}" for v in (minimum, maximum))
    if minimum is not None and maximum is not None:
        return f"in [{lo}, {hi}]"
    if minimum is not None:
        return f">= {lo}"
    if maximum is not None:
        return f"<= {hi}"
    return ""


def _error(
    error: type[Exception],
    who: str | None,
    name: str,
    expected: str,
    note: str,
    allow_none: bool,
    value: object,
    *,
    with_type: bool = False,
) -> Exception:
    """``error("<who>: <name> must be <expected> (<note>) or None, got <value> (<type>)")``."""
    note = f" ({note})" if note else ""
    none = " or None" if allow_none else ""
    got = f"{value!r} ({type(value).__name__})" if with_type else repr(value)
    return error(f"{_prefix(who)}{name} must be {expected}{note}{none}, got {got}")


def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
    who: str | None = None,
    note: str = "",
    error: type[Exception] = ValueError,
    type_error: type[Exception] | None = None,
) -> int | None:
    """Return ``value`` if it is an ``int`` (not a ``bool``) in ``[minimum, maximum]``, else raise.

    Args:
        name: the argument, as the caller knows it.
        minimum, maximum: inclusive bounds (``None``: unbounded).
        allow_none: ``None`` passes (and is returned).
        who: the function or class checking, put in front of the message.
        note: what the value counts, put after the expectation (``"latent frames"``).
        error: raised for a value outside the bounds, and for a wrong type unless ``type_error`` is given.
        type_error: raised instead for a value that is not an int; a value out of bounds then gets a message
            about the bounds alone (``"size must be >= 1, got 0"``), the type being settled.

    Example:
        >>> check_int("steps", 0, minimum=1, who="sample")
        Traceback (most recent call last):
        ...
        ValueError: sample: steps must be a positive int, got 0
    """
    if value is None and allow_none:
        return None
    positive = minimum == 1 and maximum is None
    expected = "a positive int" if positive else f"an int {_bounds(minimum, maximum)}".rstrip()
    if not is_int(value):
        shown = "an int" if type_error else expected
        raise _error(type_error or error, who, name, shown, note, allow_none, value, with_type=True)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if type_error:
            raise _error(error, who, name, _bounds(minimum, maximum), note, False, value)
        raise _error(error, who, name, expected, note, allow_none, value)
    return value


def check_number(
    name: str,
    value: object,
    *,
    positive: bool = False,
    finite: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    allow_none: bool = False,
    who: str | None = None,
    note: str = "",
    error: type[Exception] = ValueError,
) -> float | None:
    """Return ``float(value)`` if ``value`` is an int or float (not a ``bool``) that passes, else raise ``error``.

    ``positive``: ``> 0``; ``finite``: not NaN or inf; ``minimum``, ``maximum``: inclusive bounds. Any of them
    rejects NaN. The other arguments are as for :func:`check_int`.

    Example:
        >>> check_number("fps", float("inf"), positive=True, finite=True, who="save_video")
        Traceback (most recent call last):
        ...
        ValueError: save_video: fps must be a positive finite number, got inf
    """
    if value is None and allow_none:
        return None
    words = " ".join(w for w, on in (("positive", positive), ("finite", finite)) if on)
    expected = f"a {words} number {_bounds(minimum, maximum)}".replace("  ", " ").strip()
    ok = is_real(value)
    ok = ok and not (finite and not math.isfinite(value))
    ok = ok and not (positive and not value > 0)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        raise _error(error, who, name, expected, note, allow_none, value, with_type=not is_real(value))
    return float(value)


def check_bool(name: str, value: object, *, who: str | None = None, error: type[Exception] = TypeError) -> bool:
    """Return ``value`` if it is a ``bool`` (not ``0``/``1`` or any other truthy thing), else raise ``error``."""
    if not isinstance(value, bool):
        raise _error(error, who, name, "a bool", "", False, value, with_type=True)
    return value


# Floating dtypes a config may name, by torch's names and the usual short ones.
_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
}


def as_dtype(name: str, value: object, *, who: str | None = None):
    """A ``torch.dtype`` from a floating ``torch.dtype`` or its name (``"bfloat16"``, ``"bf16"``, ...).

    Anything else is a ``ValueError`` (an unknown name) or ``TypeError`` (another type) listing the names accepted.
    """
    import torch  # here, not at the top: this module stays importable without torch

    names = ", ".join(sorted(_DTYPE_NAMES))
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ValueError(f"{_prefix(who)}{name} must be a floating dtype, got {value}")
        return value
    if isinstance(value, str):
        key = value.removeprefix("torch.").lower()
        if key not in _DTYPE_NAMES:
            raise ValueError(f"{_prefix(who)}{name} must be one of {names}, got {value!r}")
        return getattr(torch, _DTYPE_NAMES[key])
    raise TypeError(f"{_prefix(who)}{name} must be a torch.dtype or one of {names}, got {type(value).__name__}")
