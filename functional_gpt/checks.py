"""One way to check a public argument.

Every public function checks what it is given with these, at its face, before any work.
Each check returns the value in its plain form (an `int`, a `float`, the tensor) or raises
a one-line UserError that names the argument and says what was given:

    top_k: expected an integer >= 1, got 0.5 (a float)
    tokens: expected an integer tensor [B, T], got a float32 tensor [2, 3]

Integers may be Python ints, NumPy integers or one-element integer tensors, never bools;
numbers may be any real number, finite unless said otherwise, never bools. The CLI and
the server reach the same rules through the functions that own them (`Sampling`,
`StepSettings`, ...), so what one door accepts, every door accepts.
"""

import math
import numbers
import operator
import os
from pathlib import Path

import torch

from .errors import UserError


def describe(value) -> str:
    """What was given, in a few words: `0.5 (a float)`, `a float32 tensor [2, 3]`, `None`."""
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        where = "" if value.device.type == "cpu" else f" on {value.device}"
        return f"{_a(str(value.dtype).removeprefix('torch.'))} tensor {list(value.shape)}{where}"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an int of {value.bit_length()} bits"  # repr may refuse (Python's 4300-digit limit)
    if isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return f"{text[:60]}{'...' if len(text) > 60 else ''} ({_a(type(value).__name__)})"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, torch.dtype):
        return f"{value} (a torch.dtype)"
    return _a(type(value).__name__)


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' and not noun.startswith('uint') else 'a'} {noun}"


def _span(low, high, low_open=False, high_open=False) -> str:
    """" in 1..16", " in (0, 1]", " >= 1", " < 2" or "" (no bounds)."""
    text = lambda x: str(x) if isinstance(x, int) else f"{x:g}"
    if low is not None and high is not None:
        if isinstance(low, int) and isinstance(high, int) and not (low_open or high_open):
            return f" in {low}..{high}"
        return f" in {'(' if low_open else '['}{text(low)}, {text(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {text(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {text(high)}"
    return ""


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """value as an int within [low, high] (either bound may be None)."""
    plain = None
    if not isinstance(value, bool) and not (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        try:
            plain = operator.index(value)
        except (TypeError, RuntimeError):  # RuntimeError: a meta tensor has no value to give
            pass
    if plain is None or (low is not None and plain < low) or (high is not None and plain > high):
        raise UserError(f"{name}: expected an integer{_span(low, high)}, got {describe(value)}")
    return plain


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, finite: bool = True) -> float:
    """value as a float within its bounds: [low, high], or open at an end (low_open: > low)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    try:
        plain = float(value) if ok else math.nan
    except OverflowError:  # an int beyond float range (JSON allows any number of digits)
        plain = math.inf if value > 0 else -math.inf
    if ok and math.isnan(plain):
        ok = False
    if ok and finite and not math.isfinite(plain):
        ok = False
    if ok and low is not None and (plain <= low if low_open else plain < low):
        ok = False
    if ok and high is not None and (plain >= high if high_open else plain > high):
        ok = False
    if not ok:
        what = "a finite number" if finite else "a number"
        raise UserError(f"{name}: expected {what}{_span(low, high, low_open, high_open)}, got {describe(value)}")
    return plain


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{name}: expected True or False, got {describe(value)}")
    return value


def check_choice(name: str, value, choices):
    """value, which must be one of `choices` (compared with ==, strings not coerced)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise UserError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {describe(value)}")
    return value


def check_str(name: str, value, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise UserError(f"{name}: expected {'a' if empty else 'a non-empty'} string, got {describe(value)}")
    return value


def check_path(name: str, value, what: str = "a file or directory") -> Path:
    """value as a Path: a non-empty string or os.PathLike without NUL bytes (which no file
    system takes)."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value) or "\x00" in str(os.fspath(value)):
        raise UserError(f"{name}: expected the path of {what}, got {describe(value)}")
    return Path(value)


def check_callable(name: str, value, what: str = "a function"):
    if not callable(value):
        raise UserError(f"{name}: expected {what}, got {describe(value)}")
    return value


def check_float_dtype(name: str, value) -> torch.dtype:
    """value, a floating-point torch.dtype (torch.float32, torch.bfloat16, ...)."""
    if not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise UserError(f"{name}: expected a floating-point torch.dtype such as torch.float32, got {describe(value)}")
    return value


_KINDS = {"float": torch.Tensor.is_floating_point,
          "integer": lambda t: not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
          "bool": lambda t: t.dtype == torch.bool}


def check_tensor(name: str, value, *, dims: str | None = None, kind: str | None = None,
                 shape: tuple | None = None, device: torch.device | None = None) -> torch.Tensor:
    """value, a torch.Tensor: of len(dims.split()) dimensions when `dims` names them
    ("B T"), of `kind` "float", "integer" or "bool", of `shape` (None entries match any size), on
    `device`."""
    want = f"{'an' if kind == 'integer' else 'a'} {kind + ' ' if kind else ''}tensor"
    if dims:
        want += f" [{', '.join(dims.split())}]"
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{name}: expected {want}, got {describe(value)}")
    if kind is not None and not _KINDS[kind](value):
        raise UserError(f"{name}: expected {want}, got {describe(value)}")
    if dims is not None and value.dim() != len(dims.split()):
        raise UserError(f"{name}: expected {want}, got {describe(value)}")
    if shape is not None and (len(shape) != value.dim() or any(s is not None and s != n
                                                              for s, n in zip(shape, value.shape))):
        expected = ", ".join("*" if s is None else str(s) for s in shape)
        raise UserError(f"{name}: expected shape [{expected}], got {describe(value)}")
    if value.is_meta:
        raise UserError(f"{name}: {describe(value)} holds no values; a real tensor is needed")
    if device is not None and value.device != torch.device(device):
        raise UserError(f"{name}: is on {value.device}, expected {torch.device(device)} (where the params are)")
    return value


def check_tensor_dict(name: str, tensors, like: dict | None = None) -> dict:
    """tensors: {key: floating-point tensor}; with `like`, holding each of its keys at its shape."""
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) and t.is_floating_point()
                                                for t in tensors.values()):
        raise UserError(f"{name}: expected a dict of {{GPT-2 key: floating-point tensor}}, got {describe(tensors)}")
    for key, t in (like or {}).items():
        if key not in tensors:
            raise UserError(f"{name}: no {key} (it must hold every key of the params)")
        if tensors[key].shape != t.shape:
            raise UserError(f"{name}: {key} is {describe(tensors[key])}, the param {list(t.shape)}")
    return tensors


def check_finite_tensor(name: str, value: torch.Tensor) -> torch.Tensor:
    """value, which must hold no NaN or infinity (one pass over it)."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        n_bad = int((~torch.isfinite(value)).sum())
        raise UserError(f"{name}: holds {n_bad} non-finite values (NaN or infinity)")
    return value
