"""``metafunc.implicit`` against independent oracles.

Oracles: closed forms differentiated by hand; ``numpy.roots``, pure-Python bisection and a Newton
solver written with ``torch.autograd.functional`` (no metafunc) with central finite differences of
them in float64; ``torch.linalg.solve`` on the dense matrix; a Python loop over tasks for every
vmapped path; a long second-order unroll with :func:`metafunc.inner_loop` (implicit == unrolled at
convergence).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import optree
import pytest
import torch
from _purity import assert_unchanged, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metafunc
import metafunc.optim as mo
from metafunc.implicit import (
    IMAMLResult,
    ImplicitSolveWarning,
    SolveInfo,
    custom_fixed_point,
    custom_root,
    imaml,
    solve_cg,
    solve_dense,
    solve_neumann,
    solve_normal_cg,
)

D = torch.float64

# the `device` fixture is a plain parameter, safe to share across hypothesis examples
with_device = settings(
    suppress_health_check=[
        *settings.default.suppress_health_check,
        HealthCheck.function_scoped_fixture,
    ]
)


# ----------------------------------------------------------------------------------- helpers
def _flat(tree) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in optree.tree_leaves(tree)])


def _unflat(vec: torch.Tensor, like):
    leaves, spec = optree.tree_flatten(like)
    parts = torch.split(vec, [x.numel() for x in leaves])
    return optree.tree_unflatten(spec, [p.reshape(x.shape) for p, x in zip(parts, leaves)])


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    return q * torch.sign(torch.diagonal(r))


def _spd(n: int, g: torch.Generator, lo: float = 1.0, hi: float = 3.0) -> torch.Tensor:
    """A random SPD matrix with eigenvalues in [lo, hi] (both attained when n > 1)."""
    q = _orthogonal(n, g)
    ev = lo + (hi - lo) * torch.rand(n, generator=g, dtype=D)
    if n > 1:
        ev[0], ev[1] = lo, hi
    return (q * ev) @ q.T


def _nonsymmetric(n: int, g: torch.Generator) -> torch.Tensor:
    """A random nonsymmetric matrix with singular values in [0.5, 2]."""
    s = 0.5 + 1.5 * torch.rand(n, generator=g, dtype=D)
    return (_orthogonal(n, g) * s) @ _orthogonal(n, g).T


def _graph_nodes(tensors) -> int:
    """Autograd nodes reachable from the tensors' grad_fn."""
    seen, stack = set(), [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def _bisect(g, lo: float, hi: float, iters: int = 200) -> float:
    """The root of an increasing g on [lo, hi] by bisection (pure Python floats)."""
    assert g(lo) < 0 < g(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if g(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ================================================================ custom_root: the cubic root
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


# ====================================================================== custom_root: errors
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


# ============================================================ custom_root: ridge regression
# argmin_w ||X w - y||^2 + lam ||w||^2, closed form w* = (X'X + lam I)^-1 X'y.
def ridge_grad(w, X, y, lam):
    return 2 * (X.T @ (X @ w - y) + lam * w)


def _ridge_gd(w, X, y, lam):
    """Gradient descent with step 1/L; X has singular values in [1, 2] so it converges fast."""
    step = 1 / (2 * (torch.linalg.matrix_norm(X, ord=2) ** 2 + lam))
    for _ in range(300):
        w = w - step * ridge_grad(w, X, y, lam)
    return w


def _ridge_problem(seed: int, m: int = 8, d: int = 3, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    u = _orthogonal(m, g)[:, :d]
    X = (u * (1 + torch.rand(d, generator=g, dtype=D))) @ _orthogonal(d, g).T
    y = torch.randn(m, generator=g, dtype=D)
    c = torch.randn(d, generator=g, dtype=D)
    lam = 0.5 + torch.rand((), generator=g, dtype=D)
    return X.to(device), y.to(device), lam.to(device), c.to(device)


def _ridge_closed_form(X, y, lam):
    M = X.T @ X + lam * torch.eye(X.shape[1], dtype=D, device=X.device)
    return torch.linalg.solve(M, X.T @ y), M


def _ridge_jac_X_fd(X, y, lam, h=1e-6) -> np.ndarray:
    """dw*/dX by central differences of the closed form in numpy, shape (d, m, d)."""
    Xn, yn, ln = X.cpu().numpy(), y.cpu().numpy(), float(lam)
    w = lambda Xn: np.linalg.solve(Xn.T @ Xn + ln * np.eye(Xn.shape[1]), Xn.T @ yn)
    jac = np.zeros((Xn.shape[1], *Xn.shape))
    for idx in np.ndindex(*Xn.shape):
        e = np.zeros_like(Xn)
        e[idx] = h
        jac[(slice(None), *idx)] = (w(Xn + e) - w(Xn - e)) / (2 * h)
    return jac


RIDGE_SOLVERS = {"normal_cg": solve_normal_cg, "cg": solve_cg, "dense": solve_dense}


@pytest.mark.parametrize("solver", list(RIDGE_SOLVERS))
def test_ridge_regression_jacrev_matches_closed_form(solver, device):
    """dw/dlam = -M^-1 w*, dw/dy = M^-1 X' (by hand); dw/dX by finite differences (numpy)."""
    X, y, lam, _ = _ridge_problem(0, device=device)
    root = custom_root(ridge_grad, RIDGE_SOLVERS[solver])(_ridge_gd)
    init = torch.zeros(X.shape[1], dtype=D, device=device)
    w_star, M = _ridge_closed_form(X, y, lam)
    torch.testing.assert_close(root(init, X, y, lam), w_star, rtol=1e-12, atol=1e-12)
    jl, jX, jy = torch.func.jacrev(lambda lam, X, y: root(init, X, y, lam), argnums=(0, 1, 2))(
        lam, X, y
    )
    torch.testing.assert_close(jl, -torch.linalg.solve(M, w_star), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(jy, torch.linalg.solve(M, X.T), rtol=1e-9, atol=1e-11)
    fd = torch.from_numpy(_ridge_jac_X_fd(X, y, lam)).to(device)
    torch.testing.assert_close(jX, fd, rtol=1e-6, atol=1e-8)


def test_ridge_regression_backward_with_kwargs_and_passthrough_args(device):
    """.backward() to X, y (a keyword) and lam (a keyword); a Python float, an int tensor and None
    among the arguments pass through. Oracle: closed form and numpy finite differences."""
    X, y, lam, c = _ridge_problem(1, device=device)
    seen = {}

    def optimality(w, X, counts, *, y, lam, scale, note=None):
        return ridge_grad(w, X, y, lam) * scale

    @custom_root(optimality, solve_cg)
    def solver(w, X, counts, *, y, lam, scale, note=None):
        seen.update(
            counts=counts, scale=scale, note=note, grads=(X.requires_grad, lam.requires_grad)
        )
        return _ridge_gd(w, X, y, lam)

    counts = torch.arange(3)
    X.requires_grad_(), y.requires_grad_(), lam.requires_grad_()
    init = torch.zeros(X.shape[1], dtype=D, device=device)
    snap = snapshot((X, y, lam, init, counts))
    w = solver(init, X, counts, y=y, lam=lam, scale=3.0)
    (w @ c).backward()
    assert_unchanged(snap)
    assert torch.equal(seen["counts"], counts) and seen["scale"] == 3.0 and seen["note"] is None
    assert seen["grads"] == (False, False)  # the solver runs on detached arguments
    w_star, M = _ridge_closed_form(X.detach(), y.detach(), lam.detach())
    u = torch.linalg.solve(M, c)  # M symmetric: d(c'w)/dy = X M^-1 c, d/dlam = -u'w
    torch.testing.assert_close(y.grad, X.detach() @ u, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(lam.grad, -(u @ w_star), rtol=1e-9, atol=1e-11)
    fd = torch.from_numpy(_ridge_jac_X_fd(X.detach(), y.detach(), lam.detach())).to(device)
    torch.testing.assert_close(X.grad, torch.einsum("d,dij->ij", c, fd), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("strategy", ["torch.func.vmap", "vmap_tasks"])
def test_ridge_regression_vmap_over_tasks_equals_loop(strategy, device):
    tasks = [_ridge_problem(s, device=device) for s in range(4)]
    X = torch.stack([t[0] for t in tasks])
    y = torch.stack([t[1] for t in tasks]).requires_grad_()
    lam = tasks[0][2].clone().requires_grad_()  # shared across tasks
    c = tasks[0][3]
    infos = []
    root = custom_root(ridge_grad, solve_cg, on_solve=infos.append)(_ridge_gd)
    init = torch.zeros(X.shape[-1], dtype=D, device=device)
    per_task = lambda X, y, lam: root(init, X, y, lam) @ c
    if strategy == "vmap_tasks":
        mapped = metafunc.vmap_tasks(per_task, in_dims=(0, 0, None), strategy="vmap")
    else:
        mapped = torch.func.vmap(per_task, in_dims=(0, 0, None))
    out = mapped(X, y, lam)
    out.sum().backward()
    assert len(infos) == 1 and all(f.shape == (4,) for f in infos[0])
    assert bool(infos[0].converged.all())

    lam_loop = lam.detach().clone().requires_grad_()
    y_loop = y.detach().clone().requires_grad_()
    loop = torch.stack([per_task(X[i], y_loop[i], lam_loop) for i in range(4)])
    loop.sum().backward()
    assert len(infos) == 5 and all(f.shape == () for f in infos[-1])
    torch.testing.assert_close(out, loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lam.grad, lam_loop.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y.grad, y_loop.grad, rtol=1e-10, atol=1e-12)
    # and the closed form per task
    for i in range(4):
        _, M = _ridge_closed_form(X[i], y[i].detach(), lam.detach())
        torch.testing.assert_close(
            y.grad[i], X[i] @ torch.linalg.solve(M, c), rtol=1e-9, atol=1e-11
        )


def test_has_aux_passes_aux_through_undifferentiated():
    X, y, lam, c = _ridge_problem(2)
    lam.requires_grad_()

    @custom_root(ridge_grad, solve_cg, has_aux=True)
    def solver(w, X, y, lam):
        w = _ridge_gd(w, X, y, lam)
        return w, {"objective": ((X @ w - y) ** 2).sum() + lam * (w @ w), "name": "gd"}

    w, aux = solver(torch.zeros(3, dtype=D), X, y, lam)
    assert aux["name"] == "gd" and not aux["objective"].requires_grad
    w_star, M = _ridge_closed_form(X, y, lam.detach())
    expected = ((X @ w_star - y) ** 2).sum() + lam.detach() * (w_star @ w_star)
    torch.testing.assert_close(aux["objective"], expected, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(w @ c, lam)
    torch.testing.assert_close(g, -(torch.linalg.solve(M, c) @ w_star), rtol=1e-9, atol=1e-11)


def test_init_gets_no_gradient_and_graph_does_not_grow_with_solver_iterations():
    X, y, lam, _ = _ridge_problem(3)
    lam.requires_grad_()
    init = torch.zeros(3, dtype=D, requires_grad=True)
    sizes = []
    for iters in (10, 100):

        @custom_root(ridge_grad, solve_cg)
        def solver(w, X, y, lam, iters=iters):
            step = 1 / (2 * (torch.linalg.matrix_norm(X, ord=2) ** 2 + lam))
            for _ in range(iters):
                w = w - step * ridge_grad(w, X, y, lam)
            return w

        w = solver(init, X, y, lam)
        sizes.append(_graph_nodes([w]))
        g_init, g_lam = torch.autograd.grad(w.sum(), (init, lam), allow_unused=True)
        assert g_init is None and g_lam is not None
    assert sizes[0] == sizes[1] <= 3


# ======================================================================= custom_fixed_point
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


# ========================================================================== non-convergence
def _unconverged(**kwargs):
    """Ridge regression whose backward CG gets one product for a 4-dim solve."""
    X, y, lam, c = _ridge_problem(5, d=4)
    lam.requires_grad_()
    root = custom_root(ridge_grad, functools.partial(solve_cg, maxiter=1), **kwargs)(_ridge_gd)
    return root(torch.zeros(4, dtype=D), X, y, lam) @ c, lam


def test_unconverged_linear_solve_warns_by_default_and_reports_to_on_solve():
    infos = []
    out, lam = _unconverged(on_solve=infos.append)
    with pytest.warns(ImplicitSolveWarning, match=r"without reaching its tolerance"):
        out.backward()
    assert lam.grad is not None
    (info,) = infos
    assert isinstance(info, SolveInfo)
    assert info.iterations.dtype == torch.long and int(info.iterations) == 1
    assert info.converged.dtype == torch.bool and not bool(info.converged)
    assert info.residual.shape == () and float(info.residual) > 0


def test_unconverged_linear_solve_raises_or_is_ignored_on_request():
    out, _ = _unconverged(if_not_converged="raise")
    with pytest.raises(RuntimeError, match=r"without reaching its tolerance.*maxiter"):
        out.backward()
    out, lam = _unconverged(if_not_converged="ignore")
    out.backward()  # filterwarnings=error: any warning would fail here
    assert lam.grad is not None


def test_unconverged_under_vmap_reports_one_entry_per_task():
    infos = []
    X = torch.stack([_ridge_problem(s, d=4)[0] for s in range(3)])
    y = torch.stack([_ridge_problem(s, d=4)[1] for s in range(3)])
    root = custom_root(ridge_grad, functools.partial(solve_cg, maxiter=1), on_solve=infos.append)(
        _ridge_gd
    )
    lam = torch.tensor(1.0, dtype=D)
    per_task = lambda X, y, lam: root(torch.zeros(4, dtype=D), X, y, lam).sum()
    with pytest.warns(ImplicitSolveWarning):
        torch.func.vmap(torch.func.grad(per_task, argnums=2), in_dims=(0, 0, None))(X, y, lam)
    (info,) = infos
    assert info.residual.shape == info.iterations.shape == info.converged.shape == (3,)
    assert info.iterations.tolist() == [1, 1, 1] and not bool(info.converged.any())


# ============================================================================ linear solvers
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


# ==================================================================================== iMAML
def quadratic(p, batch):
    A, b = batch
    return 0.5 * p["w"] @ A @ p["w"] - b @ p["w"]


TIGHT = functools.partial(solve_cg, tol=1e-12, maxiter=200)


@with_device
@given(n=st.integers(1, 4), seed=st.integers(0, 2**20), lam=st.floats(0.5, 4.0))
def test_imaml_quadratic_closed_form(n, seed, lam, device):
    """phi* = M^-1 (b + lam theta), M = A + lam I; dL/dtheta = lam M^-1 (phi* - c) and
    dL/dlam = (phi* - c)' M^-1 (theta - phi*) for L = |phi* - c|^2 / 2."""
    g = torch.Generator().manual_seed(seed)
    A = _spd(n, g, 0.5, 3.0).to(device)
    b, c, theta0 = (torch.randn(n, generator=g, dtype=D).to(device) for _ in range(3))
    theta = theta0.clone().requires_grad_()
    lam_t = torch.tensor(lam, dtype=D, device=device, requires_grad=True)
    lr = 2 / (3.5 + 2 * lam)  # contraction 2.5 / (3.5 + 2 lam) <= 5/9
    snap = snapshot((theta, A, b))
    r = imaml(quadratic, {"w": theta}, mo.sgd(lr=lr), (A, b), lam=lam_t, steps=70, solve=TIGHT)
    assert isinstance(r, IMAMLResult) and r.losses.shape == (70,)
    M = A + lam * torch.eye(n, dtype=D, device=device)
    phi = torch.linalg.solve(M, b + lam * theta0)
    torch.testing.assert_close(r.params["w"].detach(), phi, rtol=1e-11, atol=1e-11)
    assert float(r.grad_norm) < 1e-10
    g_theta, g_lam = torch.autograd.grad(0.5 * ((r.params["w"] - c) ** 2).sum(), (theta, lam_t))
    torch.testing.assert_close(g_theta, lam * torch.linalg.solve(M, phi - c), rtol=1e-8, atol=1e-10)
    expected_lam = (phi - c) @ torch.linalg.solve(M, theta0 - phi)
    torch.testing.assert_close(g_lam, expected_lam, rtol=1e-8, atol=1e-10)
    assert_unchanged(snap)


# f(phi) = sin(3 phi) + 0.5 sin(5 phi + 1) + 0.1 phi^2: |f''| <= 21.7, so lam = 25 makes the
# regularised problem strongly convex (curvature >= 3.3) while f''(phi*) may be negative.
LAM_1D = 25.0


def wiggly(p, _):
    x = p["w"]
    return (torch.sin(3 * x) + 0.5 * torch.sin(5 * x + 1) + 0.1 * x**2).sum()


def _wiggly_prime(x):
    return 3 * math.cos(3 * x) + 2.5 * math.cos(5 * x + 1) + 0.2 * x


def _wiggly_second(x):
    return -9 * math.sin(3 * x) - 12.5 * math.sin(5 * x + 1) + 0.2


def _wiggly_phi(theta: float) -> float:
    """The regularised minimiser by bisection of f'(phi) + lam (phi - theta) (increasing)."""
    return _bisect(lambda x: _wiggly_prime(x) + LAM_1D * (x - theta), theta - 1, theta + 1)


def test_imaml_one_dimensional_identity_on_a_nonconvex_loss():
    """d phi*/d theta = lam / (lam + f''(phi*)), and central differences of the bisection
    solution, at several theta (the coordinates are independent problems)."""
    thetas = [-1.3, -0.4, 0.2, 0.9, 1.7]
    theta = torch.tensor(thetas, dtype=D, requires_grad=True)
    r = imaml(wiggly, {"w": theta}, mo.sgd(lr=1 / 47), None, lam=LAM_1D, steps=500, solve=TIGHT)
    assert float(r.grad_norm) < 1e-11
    (jac,) = torch.autograd.grad(r.params["w"].sum(), theta)  # diagonal Jacobian
    h = 1e-5
    curvatures = []
    for i, t in enumerate(thetas):
        phi = _wiggly_phi(t)
        assert r.params["w"][i].item() == pytest.approx(phi, abs=1e-12)
        curvatures.append(_wiggly_second(phi))
        fd = (_wiggly_phi(t + h) - _wiggly_phi(t - h)) / (2 * h)
        assert fd == pytest.approx(LAM_1D / (LAM_1D + curvatures[-1]), rel=1e-7)
        assert jac[i].item() == pytest.approx(fd, rel=1e-7)
    assert min(curvatures) < 0  # the non-convex part is exercised (a derivative above 1)


def _tanh_problem(seed: int, n_in: int = 3, m: int = 6):
    g = torch.Generator().manual_seed(seed)
    theta = {
        "w": 0.5 * torch.randn(n_in, generator=g, dtype=D),
        "b": 0.1 * torch.randn((), generator=g, dtype=D),
    }
    support = (torch.randn(m, n_in, generator=g, dtype=D), torch.randn(m, generator=g, dtype=D))
    query = (torch.randn(m, n_in, generator=g, dtype=D), torch.randn(m, generator=g, dtype=D))
    return theta, support, query


def tanh_mse(p, batch):
    x, y = batch
    return ((torch.tanh(x @ p["w"] + p["b"]) - y) ** 2).mean()


def test_imaml_equals_a_second_order_unroll_run_to_convergence():
    """Oracle: metafunc.inner_loop on the proximal loss (theta in the init and the prox term),
    differentiated through every step."""
    theta0, support, query = _tanh_problem(0)
    lam, lr = 2.0, 0.25
    theta = {k: v.clone().requires_grad_() for k, v in theta0.items()}
    r = imaml(tanh_mse, theta, mo.sgd(lr=lr), support, lam=lam, steps=150, solve=TIGHT)
    implicit = torch.autograd.grad(tanh_mse(r.params, query), list(theta.values()))

    def prox(p, batch):
        return tanh_mse(p, batch) + 0.5 * lam * sum(((p[k] - theta[k]) ** 2).sum() for k in p)

    unrolled = metafunc.inner_loop(prox, theta, mo.sgd(lr=lr), support, steps=150, record="none")
    for k in theta:
        torch.testing.assert_close(r.params[k], unrolled.params[k], rtol=1e-12, atol=1e-12)
    expected = torch.autograd.grad(tanh_mse(unrolled.params, query), list(theta.values()))
    for got, want in zip(implicit, expected):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def _mlp(seed: int):
    g = torch.Generator().manual_seed(seed)
    theta = {
        "w0": torch.randn(3, 2, generator=g, dtype=D) / 2**0.5,
        "b0": 0.1 * torch.randn(3, generator=g, dtype=D),
        "w1": torch.randn(1, 3, generator=g, dtype=D) / 3**0.5,
        "b1": 0.1 * torch.randn(1, generator=g, dtype=D),
    }
    data = [torch.randn(5, k, generator=g, dtype=D) for k in (2, 1, 2, 1)]
    return theta, (data[0], data[1]), (data[2], data[3])


def mlp_mse(p, batch):
    x, y = batch
    h = torch.tanh(x @ p["w0"].T + p["b0"])
    return ((h @ p["w1"].T + p["b1"] - y) ** 2).mean()


def _newton_adapt(theta: dict, support, lam: float) -> dict:
    """The regularised minimiser with no metafunc: Newton steps from theta with the Hessian of
    torch.autograd.functional (float64, to machine precision; the problem is strongly convex)."""
    flat0 = _flat(theta).detach()

    def objective(v):
        phi = _unflat(v, theta)
        return mlp_mse(phi, support) + 0.5 * lam * ((v - flat0) ** 2).sum()

    v = flat0.clone()
    for _ in range(6):
        grad = torch.autograd.functional.jacobian(objective, v)
        v = v - torch.linalg.solve(torch.autograd.functional.hessian(objective, v), grad)
    assert float(torch.linalg.vector_norm(torch.autograd.functional.jacobian(objective, v))) < 1e-13
    return _unflat(v, theta)


def test_imaml_meta_gradient_and_lam_gradient_match_finite_differences_on_an_mlp():
    """Central differences of L_query(phi*(theta)) and of L_query(phi*(lam)), phi* from the
    independent Newton solver."""
    theta0, support, query = _mlp(0)
    lam = 2.0  # the support loss's Hessian at theta has eigenvalues in [-0.96, 3.5]
    theta = {k: v.clone().requires_grad_() for k, v in theta0.items()}
    lam_t = torch.tensor(lam, dtype=D, requires_grad=True)
    r = imaml(mlp_mse, theta, mo.sgd(lr=0.25), support, lam=lam_t, steps=200, solve=TIGHT)
    assert float(r.grad_norm) < 1e-12
    *grads, g_lam = torch.autograd.grad(mlp_mse(r.params, query), [*theta.values(), lam_t])
    analytic = torch.cat([_flat(dict(zip(theta, grads))), g_lam.reshape(1)])  # optree order

    meta = lambda flat, lam: mlp_mse(_newton_adapt(_unflat(flat, theta0), support, lam), query)
    flat0, h = _flat(theta0), 1e-5
    fd = []
    for i in range(flat0.numel()):
        e = torch.zeros_like(flat0)
        e[i] = h
        fd.append((meta(flat0 + e, lam) - meta(flat0 - e, lam)) / (2 * h))
    fd.append((meta(flat0, lam + h) - meta(flat0, lam - h)) / (2 * h))
    torch.testing.assert_close(analytic, torch.stack(fd), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("strategy", ["vmap_tasks", "torch.func.vmap"])
def test_imaml_vmap_over_tasks_equals_a_loop(strategy, device):
    problems = [_tanh_problem(s) for s in range(3)]
    theta0 = {k: v.to(device) for k, v in problems[0][0].items()}
    support = metafunc.stack_tasks([p[1] for p in problems])
    query = metafunc.stack_tasks([p[2] for p in problems])
    support, query = optree.tree_map(lambda x: x.to(device), (support, query))
    infos = []

    def per_task(theta, support, query):
        r = imaml(
            tanh_mse,
            theta,
            mo.sgd(lr=0.25),
            support,
            lam=2.0,
            steps=60,
            solve=TIGHT,
            on_solve=infos.append,
        )
        return tanh_mse(r.params, query), r.params, r.losses, r.grad_norm

    if strategy == "vmap_tasks":
        mapped = metafunc.vmap_tasks(per_task, in_dims=(None, 0, 0), strategy="vmap")
    else:
        mapped = torch.func.vmap(per_task, in_dims=(None, 0, 0))
    theta = {k: v.clone().requires_grad_() for k, v in theta0.items()}
    losses, params, inner_losses, grad_norms = mapped(theta, support, query)
    assert losses.shape == (3,) and inner_losses.shape == (3, 60) and grad_norms.shape == (3,)
    assert params["w"].shape == (3, 3) and params["b"].shape == (3,)
    losses.sum().backward()
    (info,) = infos
    assert info.residual.shape == info.iterations.shape == info.converged.shape == (3,)
    assert bool(info.converged.all())

    infos.clear()
    theta_loop = {k: v.clone().requires_grad_() for k, v in theta0.items()}
    tasks = metafunc.unstack_tasks((support, query))
    outs = [per_task(theta_loop, *task) for task in tasks]
    torch.stack([o[0] for o in outs]).sum().backward()
    assert len(infos) == 3 and all(f.shape == () for i in infos for f in i)
    torch.testing.assert_close(losses, torch.stack([o[0] for o in outs]), rtol=1e-12, atol=1e-12)
    for k in theta:
        torch.testing.assert_close(params[k], torch.stack([o[1][k] for o in outs]))
        torch.testing.assert_close(theta[k].grad, theta_loop[k].grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(inner_losses, torch.stack([o[2] for o in outs]))
    torch.testing.assert_close(info.iterations, torch.stack([i.iterations for i in infos]))


def test_imaml_torch_func_grad_equals_backward():
    theta0, support, query = _tanh_problem(5)
    kwargs = {"lam": 2.0, "steps": 80, "solve": TIGHT}
    meta = lambda theta: tanh_mse(
        imaml(tanh_mse, theta, mo.sgd(lr=0.25), support, **kwargs).params, query
    )
    functional = torch.func.grad(meta)(theta0)
    theta = {k: v.clone().requires_grad_() for k, v in theta0.items()}
    meta(theta).backward()
    for k in theta:
        torch.testing.assert_close(functional[k], theta[k].grad, rtol=1e-12, atol=1e-14)


def test_imaml_graph_does_not_grow_with_inner_steps_and_inputs_are_unchanged():
    theta0, support, query = _tanh_problem(6)
    theta = {k: v.clone().requires_grad_() for k, v in theta0.items()}
    lam = torch.tensor(2.0, dtype=D, requires_grad=True)
    sizes = []
    for steps in (20, 200):  # both solve the inner problem (residual ratio < 1e-3)
        snap = snapshot((theta, support, lam))
        r = imaml(tanh_mse, theta, mo.sgd(lr=0.25), support, lam=lam, steps=steps, solve=TIGHT)
        assert not r.losses.requires_grad and not r.grad_norm.requires_grad
        sizes.append(_graph_nodes(list(r.params.values())))
        tanh_mse(r.params, query).backward()
        assert_unchanged(snap)
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"lam": 0.0}, ValueError, r"expected lam to be positive and finite"),
        ({"lam": -1.0}, ValueError, r"expected lam to be positive and finite"),
        ({"lam": math.nan}, ValueError, r"expected lam to be positive and finite"),
        ({"lam": math.inf}, ValueError, r"expected lam to be positive and finite"),
        ({"lam": torch.tensor(math.inf, dtype=D)}, ValueError, r"positive and finite"),
        ({"lam": True}, ValueError, r"expected lam to be positive and finite"),
        ({"lam": torch.ones(2, dtype=D)}, ValueError, r"1-element floating tensor"),
        ({"lam": torch.tensor(1)}, ValueError, r"1-element floating tensor"),
        ({"steps": 0}, ValueError, r"expected steps to be a positive int"),
        ({"steps": 2.0}, ValueError, r"expected steps to be a positive int"),
        ({"steps": True}, ValueError, r"expected steps to be a positive int"),
        ({"params": [torch.ones(2, dtype=D)]}, TypeError, r"non-empty dict of tensors"),
        ({"params": {}}, TypeError, r"non-empty dict of tensors"),
        ({"loss_fn": 3}, TypeError, r"expected loss_fn to be callable"),
        ({"if_not_converged": "maybe"}, ValueError, r"expected if_not_converged in"),
    ],
)
def test_imaml_argument_errors(kwargs, error, pattern):
    args = {
        "loss_fn": lambda p, b: (p["w"] ** 2).sum(),
        "params": {"w": torch.ones(2, dtype=D)},
        "opt": mo.sgd(lr=0.1),
        "batch": None,
        "lam": 1.0,
        "steps": 3,
    }
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        imaml(args.pop("loss_fn"), args.pop("params"), args.pop("opt"), args.pop("batch"), **args)


@pytest.mark.parametrize("lam", [0.0, -1.0])
def test_imaml_rejects_a_nonpositive_tensor_lam(lam):
    """The documented contract is lam > 0; a tensor lam <= 0 must not silently solve a
    non-proximal (possibly unbounded) problem."""
    with pytest.raises(ValueError, match=r"lam"):
        imaml(
            lambda p, b: (p["w"] ** 2).sum(),
            {"w": torch.ones(2, dtype=D)},
            mo.sgd(lr=0.1),
            None,
            lam=torch.tensor(lam, dtype=D),
            steps=3,
        )
