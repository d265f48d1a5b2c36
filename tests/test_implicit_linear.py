"""The linear solvers of :mod:`metafunc.implicit` on pytrees: CG, normal CG, Neumann, dense.

Symmetric positive definite and nonsymmetric systems drawn by hypothesis, singular systems,
zero-dimensional right-hand sides, an exact initial guess, vmap over systems, derivatives of the
solution in the matrix, the right-hand side and the ridge, and argument errors.

Oracles: ``torch.linalg.solve`` on the dense matrix, a Python loop over systems, in float64.
"""

from __future__ import annotations

import functools
import math

import optree
import pytest
import torch
from _implicit_helpers import D, _flat, _orthogonal, _spd, _unflat, with_device
from _purity import assert_unchanged, snapshot
from hypothesis import given
from hypothesis import strategies as st

from metafunc.implicit import (
    custom_root,
    solve_cg,
    solve_dense,
    solve_neumann,
    solve_normal_cg,
)


def _nonsymmetric(n: int, g: torch.Generator) -> torch.Tensor:
    """A random nonsymmetric matrix with singular values in [0.5, 2]."""
    s = 0.5 + 1.5 * torch.rand(n, generator=g, dtype=D)
    return (_orthogonal(n, g) * s) @ _orthogonal(n, g).T


leaf_shapes = st.lists(st.lists(st.integers(1, 3), max_size=2).map(tuple), min_size=1, max_size=3)


def _tree_b(shapes, g, device):
    return {f"x{i}": torch.randn(s, generator=g, dtype=D).to(device) for i, s in enumerate(shapes)}


def _matvec(A, like):
    return lambda v: _unflat(A @ _flat(v), like)


def _check_info(info, A, x, b, tol, max_iters=None):
    bnorm = torch.linalg.vector_norm(_flat(b))
    assert info.converged.shape == () and bool(info.converged)
    assert float(info.residual) <= tol * float(bnorm)
    true_residual = torch.linalg.vector_norm(A @ _flat(x) - _flat(b))
    assert float(true_residual) <= 10 * tol * float(bnorm) + 1e-14
    assert info.iterations.dtype == torch.long and info.iterations.shape == ()
    if max_iters is not None:
        assert int(info.iterations) <= max_iters


@with_device
@given(shapes=leaf_shapes, seed=st.integers(0, 2**20), ridge=st.sampled_from([0.0, 0.5]))
def test_cg_and_neumann_on_spd_pytrees_match_linalg_solve(shapes, seed, ridge, device):
    g = torch.Generator().manual_seed(seed)
    b = _tree_b(shapes, g, device)
    n = sum(x.numel() for x in b.values())
    A = _spd(n, g).to(device)
    Ar = A + ridge * torch.eye(n, dtype=D, device=device)
    expected = torch.linalg.solve(Ar, _flat(b))
    snap = snapshot((A, b))
    tol = 1e-12
    x, info = solve_cg(_matvec(A, b), b, ridge=ridge, tol=tol)
    assert optree.tree_structure(x) == optree.tree_structure(b)
    assert all(x[k].shape == b[k].shape for k in b)
    torch.testing.assert_close(_flat(x), expected, rtol=1e-9, atol=1e-10)
    _check_info(info, Ar, x, b, tol, max_iters=n)

    alpha = 1 / (3.0 + ridge)  # < 2 / lambda_max(A + ridge I)
    x, info = solve_neumann(_matvec(A, b), b, alpha=alpha, ridge=ridge, tol=tol, maxiter=400)
    torch.testing.assert_close(_flat(x), expected, rtol=1e-9, atol=1e-10)
    _check_info(info, Ar, x, b, tol, max_iters=400)
    assert_unchanged(snap)


@with_device
@given(shapes=leaf_shapes, seed=st.integers(0, 2**20), ridge=st.sampled_from([0.0, 0.5]))
def test_normal_cg_and_dense_on_nonsymmetric_pytrees_match_linalg_solve(
    shapes, seed, ridge, device
):
    g = torch.Generator().manual_seed(seed)
    b = _tree_b(shapes, g, device)
    n = sum(x.numel() for x in b.values())
    A = _nonsymmetric(n, g).to(device)
    eye = torch.eye(n, dtype=D, device=device)
    snap = snapshot((A, b))
    tol = 1e-12

    # normal CG solves (A'A + ridge I) x = A'b
    normal = A.T @ A + ridge * eye
    x, info = solve_normal_cg(
        _matvec(A, b), b, rmatvec=_matvec(A.T, b), ridge=ridge, tol=tol, maxiter=10 * n
    )
    torch.testing.assert_close(
        _flat(x), torch.linalg.solve(normal, A.T @ _flat(b)), rtol=1e-8, atol=1e-9
    )
    assert bool(info.converged) and int(info.iterations) <= 10 * n
    assert float(info.residual) <= tol * float(torch.linalg.vector_norm(A.T @ _flat(b)))

    # dense solves (A + ridge I) x = b
    x, info = solve_dense(_matvec(A, b), b, ridge=ridge, tol=tol)
    torch.testing.assert_close(
        _flat(x), torch.linalg.solve(A + ridge * eye, _flat(b)), rtol=1e-10, atol=1e-11
    )
    _check_info(info, A + ridge * eye, x, b, tol)
    assert int(info.iterations) == n
    assert_unchanged(snap)


def test_dense_solve_of_a_singular_system_reports_it_instead_of_raising():
    """A singular A: no LinAlgError (it would surface inside a backward pass); the residual is
    inf, so converged is False and custom_root's if_not_converged policy decides."""
    A = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=D)
    b = torch.tensor([1.0, 2.0], dtype=D)
    _, info = solve_dense(lambda v: A @ v, b)
    assert float(info.residual) == math.inf and not bool(info.converged)

    @custom_root(lambda x, a: a * a * x - a, solve=solve_dense, if_not_converged="raise")
    def root(init, a):
        return torch.ones_like(a)  # d/dx of the residual is a^2 = 0 at a = 0: singular

    with pytest.raises(RuntimeError, match=r"the linear solve .* stopped at residual inf"):
        # init a point like the solution: F(init) = 0 = F(sol), so the root check passes
        root(torch.zeros(1, dtype=D), torch.zeros(1, dtype=D, requires_grad=True)).sum().backward()


@pytest.mark.parametrize("solver", ["cg", "normal_cg", "neumann", "dense"])
def test_zero_dimensional_right_hand_side(solver, device):
    a, b = torch.tensor(2.5, dtype=D, device=device), torch.tensor(-1.5, dtype=D, device=device)
    matvec = lambda v: a * v
    solve = {
        "cg": solve_cg,
        "normal_cg": functools.partial(solve_normal_cg, rmatvec=matvec),
        "neumann": functools.partial(solve_neumann, alpha=0.3, maxiter=200),
        "dense": solve_dense,
    }[solver]
    x, info = solve(matvec, b, ridge=0.5)
    # normal CG: (a^2 + ridge) x = a b; the others: (a + ridge) x = b
    expected = 2.5 * -1.5 / (2.5**2 + 0.5) if solver == "normal_cg" else -1.5 / 3.0
    assert x.shape == () and x.item() == pytest.approx(expected, rel=1e-10)
    assert bool(info.converged) and info.residual.shape == ()


def test_cg_from_the_exact_solution_takes_no_iteration_and_respects_atol():
    g = torch.Generator().manual_seed(7)
    A, b = _spd(5, g), torch.randn(5, generator=g, dtype=D)
    exact = torch.linalg.solve(A, b)
    x, info = solve_cg(lambda v: A @ v, b, init=exact.clone())
    assert int(info.iterations) == 0 and bool(info.converged)
    torch.testing.assert_close(x, exact)
    # a huge atol: converged before the first product, x is the zero init
    x, info = solve_cg(lambda v: A @ v, b, atol=1e3)
    assert (
        int(info.iterations) == 0
        and bool(info.converged)
        and torch.equal(x, torch.zeros(5, dtype=D))
    )
    x, info = solve_cg(lambda v: A @ v, b, maxiter=2)
    assert int(info.iterations) == 2 and not bool(info.converged)


@given(seed=st.integers(0, 2**20), n=st.integers(1, 5))
def test_linear_solvers_vmap_over_systems_equal_a_loop(seed, n):
    g = torch.Generator().manual_seed(seed)
    As = torch.stack([_spd(n, g, 1.0, 1.0 + 3.0 * k) for k in range(3)])
    bs = torch.randn(3, n, generator=g, dtype=D)
    solvers = {
        "cg": lambda A, b: solve_cg(lambda v: A @ v, b, tol=1e-12),
        "normal_cg": lambda A, b: solve_normal_cg(
            lambda v: A @ v, b, rmatvec=lambda v: A.T @ v, tol=1e-12
        ),
        "neumann": lambda A, b: solve_neumann(lambda v: A @ v, b, alpha=0.2, maxiter=300),
        "dense": lambda A, b: solve_dense(lambda v: A @ v, b),
    }
    for name, solve in solvers.items():
        x, info = torch.func.vmap(solve)(As, bs)
        assert x.shape == (3, n) and all(f.shape == (3,) for f in info), name
        for i in range(3):
            xi, info_i = solve(As[i], bs[i])
            torch.testing.assert_close(x[i], xi, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(x[i], torch.linalg.solve(As[i], bs[i]), rtol=1e-8, atol=1e-9)
            assert bool(info.converged[i]) == bool(info_i.converged), name
            assert int(info.iterations[i]) == int(info_i.iterations), name


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_derivative_of_the_solution_wrt_matrix_b_and_ridge(solver, device):
    """x = (A + r I)^-1 b with A = A0 + (S + S')/2: for L = c'x, dL/db = u, dL/dr = -u'x and
    dL/dS = sym(-u x') with u = (A + r I)^-1 c (A symmetric)."""
    g = torch.Generator().manual_seed(8)
    n = 5
    A0 = _spd(n, g).to(device)
    S = torch.zeros(n, n, dtype=D, device=device, requires_grad=True)
    b = torch.randn(n, generator=g, dtype=D).to(device).requires_grad_()
    r = torch.tensor(0.3, dtype=D, device=device, requires_grad=True)
    c = torch.randn(n, generator=g, dtype=D).to(device)
    A = A0 + 0.5 * (S + S.T)
    solve = solve_dense if solver == "dense" else functools.partial(solve_cg, tol=1e-14)
    x, _ = solve(lambda v: A @ v, b, ridge=r)
    gS, gb, gr = torch.autograd.grad(x @ c, (S, b, r))
    M = A0 + r.detach() * torch.eye(n, dtype=D, device=device)
    xs = torch.linalg.solve(M, b.detach())
    u = torch.linalg.solve(M, c)
    G = -torch.outer(u, xs)
    torch.testing.assert_close(gb, u, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gr, -(u @ xs), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gS, 0.5 * (G + G.T), rtol=1e-8, atol=1e-10)
    if solver == "dense":  # unconstrained entries: dL/dA = -A^-T c x'
        A = A0.clone().requires_grad_()
        x, _ = solve_dense(lambda v: A @ v, b.detach(), ridge=r.detach())
        (gA,) = torch.autograd.grad(x @ c, A)
        torch.testing.assert_close(gA, G, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda: solve_cg(lambda v: v, {}), TypeError, r"non-empty pytree of tensors"),
        (lambda: solve_cg(lambda v: v, [1.0]), TypeError, r"non-empty pytree of tensors"),
        (lambda: solve_cg(lambda v: v, torch.ones(2, dtype=torch.long)), TypeError, r"floating"),
        (lambda: solve_cg(lambda v: v, torch.ones(2), tol=-1.0), ValueError, r"tol >= 0"),
        (lambda: solve_neumann(lambda v: v, torch.ones(2), atol=math.nan), ValueError, r"atol"),
        (lambda: solve_cg(lambda v: v, torch.ones(2), maxiter=0), ValueError, r"maxiter"),
        (lambda: solve_cg(lambda v: v, torch.ones(2), ridge="big"), TypeError, r"ridge"),
        (lambda: solve_normal_cg(lambda v: v, torch.ones(2), rmatvec=3), TypeError, r"rmatvec"),
        (lambda: solve_dense(lambda v: v, torch.ones(9), max_size=8), ValueError, r"max_size=8"),
    ],
)
def test_linear_solver_errors(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
