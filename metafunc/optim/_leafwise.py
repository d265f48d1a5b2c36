"""The one driver behind every per-leaf transform: a kernel for one leaf, and all that is around it.

A transform's rule is a *kernel* for one params leaf, e.g. Adam's
``(g, m, v, *, b1, b2, eps, t) -> (direction, m, v)``: the leaf's incoming update and its state
tensors in, positionally; hyperparameters and step-dependent numbers as keywords; the outgoing
update and the new state tensors out. :func:`leafwise` makes a :class:`GradientTransformation` of
a kernel, and does once, for every transform, what each ``init`` and ``update`` needs around it:

- the checks: the state's type (an ``isinstance``), and the structure of the updates, which every
  state field and the params must share (their leaves are taken in the updates' tree structure,
  never by position in trees not known to match) with a key-path error naming what differs;
- the per-leaf hyperparameters (:func:`._hyper.values`: numbers, shared tensors, per-parameter
  pytrees matched by key path; a number too large for a leaf's dtype raises
  :class:`._hyper.HyperparameterOverflowError`);
- the dtype handling (:func:`._precision.run`): transforms with per-leaf state compute
  half-precision leaves in float32 and keep their state in ``accumulator_dtype``;
- the step count, from which a ``schedule`` computes the step-dependent keywords once per update.

Square roots of second-moment estimates use :func:`safe_sqrt`, so that an exactly-zero gradient
entry gives a finite meta-gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import optree
import torch

from .. import _tree
from .._typing import Hyper, PyTree
from . import _hyper, _precision
from ._base import EmptyState, GradientTransformation, add_leaf, check_state

Kernel = Callable[..., tuple[Any, ...]]
Apply = Callable[..., Any]
Schedule = Callable[[torch.Tensor], dict[str, Any]]


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` with derivative 0 instead of inf at ``x == 0`` (no NaN under double backward).

    The derivative of an optimizer step through ``sqrt(v)`` with ``v = g**2`` is then the limit of
    the true derivative as ``g -> 0`` (the ``|g|`` term is multiplied by ``g`` and vanishes).
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def step_number(step: torch.Tensor) -> dict[str, torch.Tensor]:
    """The usual schedule: ``t``, the number of the step being taken (1 for the first), as a
    float64 tensor."""
    return {"t": (step + 1).to(torch.float64)}


def leafwise(
    call: str,
    kernel: Kernel,
    state_type: type[tuple] | None = None,
    *,
    fields: Sequence[str] = (),
    hypers: Mapping[str, tuple[str, Hyper]] | None = None,
    schedule: Schedule | None = None,
    fill: Mapping[str, tuple[str, Hyper]] | None = None,
    products: Sequence[str] = (),
    params: Literal["ignore", "check", "use"] = "ignore",
    accumulator_dtype: torch.dtype | None = None,
    apply: Apply | None = None,
) -> GradientTransformation:
    """The transform that runs ``kernel`` on every leaf of the updates.

    Args:
        call: the factory's name, for errors (``scale_by_adam`` gives ``scale_by_adam.update``).
        kernel: ``kernel(g, *state, **keywords) -> (update, *new_state)`` for one leaf, with one
            state tensor per entry of ``fields``, in that order.
        state_type: the state's ``NamedTuple``, or ``None`` for a stateless transform (its state
            is :class:`EmptyState`). Its fields are ``fields``, ``step`` (with a ``schedule``) and
            fields a variant does not keep, which hold ``()``.
        fields: the per-leaf state fields that the kernel reads and returns, in its order.
        hypers: ``{keyword: (name, value)}``: a hyperparameter, validated by the factory, passed
            to the kernel as ``keyword`` with its value for the leaf; ``name`` is the argument's
            name in errors (``betas[0]``).
        schedule: with a step count in the state: ``schedule(state.step)`` gives keywords shared
            by every leaf (``t``), computed once per update.
        fill: ``{field: (name, value)}``: a field that starts at a hyperparameter's value for each
            leaf instead of 0 (Adagrad's ``initial_accumulator_value``).
        products: fields that are float64 numbers per leaf starting at 1 (NAdam's running product
            of momentum coefficients), outside the dtype handling.
        params: ``"use"``: the kernel takes the leaf's param as the keyword ``p`` (params are
            required); ``"check"``: params, when given, must match the updates; ``"ignore"``.
        accumulator_dtype: the state's dtype (see :mod:`._precision`); ``None``: float32 for
            half-precision leaves, the leaf's dtype otherwise.
        apply: for a stateless transform, ``apply(p, u, **keywords)``: the param ``p`` plus this
            transform's update of ``u`` in fewer ops than ``kernel`` then ``p + update`` (one
            fused op), or ``None`` where it does not apply to the leaf (the two ops run then).
            It makes the transform's ``update`` carry an ``update_and_apply`` (see
            :func:`._base.update_and_apply`), which the inner loop uses.
    """
    _precision.check_accumulator_dtype(call, accumulator_dtype)
    mode = params  # the argument's name is taken by update's params below
    hyper_items = list((hypers or {}).items())
    fill = dict(fill or {})
    exact = tuple(f in products for f in fields)
    init_call, update_call = f"{call}.init", f"{call}.update"
    names: list[str] = list(getattr(state_type, "_fields", ()))
    where = [names.index(f) for f in fields]  # each kernel field's position in the state
    step_at = names.index("step") if schedule is not None else None

    def assemble(trees: list[Any], step: torch.Tensor | None) -> Any:
        """The state: the kernel fields' trees, the step count, and () for the fields a variant
        does not keep."""
        assert state_type is not None
        values: list[Any] = [()] * len(names)
        for i, tree in zip(where, trees):
            values[i] = tree
        if step_at is not None:
            values[step_at] = step
        return state_type(*values)

    def init(params: PyTree) -> Any:
        if fields:
            _tree.check_floating(init_call, params)
        for _, (name, value) in hyper_items:
            _hyper.match(init_call, name, value, params)
        if state_type is None:
            return EmptyState()
        leaves, spec = optree.tree_flatten(params)
        trees = []
        for f in fields:
            if f in products:
                ones = [torch.ones((), dtype=torch.float64, device=p.device) for p in leaves]
                trees.append(spec.unflatten(ones))
                continue
            start = None
            if f in fill:
                start = _hyper.values(init_call, *fill[f], leaves, spec)
            trees.append(spec.unflatten(_precision.zeros(leaves, accumulator_dtype, start)))
        device = leaves[0].device if leaves else None
        return assemble(trees, torch.zeros((), dtype=torch.int64, device=device))

    def update(updates, state, params=None):
        if state_type is not None:
            check_state(update_call, call, state, state_type)
        leaves, spec = optree.tree_flatten(updates)
        if mode == "use" and params is None:
            raise ValueError(
                f"{update_call}: this transform needs the current params, got params=None. Call "
                f"opt.update(grads, state, params)."
            )
        if mode != "ignore" and params is not None:
            param_leaves = _leaves_like(update_call, updates, leaves, spec, "params", params, True)
        # every state field has the updates' structure, so its leaves line up with theirs
        columns = [
            _leaves_like(update_call, updates, leaves, spec, f"state.{f}", state[i], j == 0)
            for j, (f, i) in enumerate(zip(fields, where))
        ]
        kws = _keywords(update_call, hyper_items, leaves, spec)
        if mode == "use":
            for kw, p in zip(kws, param_leaves):
                kw["p"] = p
        if schedule is not None:
            shared = schedule(state[step_at])
            for kw in kws:
                kw.update(shared)
        if not fields:  # no state to keep: the kernel runs in the update's dtype
            out = [_precision.cast(kernel(g, **kw)[0], g.dtype) for g, kw in zip(leaves, kws)]
            return spec.unflatten(out), state
        out = []
        new: list[list[Any]] = [[] for _ in fields]
        for g, kw, *leaf_state in zip(leaves, kws, *columns):
            u, *s = _precision.run(kernel, g, tuple(leaf_state), kw, accumulator_dtype, exact)
            out.append(u)
            for column, x in zip(new, s):
                column.append(x)
        step = None if step_at is None else state[step_at] + 1
        return spec.unflatten(out), assemble([spec.unflatten(c) for c in new], step)

    if apply is not None:
        if state_type is not None or schedule is not None or mode == "use":
            raise ValueError(f"leafwise({call!r}): apply= is for stateless transforms only.")

        def update_and_apply(updates, state, params, base=None):
            """``apply_updates(base, update(updates, state, params)[0])`` and the state, with
            the same checks, in one pass over the leaves; ``base`` (default ``params``): the
            tensors to add the update to, of the params' structure (the first-order step adds
            to the params what the detached params give)."""
            leaves, spec = optree.tree_flatten(updates)
            param_leaves = _leaves_like(update_call, updates, leaves, spec, "params", params, True)
            if base is not None:
                param_leaves = _leaves_like(update_call, updates, leaves, spec, "base", base, True)
            kws = _keywords(update_call, hyper_items, leaves, spec)
            out = [
                _apply_leaf(kernel, apply, p, g, kw) for p, g, kw in zip(param_leaves, leaves, kws)
            ]
            return spec.unflatten(out), state

        update.update_and_apply = update_and_apply  # type: ignore[attr-defined]
    return GradientTransformation(init, update)


def _apply_leaf(kernel: Kernel, apply: Apply, p: Any, g: Any, kw: dict[str, Any]) -> Any:
    """One leaf of :func:`metafunc.apply_updates` after a stateless kernel: ``apply``'s fused op
    where it applies, else the kernel (in the update's dtype) and ``p + update`` in ``p``'s
    dtype; non-floating-point params are returned unchanged, as ``apply_updates`` does."""
    if not p.is_floating_point():
        return p
    fused = apply(p, g, **kw)
    if fused is not None:
        return fused
    return add_leaf(p, _precision.cast(kernel(g, **kw)[0], g.dtype))


def _keywords(
    call: str, hyper_items: list[tuple[str, tuple[str, Hyper]]], leaves: list[Any], spec: Any
) -> list[dict[str, Any]]:
    """Each leaf's keywords for the kernel: ``{keyword: the hyperparameter's value for the leaf}``
    (see :func:`._hyper.values`), one new dict per leaf."""
    values = [_hyper.values(call, name, value, leaves, spec) for _, (name, value) in hyper_items]
    keys = [k for k, _ in hyper_items]
    if len(keys) == 1:
        key = keys[0]
        return [{key: v} for v in values[0]]
    return [dict(zip(keys, vals)) for vals in zip(*values)] if keys else [{} for _ in leaves]


def _leaves_like(
    call: str,
    updates: PyTree,
    leaves: list[Any],
    spec: optree.PyTreeSpec,
    name: str,
    tree: PyTree,
    shapes: bool,
) -> list[Any]:
    """The leaves of ``tree``, in the order of the updates' ``leaves``: ``tree`` must have their
    structure ``spec`` (and, with ``shapes``, their leaves' shapes), else the key-path error of
    :func:`metafunc._tree.check_same`."""
    tleaves, tspec = optree.tree_flatten(tree)
    if tspec != spec or (shapes and not _tree.same_shapes(leaves, tleaves)):
        _tree.check_same(call, "updates", updates, name, tree)
    return tleaves
