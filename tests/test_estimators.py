"""Gradient estimators (metafunc.estimators) on a linear-quadratic unroll with a known gradient.

The unroll is ``x_{t+1} = A x_t + B w``, loss ``||x_{t+1} - y||^2 / 2``, meta-loss the mean of
the ``T = 8`` losses: quadratic in ``w``, so Gaussian smoothing leaves its gradient unchanged and
ES and PES are exactly unbiased. The oracle is autograd through a plain Python loop (float64).
"""

from __future__ import annotations

import optree
import pytest
import torch
from _purity import assert_unchanged, snapshot

import metafunc
from metafunc.estimators import (
    Estimate,
    PESState,
    TruncatedState,
    Unroll,
    backprop,
    es,
    meta_train,
    pes,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64
A = torch.tensor([[0.9, 0.2], [-0.1, 0.8]], dtype=D)
B = torch.tensor([[0.5, 0.0], [0.1, 0.3]], dtype=D)
Y = torch.tensor([1.0, -2.0], dtype=D)
X0 = torch.tensor([1.0, -1.0], dtype=D)
T, K = 8, 2  # horizon, truncation length: 4 truncations per unroll
SEEDS = 200


def _init(theta, generator):
    return X0.clone()


def _step(theta, x, t):
    x = A @ x + B @ theta["w"]
    return x, 0.5 * ((x - Y) ** 2).sum()


UNROLL = Unroll(_init, _step)


def _theta():
    return {"w": torch.tensor([0.3, -0.2], dtype=D)}


def _exact(theta):
    """The oracle: autograd through the whole unroll, written out."""
    w = theta["w"].clone().requires_grad_()
    x, total = X0, torch.zeros((), dtype=D)
    for _ in range(T):
        x = A @ x + B @ w
        total = total + 0.5 * ((x - Y) ** 2).sum()
    return torch.autograd.grad(total / T, w)[0]


def _unroll_estimate(est, theta, seed, steps):
    """The mean of the estimates over the ``T // steps`` truncations of one unroll."""
    state = est.init(theta, seed=seed)
    grads = []
    for _ in range(T // steps):
        grad, _, state = est.estimate(theta, state)
        grads.append(grad["w"])
    return torch.stack(grads).mean(0)


def _samples(est, theta, steps):
    return torch.stack([_unroll_estimate(est, theta, s, steps) for s in range(SEEDS)])


def _mean_and_error(samples):
    return samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5


def test_full_backprop_is_the_exact_gradient():
    theta = _theta()
    grad = _unroll_estimate(backprop(UNROLL, steps=T, horizon=T), theta, 0, T)
    torch.testing.assert_close(grad, _exact(theta), rtol=1e-12, atol=1e-12)


def test_truncated_backprop_is_measurably_biased():
    """Truncated backprop (4 truncations of 2 steps) averages to (-0.164, 0.532) where the
    gradient is (-0.951, 0.891): a bias of (0.786, -0.359), 64 % of the gradient's norm."""
    theta = _theta()
    tbptt = _unroll_estimate(backprop(UNROLL, steps=K, horizon=T), theta, 0, K)
    bias = tbptt - _exact(theta)
    torch.testing.assert_close(bias, torch.tensor([0.786, -0.359], dtype=D), atol=1e-3, rtol=0)


def test_es_over_the_whole_horizon_is_unbiased():
    theta = _theta()
    est = es(UNROLL, steps=T, horizon=T, std=0.1, num_pairs=16)
    mean, err = _mean_and_error(_samples(est, theta, T))
    assert ((mean - _exact(theta)).abs() <= 4 * err).all(), (mean, err, _exact(theta))


def test_pes_is_unbiased_across_truncations_where_truncated_backprop_is_not():
    """PES over 4 truncations of 2 steps: the mean of 200 unrolls is within 4 standard errors
    (about 0.025 each) of the exact gradient, while truncated backprop is off by (0.786, -0.359),
    over 10 standard errors in every coordinate."""
    theta = _theta()
    exact = _exact(theta)
    est = pes(UNROLL, steps=K, horizon=T, std=0.1, num_pairs=16)
    mean, err = _mean_and_error(_samples(est, theta, K))
    assert ((mean - exact).abs() <= 4 * err).all(), (mean, err, exact)
    tbptt = _unroll_estimate(backprop(UNROLL, steps=K, horizon=T), theta, 0, K)
    assert ((tbptt - exact).abs() > 10 * err).all(), (tbptt, exact, err)


def test_truncated_es_estimates_the_truncated_gradient():
    """ES with truncations shares truncated backprop's bias: its mean is truncated backprop's
    (the state a truncation starts from is taken as given), not the exact gradient."""
    theta = _theta()
    est = es(UNROLL, steps=K, horizon=T, std=0.1, num_pairs=16)
    mean, err = _mean_and_error(_samples(est, theta, K))
    tbptt = _unroll_estimate(backprop(UNROLL, steps=K, horizon=T), theta, 0, K)
    assert ((mean - tbptt).abs() <= 4 * err).all(), (mean, err, tbptt)
    assert ((mean - _exact(theta)).abs() > 10 * err).all()


@pytest.mark.parametrize("factory", [backprop, es, pes])
def test_estimate_is_pure_and_reproducible_from_its_seed(factory):
    kw = {} if factory is backprop else {"std": 0.1, "num_pairs": 4}
    est = factory(UNROLL, steps=K, horizon=T, **kw)
    theta = _theta()
    state = est.init(theta, seed=3)
    before = snapshot((theta, [x for x in optree.tree_leaves(state) if torch.is_tensor(x)]))
    first = est.estimate(theta, state)
    assert_unchanged(before)
    again = est.estimate(theta, state)  # the same state gives the same estimate
    assert isinstance(first, Estimate)
    torch.testing.assert_close(first.grad, again.grad, rtol=0, atol=0)
    assert first.state.step == K
    expected = PESState if factory is pes else TruncatedState
    assert isinstance(first.state, expected)


def test_a_new_unroll_starts_after_the_horizon_and_pes_forgets_its_perturbations():
    est = pes(UNROLL, steps=K, horizon=T, std=0.1, num_pairs=2)
    theta = _theta()
    state = est.init(theta, seed=0)
    for _ in range(T // K):
        _, _, state = est.estimate(theta, state)
    assert state.step == T
    _, loss, state = est.estimate(theta, state)
    assert state.step == K
    # the unperturbed particle restarted from X0: its loss is the first truncation's again
    first = backprop(UNROLL, steps=K, horizon=T)
    _, loss0, _ = first.estimate(theta, first.init(theta, seed=0))
    torch.testing.assert_close(loss, loss0)
    # the accumulators hold one truncation's perturbations only: as large as one draw
    assert optree.tree_leaves(state.accum)[0].abs().max() < 0.5


def test_pes_loss_is_the_unperturbed_trajectorys():
    theta = _theta()
    est = pes(UNROLL, steps=K, horizon=T, std=0.1, num_pairs=3)
    ref = backprop(UNROLL, steps=K, horizon=T)
    s, r = est.init(theta, seed=0), ref.init(theta, seed=0)
    for _ in range(T // K):
        _, loss, s = est.estimate(theta, s)
        _, ref_loss, r = ref.estimate(theta, r)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)


def test_meta_train_with_pes_finds_the_minimiser_of_the_meta_loss():
    """The meta-loss is quadratic, ``L(w) = w^T H w / 2 + c^T w + const``; its minimiser from
    the oracle's H and c (autograd) is where PES-driven Adam ends, within 0.05."""
    zero = {"w": torch.zeros(2, dtype=D)}
    c = _exact(zero)
    H = torch.stack([_exact({"w": e}) - c for e in torch.eye(2, dtype=D)], dim=1)
    w_star = torch.linalg.solve(H, -c)
    est = pes(UNROLL, steps=K, horizon=T, std=0.05, num_pairs=8)
    out = meta_train(est, _theta(), metafunc.optim.adam(lr=0.02), iterations=600, seed=1)
    assert out.losses.shape == (600,)
    torch.testing.assert_close(out.theta["w"], w_star, atol=0.05, rtol=0)


def test_errors_name_the_call_and_the_fix():
    with pytest.raises(TypeError, match=r"pes\(unroll, .*expected unroll to be .*Unroll"):
        pes((_init, _step), steps=1, horizon=2, std=0.1, num_pairs=1)
    with pytest.raises(ValueError, match=r"horizon to be a multiple of steps.*horizon=6"):
        es(UNROLL, steps=3, horizon=7, std=0.1, num_pairs=1)
    with pytest.raises(ValueError, match=r"expected std to be positive and finite"):
        pes(UNROLL, steps=1, horizon=2, std=0.0, num_pairs=1)
    with pytest.raises(ValueError, match=r"expected num_pairs to be a positive int"):
        es(UNROLL, steps=1, horizon=2, std=0.1, num_pairs=0)
    with pytest.raises(ValueError, match=r"expected steps to be a positive int"):
        backprop(UNROLL, steps=0, horizon=2)
    est = pes(UNROLL, steps=1, horizon=2, std=0.1, num_pairs=1)
    with pytest.raises(TypeError, match=r"expected the PESState from this estimator's init"):
        est.estimate(_theta(), backprop(UNROLL, steps=1, horizon=2).init(_theta()))
    with pytest.raises(TypeError, match=r"expected theta to be a pytree of floating-point"):
        est.init({"w": torch.tensor([1, 2])})
    with pytest.raises(TypeError, match=r"meta_train\(.*expected estimator to be"):
        meta_train(est.estimate, _theta(), metafunc.optim.sgd(lr=0.1), iterations=1)
