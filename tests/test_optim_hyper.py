"""Hyperparameters as numbers, learnable tensors and per-parameter pytrees; masking."""

from __future__ import annotations

import optree
import pytest
import torch
from _registry import REGISTRY, hyper_value, loss_fn, with_hypers

import metafunc
import metafunc.optim as mo
from metafunc.testing import check_grads

ALL = [pytest.param(case, id=case.name) for case in REGISTRY]


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {
        "w": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "b": torch.randn(2, generator=g, dtype=torch.float64),
    }
    c = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in p.items()}
    return p, c


def _meta_loss(opt, params, coeffs, steps=3):
    state = opt.init(params)
    for _ in range(steps):
        grads = torch.func.grad(loss_fn)(params, coeffs)
        updates, state = opt.update(grads, state, params)
        params = metafunc.apply_updates(params, updates)
    return sum((torch.cos(v) * v).sum() for v in params.values())


def _lr_key(case):
    return "lr"


@pytest.mark.parametrize("case", ALL)
def test_number_tensor_and_pytree_hyperparameters_agree(case):
    params, coeffs = _problem()
    config = case.configs[-1]
    value = hyper_value(case, config, "lr")
    kinds = {
        "number": value,
        "tensor": torch.tensor(value, dtype=torch.float64),
        "pytree-0d": {k: torch.tensor(value, dtype=torch.float64) for k in params},
        "pytree-elementwise": {k: torch.full_like(v, value) for k, v in params.items()},
    }
    losses = {
        kind: _meta_loss(case.ours(**with_hypers(config, {"lr": h})), params, coeffs)
        for kind, h in kinds.items()
    }
    for kind, loss in losses.items():
        torch.testing.assert_close(loss, losses["number"], rtol=1e-14, atol=0, msg=kind)


@pytest.mark.parametrize("case", ALL)
def test_meta_gradient_wrt_learnable_tensor_matches_finite_differences(case):
    params, coeffs = _problem(1)
    config = case.configs[-1]
    for key in case.learnable:
        if config.get("nesterov") and key == "dampening":
            continue
        value = hyper_value(case, config, key)
        # a tensor value is not range-checked, so the difference may straddle 0 (weight decay)
        meta_loss = lambda h, key=key: _meta_loss(
            case.ours(**with_hypers(config, {key: h})), params, coeffs
        )
        # atol=0: |a - n| <= 1e-5 |n| is within the former pytest.approx(n, rel=1e-5, abs=1e-7)
        check_grads(
            meta_loss,
            (torch.tensor(value, dtype=torch.float64),),
            modes=("rev", "autograd"),
            eps=1e-6 * max(1.0, abs(value)),
            atol=0.0,
            rtol=1e-5,
        )


@pytest.mark.parametrize("case", ALL)
def test_meta_gradient_wrt_per_element_lr_matches_finite_differences(case):
    """Meta-SGD style: one learnable learning rate per parameter entry, every entry checked (the
    tolerance is within the former pytest.approx(rel=1e-5, abs=1e-7) on two entries per leaf)."""
    params, coeffs = _problem(2)
    config = case.configs[0]
    value = hyper_value(case, config, "lr")
    lrs = {k: torch.full_like(v, value) for k, v in params.items()}
    meta_loss = lambda lrs: _meta_loss(
        case.ours(**with_hypers(config, {"lr": lrs})), params, coeffs
    )
    check_grads(
        meta_loss,
        (lrs,),
        modes=("rev", "autograd"),
        eps=1e-6 * max(1.0, value),
        atol=0.0,
        rtol=1e-5,
        exhaustive_numel=lrs["w"].numel(),
    )


def test_meta_sgd_one_step_closed_form():
    """theta' = theta - alpha * g(theta)  =>  dL(theta')/dalpha = -g(theta) * grad L(theta')."""
    params, coeffs = _problem(3)
    alpha = {
        k: torch.rand(v.shape, dtype=torch.float64).requires_grad_() for k, v in params.items()
    }
    opt = mo.sgd(lr=alpha)
    g0 = torch.func.grad(loss_fn)(params, coeffs)
    updates, _ = opt.update(g0, opt.init(params), params)
    adapted = metafunc.apply_updates(params, updates)
    outer = lambda p: sum((torch.cos(v) * v).sum() for v in p.values())
    got = torch.autograd.grad(outer(adapted), list(alpha.values()))
    detached = {k: v.detach() for k, v in adapted.items()}
    grad_outer = torch.func.grad(outer)(detached)
    for k, g in zip(alpha, got):
        torch.testing.assert_close(g, -g0[k] * grad_outer[k], rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------- masking
def test_masked_applies_inner_to_selected_leaves_and_passes_others_through():
    params, coeffs = _problem(4)
    grads = torch.func.grad(loss_fn)(params, coeffs)
    mask = {"w": True, "b": False}
    opt = mo.masked(mo.adam(lr=0.1), mask)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    ref = mo.adam(lr=0.1)
    ref_updates, _ = ref.update({"w": grads["w"]}, ref.init({"w": params["w"]}), {"w": params["w"]})
    torch.testing.assert_close(updates["w"], ref_updates["w"], rtol=0, atol=0)
    assert updates["b"] is grads["b"]
    # the inner state holds only the selected leaf (plus the step count)
    assert sum(t.numel() for t in optree.tree_leaves(state)) == params["w"].numel() * 2 + 1


def test_masked_freezing_recipe_and_per_leaf_hyperparameters_on_the_subtree():
    params, coeffs = _problem(5)
    grads = torch.func.grad(loss_fn)(params, coeffs)
    lr = {k: torch.tensor(0.1, dtype=torch.float64) for k in params}  # matches the full params
    frozen = {"w": False, "b": True}
    opt = mo.chain(
        mo.masked(mo.set_to_zero(), frozen),
        mo.masked(mo.sgd(lr=lr, weight_decay=0.5), {k: not v for k, v in frozen.items()}),
    )
    updates, _ = opt.update(grads, opt.init(params), params)
    assert torch.equal(updates["b"], torch.zeros_like(params["b"]))
    torch.testing.assert_close(updates["w"], -0.1 * (grads["w"] + 0.5 * params["w"]))


def test_masked_integer_leaf_passes_through_and_apply_updates_keeps_it():
    params = {"w": torch.ones(2), "n": torch.tensor(3)}
    opt = mo.masked(mo.adam(lr=0.1), lambda tree: {"w": True, "n": False})
    state = opt.init(params)
    grads = {"w": torch.ones(2), "n": torch.tensor(0)}
    updates, state = opt.update(grads, state, params)
    new = metafunc.apply_updates(params, updates)
    assert new["n"] is params["n"] and new["n"].dtype == torch.int64
    torch.testing.assert_close(new["w"], torch.full((2,), 0.9))


def test_masked_under_vmap_equals_loop():
    tasks = [_problem(s) for s in range(3)]
    mask = {"w": True, "b": False}

    def adapted(p, c):
        opt = mo.chain(
            mo.masked(mo.adam(lr=0.1), mask), mo.masked(mo.set_to_zero(), {"w": False, "b": True})
        )
        state = opt.init(p)
        for _ in range(2):
            updates, state = opt.update(torch.func.grad(loss_fn)(p, c), state, p)
            p = metafunc.apply_updates(p, updates)
        return p

    stack = lambda trees: optree.tree_map(lambda *x: torch.stack(x), *trees)
    out = torch.func.vmap(adapted)(stack([t[0] for t in tasks]), stack([t[1] for t in tasks]))
    for i, (p, c) in enumerate(tasks):
        ref = adapted(p, c)
        for k in ref:
            torch.testing.assert_close(out[k][i], ref[k], rtol=1e-14, atol=1e-15)
        assert torch.equal(ref["b"], p["b"])


# ------------------------------------------- value and shape checks under torch.func transforms
def test_tensor_hyperparameter_checks_do_not_read_batched_or_tracked_values():
    """The factories check a tensor's values only when it is a plain eager one: a batched
    (``vmap``) or tracked (``grad``) hyperparameter is built into an optimizer as before."""
    params, coeffs = _problem(6)
    lrs = torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64)

    def meta_loss(lr):
        opt = mo.sgd(lr=lr, momentum=lr * 5, weight_decay=lr / 10)
        return _meta_loss(opt, params, coeffs)

    batched = torch.func.vmap(meta_loss)(lrs)
    for i, lr in enumerate(lrs):
        torch.testing.assert_close(batched[i], meta_loss(lr), rtol=1e-14, atol=0)
    grads = torch.func.vmap(torch.func.grad(meta_loss))(lrs)
    for i, lr in enumerate(lrs):
        lr = lr.clone().requires_grad_()
        (want,) = torch.autograd.grad(meta_loss(lr), lr)
        torch.testing.assert_close(grads[i], want, rtol=1e-12, atol=0)


def test_per_parameter_lr_shapes_are_checked_per_task_under_vmap():
    """Under vmap the shapes compared are the per-task ones: a batch of Meta-SGD rates of the
    params' shape (or of 0-d MAML++ rates) fits; a batch of wrongly shaped rates does not."""
    params, coeffs = _problem(7)

    def adapted_w(lr):
        return _meta_loss(mo.sgd(lr=lr), params, coeffs)

    per_element = {k: torch.rand(4, *v.shape, dtype=torch.float64) for k, v in params.items()}
    per_tensor = {k: torch.rand(4, dtype=torch.float64) for k in params}
    for lr in (per_element, per_tensor):
        out = torch.func.vmap(adapted_w)(lr)
        for i in range(4):
            want = adapted_w({k: v[i] for k, v in lr.items()})
            torch.testing.assert_close(out[i], want, rtol=1e-14, atol=0)
    wrong = {"w": torch.rand(4, 3, dtype=torch.float64), "b": per_tensor["b"]}  # w is (3, 2)
    with pytest.raises(ValueError, match=r"lr\['w'\] has shape \(3,\), but params leaf \['w'\]"):
        torch.func.vmap(adapted_w)(wrong)
