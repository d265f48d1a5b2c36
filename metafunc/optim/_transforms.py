"""Small stateless or nearly stateless transforms that the named optimizers are chained from."""

from __future__ import annotations

from typing import NamedTuple

import optree
import torch

from .. import _tree
from .._typing import Hyper, Scalar, Updates
from . import _hyper, _precision
from ._base import EmptyState, GradientTransformation, _count, check_state


def _needs_params(call: str, params) -> None:
    if params is None:
        raise ValueError(
            f"{call}: this transform needs the current params, got params=None. Call "
            f"opt.update(grads, state, params)."
        )


def scale(step_size: Hyper) -> GradientTransformation:
    """Multiplies updates by ``step_size`` (a number, a learnable tensor, or a per-leaf pytree)."""
    _hyper.check("scale(step_size)", "step_size", step_size)

    def init(params):
        _hyper.match("scale.init", "step_size", step_size, params)
        return EmptyState()

    def update(updates, state, params=None):
        leaves, spec = optree.tree_flatten(updates)
        ss = _hyper.leaves("scale.update", "step_size", step_size, updates)
        out = [(u * s).to(u.dtype) for u, s in zip(leaves, ss)]
        return optree.tree_unflatten(spec, out), state

    return GradientTransformation(init, update)


def scale_by_learning_rate(lr: Hyper) -> GradientTransformation:
    """Multiplies updates by ``-lr``: turns a descent direction into an additive update.

    ``lr`` may be a number, a tensor that requires grad (a learnable learning rate), or a pytree
    of tensors matching the params (per-parameter or per-element rates, as in Meta-SGD): each
    0-d or of exactly its param's shape. A number must be finite and ``>= 0``.
    """
    _hyper.check("scale_by_learning_rate(lr)", "lr", lr, low=0.0)

    def init(params):
        _hyper.match("scale_by_learning_rate.init", "lr", lr, params)
        return EmptyState()

    def update(updates, state, params=None):
        if params is not None:
            _tree.check_same("scale_by_learning_rate.update", "updates", updates, "params", params)
        leaves, spec = optree.tree_flatten(updates)
        lrs = _hyper.leaves("scale_by_learning_rate.update", "lr", lr, updates)
        out = [(u * -r).to(u.dtype) for u, r in zip(leaves, lrs)]
        return optree.tree_unflatten(spec, out), state

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: Hyper) -> GradientTransformation:
    """Adds ``weight_decay * params`` to the updates.

    Placed before an adaptive scaling it is L2 regularisation (``torch.optim.Adam(weight_decay=)``);
    placed after it and before :func:`scale_by_learning_rate` it is decoupled weight decay
    (``torch.optim.AdamW``).
    """
    _hyper.check("add_decayed_weights(weight_decay)", "weight_decay", weight_decay, low=0.0)

    def init(params):
        _hyper.match("add_decayed_weights.init", "weight_decay", weight_decay, params)
        return EmptyState()

    def update(updates, state, params=None):
        _needs_params("add_decayed_weights.update", params)
        _tree.check_same("add_decayed_weights.update", "updates", updates, "params", params)
        leaves, spec = optree.tree_flatten(updates)
        wds = _hyper.leaves("add_decayed_weights.update", "weight_decay", weight_decay, updates)
        out = [
            (u + wd * p).to(u.dtype) for u, p, wd in zip(leaves, optree.tree_leaves(params), wds)
        ]
        return optree.tree_unflatten(spec, out), state

    return GradientTransformation(init, update)


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
        total = _hyper.safe_sqrt(sq)
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
    _precision.check_accumulator_dtype("trace", accumulator_dtype)
    plain_dampening = not _hyper.is_tree(dampening) and not isinstance(dampening, torch.Tensor)

    def init(params):
        _tree.check_floating("trace.init", params)
        _hyper.match("trace.init", "momentum", momentum, params)
        _hyper.match("trace.init", "dampening", dampening, params)
        return TraceState(_count(params), _precision.zeros(params, accumulator_dtype))

    def kernel(g, state, mu, tau, first):
        (b,) = state
        damp: float | torch.Tensor
        if plain_dampening and tau == 0:
            damp = 1.0
        else:
            damp = torch.where(first, 1.0, 1.0 - torch.as_tensor(tau, dtype=g.dtype))
        b = mu * b + damp * g
        return (g + mu * b if nesterov else b), (b,)

    def update(updates, state, params=None):
        check_state("trace.update", "trace", state, TraceState)
        _tree.check_same("trace.update", "updates", updates, "state.trace", state.trace)
        leaves, spec = optree.tree_flatten(updates)
        mus = _hyper.leaves("trace.update", "momentum", momentum, updates)
        taus = _hyper.leaves("trace.update", "dampening", dampening, updates)
        out, (new_trace,) = _precision.run_leaves(
            kernel,
            leaves,
            (optree.tree_leaves(state.trace),),
            mus,
            taus,
            shared=(state.step == 0,),
            accumulator_dtype=accumulator_dtype,
        )
        return optree.tree_unflatten(spec, out), TraceState(
            state.step + 1, optree.tree_unflatten(spec, new_trace)
        )

    return GradientTransformation(init, update)
