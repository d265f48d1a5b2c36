"""Mixed precision: the arithmetic of half-precision leaves runs in float32, and their state is kept
in float32, unless a transform's ``accumulator_dtype`` says otherwise.

In float16, Adam's ``eps=1e-8`` is 0 and ``(1 - beta2) g**2`` loses digits for ``|g| < 0.25`` and
is 0 for ``|g| < 8e-3``; so a float16 or bfloat16 leaf is widened to float32 (its *compute dtype*),
its transform's arithmetic runs there, the update is rounded back to the leaf's dtype once, and the
state stays in float32 (its *state dtype*), as in mixed-precision training. float32 and float64
leaves compute and keep their state in their own dtype. Transforms that keep no per-leaf state
(:func:`~metafunc.optim.scale`, :func:`~metafunc.optim.scale_by_learning_rate`,
:func:`~metafunc.optim.add_decayed_weights`) are one multiply-add: they run as torch's type
promotion has them and return the update in its own dtype, without this detour.

Second order in float16 needs one more rule. The derivative of an adaptive update at an
exactly-zero gradient entry is about ``lr / eps`` (1e5 for Adam at its defaults), beyond float16's
largest value, 65504. Rounded to float16 on its way back to the gradient, that cotangent is
``inf``, and where the entry is zero because its second derivatives are zero (a masked loss, an
output the inner loss leaves out) the double backward meets ``inf * 0``: the whole meta-gradient
turns into NaN, while in float32 the term is exactly 0. Saturating at 65504 is not enough: the
double backward sums such a cotangent over a layer's fan-in before it meets the zero. So for
float16 leaves :func:`widen` treats an exactly-zero gradient entry (or float16 state entry) as a
structural zero and sends no cotangent back to it: exact for the zeros above; where the zero is a
coincidence and the second derivative is not zero (a layer initialised to zeros, a gradient that
underflowed), the float32 meta-gradient holds a term of order ``lr / eps`` that float16 could not
hold either, and it is left out. bfloat16 has float32's range and keeps every term.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

HALF = (torch.float16, torch.bfloat16)


def check_accumulator_dtype(call: str, accumulator_dtype: Any) -> None:
    """In a factory: ``accumulator_dtype`` is ``None`` or a floating-point ``torch.dtype``."""
    if accumulator_dtype is None:
        return
    if not isinstance(accumulator_dtype, torch.dtype) or not accumulator_dtype.is_floating_point:
        seen = (
            str(accumulator_dtype)
            if isinstance(accumulator_dtype, torch.dtype)
            else f"{accumulator_dtype!r} ({type(accumulator_dtype).__name__})"
        )
        raise TypeError(
            f"{call}(accumulator_dtype=...): expected None or a floating-point torch.dtype, got "
            f"{seen}. Pass e.g. accumulator_dtype=torch.float32, or None for float32 state on "
            f"half-precision params and the params' dtype otherwise."
        )


def state_dtype(leaf: torch.dtype, accumulator_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of a leaf's state: ``accumulator_dtype``, or float32 for half-precision leaves and
    the leaf's own dtype otherwise."""
    if accumulator_dtype is not None:
        return accumulator_dtype
    return torch.float32 if leaf in HALF else leaf


def zeros(
    leaves: list[torch.Tensor], accumulator_dtype: torch.dtype | None, values: list | None = None
) -> list[torch.Tensor]:
    """One state tensor per params leaf, in the leaf's state dtype: zeros, or filled with
    ``values`` (one number or tensor per leaf)."""
    values = values or [0.0] * len(leaves)
    return [
        (torch.zeros_like(p) + v).to(state_dtype(p.dtype, accumulator_dtype))
        for p, v in zip(leaves, values)
    ]


def compute_dtype(leaf: torch.dtype, state: torch.dtype) -> torch.dtype:
    """The dtype a leaf's arithmetic runs in: the widest of the leaf's, its state's and float32."""
    return torch.promote_types(torch.promote_types(leaf, state), torch.float32)


class _Widen(torch.autograd.Function):
    """``x.to(dtype)``; for float16 ``x`` its backward sends no cotangent to the entries where
    ``x`` is exactly 0 (see the module docstring)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return torch.where(x == 0, 0.0, grad).to(x.dtype), None


def _narrower(x: Any, dtype: torch.dtype) -> bool:
    """Whether ``x`` is a floating-point tensor of a dtype narrower than ``dtype``."""
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.dtype != dtype
        and torch.promote_types(x.dtype, dtype) == dtype
    )


def widen(x: Any, dtype: torch.dtype) -> Any:
    """A gradient or state tensor in the compute ``dtype`` (float16 through :class:`_Widen`);
    numbers, ``None`` and tensors that are not narrower are returned unchanged."""
    if not _narrower(x, dtype):
        return x
    return _Widen.apply(x, dtype) if x.dtype == torch.float16 else x.to(dtype)


def run(
    kernel: Callable[..., tuple[Any, ...]],
    g: torch.Tensor,
    state: tuple[Any, ...],
    kwargs: dict[str, Any],
    accumulator_dtype: torch.dtype | None,
    exact: tuple[bool, ...],
) -> tuple[Any, ...]:
    """One leaf's update: ``kernel(g, *state, **kwargs) -> (update, *new_state)`` in the compute
    dtype.

    ``g`` (the leaf's update so far) and each tensor of ``state`` (the leaf's state) narrower than
    the compute dtype are widened to it by :func:`widen`, each such tensor of ``kwargs`` (per-leaf
    values: params, hyperparameters) by a plain cast; the update is returned in ``g``'s dtype and
    the new state in the state dtype, except the entries that ``exact`` marks (float64 numbers,
    returned as they are). For float32 and float64 leaves with the default ``accumulator_dtype``
    nothing is widened.
    """
    leaf = g.dtype
    if accumulator_dtype is None and leaf not in HALF:  # the common case: nothing to widen
        keep = dtype = leaf
    else:
        keep = state_dtype(leaf, accumulator_dtype)
        dtype = compute_dtype(leaf, keep)
        g = widen(g, dtype)
        state = tuple([widen(s, dtype) for s in state])
        kwargs = {k: a.to(dtype) if _narrower(a, dtype) else a for k, a in kwargs.items()}
    update, *new_state = kernel(g, *state, **kwargs)
    return (
        cast(update, leaf),
        *[s if e else cast(s, keep) for s, e in zip(new_state, exact)],
    )


def cast(x: Any, dtype: torch.dtype) -> Any:
    """``x`` in ``dtype`` (``x`` itself if it is ``None`` or already of that dtype)."""
    return x if x is None or x.dtype == dtype else x.to(dtype)
