""":func:`metafunc.implicit.imaml` against independent oracles.

Oracles: the closed form of a quadratic inner problem; the one-dimensional identity on a nonconvex
loss (pure-Python bisection for the adapted point); a long second-order unroll with
:func:`metafunc.inner_loop` (implicit == unrolled at convergence); central finite differences of a
Newton solver written with ``torch.autograd.functional`` (no metafunc) for the meta-gradient and the
``lam`` gradient on an MLP; a Python loop over tasks for vmap; ``backward`` for ``torch.func.grad``.
Also: the graph does not grow with the inner steps, inputs are unchanged, and argument errors.
"""

from __future__ import annotations

import functools
import math

import optree
import pytest
import torch
from _implicit_helpers import D, _bisect, _flat, _graph_nodes, _spd, _unflat, with_device
from _purity import assert_unchanged, snapshot
from hypothesis import given
from hypothesis import strategies as st

import metafunc
import metafunc.optim as mo
from metafunc.implicit import (
    IMAMLResult,
    imaml,
    solve_cg,
)


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
