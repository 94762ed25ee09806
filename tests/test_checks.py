"""The shared argument checks (``semanticgen._checks``): bools are never ints, messages name what was wanted."""

from __future__ import annotations

import math

import pytest
import torch

from semanticgen._checks import as_dtype, check_bool, check_int, check_number, is_int, is_real
from semanticgen.errors import UsageError


@pytest.mark.parametrize("value, expected", [(3, True), (0, True), (True, False), (3.0, False), ("3", False)])
def test_is_int_rejects_bools_and_floats(value, expected):
    assert is_int(value) is expected


@pytest.mark.parametrize("value, expected", [(3, True), (2.5, True), (math.nan, True), (False, False), ("1", False)])
def test_is_real_rejects_bools_and_strings(value, expected):
    assert is_real(value) is expected


def test_check_int_passes_and_returns_the_value():
    assert check_int("n", 5, minimum=1) == 5
    assert check_int("n", 0, minimum=0, maximum=0) == 0
    assert check_int("n", None, minimum=1, allow_none=True) is None


@pytest.mark.parametrize(
    "kwargs, value, message",
    [
        (dict(minimum=1, who="f"), 0, "f: n must be a positive int, got 0"),
        (dict(minimum=1, who="f"), True, "f: n must be a positive int, got True (bool)"),
        (dict(minimum=2), 1, "n must be an int >= 2, got 1"),
        (dict(minimum=0, maximum=51), 52, "n must be an int in [0, 51], got 52"),
        (dict(), 1.5, "n must be an int, got 1.5 (float)"),
        (
            dict(minimum=1, allow_none=True, note="frames"),
            "3",
            "n must be a positive int (frames) or None, got '3' (str)",
        ),
    ],
)
def test_check_int_messages(kwargs, value, message):
    with pytest.raises(ValueError) as info:
        check_int("n", value, **kwargs)
    assert str(info.value) == message


def test_check_int_separate_type_error_and_error_class():
    with pytest.raises(TypeError, match=r"^g: size must be an int, got True \(bool\)$"):
        check_int("size", True, minimum=1, who="g", type_error=TypeError)
    with pytest.raises(ValueError, match=r"^g: size must be >= 1, got 0$"):
        check_int("size", 0, minimum=1, who="g", type_error=TypeError)
    with pytest.raises(UsageError, match="must be an int >= 2"):
        check_int("n", 1, minimum=2, error=UsageError)


def test_check_number():
    assert check_number("x", 2) == 2.0 and isinstance(check_number("x", 2), float)
    assert math.isnan(check_number("x", math.nan))  # no constraint asked for, none applied
    assert check_number("x", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"^f: fps must be a positive finite number, got inf$"):
        check_number("fps", math.inf, positive=True, finite=True, who="f")
    with pytest.raises(ValueError, match=r"must be a positive number, got nan"):
        check_number("x", math.nan, positive=True)
    with pytest.raises(ValueError, match=r"^x must be a number in \[0, 1\], got 1.5$"):
        check_number("x", 1.5, minimum=0, maximum=1)
    with pytest.raises(ValueError, match=r"^x must be a number, got False \(bool\)$"):
        check_number("x", False)


def test_check_bool():
    assert check_bool("flag", False) is False
    with pytest.raises(TypeError, match=r"^f: flag must be a bool, got 1 \(int\)$"):
        check_bool("flag", 1, who="f")


def test_docstring_examples_run():
    import doctest

    import semanticgen._checks as checks

    result = doctest.testmod(checks)
    assert result.attempted == 2 and result.failed == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (torch.bfloat16, torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("FP32", torch.float32),
        ("double", torch.float64),
    ],
)
def test_as_dtype_accepts_dtypes_and_their_names(value, expected):
    assert as_dtype("dtype", value) is expected


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("bf17", ValueError, r"Loader: dtype must be one of .*bf16.*got 'bf17'"),
        (torch.int8, ValueError, "must be a floating dtype, got torch.int8"),
        (16, TypeError, "must be a torch.dtype or one of .*, got int"),
    ],
)
def test_as_dtype_rejects_what_is_no_floating_dtype(value, error, match):
    with pytest.raises(error, match=match):
        as_dtype("dtype", value, who="Loader")
