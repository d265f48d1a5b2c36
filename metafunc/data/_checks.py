"""Argument checks shared by :mod:`metafunc.data`: one clear error per bad input."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{value!r} ({type(value).__name__})"


def check_int(call: str, name: str, value: Any, *, minimum: int) -> int:
    """``value`` as an ``int`` of at least ``minimum``; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{call}: expected {name} to be an int >= {minimum}, got {_describe(value)}. "
            f"Pass a Python int, e.g. {name}={max(minimum, 1)}."
        )
    if value < minimum:
        raise ValueError(
            f"{call}: expected {name} to be an int >= {minimum}, got {value}. "
            f"Pass {name}={max(minimum, 1)} or more."
        )
    return value


def check_generator(call: str, generator: Any) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{call}: expected generator to be a torch.Generator, got {_describe(generator)}. "
            "Pass generator=torch.Generator().manual_seed(0) (the same seed gives the same draws)."
        )
    return generator


def check_range(call: str, name: str, value: Any) -> tuple[float, float]:
    """A ``(low, high)`` pair of finite numbers with ``low <= high``."""
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        raise TypeError(
            f"{call}: expected {name} to be a (low, high) pair of numbers, got {_describe(value)}. "
            f"Pass e.g. {name}=(0.0, 1.0)."
        )
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(
            f"{call}: expected {name} to be a (low, high) pair of finite numbers with low <= "
            f"high, got {tuple(value)!r}. Swap or fix the bounds."
        )
    return low, high


def check_labels(call: str, classes: Any, expected: str) -> list[int]:
    """``classes`` (a list or 1-D integer tensor of distinct labels) as a list of ints.

    ``expected`` completes the message "expected classes to be ..." when the type is wrong.
    """
    if isinstance(classes, torch.Tensor) and classes.dim() == 1 and not classes.is_floating_point():
        classes = classes.tolist()
    if (
        isinstance(classes, (str, bytes))
        or not isinstance(classes, Sequence)
        or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes)
    ):
        raise TypeError(f"{call}: expected classes to be {expected}, got {_describe(classes)}.")
    out = list(classes)
    if len(set(out)) != len(out):
        raise ValueError(
            f"{call}: expected distinct classes, got duplicates in {out[:10]}... "
            "Pass each label once (e.g. labels.unique().tolist())."
        )
    return out
