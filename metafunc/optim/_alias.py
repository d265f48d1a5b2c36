"""The named optimizers, each a :func:`chain` of transforms matching its ``torch.optim`` namesake.

Same hyperparameter names and defaults as ``torch.optim`` (torch 2.13); the implementation flags
(``foreach``, ``fused``, ``capturable``, ``differentiable``) have no meaning here: every metafunc
optimizer is out-of-place and differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._typing import Hyper
from . import _hyper
from ._adam import scale_by_adam, scale_by_adamax, scale_by_nadam, scale_by_radam
from ._base import GradientTransformation, _chain
from ._rms import scale_by_adadelta, scale_by_adagrad, scale_by_rms
from ._stepsize import scale_by_asgd, scale_by_rprop
from ._transforms import add_decayed_weights, scale, scale_by_learning_rate, trace


def _used(value: Hyper) -> bool:
    """Whether an optional term is active: any tensor or pytree, or a nonzero number."""
    return isinstance(value, torch.Tensor) or _hyper.is_tree(value) or value != 0


def _weight_decay(
    weight_decay: Hyper, decoupled: bool = False
) -> tuple[GradientTransformation | None, GradientTransformation | None]:
    """The weight-decay term as a pair (before the scaling, after it): L2 regularisation goes
    before the direction is computed (``torch.optim.Adam(weight_decay=)``), decoupled decay after
    it (``AdamW``); ``None`` where there is none."""
    if not _used(weight_decay):
        return None, None
    decay = add_decayed_weights(weight_decay)
    return (None, decay) if decoupled else (decay, None)


def _build(
    name: str,
    maximize: bool,
    *direction: GradientTransformation | None,
    weight_decay: Hyper = 0.0,
    decoupled: bool = False,
    lr: Hyper | None = None,
) -> GradientTransformation:
    """A named optimizer: the chain of ``scale(-1)`` (to ``maximize``), L2 weight decay, the
    ``direction`` transforms (``None``: left out), decoupled weight decay and
    ``scale_by_learning_rate(lr)`` (unless ``lr`` is ``None``: the direction is the update), each
    where it applies; named ``name`` in its errors."""
    if not isinstance(maximize, bool):
        raise TypeError(f"maximize: expected a bool, got {type(maximize).__name__}.")
    before, after = _weight_decay(weight_decay, decoupled)
    parts = [
        scale(-1.0) if maximize else None,
        before,
        *direction,
        after,
        None if lr is None else scale_by_learning_rate(lr),
    ]
    return _chain(name, tuple(p for p in parts if p is not None))


def sgd(
    lr: Hyper = 1e-3,
    momentum: Hyper = 0.0,
    dampening: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Stochastic gradient descent with optional momentum, as ``torch.optim.SGD``.

    .. math::
        g_t \\leftarrow g_t + \\lambda \\theta_{t-1}, \\quad b_t = \\mu b_{t-1} + (1-\\tau) g_t
        \\;(b_1 = g_1), \\quad
        \\theta_t = \\theta_{t-1} - lr\\,(g_t + \\mu b_t \\text{ if nesterov else } b_t)

    Args:
        lr: learning rate: a number, a learnable tensor, or a pytree of tensors matching the params
            (each 0-d or of its param's shape).
        momentum: momentum factor ``mu``.
        dampening: dampening ``tau`` for momentum.
        weight_decay: L2 penalty ``lambda``.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: ascend the objective instead of descending.

    Returns:
        A :class:`GradientTransformation`.

    Example:
        >>> import torch, metafunc
        >>> opt = metafunc.optim.sgd(lr=0.1, momentum=0.9)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.tensor([1.0, -1.0])}, state, params)
        >>> metafunc.apply_updates(params, updates)
        {'w': tensor([0.9000, 2.1000])}
    """
    if nesterov and not (
        isinstance(momentum, torch.Tensor) or _hyper.is_tree(momentum) or momentum > 0
    ):
        raise ValueError(
            f"sgd(nesterov=True): Nesterov momentum requires momentum > 0, got {momentum}."
        )
    if nesterov and _used(dampening):
        raise ValueError("sgd(nesterov=True): Nesterov momentum requires dampening=0.")
    direction = trace(momentum, dampening, nesterov) if _used(momentum) else None
    return _build("sgd", maximize, direction, weight_decay=weight_decay, lr=lr)


def adam(
    lr: Hyper = 1e-3,
    betas: Sequence[Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> GradientTransformation:
    """Adam, as ``torch.optim.Adam`` (Kingma & Ba, arXiv:1412.6980).

    .. math::
        \\theta_t = \\theta_{t-1} - lr\\,
        \\frac{m_t/(1-\\beta_1^t)}{\\sqrt{v_t}/\\sqrt{1-\\beta_2^t} + \\epsilon}

    with ``m``, ``v`` the running averages of ``g`` and ``g**2`` (see :func:`scale_by_adam`).
    ``weight_decay`` is an L2 term added to the gradient, or decoupled (AdamW) with
    ``decoupled_weight_decay=True``.

    Unlike ``torch.optim.Adam(differentiable=True)`` and torchopt's Adam, this is safe at an
    exactly-zero gradient entry (no NaN meta-gradient from ``sqrt(0)``) and runs under
    ``torch.func.vmap`` with learnable hyperparameters shared across tasks.

    Example:
        >>> import torch, metafunc
        >>> lr = torch.tensor(0.1, requires_grad=True)  # a learnable learning rate
        >>> opt = metafunc.optim.adam(lr=lr)
        >>> params = {"w": torch.tensor([1.0])}
        >>> updates, state = opt.update({"w": torch.tensor([3.0])}, opt.init(params), params)
        >>> updates["w"].detach(), torch.autograd.grad(updates["w"].sum(), lr)
        (tensor([-0.1000]), (tensor(-1.0000),))
    """
    return _adam("adam", lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay)


def _adam(
    name: str,
    lr: Hyper,
    betas: Sequence[Hyper],
    eps: Hyper,
    weight_decay: Hyper,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
) -> GradientTransformation:
    direction = scale_by_adam(betas, eps, amsgrad)
    return _build(name, maximize, direction, weight_decay=weight_decay, decoupled=decoupled, lr=lr)


def adamw(
    lr: Hyper = 1e-3,
    betas: Sequence[Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay (Loshchilov & Hutter,
    arXiv:1711.05101): ``theta_t = theta_{t-1} (1 - lr * weight_decay) - lr * adam_direction``."""
    return _adam("adamw", lr, betas, eps, weight_decay, amsgrad, maximize, True)


def adamax(
    lr: Hyper = 2e-3,
    betas: Sequence[Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Adamax, as ``torch.optim.Adamax`` (arXiv:1412.6980, section 7).

    See :func:`scale_by_adamax`.
    """
    direction = scale_by_adamax(betas, eps)
    return _build("adamax", maximize, direction, weight_decay=weight_decay, lr=lr)


def nadam(
    lr: Hyper = 2e-3,
    betas: Sequence[Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    momentum_decay: Hyper = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """NAdam, as ``torch.optim.NAdam`` (Dozat 2016); see :func:`scale_by_nadam`."""
    direction = scale_by_nadam(betas, eps, momentum_decay)
    decoupled = decoupled_weight_decay
    return _build(
        "nadam", maximize, direction, weight_decay=weight_decay, decoupled=decoupled, lr=lr
    )


def radam(
    lr: Hyper = 1e-3,
    betas: Sequence[Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """RAdam, as ``torch.optim.RAdam`` (Liu et al., arXiv:1908.03265).

    See :func:`scale_by_radam`.
    """
    direction = scale_by_radam(betas, eps)
    decoupled = decoupled_weight_decay
    return _build(
        "radam", maximize, direction, weight_decay=weight_decay, decoupled=decoupled, lr=lr
    )


def rmsprop(
    lr: Hyper = 1e-2,
    alpha: Hyper = 0.99,
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    momentum: Hyper = 0.0,
    centered: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """RMSprop, as ``torch.optim.RMSprop``; momentum accumulates the scaled gradient
    (``b_t = momentum * b_{t-1} + g_t / (sqrt(v_t) + eps)``), as torch does."""
    rms = scale_by_rms(alpha, eps, centered)
    momentum_ = trace(momentum) if _used(momentum) else None
    return _build("rmsprop", maximize, rms, momentum_, weight_decay=weight_decay, lr=lr)


def adagrad(
    lr: Hyper = 1e-2,
    lr_decay: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: Hyper = 1e-10,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Adagrad, as ``torch.optim.Adagrad`` (Duchi et al., JMLR 2011).

    See :func:`scale_by_adagrad`.
    """
    direction = scale_by_adagrad(lr_decay, eps, initial_accumulator_value)
    return _build("adagrad", maximize, direction, weight_decay=weight_decay, lr=lr)


def adadelta(
    lr: Hyper = 1.0,
    rho: Hyper = 0.9,
    eps: Hyper = 1e-6,
    weight_decay: Hyper = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Adadelta, as ``torch.optim.Adadelta`` (Zeiler, arXiv:1212.5701).

    See :func:`scale_by_adadelta`.
    """
    direction = scale_by_adadelta(rho, eps)
    return _build("adadelta", maximize, direction, weight_decay=weight_decay, lr=lr)


def rprop(
    lr: Hyper = 1e-2,
    etas: Sequence[Hyper] = (0.5, 1.2),
    step_sizes: Sequence[Hyper] = (1e-6, 50.0),
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Rprop, as ``torch.optim.Rprop``; ``lr`` is the initial step size.

    See :func:`scale_by_rprop`.
    """
    return _build("rprop", maximize, scale_by_rprop(lr, etas, step_sizes), scale(-1.0))


def asgd(
    lr: Hyper = 1e-2,
    lambd: Hyper = 1e-4,
    alpha: Hyper = 0.75,
    t0: float = 1e6,
    weight_decay: Hyper = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Averaged SGD, as ``torch.optim.ASGD``; the running average is in the state's ``ax`` field.

    See :func:`scale_by_asgd`. The average of the last transform's state is
    ``state[-1].ax``.
    """
    direction = scale_by_asgd(lr, lambd, alpha, t0)  # the full update: no lr to scale by
    return _build("asgd", maximize, direction, weight_decay=weight_decay)
