"""MetaOptNet: a multi-class SVM head per task, its dual QP solved iteratively and
differentiated by the implicit function theorem (:func:`metafunc.implicit.custom_root`)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from .. import _checks
from ..implicit import ImplicitSolveWarning, SolveInfo, custom_root, solve_normal_cg
from ..implicit._linear import all_true, plain
from ..implicit._root import _check_common
from ._base import explain_frozen
from ._protonet import HeadLearner

__all__ = ["MetaOptNet"]


def _onto_simplex(w: torch.Tensor, total: float) -> torch.Tensor:
    """Rows of ``w`` projected onto ``{u >= 0, sum(u) = total}`` (Duchi et al. 2008, by
    sorting; no data-dependent control flow, so it runs under vmap)."""
    s = torch.sort(w, dim=-1, descending=True).values
    excess = s.cumsum(-1) - total
    k = torch.arange(1, w.shape[-1] + 1, dtype=w.dtype, device=w.device)
    rho = (s - excess / k > 0).sum(-1, keepdim=True).clamp(min=1)
    theta = excess.gather(-1, rho - 1) / rho.to(w.dtype)
    return (w - theta).clamp(min=0)


def _project(v: torch.Tensor, upper: torch.Tensor, C: float) -> torch.Tensor:
    """Rows of ``v`` projected onto the dual's feasible set ``{z <= upper, sum(z) = 0}`` with
    ``upper = C * one_hot``: ``z = upper - u`` with ``u`` on the simplex of total ``C``."""
    return upper - _onto_simplex(upper - v, C)


@explain_frozen
@dataclasses.dataclass(frozen=True)
class MetaOptNet(HeadLearner):
    """MetaOptNet-SVM (Lee et al. 2019): a Crammer-Singer multi-class SVM per task.

    Per task, with ``K = X X^T`` the ``(n, n)`` Gram matrix of the support embeddings and
    ``Y`` the one-hot targets, the head solves the SVM's dual quadratic program over
    ``z`` ``(n, ways)`` (as in MetaOptNet's code):

        minimise ``1/2 tr(z^T K z) + ridge/2 ||z||^2 - <Y, z>``
        subject to ``z <= C Y`` and ``sum_k z[i, k] = 0`` for every support example ``i``,

    whose solution gives the class weights ``w_k = sum_i z[i, k] x_i``; a query ``f`` gets the
    logits ``scale * f @ w_k``. ``scale`` is learned in ``meta["head"]`` (MetaOptNet learns a
    scale of the logits too).

    **Solver.** FISTA (accelerated projected gradient; Beck & Teboulle 2009) with adaptive
    restart (O'Donoghue & Candès 2015), from ``z = 0``, step ``1 / L`` with ``L`` the largest
    eigenvalue of ``K`` (plus ``ridge``); each row's projection onto its feasible set is a
    projection onto a simplex by sorting. It stops when the fixed-point residual
    ``||P(z - grad/L) - z||`` has fallen below ``tol`` times its value at ``z = 0`` (checked
    every 10 iterations, every task of a meta-batch), or after ``maxiter`` iterations.

    **Gradient.** Not by unrolling the solver: the solution is differentiated by
    :func:`~metafunc.implicit.custom_root` on the optimality condition ``P(z - grad/L) - z =
    0`` (the fixed point of projected gradient), as a function of ``K``; the backward pass
    solves one linear system with ``solve`` (default :func:`~metafunc.implicit.solve_normal_cg`,
    the Jacobian is not symmetric), and its memory does not grow with the iterations. The
    weights' direct dependence on ``X`` is differentiated by autograd. ``if_not_converged``
    (``"warn"``: an :class:`~metafunc.implicit.ImplicitSolveWarning`, ``"raise"``: a
    ``RuntimeError``, ``"ignore"``) applies to a solver that stops at ``maxiter`` above its
    tolerance (in any task of a meta-batch; also in :meth:`evaluate`) and to a linear solve of
    the backward pass that misses its tolerance.

    The implicit gradient needs a unique solution: ``K`` must be positive definite on the
    active face, which holds for generic embeddings when ``n <= d`` (fewer support examples
    than features). Otherwise pass ``ridge > 0``, which makes the dual strictly convex
    (MetaOptNet's code adds 1.0 to the diagonal of its QP matrix to the same end).

    Args:
        model: the backbone, a :class:`~metafunc.FunctionalModel` of a features-only module.
        ways: the classes per task; targets are in ``[0, ways)``.
        C: the SVM's regularisation constant (MetaOptNet: 0.1).
        scale: the initial logit scale.
        ridge: the dual's extra ``ridge/2 ||z||^2``.
        tol, maxiter: the solver's stopping rule (see above).
        solve: the linear solver of the implicit gradient, as in ``custom_root``.
        if_not_converged: ``"warn"``, ``"raise"`` or ``"ignore"`` (see above).
        strategy: how tasks are batched, as in :func:`~metafunc.vmap_tasks`.

    Example:
        >>> import torch, metafunc
        >>> from metafunc.algorithms import MetaOptNet
        >>> fm = metafunc.functionalize(torch.nn.Linear(4, 8))
        >>> learner = MetaOptNet(fm, ways=2, C=1.0)
        >>> x, y = torch.randn(2, 6, 4), torch.tensor([[0, 1, 0, 1, 0, 1]] * 2)
        >>> grads, metrics = learner.meta_grad(learner.init(), (x, y), (x, y))
        >>> sorted(grads), metrics["accuracy"].shape
        (['head', 'params'], torch.Size([2]))

    References: Lee, Maji, Ravichandran, Soatto, "Meta-learning with differentiable convex
    optimization", CVPR 2019, https://arxiv.org/abs/1904.03758; Crammer, Singer, "On the
    algorithmic implementation of multiclass kernel-based vector machines", JMLR 2001.
    """

    name: ClassVar[str] = "metaoptnet"

    _: dataclasses.KW_ONLY
    C: float = 0.1
    scale: float = 1.0
    ridge: float = 0.0
    tol: float = 1e-6
    maxiter: int = 1000
    solve: Callable[..., Any] = solve_normal_cg
    if_not_converged: str = "warn"
    _dual: Callable[..., Any] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        call = "MetaOptNet(model, ...)"
        _checks.positive_finite(call, "C", self.C, meaning="the SVM's regularisation constant")
        _checks.finite_number(call, "scale", self.scale, minimum=-math.inf)
        _checks.finite_number(call, "ridge", self.ridge, meaning="the dual's ridge")
        _checks.positive_finite(call, "tol", self.tol, meaning="the solver's relative residual")
        _checks.positive_int(call, "maxiter", self.maxiter)
        C, ridge, tol, maxiter = float(self.C), float(self.ridge), self.tol, self.maxiter

        def optimality(z, K, Y, step):
            grad = K @ z + ridge * z - Y
            return _project(z - step * grad, C * Y, C) - z

        def fista(z, K, Y, step):
            start = torch.linalg.vector_norm(optimality(z, K, Y, step))
            previous, t = z, 1.0
            momentum = torch.zeros((), dtype=z.dtype, device=z.device)
            residual = start
            for i in range(maxiter):
                y = z + momentum * (z - previous)
                new = _project(y - step * (K @ y + ridge * y - Y), C * Y, C)
                # restart where the step points against the momentum (per task under vmap)
                restart = ((y - new) * (new - z)).sum() > 0
                previous, z = z, new
                t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
                momentum = torch.where(restart, 0.0, (t - 1) / t_next)
                t = t_next
                if i % 10 == 9 or i == maxiter - 1:
                    residual = torch.linalg.vector_norm(optimality(z, K, Y, step))
                    if all_true(residual <= tol * start):
                        break
            self._check_solution(residual, start)
            return z

        # The policy is applied here, on the solver's last residual (per task, also under
        # vmap) and, through on_solve, on the backward's linear solve; custom_root's own check
        # is not used: it runs in the backward pass only (evaluate has none), would evaluate
        # the optimality at init once more per task (FISTA has its start norm already), and
        # its message is not the SVM solver's.
        _check_common(call, optimality, self.solve, self.if_not_converged, None, tol, 0.0)
        dual = custom_root(
            optimality, self.solve, if_not_converged="ignore", on_solve=self._check_linear_solve
        )(fista)
        self._derive(_dual=dual)

    def _policy(self, message: str) -> None:
        if self.if_not_converged == "raise":
            raise RuntimeError(message)
        if self.if_not_converged == "warn":
            warnings.warn(message, ImplicitSolveWarning, stacklevel=3)

    def _check_solution(self, residual: torch.Tensor, start: torch.Tensor) -> None:
        """Applies ``if_not_converged`` to ``||P(z - grad/L) - z|| <= tol * (its start)``."""
        if self.if_not_converged == "ignore":
            return
        ok = plain(residual <= self.tol * start).reshape(-1)
        if bool(ok.all()):
            return
        ratio = (plain(residual) / plain(start).clamp(min=torch.finfo(start.dtype).tiny)).reshape(
            -1
        )
        tasks = f" in {int((~ok).sum())} of {ok.numel()} tasks" if ok.numel() > 1 else ""
        self._policy(
            f"MetaOptNet(model, ...): the SVM dual solver stopped after maxiter={self.maxiter} "
            f"iterations with its fixed-point residual at {ratio.max().item():.3g} of its start"
            f"{tasks}, above tol={self.tol:g}: the solution is not a root of the optimality "
            "condition, so its head and its implicit gradient are inaccurate. Raise maxiter, "
            "loosen tol, add ridge= (an ill-conditioned Gram matrix converges slowly), or pass "
            "if_not_converged='ignore'."
        )

    def _check_linear_solve(self, info: SolveInfo) -> None:
        if self.if_not_converged == "ignore" or bool(info.converged.all()):
            return
        self._policy(
            f"MetaOptNet(model, ...): the linear solve of the implicit gradient stopped at "
            f"residual {info.residual.max().item():.3g} after {int(info.iterations.max())} "
            "products without reaching its tolerance, so the gradient is inaccurate. Pass a "
            "solve= with more iterations, or ridge= (the dual's Jacobian is singular when "
            "there are more support examples than features)."
        )

    def _head_init(self) -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(float(self.scale), dtype=self._dtype())}

    def fit_head(self, meta, features, targets):
        X, Y = features, self._one_hot(targets, features)
        K = X @ X.T
        with torch.no_grad():
            top = torch.linalg.eigvalsh(K)[-1] + self.ridge
            step = 1 / top.clamp(min=torch.finfo(K.dtype).tiny)
        z = self._dual(torch.zeros_like(Y), K, Y, step)
        weight = meta["head"]["scale"] * (z.T @ X)
        return weight, torch.zeros(self.ways, dtype=X.dtype, device=X.device)
