"""The fused descent step: ``update_and_apply`` (what ``inner_loop`` steps through).

Every named optimizer ends in ``scale_by_learning_rate``, whose update ``-lr * u`` and
``apply_updates``' ``p + update`` become one op (``torch.add(p, u, alpha=-lr)``, or
``torch.addcmul`` for a tensor rate). Oracles: the two calls ``opt.update`` + ``apply_updates``
(same maths, two roundings: equal to one rounding in float64 at 1e-15), ``torch.optim`` through
the registry (``test_optim_torch``), and counts of autograd nodes written here.
"""

from __future__ import annotations

import pytest
import torch
from _registry import REGISTRY

import metafunc
import metafunc.optim as mo
from metafunc.optim._base import update_and_apply

D = torch.float64


def _setup(device, dtype=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(3, 2, generator=g, dtype=D).to(device, dtype),
        "b": torch.randn(2, generator=g, dtype=D).to(device, dtype),
    }
    grads = {
        k: torch.randn(v.shape, generator=g, dtype=D).to(device, dtype) for k, v in params.items()
    }
    return params, grads


def _two_calls(opt, grads, state, params):
    updates, state = opt.update(grads, state, params)
    return metafunc.apply_updates(params, updates), state


CONFIGS = [
    pytest.param(case, config, id=f"{case.name}-{i}")
    for case in REGISTRY
    for i, config in enumerate(case.configs)
]


@pytest.mark.parametrize(("case", "config"), CONFIGS)
def test_every_named_optimizer_fused_equals_update_then_apply(case, config, device):
    opt = case.ours(**config)
    params, grads = _setup(device)
    state_a = state_b = opt.init(params)
    pa = pb = params
    for step in range(3):  # the state carries on: momentum, moments, step counts
        grads_t = {k: g * (step + 1) for k, g in grads.items()}
        pa, state_a = update_and_apply(opt, grads_t, state_a, pa)
        pb, state_b = _two_calls(opt, grads_t, state_b, pb)
        for k in params:
            torch.testing.assert_close(pa[k], pb[k], rtol=1e-15, atol=1e-15)
            assert pa[k].dtype == params[k].dtype
    for a, b in zip(
        torch.utils._pytree.tree_leaves(state_a), torch.utils._pytree.tree_leaves(state_b)
    ):
        assert torch.equal(a, b)  # the state is computed by the same kernels


@pytest.mark.parametrize(
    "lr",
    [0.1, "tensor", "per-leaf", "per-element"],
)
def test_the_fused_step_is_one_op_per_leaf_and_differentiable_in_every_input(lr, device):
    """``p - lr * g`` as one node of the graph (two before), with the same first and second
    derivatives in the params, the gradients and a learnable rate as the two ops."""
    params, grads = _setup(device)
    params = {k: v.requires_grad_() for k, v in params.items()}
    grads = {k: v.requires_grad_() for k, v in grads.items()}
    if lr == "tensor":
        rate = torch.tensor(0.1, dtype=D, device=device, requires_grad=True)
    elif lr == "per-leaf":
        rate = {
            k: torch.tensor(0.1 * (i + 1), dtype=D, device=device, requires_grad=True)
            for i, k in enumerate(params)
        }
    elif lr == "per-element":
        rate = {k: torch.full_like(v, 0.05).requires_grad_() for k, v in params.items()}
    else:
        rate = lr
    opt = mo.sgd(lr=rate)
    state = opt.init(params)
    fused, _ = update_and_apply(opt, grads, state, params)
    plain, _ = _two_calls(opt, grads, state, params)
    for k in params:
        assert fused[k].grad_fn.next_functions[0][0] is not None
        inputs = {
            fused[k].grad_fn.next_functions[i][0]
            for i in range(len(fused[k].grad_fn.next_functions))
        }
        assert not any(type(n).__name__.startswith("MulBackward") for n in inputs), k
        assert any(
            type(n).__name__.startswith("MulBackward")
            for n in {plain[k].grad_fn.next_functions[i][0] for i in range(2)}
        ), k  # the oracle's two ops
    leaves = [*params.values(), *grads.values()]
    leaves += (
        [rate]
        if isinstance(rate, torch.Tensor)
        else list(rate.values())
        if isinstance(rate, dict)
        else []
    )

    def total(out):
        return sum((v**2).sum() for v in out.values())

    first_f = torch.autograd.grad(total(fused), leaves, create_graph=True)
    first_p = torch.autograd.grad(total(plain), leaves, create_graph=True)
    for a, b in zip(first_f, first_p):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    second_f = torch.autograd.grad(sum(g.sum() for g in first_f), leaves, allow_unused=True)
    second_p = torch.autograd.grad(sum(g.sum() for g in first_p), leaves, allow_unused=True)
    for a, b in zip(second_f, second_p):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def test_mixed_dtypes_take_the_two_ops_and_keep_the_param_dtype():
    """A float64 rate with float32 params: the promotion of the two ops (update in the
    gradient's dtype, sum in the param's), bit for bit."""
    params, grads = _setup("cpu", torch.float32)
    rate = {k: torch.full(v.shape, 0.1, dtype=D) for k, v in params.items()}
    opt = mo.sgd(lr=rate)
    state = opt.init(params)
    fused, _ = update_and_apply(opt, grads, state, params)
    plain, _ = _two_calls(opt, grads, state, params)
    for k in params:
        assert fused[k].dtype == torch.float32
        assert torch.equal(fused[k], plain[k])


def test_a_transform_without_a_fused_step_runs_the_two_calls():
    """A hand-written optimizer (optax-style init/update) and a chain that does not end in the
    learning rate: the two calls, bit for bit."""
    params, grads = _setup("cpu")
    custom = mo.GradientTransformation(
        lambda p: (), lambda u, s, p=None: ({k: -0.1 * v for k, v in u.items()}, s)
    )
    clipped_last = mo.chain(mo.sgd(lr=0.1), mo.clip_by_global_norm(1.0))
    for opt in (custom, clipped_last):
        state = opt.init(params)
        fused, _ = update_and_apply(opt, grads, state, params)
        plain, _ = _two_calls(opt, grads, state, params)
        for k in params:
            assert torch.equal(fused[k], plain[k])


def _message(fn, *args):
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*args)
    return type(info.value), str(info.value)


def test_the_fused_step_checks_as_the_two_calls_do():
    """The same errors, word for word: params of other shapes, a foreign state, a rate that
    overflows half precision."""
    params, grads = _setup("cpu")
    opt = mo.sgd(lr=0.1)
    state = opt.init(params)
    wrong = {"w": params["w"], "b": params["b"][:1]}
    half = {k: v.half() for k, v in params.items()}
    half_grads = {k: g.half() for k, g in grads.items()}
    too_big = mo.sgd(lr=1e300)
    for args in (
        (opt, grads, state, wrong),
        (opt, grads, (), params),
        (mo.adam(lr=0.1), grads, state, params),
        (too_big, half_grads, too_big.init(params), half),
    ):
        fused = _message(update_and_apply, *args)
        assert fused == _message(_two_calls, *args)
        assert "expected" in fused[1] or "overflow" in fused[1].lower()


def test_inner_loop_steps_with_the_fused_op(device):
    """Each exact step of an SGD inner loop adds one node per leaf for the update (the two ops
    made two), and the adapted params equal a hand-written ``torch.add(p, g, alpha=-lr)``."""
    params, _ = _setup(device)
    x = torch.randn(5, 3, dtype=D, device=device)

    def loss(p, x):
        return ((x @ p["w"] + p["b"]) ** 2).mean()

    result = metafunc.inner_loop(loss, params, mo.sgd(lr=0.1), x, steps=2)
    expected = dict(params)
    for _ in range(2):
        g = torch.func.grad(loss)(expected, x)
        expected = {k: torch.add(v, g[k], alpha=-0.1) for k, v in expected.items()}
    for k in params:
        assert torch.equal(result.params[k], expected[k])
