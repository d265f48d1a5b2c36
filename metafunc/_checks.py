"""Argument checks shared by the package: one function per rule, one wording per rule.

Each check takes ``(call, name, value, ...)``: ``call`` is how the user called the function
(``"inner_loop(loss_fn, params, opt, batches, ...)"``), ``name`` the argument, and the message
says the call, the rule, what was seen and, where there is one, the fix. A check returns nothing
and costs a few ``isinstance`` tests, so a public function checks its arguments at its top, one
line per argument, without slowing a per-task call.

Two families keep the exception types their callers have always raised:

- the core style (``inner_loop``, ``vmap_tasks``, the implicit solvers): a bad count or option is
  a ``ValueError`` whatever its type, as in ``torch.func.vmap(chunk_size=...)``;
- the data style (:mod:`metafunc.data`, :func:`int_at_least`): a wrong type is a ``TypeError``,
  a wrong value a ``ValueError``, and the message shows a value that works.

``bool`` is a subclass of ``int`` in Python; every numeric check here refuses it (``steps=True``
is a mistake, not one step).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, TypeGuard

import optree
import torch

from ._tree import close_matches


def describe(value: Any) -> str:
    """A short description of a value for a message: a tensor by shape and dtype, else its repr
    and type."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{value!r} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is an int >= 1 (not a bool): the predicate behind :func:`positive_int`,
    for rules that allow other values too (``checkpoint=None | 'sqrt' | k``)."""
    return _is_int(value) and value >= 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(call: str, name: str, value: Any, *, or_none: bool = False) -> None:
    """``value`` is an int >= 1 (or ``None`` if ``or_none``); else ``ValueError``."""
    if (value is None and or_none) or is_count(value):
        return
    rule = "a positive int or None" if or_none else "a positive int"
    raise ValueError(f"{call}: expected {name} to be {rule}, got {value!r}.")


def nonnegative_int(call: str, name: str, value: Any) -> None:
    """``value`` is an int >= 0; else ``ValueError``."""
    if not (_is_int(value) and value >= 0):
        raise ValueError(f"{call}: expected {name} to be a non-negative int, got {value!r}.")


def one_of(call: str, name: str, value: Any, choices: Collection[Any]) -> None:
    """``value`` is one of ``choices`` (a tuple, shown as it is); else ``ValueError``."""
    if value not in choices:
        raise ValueError(f"{call}: expected {name} in {choices}, got {value!r}.")


def finite_number(
    call: str, name: str, value: Any, *, minimum: float = 0.0, meaning: str = ""
) -> None:
    """``value`` is a finite int or float >= ``minimum``; else ``ValueError``. ``meaning``, when
    given, says in parentheses what the number is for."""
    if _is_number(value) and minimum <= value < math.inf:
        return
    why = f" ({meaning})" if meaning else ""
    raise ValueError(
        f"{call}: expected {name} to be a finite number >= {minimum:g}{why}, got {value!r}."
    )


def positive_finite(call: str, name: str, value: Any, *, meaning: str = "") -> None:
    """``value`` is a finite int or float > 0; else ``ValueError``."""
    if _is_number(value) and 0 < value < math.inf:
        return
    why = f" ({meaning})" if meaning else ""
    raise ValueError(f"{call}: expected {name} to be positive and finite{why}, got {value!r}.")


def at_least(call: str, name: str, value: Any, minimum: float = 0.0) -> None:
    """``value`` is an int or float >= ``minimum`` (infinity allowed, NaN not); else
    ``ValueError``, worded ``expected tol >= 0``."""
    if not (_is_number(value) and value >= minimum):
        raise ValueError(f"{call}: expected {name} >= {minimum:g}, got {value!r}.")


def boolean(call: str, name: str | None, value: Any) -> None:
    """``value`` is a bool; else ``TypeError``. Without a ``name`` (a method's single argument)
    the message says ``expected a bool``."""
    if isinstance(value, bool):
        return
    if name is None:
        raise TypeError(f"{call}: expected a bool, got {type(value).__name__}.")
    raise TypeError(f"{call}: expected {name} to be a bool, got {value!r}.")


def is_callable(call: str, name: str | None, value: Any, *, or_none: bool = False) -> None:
    """``value`` is callable (or ``None`` if ``or_none``); else ``TypeError``. Without a
    ``name`` (a decorator's single argument) the message says ``expected a callable``."""
    if callable(value) or (value is None and or_none):
        return
    seen = type(value).__name__
    if name is None:
        raise TypeError(f"{call}: expected a callable, got {seen}.")
    rule = "callable or None" if or_none else "callable"
    raise TypeError(f"{call}: expected {name} to be {rule}, got {seen}.")


def number_or_tensor(call: str, name: str, value: Any) -> None:
    """``value`` is an int, float or tensor; else ``TypeError``."""
    if not (_is_number(value) or isinstance(value, torch.Tensor)):
        raise TypeError(f"{call}: expected {name} to be a number or tensor, got {value!r}.")


_PARAMETERS_HINT = (
    " Did you pass model.parameters()? Use fm.params, or dict(model.named_parameters())."
)


def tensor_dict(
    call: str,
    name: str,
    value: Any,
    *,
    source: str,
    kind: type = dict,
    non_empty: bool = False,
) -> None:
    """``value`` is a ``kind`` (``dict``, or ``Mapping`` where any mapping will do) and, if
    ``non_empty``, has entries; else ``TypeError``. ``source`` completes "a dict of tensors ..."
    with where such a dict comes from. A list, tuple or iterator of params (``model.parameters()``)
    gets the fix in the message."""
    if isinstance(value, kind) and (value or not non_empty):
        return
    hint = ""
    if name == "params" and (isinstance(value, (list, tuple)) or hasattr(value, "__next__")):
        hint = _PARAMETERS_HINT
    empty = "non-empty " if non_empty else ""
    raise TypeError(
        f"{call}: expected {name} to be a {empty}dict of tensors {source}, got "
        f"{type(value).__name__}.{hint}"
    )


def float_tree(call: str, name: str, value: Any, *, meaning: str = "", example: str) -> None:
    """``value`` is a non-empty pytree whose leaves are all floating-point tensors (meta- or
    hyperparameters to differentiate in); else ``TypeError``. ``meaning`` (e.g. ``"the
    meta-parameters"``) is said in parentheses; ``example`` is the fix's example value."""
    leaves = optree.tree_leaves(value)
    if leaves and all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in leaves):
        return
    said = f" ({meaning})" if meaning else ""
    raise TypeError(
        f"{call}: expected {name} to be a pytree of floating-point tensors{said}, got "
        f"{type(value).__name__}. Pass e.g. {example}."
    )


def int_at_least(call: str, name: str, value: Any, *, minimum: int) -> int:
    """``value`` as an ``int`` of at least ``minimum``; bools and floats are refused."""
    if not _is_int(value):
        raise TypeError(
            f"{call}: expected {name} to be an int >= {minimum}, got {describe(value)}. "
            f"Pass a Python int, e.g. {name}={max(minimum, 1)}."
        )
    if value < minimum:
        raise ValueError(
            f"{call}: expected {name} to be an int >= {minimum}, got {value}. "
            f"Pass {name}={max(minimum, 1)} or more."
        )
    return value


def number_at_least(call: str, name: str, value: Any, *, minimum: float, fix: str) -> float:
    """``value`` as a finite int or float >= ``minimum``: ``TypeError`` if it is no number,
    ``ValueError`` if it is out of range, with ``fix`` (a sentence) appended."""
    if not _is_number(value):
        raise TypeError(f"{call}: expected {name} to be a number, got {describe(value)}.")
    if not (math.isfinite(value) and value >= minimum):
        raise ValueError(
            f"{call}: expected {name} to be a finite number >= {minimum:g}, got {value!r}. {fix}"
        )
    return value


def keys_match(
    call: str,
    what: str,
    given: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    optional: Mapping[str, Any] | None = None,
    tied: Mapping[str, str] | None = None,
    source: str,
) -> None:
    """The keys of ``given`` are those of ``expected``, plus any of ``optional``; else a
    ``ValueError`` listing the missing keys and each unknown one (with a close match, or the
    name it is ``tied`` to)."""
    if given.keys() == expected.keys():
        return
    optional = optional or {}
    missing = [k for k in expected if k not in given]
    unknown = [k for k in given if k not in expected and k not in optional]
    if not (missing or unknown):
        return
    parts = [f"missing key(s) {missing}"] if missing else []
    for k in unknown:
        if tied and k in tied:
            parts.append(f"key {k!r} is tied to {tied[k]!r}: pass {tied[k]!r} only")
        else:
            parts.append(f"unknown key {k!r}{close_matches(k, [*expected, *optional])}")
    raise ValueError(
        f"{call}: {what} do not match the model: {'; '.join(parts)}. Expected the keys of "
        f"{source}: {sorted(expected)}."
    )
