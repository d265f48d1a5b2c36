"""What the three checks share: float64 copies of pytrees, leaf names, numbers in messages."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import optree
import torch

__all__ = ["default_dtype", "float_copy", "fmt", "is_float", "leaves_with_names", "same_values"]


def is_float(x: Any) -> bool:
    """Whether ``x`` is a floating-point tensor (the leaves the checks differentiate)."""
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def float_copy(tree: Any, dtype: torch.dtype | None = torch.float64) -> Any:
    """``tree`` with every tensor replaced by a detached copy, floating ones cast to ``dtype``.

    Copies, so nothing the checks do reaches the caller's tensors (values or version counters);
    ``detach`` and ``clone`` only read their input.
    """

    def copy(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        x = x.detach().clone()
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x

    return optree.tree_map(copy, tree)


def leaves_with_names(tree: Any, root: str) -> tuple[list[str], list[Any], Any]:
    """``(names, leaves, treespec)``, each name the Python code that reaches the leaf from
    ``root`` (``args[0]['w']``, ``args[1].mu['b']``), as optree's accessors write it."""
    accessors, leaves, spec = optree.tree_flatten_with_accessor(tree)
    return [a.codify(root) for a in accessors], leaves, spec


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of shape, dtype and values, NaN equal to NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.equal(a, b) or ((a == b) | (a.isnan() & b.isnan())).all())
    return bool(torch.equal(a, b))


def fmt(x: float) -> str:
    """A number for a message: 7 significant digits."""
    return f"{x:.7g}"


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Sets torch's default dtype for the block (tensors ``fn`` creates itself, such as
    ``torch.tensor(0.5)`` or a freshly built model, then match the float64 inputs)."""
    if dtype is None:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
