"""An unroll: a long inner computation, stepped in truncations by the gradient estimators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .._typing import Params, PyTree
from ..optim._base import GradientTransformation, apply_updates

__all__ = ["Unroll", "optimizer_unroll"]


class Unroll(NamedTuple):
    """The computation whose meta-loss the estimators differentiate, in two pure functions.

    ``inner = init(theta, generator)`` starts an unroll (samples a task, initialises a model and
    its optimizer state): a pytree of tensors. ``inner, loss = step(theta, inner, t)`` takes inner
    step ``t`` (0-based, a Python int) and returns a scalar loss. The meta-loss of an unroll of
    ``horizon`` steps is the mean of its ``horizon`` losses, as a function of ``theta``.

    ``init`` is called with ``theta`` detached, and outside ``vmap``: the meta-gradient flows
    through ``step`` only, and ``init`` is where randomness belongs (draw from ``generator``).
    ``step`` runs under ``torch.func.vmap`` over particles (ES, PES) and under
    ``torch.no_grad()`` (``torch.func.grad`` inside it still works), so it must be pure, draw no
    random numbers, and make no ``torch.autograd.grad`` call.
    """

    init: Callable[[PyTree, torch.Generator], PyTree]
    step: Callable[[PyTree, PyTree, int], tuple[PyTree, torch.Tensor]]


def optimizer_unroll(
    loss_fn: Callable[[Params, Any], torch.Tensor],
    make_opt: Callable[[PyTree], GradientTransformation],
    sample_task: Callable[[torch.Generator], tuple[Params, Any]],
    *,
    meta_loss_fn: Callable[[Params, Any], torch.Tensor] | None = None,
) -> Unroll:
    """The :class:`Unroll` of training a model with an optimizer built from ``theta``.

    ``params, batch = sample_task(generator)`` draws a task: the initial params and its data (a
    pytree of tensors, used at every step: full-batch training). Each step is
    ``g = grad(loss_fn)(params, batch)``; ``u, s = make_opt(theta).update(g, s, params)``;
    ``params = params + u``, and its loss is ``meta_loss_fn(params, batch)`` after the step
    (default ``loss_fn``): the meta-loss is the mean training loss along the unroll, which
    rewards fast and stable training. The inner state is ``(params, opt_state, batch)``.

    Example (a learned learning rate; see :func:`metafunc.estimators.pes` for estimating its
    gradient):
        >>> import torch, metafunc
        >>> from metafunc.estimators import optimizer_unroll
        >>> loss = lambda p, b: ((p["w"] - b) ** 2).sum()
        >>> task = lambda g: ({"w": torch.zeros(2)}, torch.randn(2, generator=g))
        >>> unroll = optimizer_unroll(loss, lambda th: metafunc.optim.sgd(lr=th["lr"]), task)
        >>> theta = {"lr": torch.tensor(0.25)}
        >>> inner = unroll.init(theta, torch.Generator().manual_seed(0))
        >>> inner, l0 = unroll.step(theta, inner, 0)
        >>> bool(l0 < loss({"w": torch.zeros(2)}, inner[2]))
        True
    """
    meta = loss_fn if meta_loss_fn is None else meta_loss_fn

    def init(theta, generator):
        params, batch = sample_task(generator)
        return params, make_opt(theta).init(params), batch

    def step(theta, inner, t):
        params, opt_state, batch = inner
        grads = torch.func.grad(loss_fn)(params, batch)
        updates, opt_state = make_opt(theta).update(grads, opt_state, params)
        params = apply_updates(params, updates)
        return (params, opt_state, batch), meta(params, batch)

    return Unroll(init, step)


def run_segment(unroll: Unroll, theta: PyTree, inner: PyTree, start: int, steps: int):
    """``steps`` steps from step ``start``: ``(inner, mean loss)``."""
    total = None
    for t in range(start, start + steps):
        inner, loss = unroll.step(theta, inner, t)
        total = loss if total is None else total + loss
    assert total is not None  # steps >= 1, checked in the factories
    return inner, total / steps
