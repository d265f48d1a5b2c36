"""Hyperparameters: Python numbers, learnable tensors, or pytrees of tensors matching the params.

Validation happens once, in the optimizer's factory (``adam(lr=...)``); per-leaf resolution happens
in ``update`` and is a cheap lookup.
"""

from __future__ import annotations

import numbers
from typing import Any

import optree
import torch

from .._tree import format_path
from .._typing import Hyper, PyTree


def is_tree(value: Hyper) -> bool:
    return not isinstance(value, (numbers.Real, torch.Tensor))


def check(
    call: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
) -> Hyper:
    """Validates a hyperparameter in a factory and returns it unchanged.

    Python numbers are range-checked (``low <= value <= high``, or ``< high`` with ``high_open``);
    tensors must be floating point; pytrees must hold only numbers and floating-point tensors.
    Tensor values are not range-checked: they may be traced, batched or learnable.
    """
    if isinstance(value, bool):
        raise TypeError(
            f"{call}: expected {name} to be a number, a floating-point tensor or a pytree of them, "
            f"got bool {value}. Pass a float, e.g. {name}=0.1."
        )
    if isinstance(value, numbers.Real):
        number = float(value)
        bad = (low is not None and number < low) or (
            high is not None and (number >= high if high_open else number > high)
        )
        if bad:
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            interval = f"[{lo}, {hi}{')' if high_open else ']'}"
            raise ValueError(
                f"{call}: expected {name} in {interval}, got {value}. Pass a value in range."
            )
        return value
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(
                f"{call}: expected {name} to be a floating-point tensor, got dtype {value.dtype}. "
                f"Use torch.tensor({name}_value, dtype=torch.float64) (or the params' dtype)."
            )
        return value
    paths, leaves, _ = optree.tree_flatten_with_path(value)
    if not leaves:
        raise TypeError(
            f"{call}: expected {name} to be a number, a floating-point tensor or a pytree of them "
            f"matching the params, got {type(value).__name__} with no leaves."
        )
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, bool) or not isinstance(leaf, (numbers.Real, torch.Tensor)):
            raise TypeError(
                f"{call}: expected {name} to be a number, a floating-point tensor or a pytree of "
                f"them matching the params, got {type(leaf).__name__} at {name}{format_path(path)}."
            )
        if isinstance(leaf, torch.Tensor) and not leaf.is_floating_point():
            raise TypeError(
                f"{call}: expected floating-point tensors in {name}, got dtype {leaf.dtype} at "
                f"{name}{format_path(path)}."
            )
    return value


def leaves(call: str, name: str, value: Any, tree: PyTree) -> list:
    """The hyperparameter's value for each leaf of ``tree`` (aligned with ``optree.tree_leaves``).

    A number or tensor is shared by every leaf. A pytree is matched to ``tree`` by key path, so a
    hyperparameter tree that matches the full params also serves a masked sub-tree of them.
    """
    if not is_tree(value):
        return [value] * optree.tree_structure(tree).num_leaves
    if optree.tree_structure(value) == optree.tree_structure(tree):
        return optree.tree_leaves(value)
    vpaths, vleaves, _ = optree.tree_flatten_with_path(value)
    lookup = dict(zip(vpaths, vleaves))
    tpaths = optree.tree_paths(tree)
    missing = [format_path(p) for p in tpaths if p not in lookup]
    if missing:
        raise ValueError(
            f"{call}: the pytree given as {name} has no entry for params leaf "
            f"{', '.join(missing[:5])}. A per-parameter {name} needs one value for every "
            f"trainable leaf, e.g. {{k: torch.tensor(0.1) for k in params}}."
        )
    return [lookup[p] for p in tpaths]


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` with derivative 0 instead of inf at ``x == 0`` (no NaN under double backward).

    The derivative of an optimizer step through ``sqrt(v)`` with ``v = g**2`` is then the limit of
    the true derivative as ``g -> 0`` (the ``|g|`` term is multiplied by ``g`` and vanishes).
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)
