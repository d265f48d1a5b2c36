"""Tasks along a leading dimension: stacking and unstacking them, and running a per-task
function over them in a Python loop (``vmap_tasks(strategy="loop")``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optree
import torch

from ._typing import PyTree

__all__ = ["run_loop", "stack_tasks", "unstack_tasks"]


def stack_tasks(tasks: Sequence[PyTree]) -> PyTree:
    """Stacks a list of per-task pytrees (same structure) along a new leading task dimension.

    Example:
        >>> import torch, metafunc
        >>> batch = metafunc.stack_tasks([{"x": torch.zeros(2)}, {"x": torch.ones(2)}])
        >>> batch["x"].shape
        torch.Size([2, 2])
    """
    if not isinstance(tasks, Sequence) or isinstance(tasks, (str, bytes)) or len(tasks) == 0:
        empty = " (empty)" if isinstance(tasks, Sequence) and len(tasks) == 0 else ""
        raise TypeError(
            f"stack_tasks(tasks): expected a non-empty list of per-task pytrees, got "
            f"{type(tasks).__name__}{empty}."
        )
    first = optree.tree_structure(tasks[0])
    for i, t in enumerate(tasks):
        if optree.tree_structure(t) != first:
            raise ValueError(
                f"stack_tasks(tasks): task {i} has structure {optree.tree_structure(t)}, task 0 "
                f"has {first}. Every task must have the same keys and nesting."
            )
    columns = zip(*(optree.tree_leaves(t) for t in tasks))
    paths = optree.tree_paths(tasks[0])
    for path, column in zip(paths, columns):
        if not all(isinstance(x, torch.Tensor) for x in column):
            kind = next(type(x).__name__ for x in column if not isinstance(x, torch.Tensor))
            raise TypeError(
                f"stack_tasks(tasks): the leaf at {list(path)} is a {kind} in some task; every "
                "leaf must be a tensor."
            )
        shapes = {tuple(x.shape) for x in column}
        if len(shapes) > 1:
            raise ValueError(
                f"stack_tasks(tasks): the leaf at {list(path)} has different shapes across tasks "
                f"{sorted(shapes)}; tasks are stacked along a new dim 0, so each leaf needs one "
                "shape (same shots and queries in every task)."
            )
    return optree.tree_map(lambda *xs: torch.stack(xs), *tasks)


def unstack_tasks(batch: PyTree) -> list[PyTree]:
    """The inverse of :func:`stack_tasks`: a list with one pytree per task."""
    leaves, spec = optree.tree_flatten(batch)
    if not leaves:
        return []
    if not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in leaves):
        raise TypeError(
            "unstack_tasks(batch): expected a pytree of tensors with a task dimension (dim 0), "
            "got a leaf that is not a tensor of at least one dimension."
        )
    sizes = sorted({x.shape[0] for x in leaves})
    if len(sizes) > 1:
        raise ValueError(
            f"unstack_tasks(batch): the leaves disagree on the number of tasks (dim 0): {sizes}."
        )
    return [optree.tree_unflatten(spec, [x[i] for x in leaves]) for i in range(sizes[0])]


def _task_size(call: str, flat_args, flat_dims) -> int:
    sizes = {
        (a.shape[d] if d >= 0 else a.shape[a.dim() + d])
        for a, d in zip(flat_args, flat_dims)
        if d is not None and isinstance(a, torch.Tensor)
    }
    if len(sizes) != 1:
        raise ValueError(
            f"{call}: expected the batched inputs (in_dims not None) to share one task-dimension "
            f"size, got {sorted(sizes) if sizes else 'no batched tensor input'}. Arguments "
            "shared by all tasks, such as the meta-parameters, take in_dims None, e.g. "
            "in_dims=(None, 0, 0)."
        )
    return sizes.pop()


def _loop_dims(call: str, in_dims: Any, args: tuple) -> list[Any]:
    """``in_dims`` per leaf of ``args``, checked as torch.func.vmap checks them (the loop
    strategy would otherwise fail on a bad ``in_dims`` with an IndexError deep inside)."""
    if not (
        in_dims is None
        or (isinstance(in_dims, int) and not isinstance(in_dims, bool))
        or (isinstance(in_dims, (tuple, list)) and len(in_dims) == len(args))
    ):
        seen = (
            f"a {type(in_dims).__name__} of {len(in_dims)}"
            if isinstance(in_dims, (tuple, list))
            else repr(in_dims)
        )
        raise ValueError(
            f"{call}: expected in_dims to be an int, None, or a tuple with one entry per "
            f"positional argument ({len(args)}), got {seen}."
        )
    try:
        flat_dims = _broadcast_leaves(
            tuple(in_dims) if isinstance(in_dims, list) else in_dims, args
        )
    except (ValueError, TypeError):
        raise ValueError(
            f"{call}: in_dims {in_dims!r} does not match the structure of the arguments: an "
            "entry for a pytree argument is an int, None, or the same pytree of them."
        ) from None
    flat_args: list[Any] = optree.tree_leaves(args, none_is_leaf=True)  # type: ignore[arg-type]
    for a, d in zip(flat_args, flat_dims):
        if d is None:
            continue
        if not isinstance(d, int) or isinstance(d, bool):
            raise ValueError(
                f"{call}: expected every in_dims entry to be an int or None, got {d!r}."
            )
        if isinstance(a, torch.Tensor) and not -a.dim() <= d < a.dim():
            raise ValueError(
                f"{call}: in_dims entry {d} is out of range for an input of shape {tuple(a.shape)}."
            )
    return flat_dims


def _rng_states() -> list[torch.Tensor]:
    states = [torch.random.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += torch.cuda.get_rng_state_all()
    return states


def _broadcast_leaves(prefix: PyTree, tree: PyTree) -> list[Any]:
    """``tree_leaves(tree_broadcast_prefix(prefix, tree))`` (None a leaf): the prefix's value for
    each leaf of ``tree``. Not tree_broadcast_prefix itself, which torch.compile (2.13, optree
    0.20) fails on: it unflattens a dict of constants (``ValueError: length mismatch``)."""
    per_leaf = optree.tree_map(
        lambda d, sub: [d] * optree.tree_structure(sub, none_is_leaf=True).num_leaves,
        prefix,
        tree,
        none_is_leaf=True,
    )
    return [
        d for ds in optree.tree_leaves(per_leaf, is_leaf=lambda x: isinstance(x, list)) for d in ds
    ]


def run_loop(func, in_dims, out_dims, randomness, args, kwargs):
    call = "vmap_tasks(func, strategy='loop')"
    flat_dims = _loop_dims(call, in_dims, args)
    flat_args, spec = optree.tree_flatten(args, none_is_leaf=True)
    n = _task_size(call, flat_args, flat_dims)
    rng = torch.random.get_rng_state() if randomness == "same" else None
    cuda_rng = (
        torch.cuda.get_rng_state_all()
        if randomness == "same" and torch.cuda.is_available()
        else None
    )
    before = _rng_states() if randomness == "error" else None
    outs = []
    for i in range(n):
        if rng is not None:
            torch.random.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        task_args = [
            a.select(d, i) if d is not None and isinstance(a, torch.Tensor) else a
            for a, d in zip(flat_args, flat_dims)
        ]
        outs.append(func(*optree.tree_unflatten(spec, task_args), **kwargs))
        if before is not None:
            after = _rng_states()
            # zip: if func initialised CUDA, its fresh generators are not compared
            if any(not torch.equal(a, b) for a, b in zip(after, before)):
                raise RuntimeError(
                    f"{call}: func drew random numbers (dropout, torch.rand, ...) while "
                    "randomness='error', the default, as in torch.func.vmap. Pass "
                    "randomness='different' (each task its own draws) or 'same' (every task the "
                    "same draws), or move the random op out of func."
                )
    out_spec = optree.tree_structure(outs[0], none_is_leaf=True)
    flat_out_dims = _broadcast_leaves(out_dims, outs[0])
    columns = zip(*[optree.tree_leaves(o, none_is_leaf=True) for o in outs])
    stacked = []
    for column, d in zip(columns, flat_out_dims):
        if not all(isinstance(x, torch.Tensor) for x in column):
            raise ValueError(
                f"{call}: expected func to return tensors (or pytrees of them), got "
                f"{type(column[0]).__name__}."
            )
        stacked.append(column[0] if d is None else torch.stack(column, dim=d))
    return optree.tree_unflatten(out_spec, stacked)
