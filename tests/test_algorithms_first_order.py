"""Reptile, Leap and WarpGrad (first-order meta-gradients) against independent oracles, in
float64 on tiny problems.

Oracles: Reptile, ``theta - phi`` with ``phi`` from a hand-written SGD loop or from
``torch.optim.Adam``; Leap, per step, autograd of the path-segment length (or energy) in its
start point with the end point held fixed, summed over steps (the paper's identity-Jacobian
approximation); WarpGrad, the buffer's points and the warp gradient of the one-step objective
at them.
"""

from __future__ import annotations

import io
import math

import optree
import pytest
import torch
from _algorithms import (
    TASK,
    WARP,
    D,
    _close,
    _forward,
    _leaf,
    _loss,
    _model,
    _sgd,
    _task,
    _tasks,
    _torch_adam,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import metafunc
import metafunc.optim as mo
from metafunc.algorithms import (
    Leap,
    Reptile,
    WarpGrad,
)


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
    assert learner.warp == tuple(WARP) and learner.task == tuple(TASK)
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
