"""``check_grads``, ``assert_vmap_matches_loop`` and ``assert_pure`` on right and wrong code.

Oracles: closed-form derivatives written into custom ``autograd.Function``s (right, or wrong in
one known place), version counters, a stateful function whose loop result is known.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

from metafunc.testing import assert_pure, assert_vmap_matches_loop, check_grads

D = torch.float64


class _State(NamedTuple):
    mu: dict
    count: torch.Tensor


def _tree(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {
        "layers": [torch.randn(3, generator=g).to(dtype), torch.randn(2, 3, generator=g).to(dtype)],
        "state": _State({"a": torch.randn(2, generator=g).to(dtype)}, torch.tensor(3)),
    }


def _smooth(tree, scale):
    w0, w1 = tree["layers"]
    h = torch.tanh(w1 @ w0 + tree["state"].mu["a"])
    return {"out": scale * h**2, "n": tree["state"].count * 2}


def test_check_grads_passes_on_a_pytree_and_leaves_the_callers_tensors_untouched():
    tree = _tree()
    for x in (tree["layers"][0], tree["state"].mu["a"]):
        x.requires_grad_()
    before = [(x, x._version, x.detach().clone(), x.dtype) for x in _leaves(tree)]
    check_grads(_smooth, (tree, 1.5), order=2, modes=("rev", "fwd", "autograd"))
    for x, version, value, dtype in before:
        assert x._version == version and x.dtype == dtype and torch.equal(x.detach(), value)
    assert torch.get_default_dtype() == torch.float32
    assert tree["layers"][1].grad is None and tree["layers"][0].grad is None


def _leaves(tree):
    import optree

    return [x for x in optree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _scaled_square(index, factor, jvp_factor=1.0, differentiable_backward=True):
    """x ** 2 with a backward (and jvp) wrong by ``factor`` at ``index``; optionally a backward
    that is right in value but cut from the graph (its own derivative is zero)."""

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x**2

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            if not differentiable_backward:
                x = x.detach()
            scale = torch.ones_like(x)
            scale[index] = factor
            return 2 * x * grad * scale

        @staticmethod
        def jvp(ctx, tangent):
            (x,) = ctx.saved_tensors
            scale = torch.ones_like(x)
            scale[index] = jvp_factor
            return 2 * x * tangent * scale

    return Square.apply


def test_check_grads_names_the_one_wrong_element_of_a_small_leaf():
    square = _scaled_square((1, 0), 1.001)
    g = torch.Generator().manual_seed(1)
    layers = [torch.randn(3, generator=g, dtype=D), torch.randn(2, 3, generator=g, dtype=D)]
    tree = {"layers": layers}
    fn = lambda t: t["layers"][0].sin().sum() + square(t["layers"][1]).sum()
    with pytest.raises(
        AssertionError,
        match=r"(?s)w\.r\.t\. args\[0\]\['layers'\]\[1\] is wrong along element \(1, 0\):.*"
        r"analytic / numeric = 1\.001",
    ):
        check_grads(fn, (tree,), modes=("rev",))
    check_grads(lambda t: t["layers"][0].sin().sum() + (t["layers"][1] ** 2).sum(), (tree,))


def test_check_grads_order_two_finds_a_backward_that_is_not_differentiable():
    square = _scaled_square(0, 1.0, differentiable_backward=False)
    fn = lambda x: (square(x) * x.cos()).sum()
    x = torch.tensor([0.3, -1.2, 0.7], dtype=D)
    check_grads(fn, (x,))  # first derivatives are right
    with pytest.raises(
        AssertionError,
        match=r"(?s)order=2\): the second derivative \(reverse-over-reverse.*w\.r\.t\. args\[0\].*"
        r"the first derivative is right but the second is not",
    ):
        check_grads(fn, (x,), order=2, modes=("rev",))


def test_check_grads_tells_a_wrong_jvp_from_a_wrong_backward():
    x = torch.tensor([0.3, -1.2, 0.7], dtype=D)
    wrong_jvp = _scaled_square(2, 1.0, jvp_factor=0.5)
    with pytest.raises(
        AssertionError,
        match=r"(?s)\(forward mode, torch.func.jvp\) w\.r\.t\. args\[0\].*reverse mode agrees "
        r"with the numeric derivative but forward mode does not: .* whose jvp is wrong",
    ):
        check_grads(lambda x: wrong_jvp(x).sum(), (x,))
    wrong_vjp = _scaled_square(2, 0.5)
    with pytest.raises(AssertionError, match=r"(?s)\(reverse mode.*backward is wrong"):
        check_grads(lambda x: wrong_vjp(x).sum(), (x,))


def test_check_grads_argnums_holds_the_other_arguments_fixed():
    detached = lambda w, b: (w * b.detach()).sum()
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(3, generator=g, dtype=D), torch.randn(3, generator=g, dtype=D)
    check_grads(detached, (w, b), argnums=0)
    with pytest.raises(AssertionError, match=r"(?s)w\.r\.t\. args\[1\].*zero/None gradient"):
        check_grads(detached, (w, b), argnums=(1,))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"args": {"w": 1}}, TypeError, r"expected args to be the tuple of fn's positional"),
        ({"order": 3}, ValueError, r"expected order in \(1, 2\), got 3"),
        ({"modes": "rev"}, ValueError, r"expected modes to be a non-empty tuple of 'rev'"),
        ({"argnums": 2}, ValueError, r"expected argnums to be an int or a tuple of ints"),
        ({"eps": 0.0}, ValueError, r"expected eps to be positive and finite"),
        ({"args": (torch.tensor([1, 2]),)}, ValueError, r"no floating-point tensor among"),
        ({"fn": lambda x: 3}, TypeError, r"fn returned no floating-point tensor"),
        ({"fn": 3}, TypeError, r"expected fn to be callable, got int"),
    ],
)
def test_check_grads_argument_errors(kwargs, error, pattern):
    call = {"fn": lambda x: x.sum(), "args": (torch.ones(2, dtype=D),), **kwargs}
    with pytest.raises(error, match=r"check_grads\(fn, args, \.\.\.\): " + pattern):
        check_grads(call.pop("fn"), call.pop("args"), **call)


# ------------------------------------------------------------------- assert_vmap_matches_loop
def test_vmap_matches_loop_passes_with_pytrees_and_second_derivatives():
    g = torch.Generator().manual_seed(0)
    meta = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)}
    xs = torch.randn(4, 5, 3, generator=g)
    before = [(t, t._version, t.clone()) for t in (*meta.values(), xs)]

    def task(p, x, scale):
        h = torch.tanh(x @ p["w"] + p["b"])
        return {"loss": scale * (h**2).mean(), "h": h}

    assert_vmap_matches_loop(task, (None, 0, None), meta, xs, 2.0, grads=2)
    for t, version, value in before:
        assert t._version == version and t.dtype == torch.float32 and torch.equal(t, value)


def test_vmap_matches_loop_names_the_first_differing_task_and_output_leaf():
    calls = []

    def counting(x):  # reads state that changes between calls: the loop sees 1, 2, 3
        calls.append(1)
        return {"y": x * len(calls), "z": x}

    with pytest.raises(
        AssertionError,
        match=r"assert_vmap_matches_loop\(fn, in_dims=0, \.\.\.\): task 0 of 3 differs from the "
        r"per-task loop in the output out\['y'\]: max \|vmap - loop\| = 1 at element \(1,\) "
        r"\(vmap 1, loop 2, rel\. error 5\.00e-01\)",
    ):
        assert_vmap_matches_loop(counting, 0, torch.arange(6.0).reshape(3, 2))


def test_vmap_matches_loop_randomness_same_and_argument_errors():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, generator=g)
    noisy = lambda x: x + torch.rand(4)
    assert_vmap_matches_loop(noisy, (0,), x, randomness="same")
    with pytest.raises(ValueError, match=r"randomness='different' draws numbers a per-task loop"):
        assert_vmap_matches_loop(noisy, (0,), x, randomness="different")
    with pytest.raises(ValueError, match=r"same size along its in_dim, got sizes \[2, 3\]"):
        assert_vmap_matches_loop(lambda a, b: a + b, (0, 0), x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"expected in_dims to be an int or a tuple with one"):
        assert_vmap_matches_loop(noisy, (0, 1), x)
    with pytest.raises(ValueError, match=r"grads=1 needs a shared \(in_dim None\)"):
        assert_vmap_matches_loop(lambda x: x.sum(), (0,), x, grads=1)


# ------------------------------------------------------------------------------- assert_pure
def test_assert_pure_returns_the_result_of_a_pure_call():
    x = torch.linspace(-1, 1, 3)
    out = assert_pure(lambda x, *, k: {"y": x * k}, x, k=2.0)
    torch.testing.assert_close(out["y"], 2.0 * x)


def test_assert_pure_names_a_module_buffer_written_by_a_train_mode_norm():
    bn = nn.BatchNorm1d(3)
    with pytest.raises(
        AssertionError,
        match=r"fn wrote into its input fn\.running_mean without bumping its version counter "
        r"\(.*batch_norm's running statistics\).*metafunc\.functionalize",
    ):
        assert_pure(bn, torch.linspace(-1, 1, 12).reshape(4, 3))
    assert_pure(bn.eval(), torch.linspace(-1, 1, 12).reshape(4, 3))


def test_assert_pure_catches_a_write_through_data_and_a_second_call_that_differs():
    def through_data(x):
        x.data[0] = 5.0
        return x * 2

    with pytest.raises(AssertionError, match=r"args\[0\] without bumping its version counter"):
        assert_pure(through_data, torch.zeros(2))
    calls = []

    def stateful(x):
        calls.append(1)
        return {"y": x * len(calls)}

    with pytest.raises(
        AssertionError, match=r"returned different values at out\['y'\]: fn keeps state"
    ):
        assert_pure(stateful, torch.ones(2))
    assert_pure(stateful, torch.ones(2), check_repeat=False)
    # the RNG state is the same for both calls: a seeded random fn is deterministic
    assert_pure(lambda x: x + torch.randn(2), torch.ones(2))
