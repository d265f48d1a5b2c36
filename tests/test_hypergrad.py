"""Hypergradients (metafunc.hyper): unrolled against float64 central differences of a training
loop written out by hand; implicit against ridge regression's closed form."""

from __future__ import annotations

import functools

import pytest
import torch

import metafunc
import metafunc.optim as mo
from metafunc.hyper import argmin, implicit_hypergrad, unrolled_hypergrad
from metafunc.implicit import ImplicitSolveWarning, solve_neumann

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64
N, DIM, STEPS, LR = 12, 4, 6, 0.1


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * N, DIM, generator=g, dtype=D)
    y = x @ torch.randn(DIM, generator=g, dtype=D) + 0.3 * torch.randn(2 * N, generator=g, dtype=D)
    y[:3] += 4.0  # three corrupted training labels, for the data weights to find
    return (x[:N], y[:N]), (x[N:], y[N:])


TRAIN, VAL = _data()
PARAMS = {"w": torch.zeros(DIM, dtype=D), "b": torch.zeros((), dtype=D)}


def _residual(p, batch):
    x, y = batch
    return x @ p["w"] + p["b"] - y


def _val(p):
    return 0.5 * (_residual(p, VAL) ** 2).mean()


def _manual_gd(wd_w, wd_b, lrs, c):
    """Gradient descent written out (the oracle): per-element weight decay, per-step learning
    rates, per-example data weights; returns the validation loss."""
    x, y = TRAIN
    w, b = PARAMS["w"].clone(), PARAMS["b"].clone()
    for lr in lrs:
        r = c * (x @ w + b - y) / N
        gw, gb = x.T @ r + wd_w * w, r.sum() + wd_b * b
        w, b = w - lr * gw, b - lr * gb
    return 0.5 * ((VAL[0] @ w + b - VAL[1]) ** 2).mean()


def _central(f, x, h=1e-6):
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).reshape(-1)
        e[i] = h
        e = e.reshape(x.shape)
        out.reshape(-1)[i] = (f(x + e) - f(x - e)) / (2 * h)
    return out


def _weighted_train(p, h):
    return 0.5 * (h["c"] * _residual(p, TRAIN) ** 2).mean()


def test_unrolled_per_parameter_weight_decay_matches_finite_differences():
    hyper = {"wd": {"w": torch.linspace(0.1, 0.4, DIM, dtype=D), "b": torch.tensor(0.2, dtype=D)}}
    ones, lrs = torch.ones(N, dtype=D), [LR] * STEPS
    out = unrolled_hypergrad(
        _val,
        lambda p, h: _weighted_train(p, {"c": ones}),
        PARAMS,
        hyper,
        lambda h: mo.chain(mo.add_decayed_weights(h["wd"]), mo.sgd(lr=LR)),
        steps=STEPS,
    )
    wd_w, wd_b = hyper["wd"]["w"], hyper["wd"]["b"]
    fd_w = _central(lambda v: _manual_gd(v, wd_b, lrs, ones), wd_w)
    fd_b = _central(lambda v: _manual_gd(wd_w, v, lrs, ones), wd_b)
    torch.testing.assert_close(out.grad["wd"]["w"], fd_w, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(out.grad["wd"]["b"], fd_b, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(out.value, _manual_gd(wd_w, wd_b, lrs, ones))


def test_unrolled_learning_rate_schedule_matches_finite_differences():
    hyper = {"lr": torch.linspace(0.05, 0.3, STEPS, dtype=D)}
    ones, zero = torch.ones(N, dtype=D), torch.zeros((), dtype=D)
    out = unrolled_hypergrad(
        _val,
        lambda p, h: _weighted_train(p, {"c": ones}),
        PARAMS,
        hyper,
        lambda h: [mo.sgd(lr=h["lr"][t]) for t in range(STEPS)],
        steps=STEPS,
    )
    fd = _central(lambda v: _manual_gd(zero, zero, list(v), ones), hyper["lr"])
    torch.testing.assert_close(out.grad["lr"], fd, rtol=1e-6, atol=1e-10)


def test_unrolled_data_weights_match_finite_differences_and_flag_the_corrupted_labels():
    hyper = {"c": torch.ones(N, dtype=D)}
    zero = torch.zeros((), dtype=D)
    out = unrolled_hypergrad(
        _val, _weighted_train, PARAMS, hyper, lambda h: mo.sgd(lr=LR), steps=STEPS
    )
    fd = _central(lambda v: _manual_gd(zero, zero, [LR] * STEPS, v), hyper["c"])
    torch.testing.assert_close(out.grad["c"], fd, rtol=1e-6, atol=1e-10)
    # the three corrupted examples are those whose weight most wants to go down
    assert set(torch.topk(out.grad["c"], 3).indices.tolist()) == {0, 1, 2}


def _ridge_train(p, h):
    return 0.5 * (h["c"] * _residual(p, TRAIN) ** 2).mean() + 0.5 * ((h["l2"] * p["w"] ** 2).sum())


def _closed_form_val(l2, c):
    """The oracle: w*(l2, c) = argmin of the weighted ridge loss by a linear solve (the bias is
    an unpenalised column of ones), differentiated by autograd through torch.linalg.solve."""
    x, y = TRAIN
    xb = torch.cat([x, torch.ones(N, 1, dtype=D)], dim=1)
    penalty = torch.diag(torch.cat([l2, torch.zeros(1, dtype=D)]))
    a = xb.T @ (c[:, None] * xb) / N + penalty
    sol = torch.linalg.solve(a, xb.T @ (c * y) / N)
    return _val({"w": sol[:DIM], "b": sol[DIM]})


SOLVERS = {
    "cg": metafunc.implicit.solve_cg,
    "neumann": functools.partial(solve_neumann, alpha=0.3, maxiter=2000, tol=1e-12),
}


@pytest.mark.parametrize("solver", SOLVERS.values(), ids=SOLVERS.keys())
def test_implicit_hypergradient_of_ridge_regression_is_the_closed_forms(solver):
    l2 = torch.linspace(0.05, 0.5, DIM, dtype=D)
    c = torch.linspace(0.5, 1.5, N, dtype=D)
    out = implicit_hypergrad(
        _val,
        _ridge_train,
        PARAMS,
        {"l2": l2, "c": c},
        opt=mo.sgd(lr=0.3),
        steps=3000,
        solve=solver,
    )
    l2_, c_ = l2.clone().requires_grad_(), c.clone().requires_grad_()
    expected = torch.autograd.grad(_closed_form_val(l2_, c_), [l2_, c_])
    torch.testing.assert_close(out.grad["l2"], expected[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.grad["c"], expected[1], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.value, _closed_form_val(l2, c), rtol=1e-9, atol=1e-12)


def test_argmin_warns_when_training_stops_short_of_the_minimum():
    l2 = torch.full((DIM,), 0.1, dtype=D, requires_grad=True)
    w = argmin(
        _ridge_train,
        PARAMS,
        {"l2": l2, "c": torch.ones(N, dtype=D)},
        opt=mo.sgd(lr=0.01),
        steps=3,
    )
    with pytest.warns(ImplicitSolveWarning, match="the solution is not a root"):
        torch.autograd.grad(_val(w), l2)


def test_errors_name_the_call_and_the_fix():
    with pytest.raises(TypeError, match=r"unrolled_hypergrad\(.*expected hyper to be a pytree"):
        unrolled_hypergrad(_val, _weighted_train, PARAMS, {"c": 1.0}, mo.sgd, steps=1)
    with pytest.raises(TypeError, match=r"argmin\(.*expected opt to be a metafunc.optim optim"):
        argmin(_ridge_train, PARAMS, {"l2": torch.ones(DIM, dtype=D)}, opt=mo.sgd, steps=1)
    with pytest.raises(ValueError, match=r"expected steps to be a positive int"):
        implicit_hypergrad(
            _val, _ridge_train, PARAMS, {"l2": torch.ones(DIM)}, opt=mo.sgd(lr=0.1), steps=0
        )
