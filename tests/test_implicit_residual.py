"""Unconverged implicit solves are flagged: the optimality residual at the returned solution.

The implicit function theorem differentiates the root of ``F``; a solver stopped early returns a
point where ``F != 0`` and the implicit gradient there is wrong. Oracles: Newton's method on the
cubic in pure Python floats (the returned point, its residual, the derivative formula there); the
closed form of gradient descent on a quadratic (``F_T = (I - lr M)^T F_0``); a per-task Python
loop for every vmapped path.
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import pytest
import torch
from torch import nn

import metafunc
import metafunc.optim as mo
from metafunc.algorithms import IMAML
from metafunc.implicit import (
    ImplicitSolveWarning,
    SolveInfo,
    custom_fixed_point,
    custom_root,
    imaml,
    solve_cg,
)

D = torch.float64
DX_DA = -0.5924469933  # at the real root of a x^3 - x - 2, a = 1 (tests/test_implicit_root.py)


# ========================================================================== custom_root
def cubic(x, a):
    return a * x**3 - x - 2


def _newton_python(a: float, steps: int, x: float = 1.0) -> tuple[float, float, float]:
    """Newton's method in Python floats: the point, |F| there, and -x^3 / (3 a x^2 - 1) (the
    implicit function theorem's derivative evaluated at that point)."""
    for _ in range(steps):
        x = x - (a * x**3 - x - 2) / (3 * a * x**2 - 1)
    return x, abs(a * x**3 - x - 2), -(x**3) / (3 * a * x**2 - 1)


def _newton(steps: int, **kwargs):
    @custom_root(cubic, **kwargs)
    def newton(x, a):
        for _ in range(steps):
            x = x - cubic(x, a) / (3 * a * x**2 - 1)
        return x

    return newton


def test_two_newton_steps_leave_residual_075_and_a_wrong_gradient_that_now_warns(device):
    """The issue's example: |F(x)| = 0.745 at the returned point, dx/da = -0.623 instead of
    -0.592; the warning names the residual and the tolerance (1e-3 * |F(init)| = 0.002)."""
    x2, residual, formula = _newton_python(1.0, 2)
    assert residual == pytest.approx(0.7453, abs=1e-4)
    a = torch.tensor(1.0, dtype=D, device=device, requires_grad=True)
    x = _newton(2)(torch.tensor(1.0, dtype=D, device=device), a)
    assert x.item() == pytest.approx(x2, rel=1e-14)
    pattern = rf"{re.escape(f'{residual:.3g}')} at the returned solution.*tolerance 0\.002"
    with pytest.warns(ImplicitSolveWarning, match=pattern):
        (dx,) = torch.autograd.grad(x, a)
    assert dx.item() == pytest.approx(formula, rel=1e-9)  # the formula, at the wrong point
    assert formula == pytest.approx(-0.6230, abs=1e-4)
    assert abs(formula - DX_DA) > 0.03  # 5 % off

    with pytest.warns(ImplicitSolveWarning, match=r"0\.745 at the returned solution"):
        torch.func.grad(lambda a: _newton(2)(torch.tensor(1.0, dtype=D, device=device), a))(
            a.detach()
        )


def test_unconverged_root_raises_on_request_and_is_silent_when_ignored(device):
    init = torch.tensor(1.0, dtype=D, device=device)
    a = torch.tensor(1.0, dtype=D, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"custom_root\(\.\.\.\)\(newton\).*0\.745.*steps"):
        torch.autograd.grad(_newton(2, if_not_converged="raise")(init, a), a)
    (dx,) = torch.autograd.grad(_newton(2, if_not_converged="ignore")(init, a), a)  # no warning
    assert dx.item() == pytest.approx(_newton_python(1.0, 2)[2], rel=1e-9)


def test_ignore_evaluates_the_optimality_function_no_more_than_before(device):
    """With "ignore" the check costs nothing: F is not evaluated at init."""
    counts = {"ignore": 0, "warn": 0}

    def counting(policy):
        def F(x, a):
            counts[policy] += 1
            return cubic(x, a)

        return F

    for policy in counts:

        @custom_root(counting(policy), if_not_converged=policy)
        def newton(x, a):
            for _ in range(30):
                x = x - cubic(x, a) / (3 * a * x**2 - 1)
            return x

        a = torch.tensor(1.0, dtype=D, device=device, requires_grad=True)
        torch.autograd.grad(newton(torch.tensor(1.0, dtype=D, device=device), a), a)
    assert counts["ignore"] == counts["warn"] - 1


def test_on_solve_reports_the_optimality_residual(device):
    infos = []
    a = torch.tensor(1.0, dtype=D, device=device, requires_grad=True)
    init = torch.tensor(1.0, dtype=D, device=device)
    root = _newton(3, on_solve=infos.append, if_not_converged="ignore")
    torch.autograd.grad(root(init, a), a)
    torch.autograd.grad(_newton(30, on_solve=infos.append)(init, a), a)
    unconverged, converged = infos
    assert isinstance(unconverged, SolveInfo)
    assert unconverged.optimality.shape == () and unconverged.optimality.dtype == D
    assert unconverged.optimality.item() == pytest.approx(_newton_python(1.0, 3)[1], rel=1e-10)
    assert converged.optimality.item() < 1e-14
    assert bool(unconverged.converged)  # the linear solve did converge; the root did not


@pytest.mark.parametrize(
    ("tol", "atol", "warns"),
    [(0.38, 0.0, False), (0.37, 0.0, True), (0.0, 0.75, False), (0.0, 0.74, True)],
)
def test_the_tolerance_is_max_of_tol_times_the_residual_at_init_and_atol(tol, atol, warns, device):
    """|F| = 0.7453 at the solution and |F(init)| = 2: the threshold max(2 tol, atol)."""
    a = torch.tensor(1.0, dtype=D, device=device, requires_grad=True)
    x = _newton(2, tol=tol, atol=atol)(torch.tensor(1.0, dtype=D, device=device), a)
    if warns:
        with pytest.warns(ImplicitSolveWarning, match=rf"tol={tol:g}, atol={atol:g}"):
            torch.autograd.grad(x, a)
    else:
        torch.autograd.grad(x, a)


def test_an_init_that_is_not_a_point_needs_an_absolute_tolerance(device):
    a = torch.tensor(4.0, dtype=D, device=device, requires_grad=True)
    solver = lambda x, a: torch.ones_like(a)  # ignores init; F = a - 3 = 1 there
    with pytest.raises(ValueError, match=r"init is NoneType, not a point like the solution.*atol="):
        custom_root(cubic)(solver)(None, a)
    with pytest.raises(ValueError, match=r"init is list, not a point like the solution"):
        custom_root(cubic)(solver)([torch.ones_like(a)], a)
    custom_root(cubic, if_not_converged="ignore")(solver)(None, a)  # nothing to check
    x = custom_root(cubic, atol=0.5)(solver)(None, a)
    with pytest.warns(ImplicitSolveWarning, match=r"= 1 at the returned solution.*tolerance 0\.5"):
        torch.autograd.grad(x, a)
    x = custom_root(cubic, atol=1.5)(solver)(None, a)
    torch.autograd.grad(x, a)


def test_fixed_point_residual_is_t_of_x_minus_x(device):
    """x = cos(a x) by 3 iterations from 0: x3 = cos(a cos(a)) and |T(x3) - x3| in floats."""
    T = lambda x, a: torch.cos(a * x)

    @custom_fixed_point(T)
    def iterate(x, a):
        for _ in range(3):
            x = T(x, a)
        return x

    x3 = math.cos(0.5 * math.cos(0.5))
    residual = abs(math.cos(0.5 * x3) - x3)
    a = torch.tensor(0.5, dtype=D, device=device, requires_grad=True)
    x = iterate(torch.tensor(0.0, dtype=D, device=device), a)
    assert x.item() == pytest.approx(x3, rel=1e-14)
    with pytest.warns(ImplicitSolveWarning, match=re.escape(f"{residual:.3g} at the returned")):
        torch.autograd.grad(x, a)


def test_vmap_flags_the_unconverged_tasks_like_a_per_task_loop(device):
    """3 Newton steps: a = 1 is short of its root (|F| = 0.054 > 0.002), a = 2 and 4 are not."""
    a_values = [1.0, 2.0, 4.0]
    residuals = [_newton_python(a, 3)[1] for a in a_values]
    assert residuals[0] > 1e-3 * 2 and all(
        r < 1e-3 * abs(a - 3) for r, a in zip(residuals[1:], [2, 4])
    )
    init = torch.tensor(1.0, dtype=D, device=device)
    a_batch = torch.tensor(a_values, dtype=D, device=device)
    infos = []
    root = _newton(3, on_solve=infos.append)
    with pytest.warns(ImplicitSolveWarning, match=r"0\.0539 at the returned solution \(1 of 3"):
        dx = torch.func.vmap(torch.func.grad(lambda a: root(init, a)))(a_batch)
    (info,) = infos
    assert info.optimality.shape == (3,)
    torch.testing.assert_close(
        info.optimality.cpu(), torch.tensor(residuals, dtype=D), rtol=1e-9, atol=1e-14
    )
    formulas = [_newton_python(a, 3)[2] for a in a_values]
    torch.testing.assert_close(dx.cpu(), torch.tensor(formulas, dtype=D))

    infos.clear()
    flagged = []
    for a in a_batch:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.func.grad(lambda a: root(init, a))(a)
        flagged.append(any(issubclass(w.category, ImplicitSolveWarning) for w in caught))
    assert flagged == [True, False, False]
    loop = torch.stack([i.optimality for i in infos])
    torch.testing.assert_close(info.optimality, loop, rtol=1e-12, atol=0)

    with pytest.raises(RuntimeError, match=r"1 of 3 tasks"):
        strict = _newton(3, if_not_converged="raise")
        torch.func.vmap(torch.func.grad(lambda a: strict(init, a)))(a_batch)
    converged = _newton(6)
    torch.func.vmap(torch.func.grad(lambda a: converged(init, a)))(a_batch)  # silent


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"tol": -1.0}, r"expected tol to be a finite number >= 0.*got -1\.0"),
        ({"tol": float("nan")}, r"expected tol to be a finite number >= 0"),
        ({"atol": float("inf")}, r"expected atol to be a finite number >= 0"),
        ({"tol": True}, r"expected tol to be a finite number >= 0.*got True"),
        ({"atol": "0"}, r"expected atol to be a finite number >= 0"),
    ],
)
def test_tolerance_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=r"custom_root\(optimality_fn, solve=\.\.\.\): " + pattern):
        custom_root(cubic, **kwargs)
    with pytest.raises(ValueError, match=r"custom_fixed_point\(.*" + pattern):
        custom_fixed_point(cubic, **kwargs)
    with pytest.raises(ValueError, match=r"imaml\(.*" + pattern):
        imaml(
            lambda p, b: p["w"].sum(),
            {"w": torch.ones(1)},
            mo.sgd(lr=0.1),
            None,
            lam=1.0,
            steps=1,
            **kwargs,
        )
    fm = metafunc.functionalize(nn.Linear(1, 1))
    with pytest.raises(ValueError, match=r"IMAML\(model, \.\.\.\): " + pattern):
        IMAML(fm, **kwargs)


# ================================================================================ imaml
def quadratic(p, batch):
    A, b = batch
    return 0.5 * p["w"] @ A @ p["w"] - b @ p["w"]


def _gd_closed_form(A, b, theta, lam, lr, steps):
    """SGD on the proximal quadratic: F(phi) = M phi - b - lam theta with M = A + lam I, so
    F_T = (I - lr M)^T F_0 with F_0 = A theta - b, and phi_T = M^-1 (F_T + b + lam theta)."""
    eye = torch.eye(A.shape[0], dtype=D, device=A.device)
    M = A + lam * eye
    F_T = torch.linalg.matrix_power(eye - lr * M, steps) @ (A @ theta - b)
    return torch.linalg.solve(M, F_T + b + lam * theta), F_T, M


def _spd(g, device, lo=0.5, hi=3.0):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=D))
    return ((q * torch.tensor([lo, 1.7, hi], dtype=D)) @ q.T).to(device)


def test_imaml_with_too_few_inner_steps_warns_and_on_solve_gets_the_closed_form_residual(device):
    """5 steps at lr 0.1 (contraction 0.85): the implicit gradient lam M^-1 (phi_5 - c) is far
    from the true lam M^-1 (phi* - c); the warning names ||F(phi_5)||. 300 steps: silent."""
    g = torch.Generator().manual_seed(0)
    A = _spd(g, device)
    b, c, theta0 = (torch.randn(3, generator=g, dtype=D).to(device) for _ in range(3))
    lam, lr = 1.0, 0.1
    solve = functools.partial(solve_cg, tol=1e-12)
    infos = []
    theta = theta0.clone().requires_grad_()
    adapt = lambda steps, **kw: imaml(
        quadratic, {"w": theta}, mo.sgd(lr=lr), (A, b), lam=lam, steps=steps, solve=solve, **kw
    )
    r = adapt(5, on_solve=infos.append)
    phi_5, F_5, M = _gd_closed_form(A, b, theta0, lam, lr, 5)
    torch.testing.assert_close(r.params["w"].detach(), phi_5)
    residual = float(torch.linalg.vector_norm(F_5))
    assert float(r.grad_norm) == pytest.approx(residual, rel=1e-10)
    tolerance = 1e-3 * float(torch.linalg.vector_norm(A @ theta0 - b))
    pattern = (
        rf"imaml\(\.\.\.\).*{re.escape(f'{residual:.3g}')} at the returned solution.*"
        rf"tolerance {re.escape(f'{tolerance:.3g}')}.*steps="
    )
    with pytest.warns(ImplicitSolveWarning, match=pattern):
        (grad,) = torch.autograd.grad(0.5 * ((r.params["w"] - c) ** 2).sum(), theta)
    torch.testing.assert_close(grad, lam * torch.linalg.solve(M, phi_5 - c))
    true = lam * torch.linalg.solve(M, torch.linalg.solve(M, b + lam * theta0) - c)
    assert float(torch.linalg.vector_norm(grad - true) / torch.linalg.vector_norm(true)) > 0.05
    (info,) = infos
    assert float(info.optimality) == pytest.approx(residual, rel=1e-10)

    with pytest.raises(RuntimeError, match=r"imaml\(\.\.\.\).*at the returned solution"):
        torch.autograd.grad(adapt(5, if_not_converged="raise").params["w"].sum(), theta)
    torch.autograd.grad(adapt(5, if_not_converged="ignore").params["w"].sum(), theta)  # silent
    r = adapt(300)
    (grad,) = torch.autograd.grad(0.5 * ((r.params["w"] - c) ** 2).sum(), theta)  # silent
    torch.testing.assert_close(grad, true, rtol=1e-10, atol=1e-12)


def test_imaml_vmap_over_tasks_flags_like_a_per_task_loop(device):
    """Two diagonal tasks, 40 steps at lr 0.1, lam 1: task 0 (curvatures >= 2, contraction
    <= 0.7) converges, task 1 (a curvature 0.1, contraction 0.89) does not."""
    A = torch.stack(
        [torch.diag(torch.tensor(d, dtype=D)) for d in ([3.0, 2.0, 4.0], [0.1, 0.2, 3.0])]
    )
    b = torch.tensor([[1.0, -1.0, 0.5], [1.0, 1.0, -0.5]], dtype=D)
    A, b = A.to(device), b.to(device)
    theta0 = torch.zeros(3, dtype=D, device=device)
    kwargs = {"lam": 1.0, "steps": 40, "solve": functools.partial(solve_cg, tol=1e-12)}
    closed = [_gd_closed_form(A[i], b[i], theta0, 1.0, 0.1, 40)[1] for i in range(2)]
    residuals = torch.stack([torch.linalg.vector_norm(f) for f in closed])
    assert float(residuals[0]) < 1e-3 * float(b[0].norm())  # |F_0| = |b| from theta = 0
    assert float(residuals[1]) > 1e-3 * float(b[1].norm())
    infos = []

    def per_task(theta, A, b):
        r = imaml(quadratic, {"w": theta}, mo.sgd(lr=0.1), (A, b), on_solve=infos.append, **kwargs)
        return r.params["w"].sum()

    theta = theta0.clone().requires_grad_()
    mapped = metafunc.vmap_tasks(per_task, in_dims=(None, 0, 0), strategy="vmap")
    with pytest.warns(
        ImplicitSolveWarning,
        match=rf"{re.escape(f'{float(residuals[1]):.3g}')} at the returned solution \(1 of 2 tasks",
    ):
        mapped(theta, A, b).sum().backward()
    (info,) = infos
    torch.testing.assert_close(info.optimality, residuals, rtol=1e-8, atol=1e-14)

    infos.clear()
    flagged = []
    for i in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            per_task(theta, A[i], b[i]).backward()
        flagged.append(any(issubclass(w.category, ImplicitSolveWarning) for w in caught))
    assert flagged == [False, True]
    torch.testing.assert_close(info.optimality, torch.stack([i.optimality for i in infos]))


def _sinusoid_learner(device, **kwargs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).to(D).to(device)
    fm = metafunc.functionalize(net)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 1, generator=g, dtype=D).to(device)
    batch = (x[:, :3], torch.sin(x[:, :3])), (x[:, 3:], torch.sin(x[:, 3:]))
    learner = IMAML(fm, strategy="vmap", **kwargs)
    return learner, learner.init(), *batch


def test_imaml_learner_passes_its_policy_and_tolerance_on(device):
    """IMAML's defaults (inner_lr 0.01, lam 1) with 2 steps leave the inner problem unsolved."""
    learner, meta, support, query = _sinusoid_learner(device, inner_lr=0.01, steps=2)
    with pytest.warns(ImplicitSolveWarning, match=r"imaml\(\.\.\.\).*at the returned solution"):
        learner.meta_grad(meta, support, query)
    for kwargs in ({"if_not_converged": "ignore"}, {"tol": 1.0}):
        learner, meta, support, query = _sinusoid_learner(device, inner_lr=0.01, steps=2, **kwargs)
        learner.meta_grad(meta, support, query)  # silent
    learner, meta, support, query = _sinusoid_learner(device, inner_lr=0.3, steps=100, lam=2.0)
    _, metrics = learner.meta_grad(meta, support, query)  # silent
    assert bool((metrics["inner_grad_norm"] < 1e-6).all())
