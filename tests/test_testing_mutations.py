"""Each check of :mod:`metafunc.testing` catches a real bug: it fails on known-wrong code, with
the report pinned, and passes on the fixed code.

Oracles: finite differences (inside ``check_grads``), a per-task loop (inside
``assert_vmap_matches_loop``), version counters and copies (inside ``assert_pure``); the wrong
code is written here, the fixed code is metafunc's own or the corrected user code.
"""

from __future__ import annotations

from typing import NamedTuple

import optree
import pytest
import torch
from torch import nn
from torch.func import functional_call

import metafunc
import metafunc.compat.higher as higher
import metafunc.optim as mo
from metafunc.testing import assert_pure, assert_vmap_matches_loop, check_grads

D = torch.float64


# ------------------------------------------------ higher's copy_initial_weights=True mistake
def _higher_meta_loss(copy_initial_weights):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).to(D)
    xs = torch.linspace(-2, 2, 5, dtype=D)[:, None]
    ys = torch.sin(xs)

    def meta_loss(params):
        # the user's higher code, run on the params under test
        with torch.nn.utils.stateless._reparametrize_module(model, params):
            inner = torch.optim.SGD(model.parameters(), lr=0.1)
            with higher.innerloop_ctx(model, inner, copy_initial_weights=copy_initial_weights) as (
                fmodel,
                diffopt,
            ):
                for _ in range(2):
                    diffopt.step(((fmodel(xs) - ys) ** 2).mean())
                return ((fmodel(xs) - ys) ** 2).mean()

    params = {k: v.detach() for k, v in model.named_parameters()}
    return meta_loss, params


def test_check_grads_catches_highers_copy_initial_weights_mistake():
    meta_loss, params = _higher_meta_loss(copy_initial_weights=True)
    with pytest.raises(
        AssertionError,
        match=r"(?s)first derivative \(torch.autograd.grad\) w\.r\.t\. args\[0\]\['.*'\].*"
        r"analytic = 0\n.*zero/None gradient where the numeric one is not: is the tensor "
        r"detached, or was the gradient cut by copy/clone/no_grad\?",
    ):
        check_grads(meta_loss, (params,), modes=("autograd",))
    fixed, params = _higher_meta_loss(copy_initial_weights=False)
    check_grads(fixed, (params,), modes=("autograd",), order=2)


# ---------------------------------------- Adam with a naive sqrt: NaN at a zero gradient entry
def _naive_adam(lr=0.1, b1=0.9, b2=0.999, eps=1e-8):
    def init(p):
        return optree.tree_map(torch.zeros_like, p), optree.tree_map(torch.zeros_like, p)

    def update(g, s, p=None):
        m = optree.tree_map(lambda m, g: b1 * m + (1 - b1) * g, s[0], g)
        v = optree.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, s[1], g)
        return optree.tree_map(lambda m, v: -lr * m / (torch.sqrt(v) + eps), m, v), (m, v)

    return mo.GradientTransformation(init, update)


def _zero_gradient_meta_loss(opt):
    mask = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=D)

    def inner_loss(p):  # entries 0 and 2 have an exactly-zero gradient
        return (mask * (p["w"] - 0.3) ** 2).sum()

    def meta_loss(params):
        p, state = params, opt.init(params)
        for _ in range(3):
            updates, state = opt.update(torch.func.grad(inner_loss)(p), state, p)
            p = metafunc.apply_updates(p, updates)
        return (p["w"] ** 2).sum() + p["w"].sum()

    return meta_loss


def test_check_grads_catches_adam_with_a_naive_sqrt_at_a_zero_gradient_entry():
    params = {"w": torch.tensor([0.0, 0.5, 0.0, -1.0])}
    with pytest.raises(
        AssertionError,
        match=r"(?s)args\[0\]\['w'\].*analytic = nan\n  numeric  = -?[0-9.]+ .*the analytic "
        r"derivative is nan where the numeric one is finite.*double backward",
    ):
        check_grads(_zero_gradient_meta_loss(_naive_adam()), (params,))
    check_grads(_zero_gradient_meta_loss(mo.adam(lr=0.1)), (params,), order=2)


# -------------------------------------- vmap over native F.batch_norm, second order (MAML)
def _batchnorm_problem():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.ReLU(), nn.Linear(4, 1)
    ).to(D)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 5, d, generator=g, dtype=D) for d in (3, 1, 3, 1)]
    return net, data


def test_assert_vmap_matches_loop_catches_native_batch_norm_and_passes_exact_norms():
    net, data = _batchnorm_problem()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, x, y):
        return ((functional_call(net, p, (x,)) - y) ** 2).mean()

    def maml_task(p, xs, ys, xq, yq):  # one SGD step, second order, native F.batch_norm
        grads = torch.func.grad(loss)(p, xs, ys)
        return loss({k: p[k] - 0.5 * grads[k] for k in p}, xq, yq)

    in_dims = (None, 0, 0, 0, 0)
    assert_vmap_matches_loop(maml_task, in_dims, params, *data)  # the values agree
    with pytest.raises(
        AssertionError,
        match=r"(?s)task 0 of 4 differs from the per-task loop in the first derivative of the "
        r"projected outputs w\.r\.t\. args\[0\]\['0\.bias'\].*rel\. error.*"
        r"pytorch/functorch#534.*metafunc\.FunctionalModel",
    ):
        assert_vmap_matches_loop(maml_task, in_dims, params, *data, grads=1)

    fm = metafunc.functionalize(net)
    fm_loss = lambda p, b: ((fm(p, b[0]) - b[1]) ** 2).mean()

    def fixed_task(p, xs, ys, xq, yq):
        result = metafunc.inner_loop(fm_loss, p, mo.sgd(lr=0.5), (xs, ys), steps=1)
        return fm_loss(result.params, (xq, yq))

    # grads=1 (the MAML meta-gradient): grads=2 would differentiate the eager F.batch_norm of the
    # loop a third time, which check_grads finds wrong on torch 2.13 (the loop is no oracle there)
    assert_vmap_matches_loop(fixed_task, in_dims, fm.params, *data, grads=1)


# ------------ a backward wrong by 1 % in one entry of a 10 000-entry leaf, next to a large leaf
def _cube(wrong):
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x**3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            scale = torch.ones_like(x)
            if wrong:
                scale[1234] = 1.01
            return 3 * x**2 * grad * scale

    return Cube.apply


def test_check_grads_finds_a_one_percent_error_in_one_element_of_a_large_leaf():
    g = torch.Generator().manual_seed(0)
    params = {
        "big": torch.randn(10_000, generator=g, dtype=D),
        "large": torch.randn(50, 40, generator=g, dtype=D),
    }
    params["big"][1234] = 2.0

    def fn(cube):  # the second leaf's derivative is 10^4 times larger
        return lambda p: cube(p["big"]).sum() + 1e4 * torch.sin(p["large"]).sum()

    with pytest.raises(
        AssertionError,
        match=r"(?s)first derivative \(reverse mode, torch.func.grad\) w\.r\.t\. "
        r"args\[0\]\['big'\] is wrong along a random direction:\n"
        r"  analytic = 9\.76.*\n  numeric  = 9\.76.*\n"
        r"  analytic / numeric = 0\.9999.*rtol=1e-05\n  1 of 2 comparisons failed\n"
        r".*a custom autograd\.Function whose backward is wrong",
    ) as info:
        check_grads(fn(_cube(wrong=True)), (params,), modes=("rev",))
    assert "args[0]['large']" not in str(info.value)
    check_grads(fn(_cube(wrong=False)), (params,), modes=("rev",))
    # one global unit direction would have hidden it: the error is below rtol of that projection
    d = {k: torch.randn(v.shape, generator=g, dtype=D) for k, v in params.items()}
    norm = sum((v**2).sum() for v in d.values()).sqrt()
    right = (3 * params["big"] ** 2 * d["big"]).sum() + (
        1e4 * params["large"].cos() * d["large"]
    ).sum()
    error = 0.01 * 3 * params["big"][1234] ** 2 * d["big"][1234]
    assert abs(error / right) < 1e-5 and abs(right / norm) > 10


# ------------------------------------------------ an optimizer update writing into its state
class _MomentumState(NamedTuple):
    m: dict


def _leaky_momentum(lr=0.1, beta=0.9):
    def init(p):
        return _MomentumState(optree.tree_map(torch.zeros_like, p))

    def update(g, s, p=None):
        m = optree.tree_map(lambda m, g: m.mul_(beta).add_(g), s.m, g)  # in place: the bug
        return optree.tree_map(lambda m: -lr * m, m), _MomentumState(m)

    return mo.GradientTransformation(init, update)


def test_assert_pure_catches_an_update_that_writes_into_its_state():
    params = {"b": torch.zeros(2, dtype=D), "w": torch.ones(3, dtype=D)}
    grads = {"b": torch.ones(2, dtype=D), "w": torch.full((3,), 0.5, dtype=D)}
    opt = _leaky_momentum()
    with pytest.raises(
        AssertionError,
        match=r"assert_pure\(fn, \*args, \*\*kwargs\): fn wrote into its input args\[1\]\.m\['b'\] "
        r"in place \(version counter 0 -> 2; values changed\)\. A pure function returns new "
        r"tensors",
    ):
        assert_pure(opt.update, grads, opt.init(params), params)
    fixed = mo.sgd(lr=0.1, momentum=0.9)
    state = fixed.update(grads, fixed.init(params), params)[1]  # a non-trivial state
    assert_pure(fixed.update, grads, state, params)


# ------------------------------------------------ an inner loop that silently runs first order
def _mlp_meta_loss(**inner_kwargs):
    g = torch.Generator().manual_seed(3)
    xs, xq = torch.randn(6, 1, generator=g, dtype=D), torch.randn(6, 1, generator=g, dtype=D)

    def mse(p, batch):
        x, y = batch
        return ((torch.tanh(x @ p["w0"].T + p["b0"]) @ p["w1"].T - y) ** 2).mean()

    def meta_loss(params):
        adapted = metafunc.inner_loop(
            mse, params, mo.adam(lr=0.1), (xs, torch.sin(xs)), steps=2, **inner_kwargs
        )
        return mse(adapted.params, (xq, torch.sin(xq)))

    params = {
        "w0": torch.randn(5, 1, generator=g, dtype=D),
        "b0": torch.randn(5, generator=g, dtype=D),
        "w1": torch.randn(1, 5, generator=g, dtype=D),
    }
    return meta_loss, params


def test_check_grads_catches_an_inner_loop_that_silently_runs_first_order():
    meta_loss, params = _mlp_meta_loss(first_order=True)
    with pytest.raises(
        AssertionError,
        match=r"(?s)the first derivative \(.*\) w\.r\.t\. args\[0\]\['(w0|b0|w1)'\] is wrong.*"
        r"an inner loop that silently runs first order: first_order=True",
    ):
        check_grads(meta_loss, (params,))
    fixed, params = _mlp_meta_loss()
    check_grads(fixed, (params,), order=2)
