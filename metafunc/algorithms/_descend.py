"""The learners' inner optimisers: which one a learner uses, and adaptation without a graph."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch._C._functorch import get_interpreter_stack
from torch.func import grad

from .. import _checks, optim
from .._tree_math import grad_or_zeros
from .._typing import Params
from ..optim import GradientTransformation
from ..optim._base import apply_updates

__all__ = ["descend", "inner_optimizer", "params_only"]


def params_only(meta: Any, param_grads: Any) -> dict[str, Any]:
    """A meta-gradient with ``param_grads`` under ``"params"`` and zeros for every other entry
    of ``meta`` (for algorithms whose meta-gradient reaches the params only)."""
    grads = {key: optree.tree_map(torch.zeros_like, value) for key, value in meta.items()}
    grads["params"] = param_grads
    return grads


def inner_optimizer(
    call: str, inner_lr: float | None, inner_opt: Any, learn_lr: Any = None
) -> tuple[float | None, GradientTransformation]:
    """``(inner_lr, optimizer)``: ``(None, inner_opt)``, or ``(inner_lr, SGD at inner_lr)`` with
    ``inner_lr`` 0.01 when not given.

    Both at once is an error: the optimizer carries its own learning rate, and a silently
    ignored ``inner_lr`` is a wrong experiment. So is ``inner_opt`` with a learned learning
    rate (``learn_lr``), which is SGD's.
    """
    if inner_opt is None:
        lr = 0.01 if inner_lr is None else inner_lr
        _checks.positive_finite(call, "inner_lr", lr)
        return float(lr), optim.sgd(lr=float(lr))
    if not isinstance(inner_opt, GradientTransformation):
        raise TypeError(
            f"{call}: expected inner_opt to be a metafunc.optim optimizer (e.g. "
            f"metafunc.optim.adam(lr=1e-2)), got {type(inner_opt).__name__}."
        )
    if inner_lr is not None or learn_lr is not None:
        given = "inner_lr" if inner_lr is not None else f"learn_lr={learn_lr!r}"
        raise ValueError(
            f"{call}: inner_opt carries its own learning rate; drop {given} (learned rates "
            "are SGD's: use learn_lr without inner_opt)."
        )
    return None, inner_opt


def descend(
    loss_fn: Callable[[Params, Any], torch.Tensor],
    params: Params,
    opt: GradientTransformation | list[GradientTransformation],
    batch: Any,
    steps: int,
) -> Params:
    """``params`` after ``steps`` steps of ``opt`` (or a list with one optimizer per step) on
    ``loss_fn(params, batch)``, detached: adaptation for evaluation, with no graph to keep.

    The values of :func:`~metafunc.inner_loop`'s steps, without its graph: in a per-task loop the
    gradients are taken by ``torch.autograd.grad`` without ``create_graph``, so nothing of the
    backward pass is recorded (``torch.func.grad`` always records it, for a second order); under
    ``vmap``, where ``torch.autograd.grad`` cannot run, and under ``torch.compile``, by
    ``torch.func.grad``, whose graph stays inside the transform. A param with no gradient path
    gets a zero gradient (as under ``torch.func.grad``; ``inner_loop`` would raise).
    """
    opts = opt if isinstance(opt, list) else [opt] * steps
    params = {k: v.detach() for k, v in params.items()}
    state = opts[0].init(params)
    for t in range(steps):
        # under vmap (or another transform), and for dynamo, which traces torch.func.grad
        if torch.compiler.is_compiling() or get_interpreter_stack():
            grads = grad(loss_fn)(params, batch)
        else:
            grads, _ = grad_or_zeros(lambda p: loss_fn(p, batch), params)
        updates, state = opts[t].update(grads, state, params)
        params = {k: v.detach() for k, v in apply_updates(params, updates).items()}
    return params
