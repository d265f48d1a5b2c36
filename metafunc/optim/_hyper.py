"""Hyperparameters: Python numbers, learnable tensors, or pytrees of tensors matching the params.

Validation happens once, in the optimizer's factory (``adam(lr=...)``); the match of tensor and
per-parameter values with the params is checked in ``init`` and, as a cheap shape comparison, in
``update``, where each leaf's value is looked up.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, cast

import optree
import torch
from torch._C._functorch import is_batchedtensor, is_functorch_wrapped_tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._tree import format_path
from .._typing import Hyper, PyTree


def is_tree(value: Hyper) -> bool:
    return not isinstance(value, (numbers.Real, torch.Tensor))


def match(call: str, name: str, value: Hyper, params: PyTree) -> None:
    """In ``init``: checks that a tensor or per-parameter ``value`` fits the params (see
    :func:`leaves`); numbers fit any params."""
    if not isinstance(value, numbers.Real):
        leaves(call, name, value, params)


def _readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read here: a plain eager CPU tensor.

    Not while ``torch.compile`` or ``torch.jit`` traces, not for tensors wrapped by ``torch.func``
    transforms (``vmap``'s batched tensors, ``grad``'s tracked ones), tensor subclasses (fake,
    functional) or under a dispatch mode; and not on an accelerator, where reading a value would
    stall the device in a factory that meta-learners call at every meta-step.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return False
    if is_batchedtensor(t) or is_functorch_wrapped_tensor(t):
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    return t.device.type == "cpu"


def _not_finite(value: numbers.Real | torch.Tensor, allow_inf: bool) -> str | None:
    """How ``value`` fails to be finite (NaN; inf unless ``allow_inf``), or ``None`` if it does not
    (or, for a tensor, if its values cannot be read here)."""
    if isinstance(value, torch.Tensor):
        if not _readable(value):
            return None
        v = value.detach()
        ok = bool((~torch.isnan(v)).all()) if allow_inf else bool(torch.isfinite(v).all())
        what = "NaN" if allow_inf else "NaN or inf"
        return None if ok else f"a tensor of shape {tuple(value.shape)} holding {what}"
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    bad = math.isnan(number) or (math.isinf(number) and not allow_inf)
    return f"{value}" if bad else None


def check(
    call: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
    allow_inf: bool = False,
) -> Hyper:
    """Validates a hyperparameter in a factory and returns it unchanged.

    Python numbers must be finite (NaN is always rejected; ``inf`` only where ``allow_inf`` says
    it means "no bound") and are range-checked (``low <= value <= high``, or ``< high`` with
    ``high_open``); tensors must be floating point; pytrees must hold only numbers and
    floating-point tensors, their numbers finite. Tensor values are not range-checked: they may be
    traced, batched or learnable. A tensor whose values can be read without disturbing a
    transform, a trace or a device (see :func:`_readable`) must be finite.
    """
    if isinstance(value, bool):
        raise TypeError(
            f"{call}: expected {name} to be a number, a floating-point tensor or a pytree of them, "
            f"got bool {value}. Pass a float, e.g. {name}=0.1."
        )
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    interval = f"[{lo}, {hi}{')' if high_open else ']'}"
    finite = "a finite number or inf" if allow_inf else "finite"
    if isinstance(value, numbers.Real):
        seen = _not_finite(value, allow_inf)
        if seen is not None:
            raise ValueError(
                f"{call}: expected {name} to be {finite}, got {seen}. Pass a finite number in "
                f"{interval}."
            )
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf if cast(Any, value) > 0 else -math.inf
        bad = (low is not None and number < low) or (
            high is not None and (number >= high if high_open else number > high)
        )
        if bad:
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
        seen = _not_finite(value, allow_inf)
        if seen is not None:
            raise ValueError(
                f"{call}: expected {name} to be {finite}, got {seen}. Pass finite values."
            )
        return value
    paths, leaves, _ = optree.tree_flatten_with_path(value)
    if not leaves:
        raise TypeError(
            f"{call}: expected {name} to be a number, a floating-point tensor or a pytree of them "
            f"matching the params, got {type(value).__name__} with no leaves."
        )
    for path, leaf in zip(paths, leaves):
        where = f"{name}{format_path(path)}"
        if isinstance(leaf, bool) or not isinstance(leaf, (numbers.Real, torch.Tensor)):
            raise TypeError(
                f"{call}: expected {name} to be a number, a floating-point tensor or a pytree of "
                f"them matching the params, got {type(leaf).__name__} at {where}."
            )
        if isinstance(leaf, torch.Tensor) and not leaf.is_floating_point():
            raise TypeError(
                f"{call}: expected floating-point tensors in {name}, got dtype {leaf.dtype} at "
                f"{where}."
            )
        seen = _not_finite(leaf, allow_inf)
        if seen is not None:
            raise ValueError(
                f"{call}: expected {name} to be {finite} for every params leaf, got {seen} at "
                f"{where}. Pass finite values."
            )
    return value


class HyperparameterOverflowError(ValueError):
    """A Python-number hyperparameter that overflows a params leaf's dtype (``init``, ``update``).

    Raised by :func:`values` with the transform's call; :func:`metafunc.optim.chain` re-raises it
    (:meth:`seen_from`) under the name of the named optimizer it builds (``adam(...).update``).
    Its fields: ``call``, ``name`` (of the hyperparameter), ``value``, ``dtype`` (of the leaf) and
    ``key`` (the leaf's key path, formatted).
    """

    def __init__(self, call: str, name: str, value: object, dtype: torch.dtype, key: str) -> None:
        self.call, self.name, self.value, self.dtype, self.key = call, name, value, dtype, key
        super().__init__(
            f"{call}: {name}={value!r} overflows {dtype} (largest finite value "
            f"{torch.finfo(dtype).max!r}) at params leaf {key}: the update would be inf or nan. "
            f"Pass a smaller {name}, or params of a wider dtype (float64: "
            f"model.double())."
        )

    def __reduce__(self) -> tuple[Any, ...]:  # pickled by its fields, not by its message
        return type(self), (self.call, self.name, self.value, self.dtype, self.key)

    def seen_from(self, call: str) -> HyperparameterOverflowError:
        """The same overflow, reported under the enclosing optimizer's ``call``."""
        return HyperparameterOverflowError(call, self.name, self.value, self.dtype, self.key)


# float16's largest value is the smallest of the floating dtypes params take (float8 aside): a
# number within it fits every leaf, and the per-leaf check below is skipped
_FITS_ANY = torch.finfo(torch.float16).max


def _magnitude(value: numbers.Real) -> float:
    """``abs(value)`` as a float; 0 for ``inf`` (and ints too large for a float), which the
    factories allow only where they mean "no bound"."""
    try:
        number = abs(float(value))
    except OverflowError:
        return 0.0
    return 0.0 if math.isinf(number) else number


def _check_fits(call: str, name: str, value: numbers.Real, leaf: Any, path: Any) -> None:
    """Raises if a Python number is beyond ``leaf``'s dtype (Python floats and dtypes only: no
    tensor is read, so this is free under ``vmap``, ``grad`` and ``torch.compile``)."""
    if _magnitude(value) > torch.finfo(leaf.dtype).max:
        raise HyperparameterOverflowError(call, name, value, leaf.dtype, format_path(path))


def _fits_leaf(value: torch.Tensor, leaf: Any) -> bool:
    """A per-parameter tensor fits its leaf: one number (not adding dims), or the leaf's shape."""
    if value.dim() == 0 or not isinstance(leaf, torch.Tensor):
        return True
    return value.shape == leaf.shape or (value.numel() == 1 and value.dim() <= leaf.dim())


def _broadcasts_unchanged(value: torch.Tensor, leaf: Any) -> bool:
    """A shared tensor fits every leaf it broadcasts to without changing the leaf's shape."""
    if value.dim() == 0 or not isinstance(leaf, torch.Tensor):
        return True
    try:
        return torch.broadcast_shapes(value.shape, leaf.shape) == leaf.shape
    except RuntimeError:
        return False


def leaves(call: str, name: str, value: Any, tree: PyTree) -> list:
    """:func:`values` for the leaves of ``tree``."""
    tleaves, spec = optree.tree_flatten(tree)
    return values(call, name, value, tleaves, spec)


def values(call: str, name: str, value: Any, tleaves: list, spec: optree.PyTreeSpec) -> list:
    """The hyperparameter's value for each leaf of the tree flattened as ``tleaves, spec``.

    A number or tensor is shared by every leaf; a shared tensor must broadcast to each leaf's
    shape without changing it. A pytree is matched to the tree by key path, so a hyperparameter
    tree that matches the full params also serves a masked sub-tree of them (entries for leaves
    not in the tree are ignored); each of its tensors must be 0-d (or hold one number without
    adding dimensions) or have exactly its leaf's shape. Under ``vmap`` the shapes compared are the
    per-task ones. A Python number must fit each leaf's dtype (``inf``, which the factory allows
    only where it means "no bound", is not checked); tensor values are not read.
    """
    if not is_tree(value):
        if isinstance(value, numbers.Real) and not -_FITS_ANY <= cast(float, value) <= _FITS_ANY:
            for path, leaf in zip(spec.paths(), tleaves):
                _check_fits(call, name, value, leaf, path)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            for path, leaf in zip(spec.paths(), tleaves):
                if not _broadcasts_unchanged(value, leaf):
                    raise ValueError(
                        f"{call}: the {name} tensor has shape {tuple(value.shape)}, which does "
                        f"not broadcast to params leaf {format_path(path)} of shape "
                        f"{tuple(leaf.shape)} without changing it. One {name} tensor applies to "
                        f"every leaf: pass a 0-d tensor (torch.tensor(0.1)), or a per-parameter "
                        f"pytree, e.g. {{k: torch.full_like(p, 0.1) for k, p in params.items()}}."
                    )
        return [value] * len(tleaves)
    vleaves, vspec = optree.tree_flatten(value)
    if vspec == spec:
        found = vleaves
    else:  # by key path: the tree may be a masked part of the params
        lookup = dict(zip(vspec.paths(), vleaves))
        missing = [format_path(p) for p in spec.paths() if p not in lookup]
        if missing:
            raise ValueError(
                f"{call}: the pytree given as {name} has no entry for params leaf "
                f"{', '.join(missing[:5])}. A per-parameter {name} needs one value for every "
                f"trainable leaf, e.g. {{k: torch.tensor(0.1) for k in params}}."
            )
        found = [lookup[p] for p in spec.paths()]
    for path, v, leaf in zip(spec.paths(), found, tleaves):
        if isinstance(v, numbers.Real) and not -_FITS_ANY <= cast(float, v) <= _FITS_ANY:
            _check_fits(call, f"{name}{format_path(path)}", v, leaf, path)
        if isinstance(v, torch.Tensor) and not _fits_leaf(v, leaf):
            key = format_path(path)
            raise ValueError(
                f"{call}: {name}{key} has shape {tuple(v.shape)}, but params leaf {key} has shape "
                f"{tuple(leaf.shape)}. A per-parameter {name} is a 0-d tensor or a tensor of "
                f"exactly its param's shape, e.g. torch.full_like(param, 0.1)."
            )
    return found
