"""Every algorithm's ``vmap`` against a Python loop over tasks, the compiled and eager gradient
paths against each other, ``evaluate`` against the adapted params by hand, and a learning
sanity check."""

from __future__ import annotations

import functools

import optree
import pytest
import torch
from _algorithms import (
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
)
from _purity import assert_unchanged, snapshot

from metafunc.algorithms import (
    IMAML,
    MAML,
    Leap,
    PerParamLR,
    PerStepLR,
    Reptile,
    WarpGrad,
)
from metafunc.implicit import solve_cg


def _algorithms():
    solve = functools.partial(solve_cg, tol=1e-12, maxiter=200)
    return {
        "maml": lambda fm, s: MAML(fm, inner_lr=0.3, steps=2, strategy=s),
        "fomaml": lambda fm, s: MAML(fm, inner_lr=0.3, steps=2, first_order=True, strategy=s),
        "meta-sgd": lambda fm, s: MAML(fm, inner_lr=0.3, learn_lr=PerParamLR(), strategy=s),
        "anil": lambda fm, s: MAML(
            fm, inner_lr=0.3, steps=2, adapted=["4.weight", "4.bias"], strategy=s
        ),
        "maml++": lambda fm, s: MAML(
            fm,
            inner_lr=0.3,
            steps=2,
            learn_lr=PerStepLR(),
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
