"""iMAML (Rajeswaran et al. 2019): a proximal inner problem with an implicit meta-gradient."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import optree
import torch
from torch.func import grad_and_value

from .. import _checks
from .._tree_math import axpy, detach, norm, sub, vdot
from .._typing import Params
from ..optim._base import GradientTransformation, update_and_apply
from ._linear import SolveInfo, plain, solve_cg
from ._root import _check_common, _Root

__all__ = ["IMAMLResult", "imaml"]


class IMAMLResult:
    """What :func:`imaml` returns; unpacks as ``params, losses, grad_norm``.

    Attributes:
        params: the adapted params ``phi*``, differentiable in the initial params (and ``lam`` if
            it is a tensor) through the implicit function theorem.
        losses: the task loss ``loss_fn`` (without the proximal term, which costs as much again
            to evaluate) before each inner step, shape ``(steps,)``.
        grad_norm: the norm of the regularised loss's gradient at ``phi*`` (0 at an exact
            minimiser): how well the inner problem was solved, which the implicit gradient assumes.
            It costs one more gradient of ``loss_fn``, so it is evaluated on first access (then
            kept), in the function that called :func:`imaml` (under its ``vmap``, if any): code
            that never reads it does not pay for it. The backward pass checks convergence
            (``if_not_converged``) on its own, without it.
    """

    __slots__ = ("_grad_norm", "losses", "params")
    _fields = ("params", "losses", "grad_norm")

    def __init__(
        self,
        params: Params,
        losses: torch.Tensor,
        grad_norm: torch.Tensor | Callable[[], torch.Tensor],
    ):
        self.params, self.losses, self._grad_norm = params, losses, grad_norm

    @property
    def grad_norm(self) -> torch.Tensor:
        if not isinstance(self._grad_norm, torch.Tensor):
            self._grad_norm = self._grad_norm()
        return self._grad_norm

    def __iter__(self) -> Iterator[Any]:
        return iter((self.params, self.losses, self.grad_norm))

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Any:
        return tuple(self)[index]

    def __repr__(self) -> str:
        norm = self._grad_norm if isinstance(self._grad_norm, torch.Tensor) else "<not evaluated>"
        return f"IMAMLResult(params={self.params!r}, losses={self.losses!r}, grad_norm={norm})"


def _plus(a: Params, lam: float | torch.Tensor, b: Params) -> Params:
    """``a + lam * b``: one fused operation per leaf when ``lam`` is a number."""
    return axpy(lam, b, a)


def imaml(
    loss_fn: Callable[[Params, Any], torch.Tensor],
    params: Params,
    opt: GradientTransformation,
    batch: Any,
    *,
    lam: float | torch.Tensor,
    steps: int,
    solve: Callable[..., Any] | None = None,
    if_not_converged: str = "warn",
    tol: float = 1e-3,
    atol: float = 0.0,
    on_solve: Callable[[SolveInfo], None] | None = None,
) -> IMAMLResult:
    """Adapts ``params`` to a task by iMAML's proximal inner problem; implicit meta-gradient.

    The inner problem is ``min_phi loss_fn(phi, batch) + lam/2 ||phi - params||^2``, solved from
    ``phi = params`` by ``steps`` steps of ``opt`` on the one ``batch`` (no graph is recorded,
    so memory does not grow with ``steps``). The returned ``phi*`` is differentiable: for an
    outer loss ``L(phi*)``, the meta-gradient that ``.backward()`` delivers to ``params`` is
    ``(I + H / lam)^{-1} grad L(phi*)`` with ``H`` the Hessian of ``loss_fn`` at ``phi*``,
    computed by conjugate gradient on Hessian-vector products (Rajeswaran et al. 2019, eq. 7).
    The formula assumes ``phi*`` is the minimiser; ``result.grad_norm`` says how close it is, and
    the backward pass applies ``if_not_converged`` when it is not close enough (``tol``).

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, the task's training loss.
        params: the meta-parameters (initialisation), a dict of tensors.
        opt: the inner optimizer (any :mod:`metafunc.optim` transformation).
        batch: the task's training data, used at every inner step.
        lam: the proximal strength ``lambda`` (> 0); a tensor gets a meta-gradient too.
        steps: inner optimisation steps.
        solve: the linear solver for ``(H + lam I) u = v`` (``v`` the cotangent of ``phi*``; the
            meta-gradient is ``lam u``); default
            ``functools.partial(solve_cg, tol=1e-6, maxiter=100)`` (``H + lam I`` is symmetric;
            positive-definite near a minimum).
        if_not_converged: as in :func:`custom_root`: ``"warn"``, ``"raise"`` or ``"ignore"``
            when the inner problem is not solved (see ``tol``) or the linear solve misses its
            tolerance.
        tol, atol: the inner problem counts as solved when ``||grad loss_fn(phi*) + lam (phi* -
            params)|| <= max(tol * ||grad loss_fn(params)||, atol)``, i.e. ``steps`` steps
            reduced the gradient they started from ``1 / tol``-fold (the relative error of the
            meta-gradient is of that order). The start is the first inner step's gradient: no
            extra cost.
        on_solve: as in :func:`custom_root`: per-task residuals, iterations and
            ``optimality`` (``result.grad_norm``) under ``vmap``.

    Example:
        >>> import torch, metafunc
        >>> from metafunc.implicit import imaml
        >>> theta = {"w": torch.tensor([0.0], dtype=torch.float64, requires_grad=True)}
        >>> loss = lambda p, b: 0.5 * b * ((p["w"] - 1.0) ** 2).sum()  # H = b = 3
        >>> b = torch.tensor(3.0, dtype=torch.float64)
        >>> r = imaml(loss, theta, metafunc.optim.sgd(lr=0.2), b, lam=1.0, steps=100)
        >>> r.params["w"].sum().backward()
        >>> theta["w"].grad  # lam / (lam + H)
        tensor([0.2500], dtype=torch.float64)
    """
    call = "imaml(loss_fn, params, opt, batch, lam=..., steps=...)"
    _checks.is_callable(call, "loss_fn", loss_fn)
    _checks.tensor_dict(call, "params", params, source="(fm.params)", non_empty=True)
    _checks.positive_int(call, "steps", steps)
    _check_lam(call, lam)
    if solve is None:
        solve = functools.partial(solve_cg, tol=1e-6, maxiter=100)
    _check_common(call, loss_fn, solve, if_not_converged, on_solve, tol, atol)
    track = if_not_converged != "ignore"

    # The proximal term is differentiated in closed form (lam * (phi - theta)), not by autograd:
    # the inner steps and the optimality function cost one gradient of loss_fn each. So is the
    # backward pass: J^T w = H w + lam w (linearize) and the meta-gradient lam u (optimality_vjp),
    # one evaluation of loss_fn for the Hessian-vector products, as a hand-written iMAML.
    loss_grad = grad_and_value(loss_fn)

    def optimality(phi, theta, batch, lam):
        return _plus(torch.func.grad(loss_fn)(phi, batch), lam, sub(phi, theta))

    def linearize(phi, theta, batch, lam):
        # J = H + lam I with H the Hessian of loss_fn: H w by one vjp of its gradient at phi
        vjp = torch.func.vjp(lambda p: torch.func.grad(loss_fn)(p, batch), phi)
        g, hvp = vjp[0], vjp[1]
        residual = lambda: _plus(g, lam, sub(phi, theta))
        return residual, lambda w: _plus(hvp(w)[0], lam, w)

    def optimality_vjp(phi, u, theta, batch, lam):
        # -(dF/d theta)^T u = lam u and -(dF/d lam)^T u = -<phi - theta, u> in closed form (no
        # further evaluation of loss_fn); a differentiable batch goes through F (None)
        def lam_bar():
            return (-vdot(sub(phi, theta), u)).reshape(lam.shape).to(lam.dtype)

        scale = lam.reshape(()) if isinstance(lam, torch.Tensor) else lam
        theta_bar = {k: functools.partial(torch.mul, u[k], scale) for k in theta}
        batch_bar = optree.tree_map(lambda _: None, batch, none_is_leaf=True)
        return (theta_bar, batch_bar, lam_bar if isinstance(lam, torch.Tensor) else None), {}

    def solver(init, theta, batch, lam):
        phi, state = init, opt.init(init)
        losses, start = [], None
        for _ in range(steps):
            g, value = loss_grad(phi, batch)
            if start is None and track:  # phi = theta: the residual is grad loss_fn(theta)
                start = norm(g).detach()
            g = _plus(g, lam, sub(phi, theta))
            losses.append(value)
            phi, state = update_and_apply(opt, g, state, phi)
        return detach(phi), (torch.stack(losses).detach(), start)

    root = _Root(
        "imaml(...)",
        optimality,
        solver,
        solve,
        has_aux=True,
        if_not_converged=if_not_converged,
        on_solve=on_solve,
        tol=tol,
        atol=atol,
        check=False,
        start_norm=lambda aux: aux[1],
        residual=("grad loss_fn(phi) + lam (phi - params)", "grad loss_fn(params)"),
        advice="Raise steps= or the inner learning rate, so that the inner problem is solved",
        args_vjp=optimality_vjp,
        linearize=linearize,
    )
    phi, (losses, _) = root(detach(params), params, batch, lam)

    def grad_norm() -> torch.Tensor:
        # one gradient of loss_fn at phi*, without a graph (everything detached)
        g = optimality(detach(phi), detach(params), batch, detach(lam))
        return vdot(g, g).sqrt().detach()

    return IMAMLResult(phi, losses, grad_norm)


def _check_lam(call: str, lam: Any) -> None:
    """``lam`` is a positive finite number, or a 1-element floating tensor holding one (per task
    under ``vmap``)."""
    if not isinstance(lam, torch.Tensor):
        _checks.positive_finite(call, "lam", lam, meaning="the proximal strength")
        return
    if lam.numel() != 1 or not lam.is_floating_point():
        raise ValueError(
            f"{call}: expected lam to be a positive number or 1-element floating tensor, "
            f"got a {lam.dtype} tensor of shape {tuple(lam.shape)}."
        )
    if not bool(((plain(lam) > 0) & plain(lam).isfinite()).all()):
        raise ValueError(
            f"{call}: expected lam to be positive and finite (the proximal strength), got "
            f"{plain(lam).tolist()}."
        )
