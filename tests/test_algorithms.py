"""``metafunc.algorithms`` against independent oracles, in float64 on tiny problems.

Oracles, none of which calls metafunc (models are run by a hand-written forward pass of the
``nn.Linear``/``tanh`` weights, losses are written out, inner loops are explicit
``torch.autograd.grad`` steps):

* the MAML family (second order, Meta-SGD, ANIL, MAML++): central finite differences of a plain
  PyTorch unroll of the mean query loss; first-order MAML: its definition, the query gradient at
  the hand-adapted params;
* Reptile: ``theta - phi`` with ``phi`` from a hand-written SGD loop, or from ``torch.optim.Adam``;
* iMAML: finite differences of the query loss at ``phi*(theta)`` found by Newton's method on the
  proximal problem (dense Hessian from ``torch.autograd.functional``);
* Leap: per step, autograd of the path-segment length (or energy) in its start point with the
  end point held fixed, summed over steps (the paper's identity-Jacobian approximation);
* WarpGrad: the buffer's points and the warp gradient of the one-step objective at them;
* a Python loop over tasks for every algorithm's ``vmap``.
"""

from __future__ import annotations

import functools
import io
import itertools
import math

import optree
import pytest
import torch
import torch.nn.functional as F
from _purity import assert_unchanged, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import metafunc
import metafunc.optim as mo
from metafunc.algorithms import IMAML, MAML, Leap, MetaLearner, Reptile, WarpGrad
from metafunc.implicit import solve_cg

D = torch.float64

# the `device` fixture is a plain parameter, safe to share across hypothesis examples
with_device = settings(
    suppress_health_check=[
        *settings.default.suppress_health_check,
        HealthCheck.function_scoped_fixture,
    ]
)

HEAD = ["2.weight", "2.bias"]


# ================================================================================ helpers
def _model(sizes, seed: int = 0, device: str = "cpu") -> metafunc.FunctionalModel:
    """A tanh MLP ``sizes[0] -> ... -> sizes[-1]``; Linear layers at indices 0, 2, 4, ..."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b))
    return metafunc.functionalize(nn.Sequential(*layers).to(dtype=D, device=device))


def _forward(p, x):
    """The MLP by hand: ``x W^T + b`` per layer, tanh between layers."""
    idx = sorted({int(k.split(".")[0]) for k in p})
    for j, i in enumerate(idx):
        if j:
            x = torch.tanh(x)
        x = x @ p[f"{i}.weight"].T + p[f"{i}.bias"]
    return x


def _loss(kind, out, y):
    if kind == "mse":
        return ((out - y) ** 2).mean()
    picked = out.gather(-1, y[:, None]).squeeze(-1)
    return (torch.logsumexp(out, -1) - picked).mean()


def _tasks(n_tasks, n_s, n_q, d_in, d_out, kind, seed=0, device="cpu"):
    """``(support, query)``, each ``(x, y)`` stacked over tasks."""
    g = torch.Generator().manual_seed(seed)

    def part(n):
        x = torch.randn(n_tasks, n, d_in, generator=g, dtype=D)
        if kind == "mse":
            amp = 0.5 + torch.rand(n_tasks, 1, d_out, generator=g, dtype=D)
            y = amp * torch.sin(x.sum(-1, keepdim=True) + 1.0)
        else:
            y = torch.randint(d_out, (n_tasks, n), generator=g)
        return x.to(device), y.to(device)

    return part(n_s), part(n_q)


def _task(batch, i):
    return batch[0][i], batch[1][i]


def _leaf(p):
    return {k: v.detach().clone().requires_grad_() for k, v in p.items()}


def _sgd(theta, batch, kind, steps, lr, keys=None, create_graph=False):
    """The inner loop by hand: ``phi_{t+1} = phi_t - lr(k, t) * dL_support/dphi_t[k]`` for the
    adapted keys; returns ``[phi_0, ..., phi_steps]``. ``theta``'s adapted leaves must require
    grad (the graph reaches them; without ``create_graph`` it is first order)."""
    keys = list(theta) if keys is None else keys
    path = [dict(theta)]
    phi = dict(theta)
    for t in range(steps):
        with torch.enable_grad():
            loss = _loss(kind, _forward(phi, batch[0]), batch[1])
            gs = torch.autograd.grad(loss, [phi[k] for k in keys], create_graph=create_graph)
        phi = {**phi, **{k: phi[k] - lr(k, t) * g for k, g in zip(keys, gs)}}
        path.append(phi)
    return path


def _torch_adam(theta, batch, lr, steps):
    """The inner loop with torch.optim.Adam on the MSE (the oracle for ``inner_opt=adam``)."""
    phi = {k: nn.Parameter(v.detach().clone()) for k, v in theta.items()}
    opt = torch.optim.Adam(phi.values(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _loss("mse", _forward(phi, batch[0]), batch[1]).backward()
        opt.step()
    return phi


def _fd(fn, tree, eps=1e-6):
    """Central finite differences of the scalar ``fn(tree)`` in every entry of every leaf."""
    leaves, spec = optree.tree_flatten(tree)
    base = [x.detach().clone() for x in leaves]
    out = []
    for j, x in enumerate(base):
        g = torch.zeros_like(x).reshape(-1)
        for e in range(x.numel()):
            vals = []
            for sign in (1.0, -1.0):
                moved = [b.clone() for b in base]
                moved[j].reshape(-1)[e] += sign * eps
                vals.append(float(fn(optree.tree_unflatten(spec, moved))))
            g[e] = (vals[0] - vals[1]) / (2 * eps)
        out.append(g.reshape(x.shape))
    return optree.tree_unflatten(spec, out)


def _close(a, b, rtol=1e-6, atol=1e-8):
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb, (sa, sb)
    for x, y in zip(la, lb):
        torch.testing.assert_close(x.detach(), y.detach().to(x.device), rtol=rtol, atol=atol)


def _maml_objective(meta, support, query, kind, steps, keys=None, lr=None, weights=None):
    """The MAML-family meta-objective by hand: the mean over tasks of the query loss after
    ``steps`` SGD steps (or ``sum_t w_t L_query(phi_t)``), values only."""
    total = 0.0
    n = support[0].shape[0]
    for i in range(n):
        theta = _leaf(meta["params"])
        path = _sgd(theta, _task(support, i), kind, steps, lr(meta), keys)
        q = _task(query, i)
        if weights is None:
            total += _loss(kind, _forward(path[-1], q[0]), q[1]).item()
        else:
            total += sum(
                w * _loss(kind, _forward(path[t], q[0]), q[1]).item()
                for t, w in enumerate(weights, start=1)
            )
    return torch.tensor(total / n, dtype=D)


# ================================================================ MAML, second order: FD
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


# =================================================================== first-order MAML
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
        fm, inner_lr=0.2, steps=2, first_order=True, learn_lr="per_param", strategy="vmap"
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


# ========================================================================== Meta-SGD
@pytest.mark.parametrize("steps", [1, 2])
def test_meta_sgd_params_and_learning_rates_match_finite_differences(device, steps):
    fm = _model([1, 3, 1], seed=5, device=device)
    support, query = _tasks(2, 5, 5, 1, 1, "mse", seed=6, device=device)
    learner = MAML(fm, inner_lr=0.1, steps=steps, learn_lr="per_param", strategy="vmap")
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


# ============================================================================== ANIL
def test_anil_adapts_the_head_only(device):
    fm = _model([2, 4, 1], seed=7, device=device)
    support, _ = _tasks(2, 5, 5, 2, 1, "mse", seed=8, device=device)
    learner = MAML(fm, inner_lr=0.3, steps=2, adapt=list(reversed(HEAD)), strategy="vmap")
    assert learner.adapted == HEAD  # model order
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
    learner = MAML(fm, inner_lr=0.5, steps=steps, adapt=HEAD, strategy="vmap")
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
        fm, inner_lr=0.5, steps=steps, adapt=HEAD, first_order=True, strategy="vmap"
    ).meta_grad(meta, support, query)
    assert not torch.allclose(first["params"]["0.weight"], grads["params"]["0.weight"])


# ============================================================================ MAML++
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
        learn_lr="per_layer_per_step",
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
    assert base.step_weights == [0.5, 0.5] and annealed.step_weights == [0.1, 0.9]
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


# ============================================================================ Reptile
@given(
    steps=st.integers(1, 4),
    n_tasks=st.integers(1, 3),
    hidden=st.integers(1, 4),
    lr=st.floats(0.01, 0.3),
    seed=st.integers(0, 2**16),
)
def test_reptile_meta_grad_is_theta_minus_phi(steps, n_tasks, hidden, lr, seed):
    fm = _model([1, hidden, 1], seed=seed)
    support, query = _tasks(n_tasks, 4, 3, 1, 1, "mse", seed=seed)
    learner = Reptile(fm, inner_lr=lr, steps=steps, strategy="vmap")
    meta = learner.init()
    grads, metrics = learner.meta_grad(meta, support, query)
    expected = {k: torch.zeros_like(v) for k, v in meta["params"].items()}
    losses = []
    for i in range(n_tasks):
        phi = _sgd(_leaf(meta["params"]), _task(support, i), "mse", steps, lambda k, t: lr)[-1]
        for k in expected:
            expected[k] += (meta["params"][k] - phi[k]).detach() / n_tasks
        q = _task(query, i)
        losses.append(_loss("mse", _forward(phi, q[0]), q[1]).detach())
    _close(grads["params"], expected, rtol=1e-10, atol=1e-12)
    _close(metrics["loss"], torch.stack(losses), rtol=1e-10, atol=1e-12)


def test_reptile_with_adam_matches_torch_optim():
    """Nichol et al. use Adam in the inner loop; the oracle is torch.optim.Adam."""
    fm = _model([1, 4, 1], seed=15)
    support, query = _tasks(2, 5, 3, 1, 1, "mse", seed=16)
    learner = Reptile(fm, steps=4, inner_opt=mo.adam(lr=0.05), strategy="vmap")
    meta = learner.init()
    grads, _ = learner.meta_grad(meta, support, query)
    expected = {k: torch.zeros_like(v) for k, v in meta["params"].items()}
    for i in range(2):
        phi = _torch_adam(meta["params"], _task(support, i), lr=0.05, steps=4)
        for k in expected:
            expected[k] += (meta["params"][k] - phi[k]).detach() / 2
    _close(grads["params"], expected, rtol=1e-9, atol=1e-12)


# ============================================================================== iMAML
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


# =============================================================================== Leap
def _leap_oracle(theta, batch, lr, steps, metric, frozen=None):
    """Leap's gradient for one task: for each step, the derivative of the segment length (or
    energy) ``d((theta_i, f(theta_i)), (theta_{i+1}, f_{i+1}))`` in ``theta_i``, with the end point
    constant; summed over steps. ``frozen`` params enter the loss but are neither adapted nor
    part of the path (WarpGrad's warp layers)."""
    frozen = frozen or {}
    keys = list(theta)
    full = lambda p: {**frozen, **p}
    loss = lambda p: _loss("mse", _forward(full(p), batch[0]), batch[1])
    path = [{k: v.detach() for k, v in theta.items()}]
    for _ in range(steps):
        p = _leaf(path[-1])
        gs = torch.autograd.grad(loss(p), list(p.values()))
        path.append({k: (p[k] - lr * g).detach() for k, g in zip(keys, gs)})
    total = {k: torch.zeros_like(v) for k, v in path[0].items()}
    for i in range(steps):
        p = _leaf(path[i])
        nxt, f_nxt = path[i + 1], loss(path[i + 1]).detach()
        sq = sum(((nxt[k] - p[k]) ** 2).sum() for k in keys) + (f_nxt - loss(p)) ** 2
        d = torch.sqrt(sq) if metric == "length" else sq
        for k, g in zip(keys, torch.autograd.grad(d, list(p.values()))):
            total[k] += g
    return total, path


@pytest.mark.parametrize("metric", ["length", "energy"])
@pytest.mark.parametrize("steps", [1, 3])
def test_leap_meta_grad_matches_the_path_gradient(metric, steps):
    fm = _model([2, 3, 1], seed=19)
    support, query = _tasks(3, 5, 4, 2, 1, "mse", seed=20)
    learner = Leap(fm, inner_lr=0.3, steps=steps, metric=metric, strategy="vmap")
    meta = learner.init()
    grads, metrics = learner.meta_grad(meta, support, query)
    expected = {k: torch.zeros_like(v) for k, v in meta["params"].items()}
    for i in range(3):
        g, path = _leap_oracle(meta["params"], _task(support, i), 0.3, steps, metric)
        for k in expected:
            expected[k] += g[k] / 3
        q = _task(query, i)
        _close(metrics["loss"][i], _loss("mse", _forward(path[-1], q[0]), q[1]), 1e-10, 1e-12)
    _close(grads["params"], expected, rtol=1e-10, atol=1e-12)


def test_leap_sign_convention_shortens_the_path():
    """A descent step along Leap's gradient (a) decreases the frozen-end-point objective it
    differentiates and (b) on ``f(w) = (w - c)^2`` tasks moves the initialisation towards the
    optima and shortens the actual learning path."""
    torch.manual_seed(0)
    fm = metafunc.functionalize(nn.Linear(1, 1, bias=False).to(D))
    with torch.no_grad():
        fm.params["weight"].fill_(-2.0)
    c = torch.tensor([0.5, 1.0, 1.5], dtype=D)
    support = (torch.ones(3, 1, 1, dtype=D), c.reshape(3, 1, 1))
    learner = Leap(fm, inner_lr=0.2, steps=4, strategy="vmap")
    meta = learner.init()
    grads, _ = learner.meta_grad(meta, support, support)
    g = grads["params"]["weight"]
    assert float(g) < 0  # the optima are above w = -2: descent moves w up

    def path_length(w):
        total = 0.0
        for ci in c.tolist():
            traj = [w]
            for _ in range(4):
                traj.append(traj[-1] - 0.2 * 2 * (traj[-1] - ci))
            f = [(t - ci) ** 2 for t in traj]
            total += sum(math.hypot(traj[i + 1] - traj[i], f[i + 1] - f[i]) for i in range(4))
        return total

    w0 = meta["params"]["weight"].item()
    assert path_length(w0 - 0.01 * float(g)) < path_length(w0)

    # (a) the frozen-end-point objective, general model
    fm2 = _model([1, 3, 1], seed=21)
    sup, _ = _tasks(2, 4, 1, 1, 1, "mse", seed=22)
    learner2 = Leap(fm2, inner_lr=0.3, steps=3, strategy="vmap")
    meta2 = learner2.init()
    g2, _ = learner2.meta_grad(meta2, sup, sup)

    def frozen_objective(shift):
        total = 0.0
        for i in range(2):
            path = _leap_oracle(meta2["params"], _task(sup, i), 0.3, 3, "length")[1]
            x, y = _task(sup, i)
            for j in range(3):
                p = {k: path[j][k] + shift[k] for k in path[j]}
                dz = sum(((path[j + 1][k] - p[k]) ** 2).sum() for k in p)
                df = _loss("mse", _forward(path[j + 1], x), y) - _loss("mse", _forward(p, x), y)
                total += torch.sqrt(dz + df**2).item()
        return total

    zero = {k: torch.zeros_like(v) for k, v in g2["params"].items()}
    step = {k: -1e-3 * v for k, v in g2["params"].items()}
    assert frozen_objective(step) < frozen_objective(zero)


# =========================================================================== WarpGrad
WARP = ["2.weight", "2.bias"]
TASK = ["0.weight", "0.bias", "4.weight", "4.bias"]


def _warp_setup(seed=23, **kwargs):
    fm = _model([1, 3, 3, 1], seed=seed)
    support, query = _tasks(2, 4, 4, 1, 1, "mse", seed=seed + 1)
    kwargs = {"warp": WARP, "inner_lr": 0.3, "steps": 2, "strategy": "vmap", **kwargs}
    return fm, WarpGrad(fm, **kwargs), support, query


def _warp_objective_grad(theta, warp, s, q, lr):
    """``d/dw L_query(theta - lr grad_theta L_support(theta; w); w)`` by hand."""
    w = _leaf(warp)
    th = _leaf(theta)
    with torch.enable_grad():
        ls = _loss("mse", _forward({**w, **th}, s[0]), s[1])
        gs = torch.autograd.grad(ls, list(th.values()), create_graph=True)
        stepped = {k: th[k] - lr * g for k, g in zip(th, gs)}
        lq = _loss("mse", _forward({**w, **stepped}, q[0]), q[1])
        return dict(zip(w, torch.autograd.grad(lq, list(w.values()))))


def _warped_paths(meta, support, steps, lr):
    warp = {k: meta["params"][k].detach() for k in WARP}
    theta = {k: meta["params"][k] for k in TASK}
    return [
        _leap_oracle(theta, _task(support, i), lr, steps, "length", frozen=warp)
        for i in range(support[0].shape[0])
    ]


def test_warpgrad_adapt_moves_task_params_only():
    _, learner, support, _ = _warp_setup()
    assert learner.warp == WARP and learner.task == TASK
    meta = learner.init()
    phi = learner.adapt(meta, _task(support, 0))
    for k in WARP:
        assert torch.equal(phi[k], meta["params"][k].detach())
    expected = _warped_paths(meta, support, 2, 0.3)[0][1][-1]
    for k in TASK:
        assert not torch.equal(phi[k], meta["params"][k].detach())
        _close(phi[k], expected[k], rtol=1e-12, atol=1e-14)


def test_warpgrad_warp_gradient_from_the_replayed_points():
    """The buffer holds, per task (outer) and step k < steps (inner), ``theta_k`` of the warped
    trajectory with the task's data. The replayed points are reconstructed from the public
    ``state_dict()["generator"]`` taken before the call: the learner draws ``replay`` indices
    uniformly with replacement by ``torch.randint(len(buffer), (replay,))`` after appending."""
    _, learner, support, query = _warp_setup(replay=5, leap_init=False)
    meta = learner.init()
    expected_points = []
    for call in range(2):  # the second call replays points from both calls
        if call:  # as after an outer step: the buffer then holds points of two inits
            meta = {
                "params": {
                    k: (v - 0.1 * v.sin()).detach().requires_grad_()
                    for k, v in meta["params"].items()
                }
            }
        gen = torch.Generator()
        gen.set_state(learner.state_dict()["generator"])
        grads, metrics = learner.meta_grad(meta, support, query)
        for i, (_, path) in enumerate(_warped_paths(meta, support, 2, 0.3)):
            expected_points += [(path[k], i) for k in range(2)]
        assert len(learner.buffer) == len(expected_points)
        for (theta, s, q), (path_k, i) in zip(learner.buffer, expected_points):
            _close(theta, path_k, rtol=1e-12, atol=1e-14)
            assert torch.equal(s[0], support[0][i]) and torch.equal(q[1], query[1][i])
        picks = torch.randint(len(expected_points), (5,), generator=gen)
        warp = {k: meta["params"][k] for k in WARP}
        expected = {k: torch.zeros_like(v) for k, v in warp.items()}
        for j in picks.tolist():
            path_k, i = expected_points[j]
            g = _warp_objective_grad(path_k, warp, _task(support, i), _task(query, i), 0.3)
            for k in expected:
                expected[k] += g[k] / 5
        _close({k: grads["params"][k] for k in WARP}, expected, rtol=1e-10, atol=1e-12)
        for k in TASK:  # leap_init=False
            assert torch.equal(grads["params"][k], torch.zeros_like(meta["params"][k]))
        assert metrics["warp_objective"].shape == (2,)


def test_warpgrad_with_a_one_point_buffer_replays_the_last_point():
    """buffer_size=1 determines the choice: every draw is the last task's ``theta_{K-1}``."""
    _, learner, support, query = _warp_setup(buffer_size=1, replay=3, leap_init=False)
    meta = learner.init()
    grads, _ = learner.meta_grad(meta, support, query)
    path = _warped_paths(meta, support, 2, 0.3)[-1][1]
    warp = {k: meta["params"][k] for k in WARP}
    expected = _warp_objective_grad(path[1], warp, _task(support, 1), _task(query, 1), 0.3)
    _close({k: grads["params"][k] for k in WARP}, expected, rtol=1e-10, atol=1e-12)


def test_warpgrad_leap_init_is_leap_on_the_warped_trajectories():
    _, learner, support, query = _warp_setup(leap_init=True)
    meta = learner.init()
    grads, _ = learner.meta_grad(meta, support, query)
    expected = {k: torch.zeros_like(meta["params"][k]) for k in TASK}
    for g, _ in _warped_paths(meta, support, 2, 0.3):
        for k in TASK:
            expected[k] += g[k] / 2
    _close({k: grads["params"][k] for k in TASK}, expected, rtol=1e-10, atol=1e-12)
    assert all(expected[k].abs().sum() > 0 for k in TASK)


def test_warpgrad_state_dict_round_trip_reproduces_the_next_meta_grad():
    _, learner, support, query = _warp_setup(replay=4, seed=25)
    meta = learner.init()
    learner.meta_grad(meta, support, query)
    buf = io.BytesIO()
    torch.save(learner.state_dict(), buf)
    expected = learner.meta_grad(meta, support, query)

    other = WarpGrad(
        learner.model, warp=WARP, inner_lr=0.3, steps=2, replay=4, seed=99, strategy="vmap"
    )
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    got = other.meta_grad(meta, support, query)
    for a, b in zip(optree.tree_leaves(expected), optree.tree_leaves(got)):
        assert torch.equal(a, b)
    # and a fresh learner with another seed and an empty buffer does not reproduce it
    _, fresh, _, _ = _warp_setup(replay=4, seed=25)
    fresh_grads, _ = fresh.meta_grad(meta, support, query)
    assert not torch.equal(fresh_grads["params"]["2.weight"], expected[0]["params"]["2.weight"])


def test_warpgrad_auto_strategy_settles():
    """strategy="auto" times both strategies over at most six calls of each task map and keeps
    one from the seventh on; the replay objective's map must persist across meta_grad calls (or
    find its decision by its code) for that to happen."""
    _, learner, support, query = _warp_setup(strategy="auto", replay=2)
    meta = learner.init()
    for _ in range(7):
        learner.meta_grad(meta, support, query)
    used = [learner._maps[k] for k in ("warpgrad-collect", "warpgrad-objective")]
    assert all(m.strategy in ("vmap", "loop") for m in used)


# ====================================================================== vmap == loop
def _algorithms():
    solve = functools.partial(solve_cg, tol=1e-12, maxiter=200)
    return {
        "maml": lambda fm, s: MAML(fm, inner_lr=0.3, steps=2, strategy=s),
        "fomaml": lambda fm, s: MAML(fm, inner_lr=0.3, steps=2, first_order=True, strategy=s),
        "meta-sgd": lambda fm, s: MAML(fm, inner_lr=0.3, learn_lr="per_param", strategy=s),
        "anil": lambda fm, s: MAML(
            fm, inner_lr=0.3, steps=2, adapt=["4.weight", "4.bias"], strategy=s
        ),
        "maml++": lambda fm, s: MAML(
            fm,
            inner_lr=0.3,
            steps=2,
            learn_lr="per_layer_per_step",
            step_weights=[0.3, 0.7],
            strategy=s,
        ),
        "reptile": lambda fm, s: Reptile(fm, inner_lr=0.3, steps=3, strategy=s),
        "imaml": lambda fm, s: IMAML(fm, inner_lr=0.2, steps=60, lam=2.0, solve=solve, strategy=s),
        "leap": lambda fm, s: Leap(fm, inner_lr=0.3, steps=3, strategy=s),
        "leap-energy": lambda fm, s: Leap(fm, inner_lr=0.3, steps=3, metric="energy", strategy=s),
        "warpgrad": lambda fm, s: WarpGrad(
            fm, warp=WARP, inner_lr=0.3, steps=2, replay=4, strategy=s
        ),
    }


@pytest.mark.parametrize("name", list(_algorithms()))
def test_vmap_equals_the_per_task_loop(device, name):
    fm = _model([1, 3, 3, 1], seed=27, device=device)
    support, query = _tasks(3, 4, 5, 1, 1, "mse", seed=28, device=device)
    make = _algorithms()[name]
    batched, looped = make(fm, "vmap"), make(fm, "loop")
    meta = batched.init()
    for _ in range(2):  # twice: WarpGrad replays from the buffer of both calls
        gv, mv = batched.meta_grad(meta, support, query)
        gl, ml = looped.meta_grad(meta, support, query)
        _close(gv, gl, rtol=1e-10, atol=1e-12)
        _close(mv, ml, rtol=1e-10, atol=1e-12)
    _close(
        batched.evaluate(meta, support, query),
        looped.evaluate(meta, support, query),
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize("name", ["maml", "fomaml", "meta-sgd", "anil", "maml++", "imaml"])
def test_compiled_and_eager_gradient_paths_agree(device, monkeypatch, name):
    """``MetaLearner.meta_grad`` takes ``torch.func.grad`` while compiling and
    ``torch.autograd.grad`` eagerly; here the first is forced eagerly and both must agree. No
    graph goes back to ``meta`` and ``meta`` is not modified."""
    fm = _model([1, 3, 3, 1], seed=27, device=device)
    support, query = _tasks(3, 4, 5, 1, 1, "mse", seed=28, device=device)
    learner = _algorithms()[name](fm, "vmap")
    meta = learner.init()
    before = snapshot(meta)
    eager, eager_metrics = learner.meta_grad(meta, support, query)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced, traced_metrics = learner.meta_grad(meta, support, query)
    _close(traced, eager, rtol=1e-12, atol=1e-14)
    _close(traced_metrics, eager_metrics, rtol=1e-12, atol=1e-14)
    for g in optree.tree_leaves((eager, traced)):
        assert not g.requires_grad
    assert_unchanged(before)


def test_vmap_equals_the_per_task_loop_for_classification(device):
    fm = _model([2, 4, 3], seed=29, device=device)
    support, query = _tasks(3, 6, 6, 2, 3, "cross_entropy", seed=30, device=device)
    batched = MAML(fm, "cross_entropy", inner_lr=0.5, steps=2, strategy="vmap")
    looped = MAML(fm, "cross_entropy", inner_lr=0.5, steps=2, strategy="loop")
    meta = batched.init()
    gv, mv = batched.meta_grad(meta, support, query)
    gl, ml = looped.meta_grad(meta, support, query)
    assert "accuracy" in mv
    _close(gv, gl, rtol=1e-10, atol=1e-12)
    _close(mv, ml, rtol=1e-10, atol=1e-12)


# ========================================================================== evaluate
@pytest.mark.parametrize("name", list(_algorithms()))
def test_evaluate_is_per_task_without_meta_gradient_and_pure(name):
    fm = _model([1, 3, 3, 1], seed=31)
    support, query = _tasks(3, 4, 5, 1, 1, "mse", seed=32)
    learner = _algorithms()[name](fm, "vmap")
    meta = learner.init()
    before = snapshot((meta, support, query))
    buffer = list(getattr(learner, "buffer", []))
    out = learner.evaluate(meta, support, query)
    assert_unchanged(before)
    assert list(getattr(learner, "buffer", [])) == buffer  # evaluation does not feed the buffer
    assert set(out) == {"loss"}
    for v in out.values():
        assert v.shape == (3,) and not v.requires_grad and v.grad_fn is None
    assert all(x.grad is None for x in optree.tree_leaves(meta))
    # the per-task metric is the query loss at learner.adapt's params
    for i in range(3):
        phi = learner.adapt(meta, _task(support, i))
        q = _task(query, i)
        _close(out["loss"][i], _loss("mse", _forward(phi, q[0]), q[1]), 1e-10, 1e-12)


def test_evaluate_maml_classification_by_hand(device):
    fm = _model([2, 4, 3], seed=33, device=device)
    support, query = _tasks(4, 6, 8, 2, 3, "cross_entropy", seed=34, device=device)
    learner = MAML(fm, "cross_entropy", inner_lr=0.5, steps=3, strategy="vmap")
    meta = learner.init()
    out = learner.evaluate(meta, support, query)
    assert set(out) == {"loss", "accuracy"}
    for i in range(4):
        phi = _sgd(_leaf(meta["params"]), _task(support, i), "cross_entropy", 3, lambda k, t: 0.5)[
            -1
        ]
        x, y = _task(query, i)
        logits = _forward(phi, x).detach()
        _close(out["loss"][i], _loss("cross_entropy", logits, y), 1e-10, 1e-12)
        assert float(out["accuracy"][i]) == (logits.argmax(-1) == y).double().mean().item()


# ============================================================================ errors
def test_errors():
    fm = _model([1, 3, 1])
    with pytest.raises(ValueError, match="expected loss to be one of"):
        MAML(fm, "mae")
    with pytest.raises(TypeError, match="functionalize"):
        MAML(nn.Linear(1, 1))
    with pytest.raises(TypeError, match="functionalize"):
        Reptile(nn.Linear(1, 1))
    with pytest.raises(ValueError, match=r"did you mean '2\.weight'"):
        MAML(fm, adapt=["2.weigth"])
    with pytest.raises(TypeError, match="list of param names"):
        MAML(fm, adapt="2.weight")
    with pytest.raises(ValueError, match="adapt is empty"):
        MAML(fm, adapt=[])
    with pytest.raises(ValueError, match="expected learn_lr"):
        MAML(fm, learn_lr="per_layer")
    with pytest.raises(ValueError, match="step_weights"):
        MAML(fm, steps=2, step_weights=[1.0])
    with pytest.raises(ValueError, match="step_weights"):
        MAML(fm, steps=2, step_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="at least one positive"):
        MAML(fm, steps=2, step_weights=[0.0, 0.0])
    for bad in (0, -1, 1.5, True):
        for make in (
            lambda s: MAML(fm, steps=s),
            lambda s: Reptile(fm, steps=s),
            lambda s: IMAML(fm, steps=s),
            lambda s: Leap(fm, steps=s),
            lambda s: WarpGrad(fm, warp=["0.weight"], steps=s),
        ):
            with pytest.raises(ValueError, match="expected steps to be a positive int"):
                make(bad)
    for make in (
        lambda lr: MAML(fm, inner_lr=lr),
        lambda lr: Reptile(fm, inner_lr=lr),
        lambda lr: IMAML(fm, inner_lr=lr),
        lambda lr: Leap(fm, inner_lr=lr),
        lambda lr: WarpGrad(fm, warp=["0.weight"], inner_lr=lr),
    ):
        with pytest.raises(ValueError, match="inner_lr"):
            make(0.0)
    for make in (
        lambda **kw: MAML(fm, **kw),
        lambda **kw: Reptile(fm, **kw),
        lambda **kw: Leap(fm, **kw),
    ):
        with pytest.raises(ValueError, match="inner_opt carries its own learning rate; drop"):
            make(inner_lr=0.1, inner_opt=mo.adam(lr=0.1))
        with pytest.raises(TypeError, match=r"expected inner_opt to be a metafunc\.optim"):
            make(inner_opt=torch.optim.Adam)
    with pytest.raises(ValueError, match="drop learn_lr='per_param'"):
        MAML(fm, inner_opt=mo.adam(lr=0.1), learn_lr="per_param")
    with pytest.raises(ValueError, match="lam"):
        IMAML(fm, lam=0.0)
    with pytest.raises(ValueError, match="expected metric"):
        Leap(fm, metric="area")
    with pytest.raises(ValueError, match=r"did you mean '0\.weight'"):
        WarpGrad(fm, warp=["0.wieght"])
    with pytest.raises(TypeError, match="list of param names"):
        WarpGrad(fm, warp="0.weight")
    with pytest.raises(ValueError, match="both warp params and task params"):
        WarpGrad(fm, warp=list(fm.params))
    with pytest.raises(ValueError, match="buffer_size"):
        WarpGrad(fm, warp=["0.weight"], buffer_size=0)
    with pytest.raises(NotImplementedError):
        MetaLearner(fm).task_loss({}, None, None)


def test_meta_batch_mistakes_are_named():
    """The mistakes of a first meta-training loop, each named before any work is done."""
    fm = _model([1, 3, 1])
    (sx, sy), (qx, qy) = _tasks(2, 4, 5, 1, 1, "mse", seed=3)
    maml = MAML(fm, inner_lr=0.1, strategy="vmap")
    meta = maml.init()
    call = r"MAML\.meta_grad\(meta, support, query\)"
    with pytest.raises(TypeError, match=call + r": expected meta to be the dict of learner.init"):
        maml.meta_grad(fm.params, (sx, sy), (qx, qy))
    with pytest.raises(TypeError, match=r"these are the model's params"):
        maml.meta_grad(dict(fm.params), (sx, sy), (qx, qy))
    with pytest.raises(TypeError, match=r"with keys \['lr', 'params'\]; got \['params'\]"):
        MAML(fm, learn_lr="per_param", strategy="vmap").meta_grad(meta, (sx, sy), (qx, qy))
    meta_sgd = MAML(fm, steps=2, learn_lr="per_param", strategy="vmap").init()
    with pytest.raises(ValueError, match=r"expects meta\['lr'\]\['0.weight'\] of shape \(2,\)"):
        MAML(fm, steps=2, learn_lr="per_layer_per_step", strategy="vmap").meta_grad(
            meta_sgd, (sx, sy), (qx, qy)
        )
    with pytest.raises(TypeError, match=r"expected support to be a pair .* got a tuple of 3"):
        maml.meta_grad(meta, (sx, sy, sy), (qx, qy))
    with pytest.raises(TypeError, match=r"expected query to be a pair .* got a Tensor"):
        maml.meta_grad(meta, (sx, sy), qx)
    with pytest.raises(ValueError, match=r"same two leading sizes, got \(2, 4, 1\) and \(4, 1\)"):
        maml.meta_grad(meta, (sx, sy[0]), (qx, qy))
    with pytest.raises(ValueError, match=r"query has shape \(2, 0, 1\): no examples per task"):
        maml.meta_grad(meta, (sx, sy), (qx[:, :0], qy[:, :0]))  # queries=0
    with pytest.raises(ValueError, match=r"support has 2 tasks but query has 1"):
        maml.meta_grad(meta, (sx, sy), (qx[:1], qy[:1]))
    with pytest.raises(ValueError, match=r"outputs have shape \(4, 1\) per task and the targets"):
        maml.meta_grad(meta, (sx, sy[..., 0]), (qx, qy[..., 0]))  # mse would broadcast
    for learner in (Reptile(fm, strategy="vmap"), Leap(fm, strategy="vmap")):
        with pytest.raises(TypeError, match=r"\.meta_grad\(meta, support, query\): expected meta"):
            learner.meta_grad(fm.params, (sx, sy), (qx, qy))
    with pytest.raises(TypeError, match=r"MAML\.evaluate\(meta, support, query\)"):
        maml.evaluate(meta, (sx, sy, sy), (qx, qy))

    ce = MAML(_model([2, 3, 3]), "cross_entropy", strategy="vmap")
    (cx, cy), (dx, dy) = _tasks(2, 4, 5, 2, 3, "cross_entropy", seed=4)
    with pytest.raises(TypeError, match=r"int64 class indices, got torch.float64; use y.argmax"):
        ce.meta_grad(ce.init(), (cx, F.one_hot(cy, 3).double()), (dx, dy))
    with pytest.raises(TypeError, match=r"query targets as int64 class indices, got torch.int32"):
        ce.meta_grad(ce.init(), (cx, cy), (dx, dy.int()))


def test_constructor_arguments_are_checked_up_front():
    fm = _model([1, 3, 1])
    with pytest.raises(TypeError, match=r"expected first_order to be a bool, got 'no'"):
        MAML(fm, first_order="no")
    with pytest.raises(TypeError, match=r"IMAML\(model, \.\.\.\): expected solve to be a linear"):
        IMAML(fm, solve="cg")
    with pytest.raises(ValueError, match=r"expected if_not_converged in"):
        IMAML(fm, if_not_converged="bogus")
    with pytest.raises(TypeError, match=r"stop_gradient\(tree\): expected a pytree"):
        metafunc.stop_gradient(nn.Linear(1, 1).parameters())


def test_non_finite_hyperparameters_are_refused():
    fm = _model([1, 3, 1])
    for bad in (math.inf, math.nan):
        for make in (
            lambda v: MAML(fm, inner_lr=v),
            lambda v: Reptile(fm, inner_lr=v),
            lambda v: IMAML(fm, lam=v),
        ):
            with pytest.raises(ValueError, match=r"positive finite number"):
                make(bad)
        with pytest.raises(ValueError, match=r"finite non-negative numbers"):
            MAML(fm, steps=2, step_weights=[bad, 1.0])


# ================================================================== learning sanity
def test_maml_learns_a_tiny_sinusoid_family():
    """50 meta-steps of Adam reduce the post-adaptation query loss on held-out tasks."""
    fm = _model([1, 8, 1], seed=35)
    learner = MAML(fm, inner_lr=0.1, steps=1, strategy="vmap")
    meta = learner.init()
    g = torch.Generator().manual_seed(36)

    def batch(n):
        amp = 0.5 + torch.rand(n, 1, 1, generator=g, dtype=D)
        shift = 2 * torch.rand(n, 1, 1, generator=g, dtype=D) - 1
        x = 4 * torch.rand(n, 15, 1, generator=g, dtype=D) - 2
        y = amp * torch.sin(x) + shift
        return (x[:, :5], y[:, :5]), (x[:, 5:], y[:, 5:])

    held_out = batch(16)
    before = float(learner.evaluate(meta, *held_out)["loss"].mean())
    opt = torch.optim.Adam(optree.tree_leaves(meta), lr=0.02)
    for _ in range(50):
        grads, _ = learner.meta_grad(meta, *batch(8))
        for p, gp in zip(optree.tree_leaves(meta), optree.tree_leaves(grads)):
            p.grad = gp
        opt.step()
    after = float(learner.evaluate(meta, *held_out)["loss"].mean())
    assert after < 0.5 * before, (before, after)
