"""Arithmetic on pytrees of tensors: the few tree operations the package needs, each once.

Every function maps over trees by structure (``optree.tree_map``), never by zipping leaves of
separately flattened trees, so dict keys pair up by name. Leaves that are not tensors pass
through :func:`detach` unchanged; the arithmetic functions expect tensor leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch

from ._typing import PyTree

__all__ = [
    "add",
    "axpy",
    "detach",
    "grad_or_zeros",
    "norm",
    "scale",
    "stop_gradient",
    "sub",
    "vdot",
    "zeros_like",
]


def detach(tree: PyTree) -> PyTree:
    """Every tensor of ``tree`` detached (other leaves unchanged): no gradient flows back.

    Example:
        >>> import torch
        >>> w = torch.ones(2, requires_grad=True)
        >>> detach({"w": w, "n": 3})["w"].requires_grad
        False
    """
    return optree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def stop_gradient(tree: PyTree) -> PyTree:
    """Detaches every tensor of a pytree: no meta-gradient flows back through the result.

    :func:`detach` for users: a generator (``model.parameters()``) is refused, since it would come
    back as it is, undetached.

    Example:
        >>> import torch, metafunc
        >>> w = torch.ones(2, requires_grad=True)
        >>> metafunc.stop_gradient({"w": w})["w"].requires_grad
        False
    """
    if hasattr(tree, "__next__"):
        raise TypeError(
            "stop_gradient(tree): expected a pytree (e.g. a dict of tensors), got a "
            f"{type(tree).__name__}. For a module's parameters use "
            "stop_gradient(dict(model.named_parameters())) or fm.params."
        )
    return detach(tree)


def zeros_like(tree: PyTree) -> PyTree:
    """A tree of ``tree``'s structure with zero tensors of each leaf's shape, dtype and device."""
    return optree.tree_map(torch.zeros_like, tree)


def add(a: PyTree, b: PyTree) -> PyTree:
    """``a + b`` leaf by leaf."""
    return optree.tree_map(torch.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """``a - b`` leaf by leaf."""
    return optree.tree_map(torch.sub, a, b)


def scale(alpha: float | torch.Tensor, tree: PyTree) -> PyTree:
    """``alpha * tree`` leaf by leaf (``alpha`` a number or a 0-d tensor)."""
    return optree.tree_map(lambda x: alpha * x, tree)


def axpy(alpha: float | torch.Tensor, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y`` leaf by leaf.

    A number ``alpha`` takes one fused ``torch.add(y, x, alpha=alpha)`` per leaf (on small
    networks the count of operations, not their arithmetic, is the cost); a tensor ``alpha`` (0-d,
    differentiable, batched under ``vmap``) is cast to each leaf's dtype first, so a float64 step
    size does not promote float32 leaves.

    Example:
        >>> import torch
        >>> axpy(2.0, {"w": torch.ones(2)}, {"w": torch.tensor([1.0, 2.0])})["w"]
        tensor([3., 4.])
    """
    if isinstance(alpha, torch.Tensor):

        def leaf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (alpha if alpha.dtype == a.dtype else alpha.to(a.dtype)) * a + b

        return optree.tree_map(leaf, x, y)
    return optree.tree_map(lambda a, b: torch.add(b, a, alpha=alpha), x, y)


def vdot(a: PyTree, b: PyTree) -> torch.Tensor:
    """The inner product ``sum over leaves of (a * b).sum()``, a 0-d tensor.

    Example:
        >>> import torch
        >>> vdot({"u": torch.tensor([1.0, 2.0]), "v": torch.tensor(3.0)},
        ...      {"u": torch.tensor([3.0, 4.0]), "v": torch.tensor(2.0)})
        tensor(17.)
    """
    products = optree.tree_leaves(optree.tree_map(lambda x, y: (x * y).sum(), a, b))
    return torch.stack(products).sum() if len(products) > 1 else products[0]


def norm(tree: PyTree) -> torch.Tensor:
    """The Euclidean norm over all leaves of a pytree of (real or complex) tensors, a 0-d tensor."""
    leaves = optree.tree_leaves(tree)
    total = torch.linalg.vector_norm(leaves[0]) ** 2
    for x in leaves[1:]:
        total = total + torch.linalg.vector_norm(x) ** 2
    return total.sqrt()


def grad_or_zeros(
    fn: Callable[[PyTree], Any],
    tree: PyTree,
    *,
    has_aux: bool = False,
    create_graph: bool = False,
    on_grads: Callable[[Sequence[torch.Tensor | None]], None] | None = None,
) -> tuple[PyTree, Any]:
    """``(grads, value)`` of ``fn`` at ``tree`` by ``torch.autograd.grad``; a leaf that ``fn``
    does not use gets a zero gradient (as under ``torch.func.grad``) instead of ``None``.

    ``value`` is what ``fn`` returned: a scalar tensor, or ``(scalar, aux)`` with ``has_aux``.
    ``fn`` runs with grad mode on, at leaves detached from ``tree``'s graph, so the gradient is
    that of ``fn`` alone; with ``create_graph`` the leaves of ``tree`` that require grad are used
    as they are, and the gradients are differentiable in them (a second order). A ``value`` that
    depends on no leaf gives zeros everywhere. ``on_grads``, when given, sees the raw gradients
    (``None`` for an unused leaf) in the order of ``optree.tree_leaves(tree)``. Outside
    ``torch.func`` transforms only (``torch.autograd.grad`` cannot run under ``vmap``); there it
    spares the functorch level that ``torch.func.grad`` puts around ``fn``.

    Example:
        >>> import torch
        >>> grads, value = grad_or_zeros(lambda p: (p["a"] ** 2).sum(),
        ...                              {"a": torch.tensor([1.0, 2.0]), "unused": torch.ones(1)})
        >>> grads["a"], grads["unused"], value.item()
        (tensor([2., 4.]), tensor([0.]), 5.0)
    """
    leaves, spec = optree.tree_flatten(tree)
    free = [x if create_graph and x.requires_grad else x.detach().requires_grad_() for x in leaves]
    with torch.enable_grad():
        value = fn(optree.tree_unflatten(spec, free))
        loss = value[0] if has_aux else value
        raw: Sequence[torch.Tensor | None] = (
            torch.autograd.grad(loss, free, create_graph=create_graph, allow_unused=True)
            if loss.requires_grad
            else (None,) * len(free)
        )
    if on_grads is not None:
        on_grads(raw)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(free, raw)]
    return optree.tree_unflatten(spec, grads), value
