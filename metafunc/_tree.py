"""Pytree helpers: key-path formatting and structure checks with readable errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import optree
import torch

from ._typing import PyTree


def format_path(path: Sequence[object]) -> str:
    """Formats an optree key path as Python indexing, e.g. ``['fc.weight']`` or ``[0]['w']``."""
    if not path:
        return "<root>"
    return "".join(f"[{key!r}]" for key in path)


def close_matches(key: str, candidates: Iterable[str]) -> str:
    """A ``" (did you mean 'x'?)"`` suffix for misspelled keys, or an empty string."""
    found = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {found[0]!r}?)" if found else ""


def _paths(tree: PyTree) -> dict[str, object]:
    paths, leaves, _ = optree.tree_flatten_with_path(tree)
    return {format_path(path): leaf for path, leaf in zip(paths, leaves)}


def describe_mismatch(name_a: str, a: PyTree, name_b: str, b: PyTree) -> str:
    """Explains, by key path, how two pytrees differ (missing/extra leaves, shapes, structure)."""
    pa, pb = _paths(a), _paths(b)
    only_a = [k for k in pa if k not in pb]
    only_b = [k for k in pb if k not in pa]
    lines = []
    if only_a:
        lines.append(f"leaves in {name_a} but not in {name_b}: {', '.join(only_a[:8])}")
    if only_b:
        lines.append(f"leaves in {name_b} but not in {name_a}: {', '.join(only_b[:8])}")
    for key in pa:
        if key in pb:
            la, lb = pa[key], pb[key]
            sa = tuple(la.shape) if isinstance(la, torch.Tensor) else type(la).__name__
            sb = tuple(lb.shape) if isinstance(lb, torch.Tensor) else type(lb).__name__
            if sa != sb:
                lines.append(f"at {key}: {name_a} has shape {sa}, {name_b} has shape {sb}")
    if not lines:
        lines.append(
            f"same leaves but different containers: {optree.tree_structure(a)} vs "
            f"{optree.tree_structure(b)}"
        )
    return "; ".join(lines)


def check_same(call: str, name_a: str, a: PyTree, name_b: str, b: PyTree) -> None:
    """Raises ``ValueError`` unless ``a`` and ``b`` have the same structure and leaf shapes."""
    flatten_same(call, name_a, a, name_b, b)


def flatten_same(
    call: str, name_a: str, a: PyTree, name_b: str, b: PyTree
) -> tuple[list, list, optree.PyTreeSpec]:
    """:func:`check_same`, returning what it flattened: ``(leaves of a, leaves of b, spec)``.

    One flatten per tree: on the hot path of every inner step (``apply_updates``), where a
    second traversal of each tree was measurable."""
    leaves_a, spec = optree.tree_flatten(a)
    leaves_b, spec_b = optree.tree_flatten(b)
    if spec != spec_b or not same_shapes(leaves_a, leaves_b):
        raise ValueError(
            f"{call}: expected {name_b} to have the same structure and shapes as {name_a}, "
            f"but {describe_mismatch(name_a, a, name_b, b)}. Pass trees built from the same "
            f"params (e.g. grads from torch.func.grad(loss)(params), state from opt.init(params))."
        )
    return leaves_a, leaves_b, spec


def same_shapes(leaves_a: Sequence[object], leaves_b: Sequence[object]) -> bool:
    """Whether every pair of tensors at the same position has one shape (other leaves pass)."""
    for la, lb in zip(leaves_a, leaves_b):
        if isinstance(la, torch.Tensor) and isinstance(lb, torch.Tensor) and la.shape != lb.shape:
            return False
    return True


def check_floating(call: str, tree: PyTree, what: str = "params") -> None:
    """Raises ``TypeError``/``ValueError`` unless every leaf is a floating-point tensor."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree)
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{call}: expected every leaf of {what} to be a torch.Tensor, got "
                f"{type(leaf).__name__} at {format_path(path)}. Convert it with torch.as_tensor, "
                f"or keep it out of the tree."
            )
        if not leaf.is_floating_point():
            raise ValueError(
                f"{call}: expected floating-point leaves in {what}, got {leaf.dtype} at "
                f"{format_path(path)}. Optimizers only update floating-point tensors: pass the "
                f"trainable params only (FunctionalModel.params, not buffers), or exclude this "
                f"leaf with metafunc.optim.masked(...)."
            )
