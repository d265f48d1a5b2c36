"""Small stateless or nearly stateless transforms that the named optimizers are chained from.

Each per-leaf rule is a kernel that :func:`._leafwise.leafwise` runs on every leaf.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import optree
import torch

from .._typing import Hyper, Scalar, Updates
from . import _hyper
from ._base import EmptyState, GradientTransformation
from ._leafwise import leafwise, safe_sqrt


def scale(step_size: Hyper) -> GradientTransformation:
    """Multiplies updates by ``step_size`` (a number, a learnable tensor, or a per-leaf pytree)."""
    _hyper.check("scale(step_size)", "step_size", step_size)
    return leafwise("scale", _scale, hypers={"step_size": ("step_size", step_size)})


def _scale(u, *, step_size):
    return (u * step_size,)


def scale_by_learning_rate(lr: Hyper) -> GradientTransformation:
    """Multiplies updates by ``-lr``: turns a descent direction into an additive update.

    ``lr`` may be a number, a tensor that requires grad (a learnable learning rate), or a pytree
    of tensors matching the params (per-parameter or per-element rates, as in Meta-SGD): each
    0-d or of exactly its param's shape. A number must be finite and ``>= 0``.
    """
    _hyper.check("scale_by_learning_rate(lr)", "lr", lr, low=0.0)
    # the last transform of every named optimizer: checks the params it is given, so that sgd,
    # which keeps no state to compare the updates with, checks them too
    return leafwise(
        "scale_by_learning_rate",
        _descend,
        hypers={"lr": ("lr", lr)},
        params="check",
        apply=_descend_from,
    )


def _descend(u, *, lr):
    return (u * -lr,)


def _descend_from(p, u, *, lr):
    """``p + _descend(u)`` as one op, as ``torch.optim.SGD`` steps (``p.add_(g, alpha=-lr)``):
    half the ops of a step and of its backward, where the inner loop spends most of its time
    on small models. One rounding instead of two, so the last bit may differ from the two ops.
    ``None`` (the two ops) for mixed dtypes or devices, whose promotion the two ops define."""
    if u.dtype != p.dtype:
        return None
    if isinstance(lr, torch.Tensor):
        if lr.dtype != p.dtype or lr.device != p.device:
            return None
        return torch.addcmul(p, u, lr, value=-1)
    return torch.add(p, u, alpha=-float(lr))


def add_decayed_weights(weight_decay: Hyper) -> GradientTransformation:
    """Adds ``weight_decay * params`` to the updates.

    Placed before an adaptive scaling it is L2 regularisation (``torch.optim.Adam(weight_decay=)``);
    placed after it and before :func:`scale_by_learning_rate` it is decoupled weight decay
    (``torch.optim.AdamW``).
    """
    _hyper.check("add_decayed_weights(weight_decay)", "weight_decay", weight_decay, low=0.0)
    return leafwise(
        "add_decayed_weights",
        _decay,
        hypers={"weight_decay": ("weight_decay", weight_decay)},
        params="use",
    )


def _decay(u, *, p, weight_decay):
    return (u + weight_decay * p,)


def clip_by_global_norm(max_norm: Scalar) -> GradientTransformation:
    """Rescales updates so that their global L2 norm is at most ``max_norm``.

    Follows :func:`torch.nn.utils.clip_grad_norm_`: with ``n`` the norm of all leaves together,
    updates are multiplied by ``min(1, max_norm / (n + 1e-6))``. The norm of an all-zero update has
    derivative 0 (not NaN) under double backward. ``max_norm=float("inf")`` never clips.
    """
    if _hyper.is_tree(max_norm):
        raise TypeError(
            f"clip_by_global_norm(max_norm): expected a number or a 0-d tensor, got "
            f"{type(max_norm).__name__}. The global norm is one number for the whole tree."
        )
    if isinstance(max_norm, torch.Tensor) and max_norm.numel() != 1:
        raise ValueError(
            f"clip_by_global_norm(max_norm): expected a number or a 0-d tensor, got a tensor of "
            f"shape {tuple(max_norm.shape)}. The global norm is one number for the whole tree."
        )
    _hyper.check("clip_by_global_norm(max_norm)", "max_norm", max_norm, low=0.0, allow_inf=True)

    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        leaves, spec = optree.tree_flatten(updates)
        if not leaves:
            return updates, state
        sq = sum(
            u.to(torch.float64 if u.dtype == torch.float64 else torch.float32).pow(2).sum()
            for u in leaves
        )
        total = safe_sqrt(sq)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        out = [(u * coef).to(u.dtype) for u in leaves]
        return optree.tree_unflatten(spec, out), state

    return GradientTransformation(init, update)


class TraceState(NamedTuple):
    step: torch.Tensor
    trace: Updates


def trace(
    momentum: Hyper,
    dampening: Hyper = 0.0,
    nesterov: bool = False,
    *,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Heavy-ball momentum as in ``torch.optim.SGD``.

    .. math::
        b_1 = g_1, \\quad b_t = \\mu b_{t-1} + (1 - \\tau) g_t, \\quad
        u_t = g_t + \\mu b_t \\text{ (nesterov) or } b_t

    Args:
        momentum: the momentum factor ``mu``.
        dampening: the dampening ``tau`` (not applied on the first step, like torch).
        nesterov: Nesterov momentum.
        accumulator_dtype: the dtype of the momentum buffers: by default float32 for float16 and
            bfloat16 params (whose arithmetic also runs in float32), the params' dtype otherwise.
    """
    _hyper.check("trace(momentum)", "momentum", momentum, low=0.0)
    _hyper.check("trace(dampening)", "dampening", dampening)
    if not isinstance(nesterov, bool):
        raise TypeError(f"trace(nesterov): expected a bool, got {type(nesterov).__name__}.")
    return leafwise(
        "trace",
        functools.partial(trace_kernel, nesterov=nesterov),
        TraceState,
        fields=("trace",),
        hypers={"momentum": ("momentum", momentum), "dampening": ("dampening", dampening)},
        schedule=_first_step,
        accumulator_dtype=accumulator_dtype,
    )


def trace_kernel(g, b, *, momentum, dampening, first, nesterov):
    """Momentum on one leaf: ``b`` is the momentum buffer; dampening is not applied on the
    ``first`` step (a bool tensor), as in torch."""
    damp: float | torch.Tensor
    if isinstance(dampening, numbers.Real) and dampening == 0:
        damp = 1.0
    else:
        damp = torch.where(first, 1.0, 1.0 - torch.as_tensor(dampening, dtype=g.dtype))
    b = momentum * b + damp * g
    return (g + momentum * b if nesterov else b), b


def _first_step(step: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"first": step == 0}
