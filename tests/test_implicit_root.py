""":func:`metafunc.implicit.custom_root` on a cubic, its errors, and ``custom_fixed_point``.

The real root of ``a x^3 - x - 2`` (torchopt#222) has first and second derivatives in ``a`` that
every linear solver must reproduce; optimality functions of the wrong signature, structure or
shape, and bad arguments, are named; ``custom_fixed_point`` finds the fixed point of ``cos`` and
of a linear contraction on a pytree.

Oracles: the derivatives of the cubic's root by implicit differentiation worked by hand,
``numpy.roots`` with central finite differences, pure-Python bisection, the closed form of a linear
fixed point, in float64.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from _implicit_helpers import D, _bisect, _flat, _unflat

from metafunc.implicit import (
    custom_fixed_point,
    custom_root,
    solve_cg,
    solve_dense,
    solve_neumann,
    solve_normal_cg,
)

# torchopt#222: the real root of F(x, a) = a x^3 - x - 2 at a = 1.
CUBIC = (1.5213797068, -0.5924469933, 0.8451995734)  # x, dx/da, d2x/da2


def cubic(x, a):
    return a * x**3 - x - 2


def _cubic_oracle(a: float) -> tuple[float, float, float]:
    """x from numpy.roots; x' = -x^3 / (3 a x^2 - 1) and x'' differentiated by hand."""
    roots = np.roots([a, 0.0, -1.0, -2.0])
    x = float(roots[np.abs(roots.imag) < 1e-12].real.max())
    den = 3 * a * x**2 - 1
    dx = -(x**3) / den
    ddx = -(3 * x**2 * dx * den - x**3 * (3 * x**2 + 6 * a * x * dx)) / den**2
    return x, dx, ddx


def test_cubic_oracle_matches_the_issue_and_finite_differences():
    x, dx, ddx = _cubic_oracle(1.0)
    assert (x, dx, ddx) == pytest.approx(CUBIC, abs=1e-10)
    h = 1e-4
    root = lambda a: _cubic_oracle(a)[0]
    assert (root(1 + h) - root(1 - h)) / (2 * h) == pytest.approx(dx, rel=1e-7)
    assert (root(1 + h) - 2 * x + root(1 - h)) / h**2 == pytest.approx(ddx, rel=1e-6)


SOLVERS = {
    "normal_cg": solve_normal_cg,
    "cg": solve_cg,
    "dense": solve_dense,
    # J = 3 a x^2 - 1 ~ 5.94 at the root: alpha = 0.15 < 2 / 5.94
    "neumann": functools.partial(solve_neumann, alpha=0.15, maxiter=500),
}


def _cubic_root(solve):
    @custom_root(cubic, solve)
    def newton(x, a):
        for _ in range(30):
            x = x - cubic(x, a) / (3 * a * x**2 - 1)
        return x

    return newton


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_cubic_root_first_and_second_derivatives_every_solver(solver, device):
    """0-d solution and parameter; oracle: numpy.roots + hand-differentiated closed form."""
    root = _cubic_root(SOLVERS[solver])
    x_true, dx_true, ddx_true = _cubic_oracle(1.0)
    init = torch.tensor(1.0, dtype=D, device=device)

    a = torch.tensor(1.0, dtype=D, device=device, requires_grad=True)
    x = root(init, a)
    assert x.shape == () and x.item() == pytest.approx(x_true, abs=1e-12)
    (dx,) = torch.autograd.grad(x, a, create_graph=True)
    (ddx,) = torch.autograd.grad(dx, a)
    assert dx.item() == pytest.approx(dx_true, rel=1e-9)
    assert ddx.item() == pytest.approx(ddx_true, rel=1e-8)

    f = lambda a: root(init, a)
    a0 = torch.tensor(1.0, dtype=D, device=device)
    assert torch.func.grad(f)(a0).item() == pytest.approx(dx_true, rel=1e-9)
    assert torch.func.grad(torch.func.grad(f))(a0).item() == pytest.approx(ddx_true, rel=1e-8)

    a.grad = None
    root(init, a).backward()
    assert a.grad.item() == pytest.approx(dx_true, rel=1e-9)  # not zero for a 0-d solution


@pytest.mark.parametrize("a_value", [0.5, 1.0, 2.5])
def test_cubic_root_at_other_parameters_against_finite_differences_of_numpy_roots(a_value):
    root = _cubic_root(solve_cg)
    a = torch.tensor(a_value, dtype=D, requires_grad=True)
    (dx,) = torch.autograd.grad(root(torch.tensor(1.5, dtype=D), a), a)
    h = 1e-6
    fd = (_cubic_oracle(a_value + h)[0] - _cubic_oracle(a_value - h)[0]) / (2 * h)
    assert dx.item() == pytest.approx(fd, rel=1e-7)


def test_jacrev_with_the_default_solver_on_a_nonlinear_optimality_fn():
    """x = sqrt(a) as the root of x^2 - a; dx/da = diag(1 / (2 sqrt a)). The default solver
    (solve_normal_cg, which gets rmatvec) under torch.func.jacrev."""
    root = custom_root(lambda x, a: x**2 - a)(lambda x, a: a.sqrt())
    a = torch.tensor([1.0, 4.0], dtype=D)
    jac = torch.func.jacrev(lambda a: root(torch.ones(2, dtype=D), a))(a)
    torch.testing.assert_close(jac, torch.diag(0.5 / a.sqrt()), rtol=1e-10, atol=1e-12)


def test_optimality_signature_mismatch_is_a_type_error_at_call_time():
    calls = []

    def solver(x, a, scale=1.0):
        calls.append(1)
        return a.clone()

    a = torch.ones(2, dtype=D, requires_grad=True)
    init = torch.zeros(2, dtype=D)
    missing = custom_root(lambda x, a, b: x - a)(solver)
    with pytest.raises(TypeError, match=r"optimality function cannot be called.*missing.*'b'"):
        missing(init, a)
    extra_kw = custom_root(lambda x, a: x - a)(solver)
    with pytest.raises(TypeError, match=r"optimality function cannot be called.*\['scale'\]"):
        extra_kw(init, a, scale=2.0)
    too_many = custom_root(lambda x: x)(solver)
    with pytest.raises(TypeError, match=r"must take the solution first"):
        too_many(init, a)
    assert not calls  # raised before the solver ran, so before any backward


@pytest.mark.parametrize(
    ("optimality", "solution", "pattern"),
    [
        (lambda x, a: (x - a).sum(), lambda a: a.clone(), r"shapes \[\(2,\)\].*shapes \[\(\)\]"),
        (lambda x, a: (x - a)[:, None], lambda a: a.clone(), r"shapes \[\(2, 1\)\]"),
        (lambda x, a: [x - a], lambda a: a.clone(), r"the residual PyTreeSpec\(\[\*\]\)"),
        (
            lambda x, a: {"u": x["u"] - a},
            lambda a: {"u": a.clone(), "v": a.clone()},
            r"structure and shapes",
        ),
    ],
)
def test_optimality_fn_of_the_wrong_structure_or_shape_is_a_value_error(
    optimality, solution, pattern
):
    solver = custom_root(optimality)(lambda x, a: solution(a))
    with pytest.raises(ValueError, match=pattern):
        solver(None, torch.ones(2, dtype=D, requires_grad=True))


def test_custom_root_argument_errors():
    F = lambda x, a: x - a
    with pytest.raises(TypeError, match=r"expected a callable, got int"):
        custom_root(3)
    with pytest.raises(TypeError, match=r"expected solve to be a linear solver"):
        custom_root(F, solve="cg")
    with pytest.raises(ValueError, match=r"expected if_not_converged in"):
        custom_root(F, if_not_converged="never")
    with pytest.raises(TypeError, match=r"expected on_solve to be callable or None"):
        custom_root(F, on_solve=3)
    with pytest.raises(TypeError, match=r"\(solver\): expected a callable"):
        custom_root(F)(3)
    with pytest.raises(TypeError, match=r"has_aux=True, so the solver must return"):
        custom_root(F, has_aux=True)(lambda x, a: a.clone())(None, torch.ones(2))
    with pytest.raises(TypeError, match=r"pytree of floating-point tensors"):
        custom_root(F)(lambda x, a: torch.ones(2, dtype=torch.long))(None, torch.ones(2))
    with pytest.raises(TypeError, match=r"expected a callable"):
        custom_fixed_point(None)


def _cos_fixed_point(a: float) -> float:
    return _bisect(lambda x: x - math.cos(a * x), 0.0, 1.0)


def test_fixed_point_of_cos_against_bisection():
    """x = cos(a x); oracle: bisection, its central differences, and -x s / (1 + a s),
    s = sin(a x) (differentiating the fixed-point equation by hand)."""
    T = lambda x, a: torch.cos(a * x)

    @custom_fixed_point(T)
    def iterate(x, a):
        for _ in range(300):
            x = T(x, a)
        return x

    for a_value in (0.3, 0.7, 1.0):  # |dT/dx| <= 0.7: 300 iterations converge
        x_true = _cos_fixed_point(a_value)
        s = math.sin(a_value * x_true)
        dx_true = -x_true * s / (1 + a_value * s)
        h = 1e-6
        assert (_cos_fixed_point(a_value + h) - _cos_fixed_point(a_value - h)) / (
            2 * h
        ) == pytest.approx(dx_true, rel=1e-7)
        a = torch.tensor(a_value, dtype=D, requires_grad=True)
        x = iterate(torch.tensor(0.0, dtype=D), a)
        assert x.item() == pytest.approx(x_true, abs=1e-13)
        (dx,) = torch.autograd.grad(x, a)
        assert dx.item() == pytest.approx(dx_true, rel=1e-9)


def test_fixed_point_of_a_linear_contraction_on_a_pytree():
    """x = B x + c on x = {"p": (2,), "q": ()}: x* = (I - B)^-1 c, dL/dc = (I - B)^-T g,
    dL/dB = (I - B)^-T g x*' for L = g'x*."""
    g = torch.Generator().manual_seed(4)
    B = torch.randn(3, 3, generator=g, dtype=D)
    B = (0.6 * B / torch.linalg.matrix_norm(B, ord=2)).requires_grad_()
    c = torch.randn(3, generator=g, dtype=D, requires_grad=True)
    gvec = torch.randn(3, generator=g, dtype=D)
    like = {"p": torch.zeros(2, dtype=D), "q": torch.zeros((), dtype=D)}
    T = lambda x, B, c: _unflat(B @ _flat(x) + c, like)

    @custom_fixed_point(T, solve=solve_dense)
    def iterate(x, B, c):
        for _ in range(200):
            x = T(x, B, c)
        return x

    x = iterate(like, B, c)
    assert x["q"].shape == ()
    eye = torch.eye(3, dtype=D)
    x_true = torch.linalg.solve(eye - B.detach(), c.detach())
    torch.testing.assert_close(_flat(x), x_true, rtol=1e-12, atol=1e-12)
    gB, gc = torch.autograd.grad(_flat(x) @ gvec, (B, c))
    u = torch.linalg.solve((eye - B.detach()).T, gvec)
    torch.testing.assert_close(gc, u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gB, torch.outer(u, x_true), rtol=1e-10, atol=1e-12)


def test_whether_the_linear_solver_takes_rmatvec_is_read_through_partials():
    """The backward pass hands ``rmatvec`` to solvers that take it (read without
    ``inspect.signature`` of the partial on every iMAML call, cached by function)."""
    from metafunc.implicit._root import _takes_rmatvec

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, matvec, b, rmatvec=None):
            return b

    assert _takes_rmatvec(solve_normal_cg)
    assert _takes_rmatvec(functools.partial(solve_normal_cg, maxiter=5))
    assert not _takes_rmatvec(functools.partial(solve_normal_cg, rmatvec=lambda v: v))
    assert not _takes_rmatvec(functools.partial(solve_cg, tol=0))
    assert _takes_rmatvec(lambda matvec, b, rmatvec=None: b)
    assert _takes_rmatvec(Unhashable())
