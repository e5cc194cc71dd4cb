"""The words of the one way to check an argument: what was given (`describe`), the
bounds said back (`check_int`, `check_number`), exact to the character, since every
face's messages are made of them."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from functional_gpt import UserError
from functional_gpt.checks import (check_callable, check_float_dtype, check_int, check_number, check_path, check_str,
                                   check_tensor, check_tensor_dict, describe)


@pytest.mark.parametrize("value, words", [
    (None, "None"),
    (0.5, "0.5 (a float)"),
    (True, "True (a bool)"),
    (3, "3 (an int)"),
    (2**256 - 1, f"{2**256 - 1} (an int)"[:60] + "... (an int)"),
    (2**256, "an int of 257 bits"),
    (-(2**300), "an int of 301 bits"),
    ("x" * 58, repr("x" * 58) + " (a str)"),  # 60 characters with the quotes: whole
    ("x" * 59, repr("x" * 59)[:60] + "... (a str)"),  # 61: cut at 60
    ([1, 2], "a list of 2"),
    ((), "a tuple of 0"),
    ({}, "a dict"),
    (object(), "an object"),
    (np.int64(2), "an int64"),
    (torch.zeros(2, 3), "a float32 tensor [2, 3]"),
    (torch.zeros(1, dtype=torch.int64), "an int64 tensor [1]"),
    (torch.zeros(2, dtype=torch.uint8), "a uint8 tensor [2]"),
    (torch.zeros(2, device="meta"), "a float32 tensor [2] on meta"),
])
def test_describe_says_what_was_given(value, words):
    assert describe(value) == words


@pytest.mark.parametrize("call, message", [
    (lambda: check_int("n", 0, 1, 16), "n: expected an integer in 1..16, got 0 (an int)"),
    (lambda: check_int("n", 0, 1), "n: expected an integer >= 1, got 0 (an int)"),
    (lambda: check_int("n", 9, None, 8), "n: expected an integer <= 8, got 9 (an int)"),
    (lambda: check_int("n", "a"), "n: expected an integer, got 'a' (a str)"),
    (lambda: check_number("p", 0.0, 0, 1, low_open=True), "p: expected a finite number in (0, 1], got 0.0 (a float)"),
    (lambda: check_number("p", 1.0, 0, 1, high_open=True), "p: expected a finite number in [0, 1), got 1.0 (a float)"),
    (lambda: check_number("p", 2.5, 0.5, 2), "p: expected a finite number in [0.5, 2], got 2.5 (a float)"),
    (lambda: check_number("p", 0, 0, low_open=True), "p: expected a finite number > 0, got 0 (an int)"),
    (lambda: check_number("p", -1, 0), "p: expected a finite number >= 0, got -1 (an int)"),
    (lambda: check_number("p", 3, None, 2, high_open=True), "p: expected a finite number < 2, got 3 (an int)"),
    (lambda: check_number("p", 3, None, 2.5), "p: expected a finite number <= 2.5, got 3 (an int)"),
    (lambda: check_number("p", math.nan), "p: expected a finite number, got nan (a float)"),
    (lambda: check_number("p", math.nan, finite=False), "p: expected a number, got nan (a float)"),
])
def test_bounds_are_said_back_as_given(call, message):
    with pytest.raises(UserError) as e:
        call()
    assert str(e.value) == message


def test_an_int_past_float_range_is_an_infinity_of_its_sign():
    """JSON allows any number of digits: 10**400 is +inf, -10**400 -inf, refused where a
    finite number or a bound is asked."""
    assert check_number("p", 10**400, finite=False) == math.inf
    assert check_number("p", -10**400, finite=False) == -math.inf
    for value, kwargs, message in [
        (10**400, {}, "p: expected a finite number, got an int of 1329 bits"),
        (-10**400, dict(low=-5, finite=False), "p: expected a number >= -5, got an int of 1329 bits"),
        (10**400, dict(high=5, finite=False), "p: expected a number <= 5, got an int of 1329 bits"),
    ]:
        with pytest.raises(UserError) as e:
            check_number("p", value, **kwargs)
        assert str(e.value) == message


@pytest.mark.parametrize("call, message", [
    (lambda: check_tensor("x", 3, kind="float"), "x: expected a float tensor, got 3 (an int)"),
    (lambda: check_tensor("x", 3), "x: expected a tensor, got 3 (an int)"),
    (lambda: check_tensor("x", 3, kind="bool", dims="B T"), "x: expected a bool tensor [B, T], got 3 (an int)"),
    (lambda: check_tensor("x", 3, kind="integer"), "x: expected an integer tensor, got 3 (an int)"),
    (lambda: check_tensor("x", torch.zeros(2, 3), shape=(None, 4)), "x: expected shape [*, 4], got a float32 tensor [2, 3]"),
    (lambda: check_tensor("x", torch.zeros(2, device="meta")),
     "x: a float32 tensor [2] on meta holds no values; a real tensor is needed"),
    (lambda: check_tensor("x", torch.zeros(2), device="meta"), "x: is on cpu, expected meta (where the params are)"),
    (lambda: check_tensor_dict("d", {"a": torch.zeros(2, dtype=torch.long)}),
     "d: expected a dict of {GPT-2 key: floating-point tensor}, got a dict"),
    (lambda: check_tensor_dict("d", [1]), "d: expected a dict of {GPT-2 key: floating-point tensor}, got a list of 1"),
    (lambda: check_float_dtype("dtype", torch.int64),
     "dtype: expected a floating-point torch.dtype such as torch.float32, got torch.int64 (a torch.dtype)"),
    (lambda: check_float_dtype("dtype", "float32"),
     "dtype: expected a floating-point torch.dtype such as torch.float32, got 'float32' (a str)"),
    (lambda: check_path("p", "a\x00b"), "p: expected the path of a file or directory, got 'a\\x00b' (a str)"),
    (lambda: check_path("p", None), "p: expected the path of a file or directory, got None"),
    (lambda: check_callable("f", 3), "f: expected a function, got 3 (an int)"),
    (lambda: check_str("s", 3, empty=True), "s: expected a string, got 3 (an int)"),
    (lambda: check_str("s", ""), "s: expected a non-empty string, got '' (a str)"),
])
def test_each_check_says_what_it_wanted_and_what_it_got(call, message):
    with pytest.raises(UserError) as e:
        call()
    assert str(e.value) == message


def test_what_passes_a_check_comes_back():
    t = torch.zeros(2, 3, dtype=torch.long)
    assert check_tensor("x", t, dims="B T", kind="integer", shape=(2, None), device="cpu") is t
    assert check_float_dtype("d", torch.bfloat16) is torch.bfloat16 and check_path("p", "a/b") == Path("a/b")
    assert check_str("s", "", empty=True) == "" and check_tensor_dict("d", {"w": torch.ones(1)}, {"w": torch.ones(1)})


def test_a_large_integer_bound_is_written_in_full_and_non_finite_values_are_counted():
    from functional_gpt.checks import check_finite_tensor

    with pytest.raises(UserError) as e:
        check_int("n", 5, 10**7)
    assert str(e.value) == "n: expected an integer >= 10000000, got 5 (an int)"
    with pytest.raises(UserError) as e:
        check_finite_tensor("x", torch.tensor([1.0, math.nan, math.inf, -math.inf]))
    assert str(e.value) == "x: holds 3 non-finite values (NaN or infinity)"
    t = torch.tensor([1.0, 2.0])
    assert check_finite_tensor("x", t) is t and check_finite_tensor("i", torch.tensor([1, 2])).dtype == torch.int64
