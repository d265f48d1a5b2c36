"""The optimizer protocol: pure ``init`` and ``update`` functions, and ways to combine them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, cast

import optree
import torch

from .. import _tree
from .._typing import OptState, Params, PyTree, Updates
from ._hyper import HyperparameterOverflowError


class InitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class UpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure optimizer: ``state = init(params)``; ``u, state = update(grads, state, params)``.

    Neither function mutates its inputs; both are differentiable in every tensor they receive and
    in the tensors they close over (learnable hyperparameters). Apply the updates with
    :func:`metafunc.apply_updates`.
    """

    init: InitFn
    update: UpdateFn


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


class MaskedNode(NamedTuple):
    """Stands in for a leaf excluded by :func:`masked`: an empty node in optree and torch."""


class StateTypeError(TypeError):
    """An ``update`` got a state that its optimizer's ``init`` does not make.

    Raised by :func:`check_state` in the transform that keeps the state. Its fields say what
    happened: ``call`` (the update the user called), ``owner`` (the transform or named optimizer
    that keeps the state), ``expected`` and ``seen`` (the names of the state types), ``path`` (where
    the state sits in the state the user passed: ints index a :func:`chain`'s tuple, strings name
    a field, e.g. ``(1, "inner_state", 0)``) and ``named`` (whether ``owner`` is a named optimizer
    such as ``adam``). :func:`chain` and :func:`masked` re-raise it through :meth:`within`, which
    prepends their position to the path, so that the message names the call the user made.
    """

    def __init__(
        self,
        call: str,
        owner: str,
        expected: str,
        seen: str,
        path: tuple[int | str, ...] = (),
        named: bool = False,
    ) -> None:
        self.call, self.owner, self.expected, self.seen = call, owner, expected, seen
        self.path, self.named = path, named
        where = "".join(f".{k}" if isinstance(k, str) else f"[{k}]" for k in path)
        at = f" at state{where}, where {owner} keeps" if path else f"; {owner} keeps"
        super().__init__(
            f"{call}: expected the state from this optimizer's init, got a {seen}{at} a "
            f"{expected}. Pass the state from this optimizer's init (state = opt.init(params), "
            f"then the state each update returns); the state of another optimizer does not fit."
        )

    def __reduce__(self) -> tuple[Any, ...]:  # pickled by its fields, not by its message
        return type(self), (self.call, self.owner, self.expected, self.seen, self.path, self.named)

    def within(self, call: str, key: int | str, name: str | None = None) -> StateTypeError:
        """The same mismatch as seen by an enclosing transform whose ``update`` is ``call`` and
        whose state holds this one at ``key``; ``name``: the enclosing named optimizer, which
        becomes the owner unless the owner is already one."""
        owner, named = self.owner, self.named
        if name is not None and not named:
            owner, named = name, True
        return StateTypeError(call, owner, self.expected, self.seen, (key, *self.path), named)


def check_state(call: str, owner: str, state: object, expected: type) -> None:
    """Raises a ``TypeError`` unless ``state`` is the ``expected`` state type (an ``isinstance``
    check: free under ``vmap`` and ``torch.compile``)."""
    if not isinstance(state, expected):
        raise StateTypeError(call, owner, expected.__name__, type(state).__name__)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies transforms one after the other; the state is the tuple of their states.

    Example:
        >>> import torch, metafunc
        >>> opt = metafunc.optim.chain(
        ...     metafunc.optim.clip_by_global_norm(1.0), metafunc.optim.sgd(lr=0.1))
        >>> params = {"w": torch.ones(2)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.tensor([3.0, 4.0])}, state, params)
        >>> updates["w"]
        tensor([-0.0600, -0.0800])
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"chain(*transforms): expected GradientTransformation objects, got "
                f"{type(t).__name__} at position {i}. Call the factory, e.g. sgd(lr=0.1), not sgd."
            )
    return _chain(None, transforms)


def _chain(
    name: str | None, transforms: tuple[GradientTransformation, ...]
) -> GradientTransformation:
    """:func:`chain`, named in errors after the optimizer it builds (``name``, e.g. ``adam``)."""
    call = f"{name or 'chain'}(...).update"

    def init(params: Params) -> OptState:
        try:
            return tuple(t.init(params) for t in transforms)
        except HyperparameterOverflowError as e:
            if name is None:
                raise
            raise e.seen_from(f"{name}(...).init") from None

    def run(updates, state, params, last, *base):
        """Each transform's update in turn; the last one's is ``last`` (given ``*base``)."""
        plain = isinstance(state, tuple) and not hasattr(type(state), "_fields")  # no NamedTuple
        if not plain or len(state) != len(transforms):
            raise ValueError(
                f"{call}: expected the state returned by this optimizer's init (a tuple of "
                f"{len(transforms)} states), got {type(state).__name__}"
                f"{f' of {len(state)} states' if plain else ''}. Did you pass the state of "
                f"another optimizer? Pass the state from this optimizer's init."
            )
        new_state = []
        for i, (t, s) in enumerate(zip(transforms, state)):
            try:
                if i < len(transforms) - 1:
                    updates, s = t.update(updates, s, params)
                else:
                    updates, s = last(updates, s, params, *base)
            except StateTypeError as e:
                raise e.within(call, i, name) from None
            except HyperparameterOverflowError as e:
                if name is None:
                    raise
                raise e.seen_from(call) from None
            new_state.append(s)
        return updates, tuple(new_state)

    def update(updates, state, params=None):
        return run(updates, state, params, transforms[-1].update if transforms else None)

    last_fused = getattr(transforms[-1].update, "update_and_apply", None) if transforms else None
    if last_fused is not None:

        def update_and_apply(updates, state, params, base=None):
            return run(updates, state, params, last_fused, base)

        update.update_and_apply = update_and_apply  # type: ignore[attr-defined]
    return GradientTransformation(init, update)


def identity() -> GradientTransformation:
    """Leaves updates unchanged."""

    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        return updates, state

    return GradientTransformation(init, update)


def set_to_zero() -> GradientTransformation:
    """Replaces every update with zeros: combined with :func:`masked`, freezes leaves."""

    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        return optree.tree_map(torch.zeros_like, updates), state

    return GradientTransformation(init, update)


class MaskedState(NamedTuple):
    inner_state: OptState


def _apply_mask(mask: PyTree, tree: PyTree) -> PyTree:
    return optree.tree_map(lambda m, x: x if m else MaskedNode(), mask, tree)


def masked(
    inner: GradientTransformation, mask: PyTree | Callable[[PyTree], PyTree]
) -> GradientTransformation:
    """Applies ``inner`` to the leaves where ``mask`` is True; the others pass through unchanged.

    ``mask`` is a pytree of Python bools with the params' structure (or a prefix of it), or a
    function from the params to one. ``inner`` only sees, and only keeps state for, the selected
    leaves, so integer leaves or frozen leaves may be left out this way.

    Example (freeze everything but the head, as ANIL does in its inner loop):
        >>> import torch, metafunc
        >>> params = {"body.w": torch.ones(2), "head.w": torch.ones(2)}
        >>> body = {k: k.startswith("body") for k in params}
        >>> head = {k: not v for k, v in body.items()}
        >>> opt = metafunc.optim.chain(
        ...     metafunc.optim.masked(metafunc.optim.set_to_zero(), body),
        ...     metafunc.optim.masked(metafunc.optim.adam(lr=0.1), head))
        >>> updates, _ = opt.update({k: torch.ones(2) for k in params}, opt.init(params), params)
        >>> updates["body.w"], updates["head.w"]
        (tensor([0., 0.]), tensor([-0.1000, -0.1000]))
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(
            f"masked(inner, mask): expected inner to be a GradientTransformation, got "
            f"{type(inner).__name__}. Call the factory, e.g. masked(adam(lr=1e-3), mask)."
        )

    def resolve(tree):
        m = mask(tree) if callable(mask) else mask
        bad = [x for x in optree.tree_leaves(m) if not isinstance(x, bool)]
        if bad:
            raise TypeError(
                f"masked(inner, mask): expected mask leaves to be Python bools, got "
                f"{type(bad[0]).__name__}. Build it like {{name: name.startswith('head') for name "
                f"in params}}."
            )
        return m

    def init(params):
        m = resolve(params)
        try:
            masked_params = _apply_mask(m, params)
        except ValueError as e:
            raise ValueError(
                f"masked(inner, mask).init: the mask does not match the params' structure: {e}"
            ) from None
        return MaskedState(inner.init(masked_params))

    def update(updates, state, params=None):
        call = "masked(inner, mask).update"
        check_state(call, "masked", state, MaskedState)
        m = resolve(updates)
        masked_updates = _apply_mask(m, updates)
        masked_params = None if params is None else _apply_mask(m, params)
        try:
            new_updates, inner_state = inner.update(
                masked_updates, state.inner_state, masked_params
            )
        except StateTypeError as e:
            raise e.within(call, "inner_state") from None
        merged = optree.tree_map(
            lambda keep, new, old: new if keep else old, m, new_updates, updates
        )
        return merged, MaskedState(inner_state)

    return GradientTransformation(init, update)


def update_and_apply(
    opt: GradientTransformation,
    grads: Updates,
    state: OptState,
    params: Params,
    base: Params | None = None,
) -> tuple[Params, OptState]:
    """``updates, state = opt.update(grads, state, params)``, then ``apply_updates(base,
    updates)`` (``base`` defaults to ``params``; the first-order step passes detached params
    to the update and adds to the attached ones): the new params and state.

    Where ``opt`` ends in a transform that can add its update to the params in one op
    (:func:`~metafunc.optim.scale_by_learning_rate`, the last transform of every named optimizer:
    ``p - lr * u`` as ``torch.add(p, u, alpha=-lr)``, as ``torch.optim.SGD`` steps) that op is
    used, which halves the ops of the step and of its backward; the result may differ from the
    two ops in the last bit (one rounding instead of two). Any other ``opt`` runs the two calls.
    :func:`metafunc.inner_loop` steps through this.
    """
    fused = getattr(opt.update, "update_and_apply", None)
    if fused is not None:
        return fused(grads, state, params, base)
    updates, state = opt.update(grads, state, params)
    return apply_updates(params if base is None else base, updates), state


def apply_updates(params: Params, updates: Updates) -> Params:
    """Returns ``params + updates`` leaf by leaf, as new tensors (the inputs are not modified).

    Each result keeps its param's dtype. Non-floating-point leaves (integer or boolean tensors,
    e.g. ``num_batches_tracked``) are returned unchanged.

    Example:
        >>> import torch, metafunc
        >>> metafunc.apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})
        {'w': tensor([1.5000, 0.0000])}
    """
    leaves, update_leaves, spec = _tree.flatten_same(
        "apply_updates(params, updates)", "params", params, "updates", updates
    )
    return cast(Params, spec.unflatten([add_leaf(p, u) for p, u in zip(leaves, update_leaves)]))


def add_leaf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One leaf of :func:`apply_updates`: ``p + u`` in ``p``'s dtype; a non-floating-point ``p``
    (``num_batches_tracked``) unchanged."""
    if not p.is_floating_point():
        return p
    out = p + u
    return out if out.dtype == p.dtype else out.to(p.dtype)
