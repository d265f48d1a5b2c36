"""The learned optimizer (metafunc.optim.learned): meta-gradients, vmap, purity, composition."""

from __future__ import annotations

import optree
import pytest
import torch
from _purity import assert_unchanged, snapshot

import metafunc
import metafunc.optim as mo
from metafunc.estimators import meta_train, optimizer_unroll, pes

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64


def _weights(seed=0, hidden=(8,), dtype=D):
    w = mo.init_learned_weights(torch.Generator().manual_seed(seed), hidden=hidden, dtype=dtype)
    last = max(int(k[1:]) for k in w)
    # larger outputs than a fresh optimizer's, so that the MLP's nonlinearity shows in the tests
    w[f"w{last}"] = w[f"w{last}"] * 30
    return w


def _task(seed, n=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=D)
    y = x @ torch.randn(3, 2, generator=g, dtype=D) + 0.1 * torch.randn(n, 2, generator=g, dtype=D)
    params = {
        "w": 0.5 * torch.randn(3, 2, generator=g, dtype=D),
        "b": torch.zeros(2, dtype=D),
    }
    return params, (x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])


def _loss(p, batch):
    x, y = batch
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


def _meta_loss(weights, params, train, val, steps=4, **kw):
    """An unroll written out (not inner_loop): the oracle for inner_loop's gradients."""
    opt = mo.learned(weights, **kw)
    state = opt.init(params)
    for _ in range(steps):
        grads = torch.func.grad(_loss)(params, train)
        updates, state = opt.update(grads, state, params)
        params = metafunc.apply_updates(params, updates)
    return _loss(params, val)


def _directional_fd(f, weights, direction, h=1e-6):
    plus = {k: v + h * direction[k] for k, v in weights.items()}
    minus = {k: v - h * direction[k] for k, v in weights.items()}
    return (f(plus) - f(minus)) / (2 * h)


def test_meta_gradient_in_the_weights_matches_central_differences():
    weights = {k: v.requires_grad_() for k, v in _weights().items()}
    params, train, val = _task(0)
    loss = _meta_loss(weights, params, train, val)
    grads = torch.autograd.grad(loss, list(weights.values()))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=g, dtype=D) for k, v in weights.items()}
        analytic = sum((gr * direction[k]).sum() for gr, k in zip(grads, weights))
        numeric = _directional_fd(
            lambda w: _meta_loss(w, params, train, val), _detached(weights), direction
        )
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)


def _detached(tree):
    return optree.tree_map(torch.detach, tree)


def test_inner_loop_meta_gradient_matches_the_written_out_unroll_and_checkpointing():
    weights = {k: v.requires_grad_() for k, v in _weights().items()}
    params, train, val = _task(0)
    expected = torch.autograd.grad(_meta_loss(weights, params, train, val), list(weights.values()))
    for checkpoint in (None, 2):
        result = metafunc.inner_loop(
            _loss, params, mo.learned(weights), train, steps=4, checkpoint=checkpoint
        )
        got = torch.autograd.grad(_loss(result.params, val), list(weights.values()))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert result.tape.num_steps == 4 and result.tape.steps == [0, 1, 2, 3, 4]


def test_truncated_inner_loop_treats_the_leading_steps_first_order():
    """Oracle: the first two steps written out with constant gradients and params (the weights
    still act through the updates), the last two exact."""
    weights = {k: v.requires_grad_() for k, v in _weights().items()}
    params, train, val = _task(2)
    opt = mo.learned(weights)
    p, state = params, opt.init(params)
    for t in range(4):
        if t < 2:
            fixed = _detached(p)
            grads = _detached(torch.func.grad(_loss)(fixed, train))
            updates, state = opt.update(grads, state, fixed)
        else:
            updates, state = opt.update(torch.func.grad(_loss)(p, train), state, p)
        p = metafunc.apply_updates(p, updates)
    expected = torch.autograd.grad(_loss(p, val), list(weights.values()))
    result = metafunc.inner_loop(_loss, params, mo.learned(weights), train, steps=4, truncate=2)
    got = torch.autograd.grad(_loss(result.params, val), list(weights.values()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_vmapped_over_tasks_equals_the_per_task_loop():
    weights = _weights()
    tasks = [_task(s) for s in range(3)]

    def meta_grad(w, params, train, val):
        return torch.func.grad(_meta_loss)(w, params, train, val)

    loop = [meta_grad(weights, *task) for task in tasks]
    stacked = metafunc.stack_tasks(tasks)
    batched = metafunc.vmap_tasks(meta_grad, in_dims=(None, 0, 0, 0), strategy="vmap")(
        weights, *stacked
    )
    for i, expected in enumerate(loop):
        for k in weights:
            torch.testing.assert_close(batched[k][i], expected[k], rtol=1e-10, atol=1e-12)


def test_update_is_pure():
    weights = {k: v.requires_grad_() for k, v in _weights().items()}
    params, train, _ = _task(0)
    opt = mo.learned(weights)
    state = opt.init(params)
    grads = torch.func.grad(_loss)(params, train)
    updates, state = opt.update(grads, state, params)  # a state with nonzero momenta
    before = snapshot((weights, params, grads, state))
    updates, new_state = opt.update(grads, state, params)
    sum(u.sum() for u in updates.values()).backward()
    assert_unchanged(before)
    assert int(new_state.step) == 2 and int(state.step) == 1


def test_composes_with_chain_and_masked():
    weights = _weights()
    params, train, _ = _task(0)
    grads = torch.func.grad(_loss)(params, train)
    alone, _ = mo.learned(weights).update(grads, mo.learned(weights).init(params), params)
    opt = mo.chain(mo.learned(weights), mo.scale(2.0))
    doubled, _ = opt.update(grads, opt.init(params), params)
    for k in params:
        torch.testing.assert_close(doubled[k], 2 * alone[k])
    clip = mo.chain(mo.clip_by_global_norm(0.01), mo.learned(weights))
    clipped, _ = clip.update(grads, clip.init(params), params)
    small = optree.tree_map(lambda g: g * 0.01 / metafunc._tree_math.norm(grads), grads)
    expected, _ = mo.learned(weights).update(small, mo.learned(weights).init(params), params)
    for k in params:
        torch.testing.assert_close(clipped[k], expected[k], rtol=1e-4, atol=1e-12)
    frozen = mo.masked(mo.learned(weights), {"w": True, "b": False})
    out, _ = frozen.update(grads, frozen.init(params), params)
    torch.testing.assert_close(out["b"], grads["b"])  # excluded leaves pass through unchanged


def test_the_update_is_invariant_to_the_scale_of_a_leafs_gradients_at_the_first_step():
    """At the first step every gradient feature is normalised by its RMS over the leaf (up to the
    1e-8 under the square roots: 6e-4 relative here; without the normalisation the updates differ
    by orders of magnitude)."""
    weights = _weights()
    params = {"w": torch.zeros(3, 2, dtype=D)}
    g = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=D)}
    opt = mo.learned(weights)
    a, _ = opt.update(g, opt.init(params), params)
    b, _ = opt.update({"w": 1000 * g["w"]}, opt.init(params), params)
    torch.testing.assert_close(a["w"], b["w"], rtol=2e-3, atol=1e-12)


def test_half_precision_params_get_updates_in_their_dtype():
    weights = _weights(dtype=torch.float32)
    params = {"w": torch.ones(4, dtype=torch.float16)}
    opt = mo.learned(weights)
    grads = {"w": torch.ones(4, dtype=torch.float16)}
    updates, _ = opt.update(grads, opt.init(params), params)
    assert updates["w"].dtype == torch.float16 and torch.isfinite(updates["w"]).all()


def test_meta_training_with_truncated_unrolls_improves_on_held_out_tasks():
    """A learned optimizer meta-trained with PES over 20-step unrolls in truncations of 5 steps,
    on linear regression tasks: its mean training loss on held-out tasks falls below the
    untrained one's."""

    def sample(g):
        x = torch.randn(16, 3, generator=g, dtype=D)
        y = x @ torch.randn(3, 1, generator=g, dtype=D)
        return {"w": torch.zeros(3, 1, dtype=D)}, (x, y)

    unroll = optimizer_unroll(_loss_no_bias, lambda th: mo.learned(th), sample)
    theta = mo.init_learned_weights(torch.Generator().manual_seed(0), hidden=(8,), dtype=D)

    def held_out(th):
        losses = []
        for s in range(100, 105):
            inner = unroll.init(th, torch.Generator().manual_seed(s))
            for t in range(20):
                inner, loss = unroll.step(th, inner, t)
                losses.append(loss)
        return torch.stack(losses).mean()

    est = pes(unroll, steps=5, horizon=20, std=0.01, num_pairs=8)
    out = meta_train(est, theta, mo.adam(lr=3e-2), iterations=60, seed=0)
    assert torch.isfinite(out.losses).all()
    assert held_out(out.theta) < 0.8 * held_out(theta), (held_out(out.theta), held_out(theta))


def _loss_no_bias(p, batch):
    x, y = batch
    return ((x @ p["w"] - y) ** 2).mean()


def test_errors_name_the_call_and_the_fix():
    weights = _weights()
    with pytest.raises(TypeError, match=r"learned\(weights, \.\.\.\): expected weights to be a"):
        mo.learned([weights["w0"]])
    with pytest.raises(ValueError, match=r"expected the weights' keys to be \['w0', 'b0'"):
        mo.learned({"w0": weights["w0"], "b0": weights["b0"], "w1": weights["w1"]})
    with pytest.raises(ValueError, match=r"layer 0 has w0 of shape .*Pass the same betas"):
        mo.learned(weights, betas=(0.9,))
    with pytest.raises(ValueError, match=r"expected every beta in \[0, 1\), got 1.0"):
        mo.learned(weights, betas=(0.5, 0.9, 1.0))
    with pytest.raises(ValueError, match=r"expected step_mult to be positive and finite"):
        mo.learned(weights, step_mult=0.0)
    with pytest.raises(ValueError, match=r"expected hidden to be a list or tuple of positive"):
        mo.init_learned_weights(hidden=8)
    opt = mo.learned(weights)
    params = {"w": torch.ones(2, dtype=D)}
    with pytest.raises(ValueError, match=r"update: expected the params .*opt.update\(grads"):
        opt.update(params, opt.init(params))
    with pytest.raises(TypeError, match=r"learned\(weights, \.\.\.\)\.update: expected the state"):
        opt.update(params, mo.sgd(lr=0.1).init(params), params)
