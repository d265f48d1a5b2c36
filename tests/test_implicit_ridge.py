""":func:`metafunc.implicit.custom_root` on ridge regression; linear solves that do not converge.

``argmin_w ||X w - y||^2 + lam ||w||^2`` solved by gradient descent: ``jacrev``, ``backward`` with
keyword and pass-through arguments, vmap over tasks, ``has_aux``, and a graph that does not grow
with the solver's iterations; an unconverged linear solve in the backward warns, raises or is
ignored on request, and reports to ``on_solve`` (one entry per task under vmap).

Oracles: the closed form ``w* = (X'X + lam I)^-1 X'y`` differentiated by hand, central finite
differences of it, a Python loop over tasks, in float64.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from _implicit_helpers import D, _graph_nodes, _orthogonal
from _purity import assert_unchanged, snapshot

import metafunc
from metafunc.implicit import (
    ImplicitSolveWarning,
    SolveInfo,
    custom_root,
    solve_cg,
    solve_dense,
    solve_normal_cg,
)


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
