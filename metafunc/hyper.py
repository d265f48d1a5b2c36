"""Hypergradients: the gradient of a validation loss with respect to training hyperparameters.

Two ways to get it. **Unrolled** (:func:`unrolled_hypergrad`): differentiate through the training
steps with :func:`metafunc.inner_loop`; it covers every hyperparameter, those of the optimizer
(a learning-rate schedule) as well as those of the training loss, and the gradient is that of the
finite run. **Implicit** (:func:`argmin`, :func:`implicit_hypergrad`): train to the minimum
``w*(h)`` of ``train_loss(w, h)`` without a graph, and differentiate ``w*`` by the implicit
function theorem, ``dw*/dh = -H^{-1} d^2 train_loss / dw dh`` (``H`` the Hessian in ``w``) with
the :mod:`metafunc.implicit` linear solvers (conjugate gradient, the Neumann series of Lorraine
et al. 2020, https://arxiv.org/abs/1911.02590): memory does not grow with the number of steps,
but only hyperparameters of the training loss (weight decay, data weights) move ``w*``; the
optimizer's do not.

``hyper`` is a pytree of floating-point tensors: per-parameter weight decays
``{"wd": {"w": ..., "b": ...}}``, a schedule ``{"lr": torch.full((steps,), 0.1)}``, per-example
data weights ``{"c": torch.ones(n)}``. Both functions return the gradient as a pytree of
``hyper``'s structure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import optree
import torch

from . import _checks
from ._inner import inner_loop
from ._tree_math import detach
from ._typing import Params, PyTree
from .implicit import custom_root, solve_cg
from .optim._base import GradientTransformation, apply_updates

__all__ = ["Hypergradient", "argmin", "implicit_hypergrad", "unrolled_hypergrad"]


class Hypergradient(NamedTuple):
    """What the hypergradient functions return: ``grad`` (a pytree like ``hyper``), the validation
    loss ``value`` and the trained ``params`` (both without a graph)."""

    grad: PyTree
    value: torch.Tensor
    params: Params


def _check_hyper(call: str, hyper: Any) -> None:
    _checks.float_tree(call, "hyper", hyper, example="{'wd': torch.tensor(1e-3)}")


def _leaf_copies(hyper: PyTree) -> PyTree:
    return optree.tree_map(lambda x: x.detach().requires_grad_(), hyper)


def _grad(value: torch.Tensor, hyper: PyTree) -> PyTree:
    leaves, spec = optree.tree_flatten(hyper)
    raw = torch.autograd.grad(value, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, raw)]
    return optree.tree_unflatten(spec, grads)


def unrolled_hypergrad(
    val_loss: Callable[[Params], torch.Tensor],
    train_loss: Callable[[Params, PyTree], torch.Tensor],
    params: Params,
    hyper: PyTree,
    make_opt: Callable[[PyTree], GradientTransformation | Sequence[GradientTransformation]],
    *,
    steps: int,
    truncate: int | None = None,
    checkpoint: int | str | None = None,
) -> Hypergradient:
    """``d val_loss(w_T(h)) / dh`` by differentiating through ``steps`` training steps.

    ``w_T`` is the result of ``steps`` steps of ``make_opt(h)`` (an optimizer, or one per step
    for a schedule) on ``train_loss(w, h)`` from ``params`` (run by :func:`metafunc.inner_loop`,
    whose ``truncate=`` and ``checkpoint=`` are passed on). The initial ``params`` get no
    gradient.

    Example: the hypergradient of a learning rate.
        >>> import torch, metafunc
        >>> from metafunc.hyper import unrolled_hypergrad
        >>> train = lambda p, h: ((p["w"] - 1.0) ** 2).sum()
        >>> val = lambda p: ((p["w"] - 2.0) ** 2).sum()
        >>> out = unrolled_hypergrad(val, train, {"w": torch.zeros(1)}, {"lr": torch.tensor(0.25)},
        ...                          lambda h: metafunc.optim.sgd(lr=h["lr"]), steps=1)
        >>> out.grad["lr"]   # w_1 = 2 lr: d (2 lr - 2)^2 / d lr = 4 (2 lr - 2)
        tensor(-6.)
    """
    call = "unrolled_hypergrad(val_loss, train_loss, params, hyper, make_opt, steps=...)"
    _checks.is_callable(call, "val_loss", val_loss)
    _checks.is_callable(call, "train_loss", train_loss)
    _checks.is_callable(call, "make_opt", make_opt)
    _check_hyper(call, hyper)
    _checks.positive_int(call, "steps", steps)
    h = _leaf_copies(hyper)
    with torch.enable_grad():
        result = inner_loop(
            lambda p, _: train_loss(p, h),
            detach(params),
            make_opt(h),
            (),
            steps=steps,
            truncate=truncate,
            checkpoint=checkpoint,
            record="endpoints",
        )
        value = val_loss(result.params)
        grad = _grad(value, h)
    return Hypergradient(grad, value.detach(), detach(result.params))


def argmin(
    train_loss: Callable[[Params, PyTree], torch.Tensor],
    params: Params,
    hyper: PyTree,
    *,
    opt: GradientTransformation,
    steps: int,
    solve: Callable[..., Any] = solve_cg,
    tol: float = 1e-3,
    atol: float = 0.0,
    if_not_converged: str = "warn",
) -> Params:
    """The minimiser ``w*(h)`` of ``train_loss(w, h)``, differentiable in ``hyper`` by the
    implicit function theorem.

    ``steps`` steps of ``opt`` from ``params`` find it (no graph is recorded); its derivative
    solves ``H u = v`` with ``solve`` (default conjugate gradient: ``H``, the Hessian of
    ``train_loss`` in ``w``, is symmetric positive-definite at a strict minimum; pass
    ``functools.partial(metafunc.implicit.solve_neumann, alpha=..., maxiter=...)`` for the
    Neumann series). ``tol``, ``atol`` and ``if_not_converged`` are
    :func:`metafunc.implicit.custom_root`'s: the gradient is exact only at a minimum, and a run
    that stops short of one warns.

    Example: ridge regression in one dimension, ``w* = x y / (x^2 + l)``.
        >>> import torch, metafunc
        >>> from metafunc.hyper import argmin
        >>> train = lambda p, h: 0.5 * (2.0 * p["w"] - 1.0) ** 2 + 0.5 * h["l"] * p["w"] ** 2
        >>> l = torch.tensor(1.0, requires_grad=True)
        >>> w = argmin(train, {"w": torch.zeros(())}, {"l": l},
        ...            opt=metafunc.optim.sgd(lr=0.1), steps=200)["w"]
        >>> round(w.item(), 4), round(torch.autograd.grad(w, l)[0].item(), 4)  # 2/5, -2/25
        (0.4, -0.08)
    """
    call = "argmin(train_loss, params, hyper, opt=..., steps=...)"
    _checks.is_callable(call, "train_loss", train_loss)
    _checks.tensor_dict(call, "params", params, source="(the model's params)")
    _check_hyper(call, hyper)
    if not isinstance(opt, GradientTransformation):
        raise TypeError(
            f"{call}: expected opt to be a metafunc.optim optimizer, got {type(opt).__name__}. "
            f"Pass e.g. opt=metafunc.optim.sgd(lr=0.1)."
        )
    _checks.positive_int(call, "steps", steps)

    def optimality(w, h):
        return torch.func.grad(train_loss)(w, h)

    def minimise(w, h):
        state = opt.init(w)
        for _ in range(steps):
            grads = torch.func.grad(train_loss)(w, h)
            updates, state = opt.update(grads, state, w)
            w = apply_updates(w, updates)
        return detach(w)

    solver = custom_root(optimality, solve, tol=tol, atol=atol, if_not_converged=if_not_converged)(
        functools.wraps(minimise)(minimise)
    )
    return solver(detach(params), hyper)


def implicit_hypergrad(
    val_loss: Callable[[Params], torch.Tensor],
    train_loss: Callable[[Params, PyTree], torch.Tensor],
    params: Params,
    hyper: PyTree,
    *,
    opt: GradientTransformation,
    steps: int,
    solve: Callable[..., Any] = solve_cg,
    tol: float = 1e-3,
    atol: float = 0.0,
    if_not_converged: str = "warn",
) -> Hypergradient:
    """``d val_loss(w*(h)) / dh`` with ``w*`` from :func:`argmin` (its arguments, the same).

    Example: ridge regression in one dimension, ``w* = 2 / (4 + l)``, validation target 0.
        >>> import torch, metafunc
        >>> from metafunc.hyper import implicit_hypergrad
        >>> train = lambda p, h: 0.5 * (2.0 * p["w"] - 1.0) ** 2 + 0.5 * h["l"] * p["w"] ** 2
        >>> out = implicit_hypergrad(lambda p: p["w"] ** 2, train, {"w": torch.zeros(())},
        ...                          {"l": torch.tensor(1.0)}, opt=metafunc.optim.sgd(lr=0.1),
        ...                          steps=200)
        >>> round(out.grad["l"].item(), 4)   # 2 w* dw*/dl = 2 (2/5) (-2/25)
        -0.064
    """
    call = "implicit_hypergrad(val_loss, train_loss, params, hyper, opt=..., steps=...)"
    _checks.is_callable(call, "val_loss", val_loss)
    _check_hyper(call, hyper)
    h = _leaf_copies(hyper)
    with torch.enable_grad():
        w = argmin(
            train_loss,
            params,
            h,
            opt=opt,
            steps=steps,
            solve=solve,
            tol=tol,
            atol=atol,
            if_not_converged=if_not_converged,
        )
        value = val_loss(w)
        grad = _grad(value, h)
    return Hypergradient(grad, value.detach(), detach(w))
