"""The MAML family (second order, first order, an Adam inner loop, Meta-SGD, ANIL, MAML++) and
iMAML against independent oracles, in float64 on tiny problems.

Oracles (``tests/_algorithms.py``; none calls metafunc): central finite differences of a plain
PyTorch unroll of the mean query loss; first-order MAML by its definition, the query gradient at
the hand-adapted params; an Adam inner loop by ``torch.optim.Adam``; iMAML by finite differences
of the query loss at ``phi*(theta)`` found by Newton's method on the proximal problem (dense
Hessian from ``torch.autograd.functional``).
"""

from __future__ import annotations

import functools

import pytest
import torch
from _algorithms import (
    HEAD,
    D,
    _close,
    _fd,
    _forward,
    _leaf,
    _loss,
    _maml_objective,
    _model,
    _sgd,
    _task,
    _tasks,
    _torch_adam,
    with_device,
)
from _purity import assert_unchanged, snapshot
from hypothesis import given
from hypothesis import strategies as st

import metafunc.optim as mo
from metafunc.algorithms import (
    IMAML,
    MAML,
    PerParamLR,
    PerStepLR,
)
from metafunc.implicit import solve_cg


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_maml_meta_grad_matches_finite_differences(device, steps, kind):
    d_out = 1 if kind == "mse" else 3
    fm = _model([2, 3, d_out], seed=steps, device=device)
    support, query = _tasks(3, 4, 5, 2, d_out, kind, seed=10 + steps, device=device)
    learner = MAML(fm, kind, inner_lr=0.4, steps=steps, strategy="vmap")
    meta = learner.init()
    grads, metrics = learner.meta_grad(meta, support, query)

    fd = _fd(
        lambda m: _maml_objective(m, support, query, kind, steps, lr=lambda m: lambda k, t: 0.4),
        meta,
    )
    _close(grads, fd)
    assert set(grads) == {"params"}
    assert all(g.abs().sum() > 0 for g in grads["params"].values())

    # per-task metrics by hand: query loss (and accuracy) at the adapted params, support before
    expected = {"loss": [], "support_loss_before": [], "accuracy": []}
    for i in range(3):
        s, q = _task(support, i), _task(query, i)
        phi = _sgd(_leaf(meta["params"]), s, kind, steps, lambda k, t: 0.4)[-1]
        out = _forward(phi, q[0]).detach()
        expected["loss"].append(_loss(kind, out, q[1]))
        expected["support_loss_before"].append(_loss(kind, _forward(meta["params"], s[0]), s[1]))
        if kind == "cross_entropy":
            expected["accuracy"].append((out.argmax(-1) == q[1]).double().mean())
    if kind == "mse":
        del expected["accuracy"]
    assert set(metrics) == set(expected)
    for k, v in expected.items():
        assert metrics[k].shape == (3,)
        assert not metrics[k].requires_grad
        _close(metrics[k], torch.stack(v), rtol=1e-10, atol=1e-12)


@with_device
@given(
    steps=st.integers(1, 3),
    kind=st.sampled_from(["mse", "cross_entropy"]),
    n_tasks=st.integers(1, 3),
    d_in=st.integers(1, 2),
    hidden=st.integers(1, 3),
    n_s=st.integers(1, 4),
    lr=st.floats(0.05, 0.5),
    seed=st.integers(0, 2**16),
)
def test_maml_meta_grad_random_shapes(device, steps, kind, n_tasks, d_in, hidden, n_s, lr, seed):
    d_out = 1 if kind == "mse" else 2
    fm = _model([d_in, hidden, d_out], seed=seed, device=device)
    support, query = _tasks(n_tasks, n_s, 3, d_in, d_out, kind, seed=seed, device=device)
    learner = MAML(fm, kind, inner_lr=lr, steps=steps, strategy="vmap")
    meta = learner.init()
    grads, _ = learner.meta_grad(meta, support, query)
    objective = functools.partial(
        _maml_objective, support=support, query=query, kind=kind, steps=steps
    )
    _close(grads, _fd(lambda m: objective(m, lr=lambda m: lambda k, t: lr), meta))


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_with_an_adam_inner_loop_matches_torch_optim(device, first_order):
    """``inner_opt=adam(...)``: the oracle unrolls torch.optim.Adam per task; second order by
    finite differences of that unroll, first order as the query gradient at its endpoint."""
    fm = _model([2, 3, 1], seed=41, device=device)
    support, query = _tasks(3, 4, 5, 2, 1, "mse", seed=42, device=device)
    learner = MAML(
        fm, inner_opt=mo.adam(lr=0.05), steps=3, first_order=first_order, strategy="vmap"
    )
    meta = learner.init()
    before = snapshot(meta)
    grads, metrics = learner.meta_grad(meta, support, query)
    assert_unchanged(before)

    def adapted(theta, i):
        return _torch_adam(theta, _task(support, i), lr=0.05, steps=3)

    def objective(m):
        return (
            sum(
                _loss(
                    "mse", _forward(adapted(m["params"], i), _task(query, i)[0]), _task(query, i)[1]
                ).detach()
                for i in range(3)
            )
            / 3
        )

    if first_order:
        expected = {k: torch.zeros_like(v) for k, v in meta["params"].items()}
        for i in range(3):
            phi = adapted(meta["params"], i)
            x, y = _task(query, i)
            query_grads = torch.autograd.grad(_loss("mse", _forward(phi, x), y), list(phi.values()))
            for k, g in zip(phi, query_grads):
                expected[k] += g / 3
        _close(grads["params"], expected, rtol=1e-9, atol=1e-12)
    else:
        _close(grads, _fd(objective, meta))
    # per-task query losses after adaptation, by the same unroll
    torch.testing.assert_close(
        metrics["loss"].mean().item(), float(objective(meta)), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_fomaml_is_the_query_gradient_at_the_adapted_params(steps):
    fm = _model([1, 4, 1], seed=1)
    support, query = _tasks(3, 5, 6, 1, 1, "mse", seed=2)
    learner = MAML(fm, inner_lr=0.3, steps=steps, first_order=True, strategy="vmap")
    meta = learner.init()
    grads, _ = learner.meta_grad(meta, support, query)

    expected = {k: torch.zeros_like(v) for k, v in meta["params"].items()}
    for i in range(3):
        phi = _sgd(_leaf(meta["params"]), _task(support, i), "mse", steps, lambda k, t: 0.3)[-1]
        phi = _leaf(phi)
        q = _task(query, i)
        gs = torch.autograd.grad(_loss("mse", _forward(phi, q[0]), q[1]), list(phi.values()))
        for k, g in zip(phi, gs):
            expected[k] += g / 3
    _close(grads["params"], expected, rtol=1e-10, atol=1e-12)
    # and it is not the second-order gradient
    second, _ = MAML(fm, inner_lr=0.3, steps=steps, strategy="vmap").meta_grad(meta, support, query)
    assert not torch.allclose(second["params"]["0.weight"], grads["params"]["0.weight"])


def test_first_order_meta_sgd_learning_rate_gradient():
    """First order with learned rates: inner gradients are constants, so ``phi_T = theta -
    sum_t lr * g_t`` and ``dL/dlr = -sum_t g_t * grad L_query(phi_T)``."""
    fm = _model([1, 3, 1], seed=3)
    support, query = _tasks(2, 4, 4, 1, 1, "mse", seed=4)
    learner = MAML(
        fm, inner_lr=0.2, steps=2, first_order=True, learn_lr=PerParamLR(), strategy="vmap"
    )
    meta = learner.init()
    g = torch.Generator().manual_seed(0)
    meta["lr"] = {
        k: (0.1 + 0.3 * torch.rand(v.shape, generator=g, dtype=D)).requires_grad_()
        for k, v in meta["lr"].items()
    }
    grads, _ = learner.meta_grad(meta, support, query)

    lr_fn = lambda k, t: meta["lr"][k].detach()
    exp_p = {k: torch.zeros_like(v) for k, v in meta["params"].items()}
    exp_lr = {k: torch.zeros_like(v) for k, v in meta["params"].items()}
    for i in range(2):
        s, q = _task(support, i), _task(query, i)
        path = _sgd(_leaf(meta["params"]), s, "mse", 2, lr_fn)
        inner_grads = [
            {k: (path[t][k] - path[t + 1][k]).detach() / lr_fn(k, t) for k in path[t]}
            for t in range(2)
        ]
        phi = _leaf(path[-1])
        gq = dict(
            zip(phi, torch.autograd.grad(_loss("mse", _forward(phi, q[0]), q[1]), phi.values()))
        )
        for k in phi:
            exp_p[k] += gq[k] / 2
            exp_lr[k] -= sum(ig[k] for ig in inner_grads) * gq[k] / 2
    _close(grads["params"], exp_p, rtol=1e-10, atol=1e-12)
    _close(grads["lr"], exp_lr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2])
def test_meta_sgd_params_and_learning_rates_match_finite_differences(device, steps):
    fm = _model([1, 3, 1], seed=5, device=device)
    support, query = _tasks(2, 5, 5, 1, 1, "mse", seed=6, device=device)
    learner = MAML(fm, inner_lr=0.1, steps=steps, learn_lr=PerParamLR(), strategy="vmap")
    meta = learner.init()
    assert set(meta["lr"]) == set(meta["params"])
    for k, v in meta["lr"].items():
        assert v.shape == meta["params"][k].shape and torch.all(v == 0.1) and v.requires_grad
    g = torch.Generator().manual_seed(1)
    meta["lr"] = {
        k: (0.05 + 0.5 * torch.rand(v.shape, generator=g, dtype=D)).to(device).requires_grad_()
        for k, v in meta["lr"].items()
    }
    grads, _ = learner.meta_grad(meta, support, query)
    fd = _fd(
        lambda m: _maml_objective(
            m, support, query, "mse", steps, lr=lambda m: lambda k, t: m["lr"][k]
        ),
        meta,
    )
    _close(grads, fd)
    assert all(x.abs().sum() > 0 for x in grads["lr"].values())


def test_anil_adapts_the_head_only(device):
    fm = _model([2, 4, 1], seed=7, device=device)
    support, _ = _tasks(2, 5, 5, 2, 1, "mse", seed=8, device=device)
    learner = MAML(fm, inner_lr=0.3, steps=2, adapted=list(reversed(HEAD)), strategy="vmap")
    assert learner.adapted == tuple(HEAD)  # model order
    meta = learner.init()
    phi = learner.adapt(meta, _task(support, 0))
    for k in ["0.weight", "0.bias"]:
        assert torch.equal(phi[k], meta["params"][k].detach())
    expected = _sgd(_leaf(meta["params"]), _task(support, 0), "mse", 2, lambda k, t: 0.3, HEAD)
    for k in HEAD:
        assert not torch.equal(phi[k], meta["params"][k].detach())
        _close(phi[k], expected[-1][k], rtol=1e-12, atol=1e-14)
    assert not any(v.requires_grad for v in phi.values())


@pytest.mark.parametrize("steps", [1, 3])
def test_anil_meta_grad_matches_finite_differences(device, steps):
    fm = _model([2, 3, 1], seed=9, device=device)
    support, query = _tasks(3, 4, 5, 2, 1, "mse", seed=10, device=device)
    learner = MAML(fm, inner_lr=0.5, steps=steps, adapted=HEAD, strategy="vmap")
    meta = learner.init()
    grads, _ = learner.meta_grad(meta, support, query)
    fd = _fd(
        lambda m: _maml_objective(
            m, support, query, "mse", steps, keys=HEAD, lr=lambda m: lambda k, t: 0.5
        ),
        meta,
    )
    _close(grads, fd)
    # the body's gradient includes the second-order path through the head's inner steps: it
    # differs from first-order ANIL's (the query loss alone at (body, adapted head))
    first, _ = MAML(
        fm, inner_lr=0.5, steps=steps, adapted=HEAD, first_order=True, strategy="vmap"
    ).meta_grad(meta, support, query)
    assert not torch.allclose(first["params"]["0.weight"], grads["params"]["0.weight"])


@pytest.mark.parametrize(
    ("steps", "weights"), [(1, None), (2, [0.4, 0.6]), (3, [0.2, 0.0, 0.8]), (3, None)]
)
def test_maml_plus_plus_matches_finite_differences(device, steps, weights):
    fm = _model([1, 3, 1], seed=11, device=device)
    support, query = _tasks(2, 4, 5, 1, 1, "mse", seed=12, device=device)
    learner = MAML(
        fm,
        inner_lr=0.2,
        steps=steps,
        learn_lr=PerStepLR(),
        step_weights=weights,
        strategy="vmap",
    )
    meta = learner.init()
    assert all(v.shape == (steps,) and torch.all(v == 0.2) for v in meta["lr"].values())
    meta["lr"] = {
        k: torch.linspace(0.1, 0.4, steps, dtype=D, device=device).roll(j).requires_grad_()
        for j, k in enumerate(meta["lr"])
    }
    grads, metrics = learner.meta_grad(meta, support, query)
    fd = _fd(
        lambda m: _maml_objective(
            m,
            support,
            query,
            "mse",
            steps,
            lr=lambda m: lambda k, t: m["lr"][k][t],
            weights=weights,
        ),
        meta,
    )
    _close(grads, fd)
    # the loss metric stays the query loss at the final adapted params
    s, q = _task(support, 0), _task(query, 0)
    lr = lambda k, t: meta["lr"][k][t].detach()
    phi = _sgd(_leaf(meta["params"]), s, "mse", steps, lr)[-1]
    _close(metrics["loss"][0], _loss("mse", _forward(phi, q[0]), q[1]), rtol=1e-10, atol=1e-12)


def test_with_step_weights():
    fm = _model([1, 3, 1], seed=13)
    support, query = _tasks(2, 4, 5, 1, 1, "mse", seed=14)
    base = MAML(fm, inner_lr=0.3, steps=2, step_weights=[0.5, 0.5], strategy="vmap")
    meta = base.init()
    annealed = base.with_step_weights([0.1, 0.9])
    assert isinstance(annealed, MAML) and annealed is not base
    assert base.step_weights == (0.5, 0.5) and annealed.step_weights == (0.1, 0.9)
    obj = functools.partial(
        _maml_objective,
        support=support,
        query=query,
        kind="mse",
        steps=2,
        lr=lambda m: lambda k, t: 0.3,
    )
    for learner, w in [(annealed, [0.1, 0.9]), (base, [0.5, 0.5])]:
        grads, _ = learner.meta_grad(meta, support, query)
        _close(grads, _fd(lambda m, w=w: obj(m, weights=w), meta))
    plain, _ = base.with_step_weights(None).meta_grad(meta, support, query)
    _close(plain, _fd(obj, meta))
    with pytest.raises(ValueError, match="expected step_weights to be 2"):
        base.with_step_weights([1.0])
    with pytest.raises(ValueError, match="non-negative"):
        base.with_step_weights([1.0, -0.5])
    with pytest.raises(ValueError, match="at least one positive"):
        base.with_step_weights([0.0, 0.0])


def _flat(p):
    return torch.cat([v.reshape(-1) for v in p.values()])


def _unflat(vec, like):
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def _prox_newton(theta, batch, lam, iters=50):
    """``argmin_phi L(phi) + lam/2 ||phi - theta||^2`` by Newton's method on the flat vector."""
    th = _flat(theta).detach()

    def f(v):
        return (
            _loss("mse", _forward(_unflat(v, theta), batch[0]), batch[1])
            + 0.5 * lam * ((v - th) ** 2).sum()
        )

    v = th.clone()
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(f, v)
        if float(g.norm()) < 1e-14:
            break
        v = v - torch.linalg.solve(torch.autograd.functional.hessian(f, v), g)
    g = torch.autograd.functional.jacobian(f, v)
    assert float(g.norm()) < 1e-12  # the oracle itself converged
    return _unflat(v, theta)


def test_imaml_meta_grad_matches_finite_differences_of_the_proximal_solution(device):
    fm = _model([1, 3, 1], seed=17, device=device)
    support, query = _tasks(2, 5, 5, 1, 1, "mse", seed=18, device=device)
    lam = 2.0
    solve = functools.partial(solve_cg, tol=1e-12, maxiter=200)
    learner = IMAML(fm, inner_lr=0.2, steps=120, lam=lam, solve=solve, strategy="vmap")
    meta = learner.init()
    grads, metrics = learner.meta_grad(meta, support, query)

    def objective(m):
        total = 0.0
        for i in range(2):
            phi = _prox_newton(m["params"], _task(support, i), lam)
            q = _task(query, i)
            total += _loss("mse", _forward(phi, q[0]), q[1]).item()
        return torch.tensor(total / 2, dtype=D)

    _close(grads, _fd(objective, meta, eps=1e-5), rtol=1e-6, atol=1e-9)
    assert torch.all(metrics["inner_grad_norm"] < 1e-10)
    phi = learner.adapt(meta, _task(support, 1))
    _close(phi, _prox_newton(meta["params"], _task(support, 1), lam), rtol=1e-10, atol=1e-12)
    # proximal: phi* is not the plain minimiser; a weaker lam moves it further from theta
    far = IMAML(fm, inner_lr=0.2, steps=120, lam=0.5, strategy="vmap").adapt(
        meta, _task(support, 1)
    )
    dist = lambda p: float(_flat(p).sub(_flat(meta["params"]).detach()).norm())
    assert dist(far) > dist(phi) > 0
