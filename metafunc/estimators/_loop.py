"""``meta_train``: meta-parameters trained by a gradient estimator and a metafunc optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .. import _checks
from .._tree_math import detach
from .._typing import PyTree
from ..optim._base import GradientTransformation, apply_updates
from ._estimators import GradientEstimator

__all__ = ["MetaTrainResult", "meta_train"]


class MetaTrainResult(NamedTuple):
    """What :func:`meta_train` returns: the meta-parameters after the last iteration, the loss
    each ``estimate`` reported (shape ``(iterations,)``), and the estimator's and the
    meta-optimizer's final states (to continue the run)."""

    theta: PyTree
    losses: torch.Tensor
    estimator_state: Any
    opt_state: Any


def meta_train(
    estimator: GradientEstimator,
    theta: PyTree,
    meta_opt: GradientTransformation,
    *,
    iterations: int,
    seed: int = 0,
    estimator_state: Any = None,
    opt_state: Any = None,
    callback: Callable[[int, PyTree, torch.Tensor], None] | None = None,
) -> MetaTrainResult:
    """Runs ``iterations`` of ``grad, loss, s = estimator.estimate(theta, s)``;
    ``theta <- theta + meta_opt.update(grad, ...)``.

    Each iteration is one truncation of the estimator's unroll (a new unroll, a new task, starts
    after every ``horizon`` steps), so with :func:`metafunc.estimators.pes` this is meta-training
    with truncated unrolls and no truncation bias. ``theta`` is detached (no graph spans
    iterations). ``callback(i, theta, loss)``, when given, is called after each iteration.

    Example:
        >>> import torch, metafunc
        >>> from metafunc.estimators import Unroll, backprop, meta_train
        >>> unroll = Unroll(lambda th, g: torch.zeros(()), lambda th, x, t: (x, (th["a"] - 3) ** 2))
        >>> est = backprop(unroll, steps=1, horizon=1)
        >>> out = meta_train(est, {"a": torch.tensor(0.0)}, metafunc.optim.sgd(lr=0.25),
        ...                  iterations=20)
        >>> round(out.theta["a"].item(), 3)
        3.0
    """
    call = "meta_train(estimator, theta, meta_opt, iterations=...)"
    if not isinstance(estimator, GradientEstimator):
        raise TypeError(
            f"{call}: expected estimator to be a metafunc.estimators.GradientEstimator, got "
            f"{type(estimator).__name__}. Build one with backprop(...), es(...) or pes(...)."
        )
    if not isinstance(meta_opt, GradientTransformation):
        raise TypeError(
            f"{call}: expected meta_opt to be a metafunc.optim optimizer, got "
            f"{type(meta_opt).__name__}. Pass e.g. metafunc.optim.adam(lr=1e-3)."
        )
    _checks.positive_int(call, "iterations", iterations)
    _checks.is_callable(call, "callback", callback, or_none=True)
    theta = detach(theta)
    state = estimator.init(theta, seed=seed) if estimator_state is None else estimator_state
    opt_state = meta_opt.init(theta) if opt_state is None else opt_state
    losses = []
    for i in range(iterations):
        grad, loss, state = estimator.estimate(theta, state)
        updates, opt_state = meta_opt.update(grad, opt_state, theta)
        theta = detach(apply_updates(theta, updates))
        losses.append(loss)
        if callback is not None:
            callback(i, theta, loss)
    return MetaTrainResult(theta, torch.stack(losses), state, opt_state)
