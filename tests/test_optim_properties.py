"""Generic properties every registered optimizer must have (optax ``alias_test`` style)."""

from __future__ import annotations

import optree
import pytest
import torch
from _registry import REGISTRY, hyper_value, loss_fn, with_hypers
from hypothesis import given
from hypothesis import strategies as st

import metafunc
import metafunc.optim as mo
from metafunc.testing import assert_pure, assert_vmap_matches_loop, check_grads

ALL = [pytest.param(case, id=case.name) for case in REGISTRY]
ALL_CONFIGS = [
    pytest.param(case, i, id=f"{case.name}-{i}")
    for case in REGISTRY
    for i in range(len(case.configs))
]


def _params(seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    p = {
        "w": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "b": torch.randn(2, generator=g, dtype=torch.float64),
    }
    c = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in p.items()}
    cast = lambda t: optree.tree_map(lambda x: x.to(device, dtype), t)
    return cast(p), cast(c)


def _unroll(opt, params, coeffs, steps, create_graph=True):
    """A differentiable unroll written with torch.autograd.grad (independent of torch.func)."""
    state = opt.init(params)
    for _ in range(steps):
        loss = loss_fn(params, coeffs)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        grads = dict(zip(params, grads))
        updates, state = opt.update(grads, state, params)
        params = metafunc.apply_updates(params, updates)
    return params, state


# ------------------------------------------------------------------------------------ purity
@pytest.mark.parametrize(("case", "index"), ALL_CONFIGS)
def test_pure_no_input_modified(case, index):
    params, coeffs = _params()
    grads = torch.func.grad(loss_fn)(params, coeffs)
    opt = case.ours(**case.configs[index])
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)  # a non-trivial state

    def next_step(params, grads, state, updates):
        updates2, state2 = opt.update(grads, state, params)
        metafunc.apply_updates(params, updates2)
        opt.init(params)
        return updates2, state2

    # no input (nor the previous updates) written, values or versions; a repeat call agrees
    updates2, state2 = assert_pure(next_step, params, grads, state, updates)
    # new state and updates never alias the inputs
    ids = {t.data_ptr() for t in optree.tree_leaves((params, grads)) if t.numel()}
    assert not any(
        t.data_ptr() in ids for t in optree.tree_leaves((updates2, state2)) if t.dim() > 0
    )


# ------------------------------------------------------------- structure / shape / dtype
@given(
    case=st.sampled_from(REGISTRY),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    shape_list=st.lists(st.lists(st.integers(1, 3), max_size=3).map(tuple), min_size=1, max_size=3),
    nested=st.booleans(),
)
def test_structure_shape_dtype_preserved(case, dtype, shape_list, nested):
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(s, generator=g).to(dtype) for s in shape_list]
    params = {"block": {"layers": leaves}} if nested else {f"p{i}": x for i, x in enumerate(leaves)}
    grads = optree.tree_map(lambda x: torch.randn(x.shape, generator=g).to(dtype), params)
    opt = case.ours(**case.configs[-1])
    state = opt.init(params)
    for _ in range(2):
        updates, state = opt.update(grads, state, params)
        new = metafunc.apply_updates(params, updates)
    for tree in (updates, new):
        assert optree.tree_structure(tree) == optree.tree_structure(params)
        for p, u in zip(optree.tree_leaves(params), optree.tree_leaves(tree)):
            assert u.shape == p.shape and u.dtype == p.dtype
    # per-parameter state is float32 for half-precision params (metafunc.optim's documented
    # accumulator dtype), the params' dtype otherwise; only 0-d counters are int64/float64
    expected = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    for leaf in optree.tree_leaves(state):
        assert leaf.dtype == expected or (
            leaf.dim() == 0 and leaf.dtype in (torch.int64, torch.float64)
        )


# ------------------------------------------------------------------- vmap == per-task loop
@pytest.mark.parametrize("case", ALL)
def test_vmap_over_tasks_equals_loop_with_shared_hyperparameters(case, device):
    """Shared learnable hyperparameters across a vmapped batch of tasks (torchopt's Adam family
    fails exactly here); the meta-gradient w.r.t. them equals the per-task loop's."""
    config = case.configs[-1]
    key = case.learnable[0]
    n_tasks = 3
    tasks = [_params(seed, device=device) for seed in range(n_tasks)]
    stacked_p = optree.tree_map(lambda *x: torch.stack(x), *[t[0] for t in tasks])
    stacked_c = optree.tree_map(lambda *x: torch.stack(x), *[t[1] for t in tasks])

    def adapted(hyper, p, c):
        opt = case.ours(**with_hypers(config, {key: hyper}))
        state = opt.init(p)
        for _ in range(3):
            grads = torch.func.grad(loss_fn)(p, c)
            updates, state = opt.update(grads, state, p)
            p = metafunc.apply_updates(p, updates)
        return p

    h = torch.tensor(hyper_value(case, config, key), dtype=torch.float64, device=device)
    in_dims = (None, 0, 0)
    assert_vmap_matches_loop(adapted, in_dims, h, stacked_p, stacked_c, rtol=1e-12, atol=1e-12)
    # the meta-gradient w.r.t. the shared hyperparameter, task by task
    assert_vmap_matches_loop(
        adapted, in_dims, h, stacked_p, stacked_c, grads=1, rtol=1e-10, atol=1e-12
    )
    h_l = h.clone().requires_grad_()
    outs = [adapted(h_l, p, c) for p, c in tasks]
    (gl,) = torch.autograd.grad(sum((v**2).sum() for o in outs for v in o.values()), h_l)
    assert gl.abs() > 0


# ------------------------------------------------ gradcheck / gradgradcheck of an unroll
@pytest.mark.parametrize(("case", "index"), ALL_CONFIGS)
def test_gradcheck_unroll_wrt_params_and_hyperparameters(case, index):
    config = case.configs[index]
    params, coeffs = _params(seed=index + 1)
    keys = list(params)
    # Nesterov momentum is only defined for dampening == 0: keep that one a number there
    hkeys = [k for k in case.learnable if not (config.get("nesterov") and k == "dampening")]
    # a central difference with step 1e-6 needs a hyperparameter much larger than the step (eps=1e-6
    # in Adadelta's sqrt(acc + eps) is not); those are checked in configs where eps is larger
    hkeys = [k for k in hkeys if hyper_value(case, config, k) >= 1e-4]
    hvals = [torch.tensor(hyper_value(case, config, k), dtype=torch.float64) for k in hkeys]

    def fn(*inputs):
        p = dict(zip(keys, inputs[: len(keys)]))
        hyper = dict(zip(hkeys, inputs[len(keys) :]))
        opt = case.ours(**with_hypers(config, hyper))
        out, _ = _unroll(opt, p, coeffs, 3)
        return tuple(out[k] for k in keys)

    inputs = tuple(t.clone().requires_grad_() for t in [*params.values(), *hvals])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------- composes with torch.func
@pytest.mark.parametrize("case", ALL)
def test_meta_gradient_inside_torch_func_grad_equals_autograd(case):
    params, coeffs = _params(seed=5)
    opt = case.ours(**case.configs[-1])

    def meta_loss_func(p0):
        p, state = p0, opt.init(p0)
        for _ in range(3):
            updates, state = opt.update(torch.func.grad(loss_fn)(p, coeffs), state, p)
            p = metafunc.apply_updates(p, updates)
        return loss_fn(p, coeffs)

    via_func = torch.func.grad(meta_loss_func)(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    out, _ = _unroll(opt, leaves, coeffs, 3)
    via_autograd = torch.autograd.grad(loss_fn(out, coeffs), list(leaves.values()))
    for k, g in zip(leaves, via_autograd):
        torch.testing.assert_close(via_func[k], g, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- safe at zero
def _zero_grad_meta_gradient(opt, dtype, device):
    """Meta-gradient through 3 steps where some gradient entries are exactly zero throughout."""
    w = torch.tensor([0.0, 0.5, 0.0, -1.0], dtype=dtype, device=device, requires_grad=True)
    mask = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=dtype, device=device)
    p, state = {"w": w}, opt.init({"w": w})
    for _ in range(3):
        loss = (mask * (p["w"] - 0.3) ** 2).sum() + (p["w"] ** 2 * (1 - mask)).sum() * 0
        (g,) = torch.autograd.grad(loss, [p["w"]], create_graph=True)
        # entries 0 and 2 are exactly zero, but still a function of w (so backward visits them)
        g = g + p["w"] * (1 - mask) * 0
        updates, state = opt.update({"w": g}, state, p)
        p = metafunc.apply_updates(p, updates)
    (meta,) = torch.autograd.grad((p["w"] ** 2).sum() + p["w"].sum(), [w])
    return meta


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ALL)
def test_zero_gradient_entries_give_finite_meta_gradient(case, dtype, device):
    config = dict(case.configs[0])
    if dtype == torch.float16 and case.eps_name:
        # lr/eps is the true derivative of the update at g = 0: at eps=1e-8 it overflows float16
        config[case.eps_name] = 1e-3
    with torch.autograd.detect_anomaly():
        meta = _zero_grad_meta_gradient(case.ours(**config), dtype, device)
    assert torch.isfinite(meta).all(), meta


def test_zero_gradient_check_can_fail_with_a_naive_sqrt():
    """The zero-gradient test is sensitive: Adam with a plain ``torch.sqrt`` gives NaN there."""

    def naive_adam(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
        def init(p):
            return optree.tree_map(torch.zeros_like, p), optree.tree_map(torch.zeros_like, p)

        def update(g, s, p=None):
            m = optree.tree_map(lambda m, g: b1 * m + (1 - b1) * g, s[0], g)
            v = optree.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, s[1], g)
            u = optree.tree_map(lambda m, v: -lr * m / (torch.sqrt(v) + eps), m, v)
            return u, (m, v)

        return mo.GradientTransformation(init, update)

    meta = _zero_grad_meta_gradient(naive_adam(), torch.float64, "cpu")
    assert torch.isnan(meta).any()
    # and the public check reports it, where metafunc's Adam passes
    w = torch.tensor([0.0, 0.5, 0.0, -1.0], dtype=torch.float64)
    meta_loss = lambda opt: lambda w: _zero_grad_meta_gradient_value(opt, w)
    with pytest.raises(AssertionError, match=r"analytic derivative is nan where the numeric"):
        check_grads(meta_loss(naive_adam()), (w,), modes=("autograd",))
    check_grads(meta_loss(mo.adam(lr=1e-3)), (w,), modes=("autograd",), order=2)


def _zero_grad_meta_gradient_value(opt, w):
    """The meta-loss of :func:`_zero_grad_meta_gradient` as a function of ``w``."""
    mask = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=w.dtype)
    p, state = {"w": w}, opt.init({"w": w})
    for _ in range(3):
        loss = (mask * (p["w"] - 0.3) ** 2).sum()
        (g,) = torch.autograd.grad(loss, [p["w"]], create_graph=True)
        g = g + p["w"] * (1 - mask) * 0
        updates, state = opt.update({"w": g}, state, p)
        p = metafunc.apply_updates(p, updates)
    return (p["w"] ** 2).sum() + p["w"].sum()


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_global_norm_matches_torch_and_is_finite_at_zero(max_norm):
    g = torch.Generator().manual_seed(0)
    grads = {
        "a": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "b": torch.randn(4, generator=g, dtype=torch.float64),
    }
    clip = mo.clip_by_global_norm(max_norm)
    out, _ = clip.update(grads, clip.init(grads))
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads.values()]
    for p, t in zip(params, grads.values()):
        p.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    for k, p in zip(grads, params):
        torch.testing.assert_close(out[k], p.grad, rtol=1e-14, atol=0)
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with torch.autograd.detect_anomaly():
        u = clip.update({"z": z * 1.0}, ())[0]["z"]
        (dz,) = torch.autograd.grad(u.sum(), z, create_graph=True)
        (ddz,) = torch.autograd.grad(dz.sum(), z)
    assert torch.isfinite(dz).all() and torch.isfinite(ddz).all()


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_compiles_fullgraph_and_matches_eager(name):
    case = next(c for c in REGISTRY if c.name == name)
    opt = case.ours(**case.configs[1])
    params, coeffs = _params(seed=2)

    def step(p, state):
        grads = torch.func.grad(loss_fn)(p, coeffs)
        updates, state = opt.update(grads, state, p)
        return metafunc.apply_updates(p, updates), state

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(params, opt.init(params))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    pe, se = params, opt.init(params)
    pc, sc = params, opt.init(params)
    for _ in range(3):
        pe, se = step(pe, se)
        pc, sc = compiled(pc, sc)
    for k in params:
        torch.testing.assert_close(pc[k], pe[k], rtol=1e-12, atol=1e-12)
