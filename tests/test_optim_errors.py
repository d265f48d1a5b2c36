"""Every user-facing error of metafunc.optim, pinned by message."""

from __future__ import annotations

import re

import pytest
import torch
from _registry import REGISTRY

import metafunc
import metafunc.optim as mo

P = {"w": torch.ones(2, 3), "b": torch.ones(3)}


def _grads(**override):
    g = {k: torch.ones_like(v) for k, v in P.items()}
    g.update(override)
    return g


# ----------------------------------------------------------------- mismatched trees
@pytest.mark.parametrize("case", REGISTRY, ids=repr)
def test_update_with_missing_key_names_the_key_path(case):
    opt = case.ours(**case.configs[0])
    state = opt.init(P)
    grads = {"w": torch.ones(2, 3)}
    with pytest.raises(ValueError, match=r"leaves in .* but not in .*\['b'\]"):
        opt.update(grads, state, P)


@pytest.mark.parametrize("case", REGISTRY, ids=repr)
def test_update_with_wrong_shape_names_the_key_path(case):
    opt = case.ours(**case.configs[-1])
    state = opt.init(P)
    with pytest.raises(
        ValueError, match=r"at \['b'\]: updates has shape \(4,\), .* has shape \(3,\)"
    ):
        opt.update(_grads(b=torch.ones(4)), state, P)


def test_update_with_extra_key_and_nested_path():
    opt = mo.adam()
    params = {"enc": {"w": torch.ones(2)}}
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"\['enc'\]\['v'\]"):
        opt.update({"enc": {"w": torch.ones(2), "v": torch.ones(2)}}, state, params)


def test_apply_updates_mismatch():
    with pytest.raises(
        ValueError, match=r"apply_updates\(params, updates\): .*leaves in params but not in updates"
    ):
        metafunc.apply_updates(P, {"w": torch.ones(2, 3)})


def test_state_of_another_optimizer_is_rejected():
    with pytest.raises(ValueError, match=r"expected the state returned by this optimizer's init"):
        mo.adam().update(_grads(), mo.sgd(momentum=0.9, weight_decay=0.1).init(P), P)


def test_params_needed_but_missing():
    opt = mo.sgd(weight_decay=0.1)
    with pytest.raises(ValueError, match=r"add_decayed_weights.update: .* got params=None"):
        opt.update(_grads(), opt.init(P))
    opt = mo.asgd()
    with pytest.raises(ValueError, match=r"scale_by_asgd.update: .* got params=None"):
        opt.update(_grads(), opt.init(P))


# -------------------------------------------------------------------- leaf kinds
@pytest.mark.parametrize("case", REGISTRY, ids=repr)
def test_integer_leaf_rejected_at_init(case):
    opt = case.ours(**case.configs[-1])
    params = {**P, "bn.num_batches_tracked": torch.tensor(0)}
    with pytest.raises(
        ValueError,
        match=r"expected floating-point leaves in params, got torch.int64 at "
        r"\['bn.num_batches_tracked'\].*masked",
    ):
        opt.init(params)


def test_non_tensor_leaf_rejected_at_init():
    with pytest.raises(
        TypeError, match=r"expected every leaf of params to be a torch.Tensor, got float"
    ):
        mo.adam().init({"w": 1.0})


def test_apply_updates_leaves_integer_params_unchanged():
    params = {"w": torch.ones(2), "n": torch.tensor(5)}
    out = metafunc.apply_updates(params, {"w": torch.ones(2), "n": torch.tensor(1)})
    assert out["n"] is params["n"]


# ------------------------------------------------------------ hyperparameter validation
@pytest.mark.parametrize(
    ("factory", "kwargs", "error", "pattern"),
    [
        (mo.sgd, {"lr": -1.0}, ValueError, r"expected lr in \[0.0, inf\], got -1.0"),
        (mo.sgd, {"lr": True}, TypeError, r"expected lr to be a number.*got bool"),
        (mo.sgd, {"lr": torch.tensor(1)}, TypeError, r"expected lr to be a floating-point tensor"),
        (mo.sgd, {"lr": {"w": "big"}}, TypeError, r"got str at lr\['w'\]"),
        (mo.sgd, {"lr": []}, TypeError, r"got list with no leaves"),
        (mo.sgd, {"nesterov": True}, ValueError, r"Nesterov momentum requires momentum > 0"),
        (
            mo.sgd,
            {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
            ValueError,
            r"Nesterov momentum requires dampening=0",
        ),
        (mo.sgd, {"momentum": -0.5}, ValueError, r"expected momentum in \[0.0, inf\]"),
        (mo.sgd, {"weight_decay": -0.1}, ValueError, r"expected weight_decay in \[0.0, inf\]"),
        (mo.adam, {"betas": (1.0, 0.9)}, ValueError, r"expected betas\[0\] in \[0.0, 1.0\)"),
        (mo.adam, {"betas": 0.9}, TypeError, r"expected betas to be a pair"),
        (mo.adam, {"eps": -1e-8}, ValueError, r"expected eps in \[0.0, inf\]"),
        (mo.adam, {"maximize": 1}, TypeError, r"maximize: expected a bool"),
        (mo.rmsprop, {"alpha": -0.1}, ValueError, r"expected alpha in"),
        (mo.adadelta, {"rho": 1.5}, ValueError, r"expected rho in \[0.0, 1.0\]"),
        (mo.rprop, {"etas": (1.5, 1.2)}, ValueError, r"expected etas\[0\] in \[0.0, 1.0\)"),
        (mo.rprop, {"etas": (0.5, 0.9)}, ValueError, r"expected etas\[1\] in \[1.0, inf\]"),
        (mo.rprop, {"etas": (0.0, 1.2)}, ValueError, r"expected 0 < etas\[0\] < 1 < etas\[1\]"),
        (mo.rprop, {"step_sizes": 1.0}, TypeError, r"expected step_sizes to be a pair"),
        (mo.asgd, {"t0": torch.tensor(1.0)}, TypeError, r"expected t0 to be a number"),
        (mo.adagrad, {"initial_accumulator_value": -1.0}, ValueError, r"initial_accumulator_value"),
        (mo.clip_by_global_norm, {"max_norm": {"w": 1.0}}, TypeError, r"one number for the whole"),
        (mo.trace, {"momentum": 0.9, "nesterov": "yes"}, TypeError, r"trace\(nesterov\)"),
    ],
)
def test_factory_validation(factory, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        factory(**kwargs)


def test_pytree_hyperparameter_missing_a_leaf():
    opt = mo.sgd(lr={"w": torch.tensor(0.1)})
    with pytest.raises(ValueError, match=r"has no entry for params leaf \['b'\]"):
        opt.init(P)


# ---------------------------------------------------------------- combinators
def test_chain_rejects_uncalled_factory():
    with pytest.raises(TypeError, match=re.escape("got function at position 0. Call the factory")):
        mo.chain(mo.sgd)


def test_masked_rejects_non_transformation_and_non_bool_masks():
    with pytest.raises(TypeError, match=r"masked\(inner, mask\): expected inner"):
        mo.masked(mo.adam, {"w": True})
    opt = mo.masked(mo.adam(), {"w": 1, "b": 0})
    with pytest.raises(TypeError, match=r"expected mask leaves to be Python bools, got int"):
        opt.init(P)
    opt = mo.masked(mo.adam(), {"w": True})
    with pytest.raises(ValueError, match=r"the mask does not match the params' structure"):
        opt.init(P)
