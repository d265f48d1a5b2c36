"""The learners' own argument rules (param names of the model, MAML++'s step weights), in the
form of the package's checks (:mod:`metafunc._checks`, which has the generic rules): the call,
the argument's name, its value."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .._functional import FunctionalModel
from .._tree import close_matches

__all__ = ["param_names", "step_weights"]


def param_names(call: str, name: str, names: Any, model: FunctionalModel) -> tuple[str, ...]:
    """``names`` (a collection of the model's trainable param names), in the model's order."""
    known = list(model.params)
    if isinstance(names, Iterable) and not isinstance(names, str):
        names = list(names)  # an iterator is read once, here
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{call}: expected {name} to be a list of param names, got {names!r}.")
    for n in names:
        if n not in model.params:
            raise ValueError(
                f"{call}: {name} names {n!r}, which is not a trainable param of the model"
                f"{close_matches(n, known)}. Params: {known}."
            )
    chosen = set(names)
    return tuple(n for n in known if n in chosen)


def step_weights(call: str, weights: Any, steps: int) -> tuple[float, ...] | None:
    """``None``, or ``steps`` finite non-negative floats with at least one positive (else there
    is no meta-loss)."""
    if weights is None:
        return None
    floats = tuple(float(w) for w in weights)
    if (
        len(floats) != steps
        or not all(0 <= w < math.inf for w in floats)  # also rejects nan
        or not any(w > 0 for w in floats)
    ):
        raise ValueError(
            f"{call}: expected step_weights to be {steps} finite non-negative numbers (one per "
            f"inner step), at least one positive; got {list(floats)!r}."
        )
    return floats
