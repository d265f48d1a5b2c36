"""Argument checks of :mod:`metafunc.data` that no other part of the package needs (the general
ones, such as :func:`metafunc._checks.int_at_least`, live in :mod:`metafunc._checks`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .._checks import describe


def check_generator(call: str, generator: Any) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{call}: expected generator to be a torch.Generator, got {describe(generator)}. "
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
            f"{call}: expected {name} to be a (low, high) pair of numbers, got {describe(value)}. "
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
        raise TypeError(f"{call}: expected classes to be {expected}, got {describe(classes)}.")
    out = list(classes)
    if len(set(out)) != len(out):
        raise ValueError(
            f"{call}: expected distinct classes, got duplicates in {out[:10]}... "
            "Pass each label once (e.g. labels.unique().tolist())."
        )
    return out
