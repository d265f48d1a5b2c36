"""``assert_pure``: a call writes into none of its inputs, and a repeat call gives the same result.

A write is seen the way :mod:`metafunc._purity` sees it inside :class:`FunctionalModel`: every
in-place op bumps a tensor's version counter (read through functorch wrappers by
:func:`metafunc._purity.versions`). Values are compared too, because a write through ``.data``
changes values without a version bump.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import _checks, _purity
from ._common import leaves_with_names, same_values

__all__ = ["assert_pure"]

_FIX = (
    "A pure function returns new tensors: write `m = b1 * m + (1 - b1) * g`, not "
    "`m.mul_(b1).add_(g)`; clone first where a scratch copy is needed."
)


def _watched(fn: Any, args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """Every tensor reachable from the inputs, named; the parameters and buffers of modules
    among them (and of ``fn`` itself or its bound ``self``)."""
    found: list[tuple[str, Any]] = []
    for tree, root in ((args, "args"), (kwargs, "kwargs")):
        names, leaves, _ = leaves_with_names(tree, root)
        found += zip(names, leaves)
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        found.append(("fn" if owner is fn else "fn.__self__", owner))
    out: list[tuple[str, torch.Tensor]] = []
    for name, leaf in found:
        if isinstance(leaf, torch.Tensor):
            out.append((name, leaf))
        elif isinstance(leaf, nn.Module):
            for key, t in [*leaf.named_parameters(), *leaf.named_buffers()]:
                out.append((f"{name}.{key}", t))
    return out


def assert_pure(
    fn: Callable[..., Any], *args: Any, check_repeat: bool = True, **kwargs: Any
) -> Any:
    """Asserts that ``fn(*args, **kwargs)`` is pure, and returns its result.

    Checks that no tensor in ``args``/``kwargs`` (at any depth of their pytrees: optimizer
    states, params dicts, NamedTuples) changed its values or its version counter, that no
    parameter or buffer of a module among the inputs (or of ``fn`` itself, or of a bound
    method's ``self``) changed, and, with ``check_repeat``, that calling ``fn`` again on the same
    inputs and the same torch RNG state gives exactly the same result.

    Args:
        fn: the function to call, e.g. ``opt.update``.
        *args, **kwargs: its arguments. (To pass ``fn`` a keyword named ``check_repeat``, bind
            it with ``functools.partial``.)
        check_repeat: also call ``fn`` a second time and compare; turn off for a function that
            is meant to differ between calls.

    Returns:
        The result of the first call.

    Raises:
        AssertionError: names the input written (``args[1].mu['w']``), the version counter
            before and after, and the fix; or the output leaf that differs between two calls.

    Example:
        >>> import torch
        >>> from metafunc.testing import assert_pure
        >>> def update(g, state):
        ...     state["m"].mul_(0.9).add_(g)  # writes into the caller's state
        ...     return -0.1 * state["m"], state
        >>> assert_pure(update, torch.ones(2), {"m": torch.zeros(2)})
        Traceback (most recent call last):
        ...
        AssertionError: assert_pure(fn, *args, **kwargs): fn wrote into its input args[1]['m'] ...
    """
    call = "assert_pure(fn, *args, **kwargs)"
    _checks.is_callable(call, "fn", fn)
    _checks.boolean(call, "check_repeat", check_repeat)
    watched = _watched(fn, args, kwargs)
    tensors = [t for _, t in watched]
    before = _purity.versions(tensors)
    values = [t.detach().clone() for t in tensors]
    rng = torch.get_rng_state()
    out = fn(*args, **kwargs)
    after = _purity.versions(tensors)
    for (name, t), v0, v1, value in zip(watched, before, after, values):
        changed = not same_values(t.detach(), value)
        if v0 == v1 and not changed:
            continue
        if v0 != v1:
            seen = "changed" if changed else "the same"
            how = f"in place (version counter {v0} -> {v1}; values {seen})"
        else:
            how = (
                "without bumping its version counter (a write through .data or a detached "
                "alias, or a kernel that writes internally, as batch_norm's running statistics)"
            )
        hint = ""
        if "running_" in name or "num_batches_tracked" in name:
            hint = (
                " A train-mode norm layer updates its running statistics in place: use "
                "metafunc.functionalize (buffers are returned, not written) or eval mode."
            )
        raise AssertionError(f"{call}: fn wrote into its input {name} {how}. {_FIX}{hint}")
    if check_repeat:
        now = torch.get_rng_state()
        torch.set_rng_state(rng)
        try:
            again = fn(*args, **kwargs)
        finally:
            torch.set_rng_state(now)
        _compare_outputs(call, out, again)
    return out


def _compare_outputs(call: str, first: Any, second: Any) -> None:
    names, a, spec_a = leaves_with_names(first, "out")
    _, b, spec_b = leaves_with_names(second, "out")
    if spec_a != spec_b:
        raise AssertionError(
            f"{call}: two calls with the same inputs returned different structures: "
            f"{spec_a} then {spec_b}."
        )
    for name, x, y in zip(names, a, b):
        same = (
            same_values(x.detach(), y.detach())
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
            else _equal_objects(x, y)
        )
        if not same:
            raise AssertionError(
                f"{call}: two calls with the same inputs (and the same torch RNG state) returned "
                f"different values at {name}: fn keeps state between calls (a counter, a cache, a "
                "module attribute) or draws from an RNG other than torch's global one. Pass "
                "check_repeat=False if it is meant to."
            )


def _equal_objects(x: Any, y: Any) -> bool:
    try:
        return bool(x == y)
    except Exception:  # objects without a truth value for ==: identity is all we can check
        return x is y
