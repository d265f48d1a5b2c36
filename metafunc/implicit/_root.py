"""custom_root and custom_fixed_point: solutions differentiated by the implicit function theorem.

If ``sol(theta)`` solves ``F(sol, theta) = 0`` and ``J = dF/dsol`` is invertible there, then
``dsol/dtheta = -J^{-1} dF/dtheta``. The backward pass of a decorated solver therefore never looks
at the solver's iterations: given the cotangent ``v`` of the solution it solves ``J^T u = v`` with
a linear solver built on vector-Jacobian products (no Hessian is formed) and returns
``-(dF/dtheta)^T u``. Memory does not grow with the solver's iterations.

The backward pass evaluates ``F`` at the *differentiable* solution, so second derivatives (a
gradient of a gradient) are the implicit function's own, not those of a frozen solution.

The theorem holds at a root only: at a point a solver stopped short of, ``-J^{-1} dF/dtheta`` is
the derivative of nothing. That evaluation of ``F`` gives the residual ``||F(sol)||`` for free,
and the backward pass compares it with ``max(tol * ||F(init)||, atol)`` (the residual the solver
started from) before it trusts the formula.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import optree
import torch

from .. import _checks
from .._tree_math import detach, norm
from .._typing import PyTree
from ._backward import Implicit, Problem
from ._batched import failing_tasks, may_need_grad
from ._linear import SolveInfo, all_true, plain, solve_normal_cg

__all__ = ["ImplicitSolveWarning", "custom_fixed_point", "custom_root"]

_POLICIES = ("warn", "raise", "ignore")


class ImplicitSolveWarning(RuntimeWarning):
    """An implicit gradient is inaccurate: the solution is not a root, or its linear solve did not
    reach its tolerance."""


def _is_diff(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _takes_rmatvec(solve: Callable[..., Any]) -> bool:
    """Whether ``solve`` takes ``rmatvec=``; a ``functools.partial`` is read through its function
    (cached: ``inspect.signature`` of a partial costs ~30 us, and iMAML builds its root anew on
    every call)."""
    if isinstance(solve, functools.partial):
        return "rmatvec" not in solve.keywords and _takes_rmatvec(solve.func)
    try:
        return _function_takes_rmatvec(solve)
    except TypeError:  # unhashable callable
        return "rmatvec" in _parameters(solve)


@functools.lru_cache(maxsize=256)
def _function_takes_rmatvec(solve: Callable[..., Any]) -> bool:
    return "rmatvec" in _parameters(solve)


def _parameters(fn: Callable[..., Any]) -> Any:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


class _Root:
    """A solver made differentiable. ``start_norm(aux)``, when given, is ``||F(init)||`` as the
    solver computed it (else it is evaluated here); ``residual`` and ``advice`` word the message
    on an unconverged solution; ``check=False`` skips the checks of ``F`` (trusted: its
    signature and the shape of its output).
    ``args_vjp(sol, u, *args, **kwargs)``, when given, returns a pytree of ``(args, kwargs)``'s
    structure whose leaves are ``None`` (differentiate ``F`` in that leaf) or a function of no
    arguments giving ``-(dF/d leaf)^T u`` in closed form (called only when the leaf needs a
    gradient): the backward pass then evaluates ``F`` again only for the ``None`` leaves.
    ``linearize(sol, *args, **kwargs)``, when given, returns ``(residual, matvec)``: a function of
    no arguments giving ``F(sol, ...)`` and ``w -> J^T w``, in place of ``torch.func.vjp`` of
    ``F``."""

    def __init__(
        self,
        call,
        optimality_fn,
        solver,
        solve,
        *,
        has_aux,
        if_not_converged,
        on_solve,
        tol,
        atol,
        check=True,
        start_norm=None,
        residual=("optimality_fn(sol, ...)", "optimality_fn(init, ...)"),
        advice="Run the solver for more steps (or to a tighter tolerance of its own)",
        args_vjp=None,
        linearize=None,
    ):
        self.call, self.check = call, check
        self.optimality_fn, self.solver, self.solve = optimality_fn, solver, solve
        self.has_aux, self.if_not_converged, self.on_solve = has_aux, if_not_converged, on_solve
        self.tol, self.atol, self.start_norm = tol, atol, start_norm
        self.residual, self.advice = residual, advice
        self.args_vjp, self.linearize = args_vjp, linearize
        self.solve_takes_rmatvec = _takes_rmatvec(solve)
        self.signature: inspect.Signature | None = None
        if check:  # a trusted optimality function (check=False) is not bound either
            try:
                self.signature = inspect.signature(optimality_fn)
            except (TypeError, ValueError):  # a builtin without a signature: not checked
                pass

    def check_optimality(self, optimality: torch.Tensor, limit: torch.Tensor | None) -> None:
        """Applies the policy to ``||F(sol)|| <= limit`` (per task under vmap)."""
        if limit is None:
            return
        ok = optimality <= limit  # a tensor op, batched under vmap; NaN fails
        if all_true(ok):
            return
        failing = plain(torch.where(ok, -1.0, optimality)).reshape(-1)
        limits = plain(torch.where(ok, 0.0, limit)).reshape(-1)
        worst = int(torch.argmax(failing))
        tasks = failing_tasks(ok, worst)
        at_sol, at_init = self.residual
        message = (
            f"{self.call}: the solution is not a root, so its implicit gradient (exact only "
            f"where {at_sol} = 0) is inaccurate: ||{at_sol}|| = {failing[worst].item():.3g} at "
            f"the returned solution{tasks}, above the tolerance {limits[worst].item():.3g} = "
            f"max(tol * ||{at_init}||, atol) with tol={self.tol:g}, atol={self.atol:g}. "
            f"{self.advice}, loosen tol=/atol=, or pass if_not_converged='ignore' if this "
            "accuracy is enough."
        )
        if self.if_not_converged == "raise":
            raise RuntimeError(message)
        warnings.warn(message, ImplicitSolveWarning, stacklevel=2)

    def report(self, info: SolveInfo, optimality: torch.Tensor | None) -> None:
        """Hands ``info`` to ``on_solve`` and applies the policy to the linear solve."""
        if self.on_solve is not None:
            residual, iterations, converged = (plain(x) for x in info[:3])
            reached = None if optimality is None else plain(optimality)
            self.on_solve(SolveInfo(residual, iterations, converged, reached))
        if self.if_not_converged == "ignore" or all_true(info.converged):
            return
        worst = plain(info.residual).max().item()
        iters = plain(info.iterations).max().item()
        tasks = failing_tasks(info.converged)
        message = (
            f"{self.call}: the linear solve of the implicit gradient stopped at residual "
            f"{worst:.3g}{tasks} after {iters} products without reaching its tolerance, so the "
            "gradient is inaccurate. Raise the solver's maxiter, add ridge= (damping), or check "
            "that the solver really converged (the optimality Jacobian must be invertible at the "
            "solution)."
        )
        if self.if_not_converged == "raise":
            raise RuntimeError(message)
        warnings.warn(message, ImplicitSolveWarning, stacklevel=2)

    def __call__(self, init, *args, **kwargs):
        if self.signature is not None:
            try:
                self.signature.bind(init, *args, **kwargs)
            except TypeError as e:
                raise TypeError(
                    f"{self.call}: the optimality function cannot be called as "
                    f"optimality_fn(sol, *args, **kwargs) with the solver's arguments after init "
                    f"({len(args)} positional: {sorted(kwargs)} by keyword): {e}. It must take the "
                    "solution first, then exactly the solver's other arguments."
                ) from None
        out = self.solver(init, *detach(args), **detach(kwargs))
        if self.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"{self.call}: has_aux=True, so the solver must return (solution, aux), got "
                    f"{type(out).__name__}."
                )
            sol, aux = out
        else:
            sol, aux = out, None
        sol_leaves, sol_spec = optree.tree_flatten(sol)
        if not sol_leaves or not all(_is_diff(x) for x in sol_leaves):
            raise TypeError(
                f"{self.call}: the solver must return a pytree of floating-point tensors (the "
                f"solution){', and aux' if self.has_aux else ''}, got {sol!r}."
            )
        sol_leaves = [x.detach() for x in sol_leaves]
        leaves: list[Any]
        leaves, args_spec = optree.tree_flatten((args, kwargs), none_is_leaf=True)  # type: ignore[arg-type]
        diff_idx = [i for i, x in enumerate(leaves) if _is_diff(x)]
        problem = Problem(self, sol_spec, args_spec, leaves, diff_idx)
        diff = [leaves[i] for i in diff_idx]
        if self.check:  # one evaluation of F, so that a wrong F fails here, not in backward
            self._check_residual(problem, sol_spec, sol_leaves, diff)
        if not diff:  # nothing to differentiate: the plain solution
            out_leaves = sol_leaves
        else:
            limit = self._limit(init, aux, problem, sol_spec, sol_leaves, diff)
            out_leaves = list(Implicit.apply(problem, len(sol_leaves), limit, *sol_leaves, *diff))
        sol = optree.tree_unflatten(sol_spec, out_leaves)
        return (sol, aux) if self.has_aux else sol

    def _limit(self, init, aux, problem, sol_spec, sol_leaves, diff) -> torch.Tensor | None:
        """The tolerance on ``||F(sol)||`` that the backward pass checks: ``max(tol *
        ||F(init)||, atol)``; ``None`` (nothing evaluated) under "ignore" or when no gradient
        can flow."""
        if self.if_not_converged == "ignore":
            return None
        start, init_leaves = None, None
        if self.start_norm is None:
            init_leaves, init_spec = optree.tree_flatten(init)
            if init_spec != sol_spec or any(
                not _is_diff(x) or x.shape != s.shape for x, s in zip(init_leaves, sol_leaves)
            ):
                if self.atol == 0:
                    raise ValueError(
                        f"{self.call}: if_not_converged={self.if_not_converged!r} checks "
                        f"||optimality_fn(sol, ...)|| <= max(tol * ||optimality_fn(init, ...)||, "
                        f"atol), but init is {type(init).__name__}, not a point like the "
                        f"solution ({sol_spec} with shapes "
                        f"{[tuple(s.shape) for s in sol_leaves]}), so tol has nothing to scale. "
                        "Pass an init of the solution's structure, an absolute atol=, or "
                        "if_not_converged='ignore'."
                    )
                init_leaves = None
        if not torch.is_grad_enabled() or not any(may_need_grad(x) for x in diff):
            return None  # no backward pass will run
        if self.start_norm is not None:
            start = self.start_norm(aux)
        elif init_leaves is not None:
            with torch.no_grad():
                start = norm(problem.residual([x.detach() for x in init_leaves], diff))
        if start is None:
            return torch.tensor(float(self.atol), device=sol_leaves[0].device)
        return torch.clamp(self.tol * start.detach(), min=self.atol)

    def _check_residual(self, problem, sol_spec, sol_leaves, diff) -> None:
        with torch.no_grad():
            residual = problem.residual(sol_leaves, diff)
        res_leaves, res_spec = optree.tree_flatten(residual)
        if res_spec != sol_spec or any(r.shape != s.shape for r, s in zip(res_leaves, sol_leaves)):
            raise ValueError(
                f"{self.call}: optimality_fn(sol, ...) must return a pytree of the solution's "
                f"structure and shapes; the solution is {sol_spec} with shapes "
                f"{[tuple(s.shape) for s in sol_leaves]}, the residual {res_spec} with shapes "
                f"{[tuple(getattr(r, 'shape', ())) for r in res_leaves]}."
            )


def _check_common(call, fn, solve, if_not_converged, on_solve, tol, atol):
    _checks.is_callable(call, None, fn)
    if not callable(solve):
        raise TypeError(
            f"{call}: expected solve to be a linear solver solve(matvec, b) -> x or (x, info), "
            f"such as metafunc.implicit.solve_cg, got {solve!r}."
        )
    _checks.one_of(call, "if_not_converged", if_not_converged, _POLICIES)
    _checks.is_callable(call, "on_solve", on_solve, or_none=True)
    meaning = "a tolerance on the optimality residual at the solution"
    _checks.finite_number(call, "tol", tol, meaning=meaning)
    _checks.finite_number(call, "atol", atol, meaning=meaning)


def custom_root(
    optimality_fn: Callable[..., PyTree],
    solve: Callable[..., Any] = solve_normal_cg,
    *,
    has_aux: bool = False,
    if_not_converged: str = "warn",
    tol: float = 1e-3,
    atol: float = 0.0,
    on_solve: Callable[[SolveInfo], None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorates ``solver(init, *args, **kwargs) -> sol`` with implicit differentiation.

    ``optimality_fn(sol, *args, **kwargs)`` is zero at the solution and returns a pytree of the
    solution's structure (for a minimiser: the gradient of the objective). The decorated solver
    runs ``solver`` on detached arguments (its iterations record no graph) and returns the same
    solution, now differentiable with respect to every floating-point tensor in ``args`` and
    ``kwargs`` (never ``init``) through the implicit function theorem. It works with
    ``.backward()``, ``torch.autograd.grad`` (also ``create_graph=True``), ``torch.func.grad``,
    ``jacrev`` and ``vmap``.

    Args:
        optimality_fn: ``F(sol, *args, **kwargs)``; checked against the solver's arguments at
            call time.
        solve: the linear solver for ``J^T u = v``, ``solve(matvec, b) -> x`` or ``(x, info)``;
            one that takes ``rmatvec=`` receives ``w -> J w`` too. The default,
            :func:`solve_normal_cg`, works for any invertible ``J``; use :func:`solve_cg` when
            ``J`` is symmetric positive-definite (a Hessian), :func:`solve_dense` when small.
            Configure with ``functools.partial(solve_cg, maxiter=20, ridge=1e-4)``.
        has_aux: the solver returns ``(sol, aux)``; ``aux`` is passed through, not differentiated.
        if_not_converged: ``"warn"`` (an :class:`ImplicitSolveWarning`), ``"raise"`` (a
            ``RuntimeError``) or ``"ignore"`` when the solution is not a root (see ``tol``) or
            the linear solve misses its tolerance; checked in the backward pass, per task under
            ``vmap`` (also when the arguments are batched per task: a gradient that reaches
            them through ``vmap`` counts), the message naming the failing tasks by their index
            in the batch (in their chunk, under ``chunk_size``). ``"ignore"`` evaluates
            nothing extra.
        tol, atol: the solution counts as a root when ``||optimality_fn(sol, ...)|| <= max(tol
            * ||optimality_fn(init, ...)||, atol)`` (Euclidean norms over all leaves): the
            solver must have reduced the residual it started from ``1 / tol``-fold. The norm at
            ``init`` costs one more evaluation of ``optimality_fn`` per call (not under
            ``"ignore"``); an ``init`` that is not a point like the solution (``None``) needs an
            absolute ``atol``, and so does a warm start already close to the root.
        on_solve: called with the :class:`SolveInfo` of every backward solve (plain tensors;
            under ``vmap`` one entry per task), for diagnostics; its ``optimality`` is
            ``||optimality_fn(sol, ...)||``.

    Example: the real root of ``a x^3 - x - 2``, whose derivative in ``a`` is ``-x^3 / (3 a x^2 -
    1)``.

        >>> import torch
        >>> from metafunc.implicit import custom_root
        >>> F = lambda x, a: a * x**3 - x - 2
        >>> @custom_root(F)
        ... def cube_root(x, a):
        ...     for _ in range(50):  # Newton
        ...         x = x - F(x, a) / (3 * a * x**2 - 1)
        ...     return x
        >>> a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> x = cube_root(torch.tensor(1.0, dtype=torch.float64), a)
        >>> (dx,) = torch.autograd.grad(x, a, create_graph=True)
        >>> round(x.item(), 10), round(dx.item(), 10)
        (1.5213797068, -0.5924469933)
        >>> round(torch.autograd.grad(dx, a)[0].item(), 10)
        0.8451995734
    """
    call = "custom_root(optimality_fn, solve=...)"
    _check_common(call, optimality_fn, solve, if_not_converged, on_solve, tol, atol)

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        _checks.is_callable(f"{call}(solver)", None, solver)
        name = getattr(solver, "__name__", "solver")
        root = _Root(
            f"custom_root(...)({name})",
            optimality_fn,
            solver,
            solve,
            has_aux=has_aux,
            if_not_converged=if_not_converged,
            on_solve=on_solve,
            tol=tol,
            atol=atol,
        )

        @functools.wraps(solver)
        def wrapped(init, *args, **kwargs):
            return root(init, *args, **kwargs)

        return wrapped

    return decorator


def custom_fixed_point(
    fixed_point_fn: Callable[..., PyTree],
    solve: Callable[..., Any] = solve_normal_cg,
    *,
    has_aux: bool = False,
    if_not_converged: str = "warn",
    tol: float = 1e-3,
    atol: float = 0.0,
    on_solve: Callable[[SolveInfo], None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """:func:`custom_root` for a solver of ``x = T(x, *args, **kwargs)``.

    The optimality function is ``T(x, ...) - x``: ``tol`` compares ``||T(x) - x||`` at the
    solution with its value at ``init``. Example: ``x = cos(a x)``.

        >>> import torch
        >>> from metafunc.implicit import custom_fixed_point
        >>> T = lambda x, a: torch.cos(a * x)
        >>> @custom_fixed_point(T)
        ... def iterate(x, a):
        ...     for _ in range(200):
        ...         x = T(x, a)
        ...     return x
        >>> a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> x = iterate(torch.tensor(0.0, dtype=torch.float64), a)
        >>> (dx,) = torch.autograd.grad(x, a)
        >>> s = torch.sin(a * x)  # x = cos(a x)  =>  dx/da = -s x / (1 + s a)
        >>> torch.allclose(dx, -s * x / (1 + s * a))
        True
    """
    call = "custom_fixed_point(fixed_point_fn, solve=...)"
    _check_common(call, fixed_point_fn, solve, if_not_converged, on_solve, tol, atol)

    @functools.wraps(fixed_point_fn)
    def optimality_fn(x, *args, **kwargs):
        return optree.tree_map(torch.sub, fixed_point_fn(x, *args, **kwargs), x)

    optimality_fn.__signature__ = inspect.signature(fixed_point_fn)  # type: ignore[attr-defined]
    return custom_root(
        optimality_fn,
        solve,
        has_aux=has_aux,
        if_not_converged=if_not_converged,
        tol=tol,
        atol=atol,
        on_solve=on_solve,
    )
