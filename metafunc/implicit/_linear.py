"""Pytree-native linear solvers for the implicit function theorem.

Each solver takes ``matvec`` (a function from a pytree of tensors to a pytree of the same structure,
the linear map ``A``) and a right-hand side ``b`` (such a pytree), and returns ``(x, info)`` with
``A x ~= b`` and a :class:`SolveInfo`. Nothing materialises ``A`` except :func:`solve_dense`.

They run unchanged under ``torch.func.vmap`` (each task its own step sizes; a task that has
converged stops moving while the others go on) and are differentiable: differentiating the result
differentiates the iterations, which is exact for a converged dense solve and, for the iterative
solvers, accurate to the tolerance they converged to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch._C._functorch import get_unwrapped, is_batchedtensor, is_functorch_wrapped_tensor

from .. import _checks
from .._tree_math import axpy, sub, vdot, zeros_like
from .._typing import PyTree

__all__ = ["SolveInfo", "solve_cg", "solve_dense", "solve_neumann", "solve_normal_cg"]

Matvec = Callable[[PyTree], PyTree]


class SolveInfo(NamedTuple):
    """How a linear solve ended; under ``vmap`` each field has one entry per task.

    Attributes:
        residual: ``||A x - b||`` (Euclidean norm over all leaves) at the returned ``x``; for the
            iterative solvers the recursively updated residual.
        iterations: matrix-vector products spent (0-d integer tensor).
        converged: whether ``residual <= max(tol * ||b||, atol)``.
        optimality: ``||F(sol, ...)||``, the norm of the optimality function at the solution
            whose implicit gradient the solve computes (0 at an exact root), as reported to
            ``on_solve`` by :func:`custom_root` and :func:`imaml`. The linear solvers, whose
            optimality function is ``A x - b``, repeat ``residual`` here.
    """

    residual: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    optimality: torch.Tensor | None = None


def _size(tree: PyTree) -> int:
    return max(sum(x.numel() for x in optree.tree_leaves(tree)), 1)


def plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor under any ``torch.func`` wrappers (vmap's batch, grad's levels), detached.

    For reading values (convergence tests, diagnostics) inside transforms; never for compute.
    """
    with torch._C._DisableFuncTorch():  # else detach() would wrap the result again
        while is_batchedtensor(t) or is_functorch_wrapped_tensor(t):
            t = get_unwrapped(t)
        return t.detach()


def all_true(flag: torch.Tensor) -> bool:
    """``bool(flag.all())``, also for a flag batched by ``vmap`` (every task must be true)."""
    return bool(plain(flag).all())


def _as_vector(call: str, b: PyTree) -> tuple[Callable, Callable] | None:
    """``(ravel, unravel)`` between pytrees of ``b``'s structure and shapes and one flat vector,
    when ``b`` has several leaves of one dtype and device; else ``None``. An iterative solver
    run on the vector costs one tensor operation per vector update instead of one per leaf: on
    small networks the operations, not their arithmetic, are the cost (``torch.func`` wrappers,
    ``vmap``)."""
    leaves, spec = optree.tree_flatten(b)
    if len(leaves) < 2 or len({(x.dtype, x.device) for x in leaves}) > 1:
        return None
    shapes, sizes = [x.shape for x in leaves], [x.numel() for x in leaves]

    def ravel(tree: PyTree, what: str = "matvec(v)") -> torch.Tensor:
        parts, got = optree.tree_flatten(tree)
        if got != spec or any(x.shape != s for x, s in zip(parts, shapes)):
            fix = "Pass an init built like b" if what == "init" else "matvec must keep v's layout"
            raise ValueError(
                f"{call}: expected {what} to be a pytree of b's structure and shapes, {spec} "
                f"with shapes {[tuple(s) for s in shapes]}, got {got} with shapes "
                f"{[tuple(getattr(x, 'shape', ())) for x in parts]}. {fix} (the same keys and "
                "shapes)."
            )
        return torch.cat([x.reshape(-1) for x in parts])

    def unravel(vec: torch.Tensor) -> PyTree:
        parts = torch.split(vec, sizes)
        return optree.tree_unflatten(spec, [x.reshape(s) for x, s in zip(parts, shapes)])

    return ravel, unravel


def _check(call: str, b: PyTree, tol: float, atol: float, maxiter: int | None, ridge: Any) -> None:
    leaves = optree.tree_leaves(b)
    if not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
        raise TypeError(f"{call}: expected b to be a non-empty pytree of tensors, got {b!r}.")
    if not all(x.is_floating_point() or x.is_complex() for x in leaves):
        dtypes = sorted({str(x.dtype) for x in leaves})
        raise TypeError(f"{call}: expected floating-point b, got dtypes {dtypes}.")
    _checks.at_least(call, "tol", tol)
    _checks.at_least(call, "atol", atol)
    _checks.positive_int(call, "maxiter", maxiter, or_none=True)
    _checks.number_or_tensor(call, "ridge", ridge)


def _with_ridge(matvec: Matvec, ridge: Any) -> Matvec:
    if isinstance(ridge, (int, float)) and ridge == 0:
        return matvec
    return lambda v: axpy(ridge, v, matvec(v))


def _threshold(b: PyTree, tol: float, atol: float) -> torch.Tensor:
    bnorm = vdot(b, b).detach().sqrt()
    return torch.clamp(tol * bnorm, min=atol)


def solve_cg(
    matvec: Matvec,
    b: PyTree,
    *,
    init: PyTree | None = None,
    ridge: float | torch.Tensor = 0.0,
    tol: float = 1e-10,
    atol: float = 0.0,
    maxiter: int | None = None,
) -> tuple[PyTree, SolveInfo]:
    """Conjugate gradient for a symmetric positive-definite ``A`` (e.g. a Hessian + ``ridge``).

    Solves ``(A + ridge I) x = b``; stops when ``||r|| <= max(tol ||b||, atol)`` or after
    ``maxiter`` products (default ``10 * size``, at least 10, also for a 0-d ``b``). A pytree
    ``b`` whose leaves share a dtype and device is solved as one flat vector (each vector update
    one operation, whatever the number of leaves); ``matvec`` still sees pytrees like ``b``.

    Example:
        >>> import torch
        >>> from metafunc.implicit import solve_cg
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = solve_cg(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> x, int(info.iterations), bool(info.converged)
        (tensor([0.0909, 0.6364], dtype=torch.float64), 2, True)
    """
    call = "solve_cg(matvec, b, ...)"
    _check(call, b, tol, atol, maxiter, ridge)
    A = _with_ridge(matvec, ridge)
    maxiter = maxiter if maxiter is not None else max(10 * _size(b), 10)
    vector = _as_vector(call, b)
    if vector is not None:  # the same iterations on one flat vector
        ravel, unravel = vector
        x, info = _cg(
            lambda v: ravel(A(unravel(v))),
            ravel(b),
            None if init is None else ravel(init, "init"),
            tol,
            atol,
            maxiter,
        )
        return unravel(x), info
    return _cg(A, b, init, tol, atol, maxiter)


def _cg(
    A: Matvec, b: PyTree, init: PyTree | None, tol: float, atol: float, maxiter: int
) -> tuple[PyTree, SolveInfo]:
    x = zeros_like(b) if init is None else init
    r = b if init is None else sub(b, A(x))
    p, rs = r, vdot(r, r)
    thresh = _threshold(b, tol, atol)
    done = rs.detach().sqrt() <= thresh
    iterations = torch.zeros((), dtype=torch.long, device=rs.device)
    for _ in range(maxiter):
        if all_true(done):
            break
        Ap = A(p)
        pAp = vdot(p, Ap)
        alpha = torch.where(done, 0.0, rs / torch.where(pAp == 0, 1, pAp))
        x = axpy(alpha, p, x)
        r = axpy(-alpha, Ap, r)
        rs_new = vdot(r, r)
        beta = rs_new / torch.where(rs == 0, 1, rs)
        p = axpy(beta, p, r)
        rs = torch.where(done, rs, rs_new)
        iterations = iterations + ~done  # bool + long: long
        done = done | (rs.detach().sqrt() <= thresh)
    residual = rs.detach().sqrt()
    return x, SolveInfo(residual, iterations, done, residual)


def solve_normal_cg(
    matvec: Matvec,
    b: PyTree,
    *,
    rmatvec: Matvec,
    init: PyTree | None = None,
    ridge: float | torch.Tensor = 0.0,
    tol: float = 1e-10,
    atol: float = 0.0,
    maxiter: int | None = None,
) -> tuple[PyTree, SolveInfo]:
    """CG on the normal equations ``(A^T A + ridge I) x = A^T b``, for any nonsingular ``A``.

    Needs ``rmatvec`` (``v -> A^T v``). Squares the condition number: prefer :func:`solve_cg`
    when ``A`` is symmetric positive-definite. ``info.residual`` is that of the normal equations.

    Example:
        >>> import torch
        >>> from metafunc.implicit import solve_normal_cg
        >>> A = torch.tensor([[0.0, 2.0], [-1.0, 0.0]], dtype=torch.float64)  # not symmetric
        >>> x, _ = solve_normal_cg(lambda v: A @ v, torch.tensor([2.0, 3.0], dtype=torch.float64),
        ...                        rmatvec=lambda v: A.T @ v)
        >>> x
        tensor([-3.,  1.], dtype=torch.float64)
    """
    call = "solve_normal_cg(matvec, b, rmatvec=...)"
    _check(call, b, tol, atol, maxiter, ridge)
    if not callable(rmatvec):
        raise TypeError(f"{call}: expected rmatvec (v -> A^T v) to be callable, got {rmatvec!r}.")
    return solve_cg(
        lambda v: rmatvec(matvec(v)),
        rmatvec(b),
        init=init,
        ridge=ridge,
        tol=tol,
        atol=atol,
        maxiter=maxiter,
    )


def solve_neumann(
    matvec: Matvec,
    b: PyTree,
    *,
    alpha: float | torch.Tensor = 1.0,
    init: PyTree | None = None,
    ridge: float | torch.Tensor = 0.0,
    tol: float = 1e-10,
    atol: float = 0.0,
    maxiter: int = 100,
) -> tuple[PyTree, SolveInfo]:
    """The Neumann series ``x = alpha sum_k (I - alpha A)^k b`` (Richardson iteration).

    Converges when every eigenvalue of ``I - alpha (A + ridge I)`` has modulus below 1, e.g. for a
    positive-definite ``A`` with ``alpha < 2 / lambda_max``; used by Lorraine et al. (2020) for
    hyperparameter gradients. Each iteration is one product.

    Example:
        >>> import torch
        >>> from metafunc.implicit import solve_neumann
        >>> A = torch.tensor([[1.0, 0.2], [0.2, 0.5]], dtype=torch.float64)
        >>> x, info = solve_neumann(lambda v: A @ v, torch.tensor([1.0, 1.0], dtype=torch.float64),
        ...                         alpha=1.0, maxiter=500)
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), bool(info.converged)
        (True, True)
    """
    _check("solve_neumann(matvec, b, ...)", b, tol, atol, maxiter, ridge)
    A = _with_ridge(matvec, ridge)
    x = zeros_like(b) if init is None else init
    r = b if init is None else sub(b, A(x))
    thresh = _threshold(b, tol, atol)
    rn = vdot(r, r).detach().sqrt()
    done = rn <= thresh
    iterations = torch.zeros((), dtype=torch.long, device=rn.device)
    step = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha))
    for _ in range(maxiter):
        if all_true(done):
            break
        a = torch.where(done, torch.zeros_like(rn), step.to(rn.device, rn.dtype))
        x = axpy(a, r, x)
        r = axpy(-a, A(r), r)
        rn = torch.where(done, rn, vdot(r, r).detach().sqrt())
        iterations = iterations + (~done).long()
        done = done | (rn <= thresh)
    return x, SolveInfo(rn, iterations, done, rn)


def solve_dense(
    matvec: Matvec,
    b: PyTree,
    *,
    ridge: float | torch.Tensor = 0.0,
    tol: float = 1e-8,
    atol: float = 0.0,
    max_size: int = 4096,
) -> tuple[PyTree, SolveInfo]:
    """Materialises ``A`` (one product per unknown) and solves with ``torch.linalg.solve``.

    For small problems (at most ``max_size`` unknowns) and as a reference for the iterative
    solvers; exact up to round-off, also in its derivatives. ``info.converged`` tests the residual
    against ``tol`` (a singular ``A`` gives a large one).

    Example:
        >>> import torch
        >>> from metafunc.implicit import solve_dense
        >>> A = torch.tensor([[0.0, 2.0], [-1.0, 0.0]], dtype=torch.float64)
        >>> solve_dense(lambda v: A @ v, torch.tensor([2.0, 3.0], dtype=torch.float64))[0]
        tensor([-3.,  1.], dtype=torch.float64)
    """
    call = "solve_dense(matvec, b, ...)"
    _check(call, b, tol, atol, None, ridge)
    n = _size(b)
    if n > max_size:
        raise ValueError(
            f"{call}: b has {n} entries, more than max_size={max_size}; materialising A would "
            f"cost {n} products and {n * n} numbers. Use solve_cg or solve_normal_cg, or raise "
            "max_size."
        )
    leaves, spec = optree.tree_flatten(b)
    shapes = [x.shape for x in leaves]
    sizes = [x.numel() for x in leaves]

    def ravel(tree: PyTree) -> torch.Tensor:
        return torch.cat([x.reshape(-1) for x in optree.tree_leaves(tree)])

    def unravel(vec: torch.Tensor) -> PyTree:
        parts = torch.split(vec, sizes)
        return optree.tree_unflatten(spec, [p.reshape(s) for p, s in zip(parts, shapes)])

    b_flat = ravel(b)
    eye = torch.eye(b_flat.shape[0], dtype=b_flat.dtype, device=b_flat.device)
    columns = [ravel(matvec(unravel(eye[i] + 0 * b_flat))) for i in range(b_flat.shape[0])]
    M = torch.stack(columns, dim=1)
    if not (isinstance(ridge, (int, float)) and ridge == 0):
        M = M + ridge * eye
    # solve_ex: a singular A is reported by the residual (inf) and the caller's policy, not by
    # a LinAlgError from inside a backward pass
    x_flat = torch.linalg.solve_ex(M, b_flat)[0]
    residual = torch.linalg.vector_norm((M @ x_flat - b_flat).detach())
    residual = torch.where(residual.isfinite(), residual, torch.full_like(residual, math.inf))
    thresh = _threshold(b, tol, atol)
    converged = residual <= thresh
    iterations = torch.full((), b_flat.shape[0], dtype=torch.long, device=b_flat.device)
    return unravel(x_flat), SolveInfo(residual, iterations, converged, residual)
