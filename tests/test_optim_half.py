"""Optimizers on float16 and bfloat16 params, and hyperparameters that overflow the params' dtype.

Half-precision leaves are computed, and their state kept, in float32 (see ``metafunc.optim``); the
oracles are the same computation on float32 params (the half-precision inputs, widened exactly)
and ``torch.optim`` in float64.
"""

from __future__ import annotations

import pickle

import optree
import pytest
import torch
from _registry import REGISTRY

import metafunc
import metafunc.optim as mo

HALF = [torch.float16, torch.bfloat16]
# support-loss weights of the two outputs: output 0 is left out of the inner loss, so the gradients
# of its weights are exactly zero (their second derivatives too; with L2 weight decay they are
# weight_decay * w), while the outer loss uses it
SUPPORT_MASK = [0.0, 1.0]


HALF_CASES = [
    pytest.param(case, config, dtype, id=f"{case.name}-{i}-{str(dtype)[6:]}")
    for case in REGISTRY
    for i, config in enumerate(case.configs)
    for dtype in HALF
]


def _problem(dtype, device):
    """A one-hidden-layer regression net with two outputs, a support and a query set."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    params = {"w1": r(3, 4, scale=0.5), "b1": r(4, scale=0.1), "w2": r(4, 2, scale=0.5)}
    params["b2"] = r(2, scale=0.1)
    data = (r(8, 3), r(8, 2), r(8, 3), r(8, 2))
    return optree.tree_map(lambda t: t.to(device, dtype), (params, data))


def _net(p, x):
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _meta_gradient(opt, params0, data, steps=3):
    """d(query loss after ``steps`` inner steps) / d(params0), by second-order autograd."""
    xs, ys, xq, yq = data
    mask = torch.tensor(SUPPORT_MASK, dtype=ys.dtype, device=ys.device)
    params0 = {k: v.detach().requires_grad_() for k, v in params0.items()}
    p, state = params0, opt.init(params0)
    for _ in range(steps):
        loss = (((_net(p, xs) - ys) ** 2) * mask).mean()
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        updates, state = opt.update(dict(zip(p, grads)), state, p)
        p = metafunc.apply_updates(p, updates)
    query = ((_net(p, xq) - yq) ** 2).mean()
    return dict(zip(params0, torch.autograd.grad(query, list(params0.values()))))


@pytest.mark.parametrize(("case", "config", "dtype"), HALF_CASES)
def test_half_precision_meta_gradient_at_zero_gradient_entries_is_close_to_float32(
    case, config, dtype, device
):
    """The update's derivative at a zero gradient entry is ~lr/eps (1e6 for Adam at lr=0.01),
    beyond float16: it used to meet the zero second derivative of the masked output as
    inf * 0 = nan."""
    params, data = _problem(dtype, device)
    wide = optree.tree_map(lambda t: t.float(), (params, data))  # the same values, exactly
    half = _meta_gradient(case.ours(**config), params, data)
    ref = _meta_gradient(case.ours(**config), *wide)
    assert all(v.dtype == dtype for v in half.values())
    # the inner gradients of output 0's weights are exactly zero; the meta-gradient is not
    assert ref["b2"][0] != 0
    # a few dozen roundings of eps/2 each, on terms no larger than the largest entry
    scale = max(v.abs().max().item() for v in ref.values())
    tol = 16 * torch.finfo(dtype).eps * scale
    for k, v in half.items():
        assert torch.isfinite(v).all(), (k, v)
        torch.testing.assert_close(v.float(), ref[k], rtol=0, atol=tol, msg=k)


def test_float16_meta_gradient_under_vmap_and_torch_func_grad_equals_the_per_task_loop(device):
    """The float16 rule at zero gradient entries (an ``autograd.Function``) composes with
    ``torch.func.grad`` inside ``torch.func.vmap`` over tasks; oracle: the per-task loop."""
    opt = mo.adam(lr=0.01)
    tasks = [_problem(torch.float16, device) for _ in range(3)]
    tasks = [(p, tuple(d * (1 + i / 4) for d in data)) for i, (p, data) in enumerate(tasks)]

    def query_loss_after_two_steps(p, data):
        xs, ys, xq, yq = data
        mask = torch.tensor(SUPPORT_MASK, dtype=ys.dtype, device=ys.device)
        state = opt.init(p)
        for _ in range(2):
            grads = torch.func.grad(lambda q: (((_net(q, xs) - ys) ** 2) * mask).mean())(p)
            updates, state = opt.update(grads, state, p)
            p = metafunc.apply_updates(p, updates)
        return ((_net(p, xq) - yq) ** 2).mean()

    meta = torch.func.grad(query_loss_after_two_steps)
    stacked = optree.tree_map(lambda *x: torch.stack(x), *tasks)
    batched = torch.func.vmap(meta)(*stacked)
    for i, (p, data) in enumerate(tasks):
        one = meta(p, data)
        for k, v in one.items():
            assert torch.isfinite(v).all(), (k, v)
            tol = 4 * torch.finfo(torch.float16).eps  # batched kernels may round differently
            torch.testing.assert_close(batched[k][i], v, rtol=tol, atol=tol * v.abs().max().item())


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", REGISTRY, ids=repr)
def test_half_precision_updates_keep_the_leaf_dtype_and_state_is_float32(case, dtype, device):
    params, _ = _problem(dtype, device)
    grads = optree.tree_map(lambda p: torch.full_like(p, 0.5), params)
    opt = case.ours(**case.configs[-1])
    state = opt.init(params)
    for _ in range(2):
        updates, state = opt.update(grads, state, params)
        assert all(u.dtype == dtype for u in optree.tree_leaves(updates))
        params = metafunc.apply_updates(params, updates)
        assert all(p.dtype == dtype for p in optree.tree_leaves(params))
    per_leaf = [s for s in optree.tree_leaves(state) if s.dim() > 0]
    assert per_leaf
    assert all(s.dtype == torch.float32 for s in per_leaf), [s.dtype for s in per_leaf]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", REGISTRY, ids=repr)
def test_full_precision_state_keeps_the_params_dtype(case, dtype, device):
    params, _ = _problem(dtype, device)
    opt = case.ours(**case.configs[-1])
    state = opt.init(params)
    _, state = opt.update(optree.tree_map(torch.ones_like, params), state, params)
    assert all(s.dtype == dtype for s in optree.tree_leaves(state) if s.dim() > 0)


def test_accumulator_dtype_sets_the_state_dtype_and_the_arithmetic(device):
    """``accumulator_dtype=torch.float64`` on float32 params: Adam's arithmetic and state in
    float64, the update rounded to float32 once. Oracle: ``torch.optim.Adam`` on float64 params."""
    g = torch.Generator().manual_seed(1)
    p32 = torch.randn(5, generator=g).to(device)
    grads = [torch.randn(5, generator=g).to(device) * 10.0**-k for k in range(4)]
    opt = mo.chain(
        mo.scale_by_adam(accumulator_dtype=torch.float64), mo.scale_by_learning_rate(0.1)
    )
    state = opt.init({"p": p32})
    ref = torch.nn.Parameter(p32.double())
    torch_opt = torch.optim.Adam([ref], lr=0.1)
    for grad in grads:
        before = ref.detach().clone()
        ref.grad = grad.double()
        torch_opt.step()
        updates, state = opt.update({"p": grad}, state, {"p": p32})
        assert updates["p"].dtype == torch.float32
        torch.testing.assert_close(updates["p"], (ref - before).float(), rtol=2e-7, atol=1e-9)
    adam_state = state[0]
    assert adam_state.mu["p"].dtype == adam_state.nu["p"].dtype == torch.float64
    torch.testing.assert_close(adam_state.nu["p"], torch_opt.state[ref]["exp_avg_sq"])


def test_accumulator_dtype_float16_keeps_half_state(device):
    params = {"w": torch.ones(3, dtype=torch.float16, device=device)}
    opt = mo.scale_by_rms(accumulator_dtype=torch.float16)
    updates, state = opt.update({"w": torch.full_like(params["w"], 2.0)}, opt.init(params))
    assert state.nu["w"].dtype == torch.float16 and updates["w"].dtype == torch.float16
    # 0.01 * 2**2 = 0.04 is rounded to float16 in the state
    assert state.nu["w"][0].item() == torch.tensor(0.04, dtype=torch.float16).item()


@pytest.mark.parametrize(
    "factory",
    [
        mo.scale_by_adam,
        mo.scale_by_adamax,
        mo.scale_by_nadam,
        mo.scale_by_radam,
        mo.scale_by_rms,
        mo.scale_by_adagrad,
        mo.scale_by_adadelta,
        mo.scale_by_rprop,
        mo.scale_by_asgd,
        lambda **kw: mo.trace(0.9, **kw),
    ],
)
def test_accumulator_dtype_must_be_a_floating_point_dtype(factory):
    with pytest.raises(
        TypeError,
        match=r"\(accumulator_dtype=\.\.\.\): expected None or a floating-point "
        r"torch\.dtype, got 'float16' \(str\)\. Pass e\.g\. accumulator_dtype=torch\.float32",
    ):
        factory(accumulator_dtype="float16")
    with pytest.raises(TypeError, match=r"got torch\.int32"):
        factory(accumulator_dtype=torch.int32)


# ------------------------------------------------------------ hyperparameters that overflow
@pytest.mark.parametrize("case", REGISTRY, ids=repr)
def test_a_learning_rate_that_overflows_the_params_dtype_is_refused(case, device):
    params = {"w": torch.ones(2, device=device)}
    opt = case.ours(**{**case.configs[0], "lr": 1e300})
    with pytest.raises(
        ValueError,
        match=rf"^{case.name}\(\.\.\.\)\.(update|init): lr=1e\+300 overflows torch\.float32 "
        r"\(largest finite value 3\.4028\d*e\+38\) at params leaf \['w'\]: the update would "
        r"be inf or nan\. Pass a smaller lr, or params of a wider dtype \(float64: "
        r"model\.double\(\)\)\.$",
    ):
        opt.update({"w": torch.ones(2, device=device)}, opt.init(params), params)


def test_a_hyperparameter_that_fits_float64_but_not_float16_is_refused_for_float16_only():
    wide = {"w": torch.ones(2, dtype=torch.float64)}
    opt = mo.sgd(lr=0.1, weight_decay=1e5)
    updates, _ = opt.update({"w": torch.ones(2, dtype=torch.float64)}, opt.init(wide), wide)
    torch.testing.assert_close(
        updates["w"], torch.full((2,), -0.1 * (1 + 1e5), dtype=torch.float64)
    )
    half = {"w": torch.ones(2, dtype=torch.float16)}
    with pytest.raises(
        ValueError, match=r"^sgd\(\.\.\.\)\.update: weight_decay=100000\.0 overflows torch\.float16"
    ):
        opt.update({"w": torch.ones(2, dtype=torch.float16)}, opt.init(half), half)


def test_an_overflowing_per_parameter_value_names_its_leaf():
    params = {"a": torch.ones(2), "b": torch.ones(2)}
    opt = mo.adam(lr={"a": 0.1, "b": 1e39})
    with pytest.raises(ValueError, match=r"^adam\(\.\.\.\)\.init: lr\['b'\]=1e\+39 overflows"):
        opt.update({k: torch.ones(2) for k in params}, opt.init(params), params)


def test_an_overflowing_hyperparameter_of_a_plain_transform_names_the_transform():
    params = {"w": torch.ones(2)}
    opt = mo.chain(mo.scale_by_adam(), mo.scale(1e39))
    with pytest.raises(ValueError, match=r"^scale\.update: step_size=1e\+39 overflows"):
        opt.update({"w": torch.ones(2)}, opt.init(params), params)


def test_the_overflow_error_keeps_its_fields_and_pickles():
    """It pickled as its message only, and unpickling called it with one argument of five (a
    TypeError in the process that received it)."""
    params = {"w": torch.ones(2, dtype=torch.float16)}
    opt = mo.sgd(lr=1e5)
    with pytest.raises(ValueError) as caught:
        opt.update({"w": torch.ones(2, dtype=torch.float16)}, opt.init(params), params)
    e = caught.value
    assert (e.call, e.name, e.value, e.dtype, e.key) == (
        "sgd(...).update",
        "lr",
        1e5,
        torch.float16,
        "['w']",
    )
    copy = pickle.loads(pickle.dumps(e))
    assert type(copy) is type(e) and str(copy) == str(e)


def test_overflow_check_runs_under_vmap_without_reading_tensors():
    params = {"w": torch.ones(3, 2)}
    opt = mo.adam(lr=1e300)

    def step(p):
        updates, _ = opt.update({"w": torch.ones_like(p["w"])}, opt.init(p), p)
        return updates

    with pytest.raises(ValueError, match=r"lr=1e\+300 overflows torch\.float32"):
        torch.func.vmap(step)(params)


def test_infinite_bounds_and_large_fitting_values_are_accepted():
    params = {"w": torch.ones(2)}
    for opt in (mo.rprop(step_sizes=(1e-6, float("inf"))), mo.sgd(lr=1e38)):
        updates, _ = opt.update({"w": torch.ones(2)}, opt.init(params), params)
        assert torch.isfinite(updates["w"]).all()
