"""The words of the one way to check an argument: what was given (`describe`), the
bounds said back (`check_int`, `check_number`), exact to the character, since every
face's messages are made of them."""

import math

import numpy as np
import pytest
import torch

from functional_gpt import UserError
from functional_gpt.checks import check_int, check_number, describe


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
