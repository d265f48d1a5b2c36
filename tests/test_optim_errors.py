"""Every user-facing error of metafunc.optim, pinned by message."""

from __future__ import annotations

import pickle
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


# ----------------------------------------------------------- non-finite hyperparameters
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("factory", "kwargs", "pattern"),
    [
        (mo.sgd, {"lr": NAN}, r"scale_by_learning_rate\(lr\): expected lr to be finite, got nan"),
        (mo.sgd, {"lr": INF}, r"expected lr to be finite, got inf\. Pass a finite number"),
        (mo.sgd, {"lr": -INF}, r"expected lr to be finite, got -inf"),
        (mo.adam, {"lr": NAN}, r"expected lr to be finite, got nan"),
        (mo.adam, {"eps": NAN}, r"scale_by_adam: expected eps to be finite, got nan"),
        (mo.adam, {"betas": (NAN, 0.999)}, r"expected betas\[0\] to be finite, got nan"),
        (mo.sgd, {"momentum": NAN}, r"trace\(momentum\): expected momentum to be finite"),
        (mo.sgd, {"momentum": 0.9, "dampening": NAN}, r"expected dampening to be finite"),
        (mo.sgd, {"weight_decay": INF}, r"expected weight_decay to be finite, got inf"),
        (mo.rmsprop, {"alpha": INF}, r"scale_by_rms: expected alpha to be finite"),
        (mo.adagrad, {"initial_accumulator_value": NAN}, r"initial_accumulator_value to be"),
        (mo.rprop, {"step_sizes": (1e-6, NAN)}, r"step_sizes\[1\] to be a finite number or inf"),
        (mo.asgd, {"t0": NAN}, r"expected t0 to be a finite number or inf, got nan"),
        (mo.scale, {"step_size": NAN}, r"scale\(step_size\): expected step_size to be finite"),
        (
            mo.clip_by_global_norm,
            {"max_norm": NAN},
            r"clip_by_global_norm\(max_norm\): expected max_norm to be a finite number or inf, "
            r"got nan",
        ),
        (mo.sgd, {"lr": {"w": 0.1, "b": NAN}}, r"expected lr to be finite .*got nan at lr\['b'\]"),
        (mo.sgd, {"lr": torch.tensor(NAN)}, r"got a tensor of shape \(\) holding NaN or inf"),
        (
            mo.sgd,
            {"lr": {"w": torch.full((2, 3), 0.1), "b": torch.tensor([0.1, INF, 0.1])}},
            r"got a tensor of shape \(3,\) holding NaN or inf at lr\['b'\]",
        ),
    ],
)
def test_non_finite_hyperparameters_rejected(factory, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        factory(**kwargs)


@pytest.mark.parametrize("case", REGISTRY, ids=repr)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_every_optimizer_rejects_a_non_finite_lr(case, value):
    with pytest.raises(ValueError, match=r"expected lr to be finite"):
        case.ours(**{**case.configs[0], "lr": value})


def test_inf_accepted_where_it_means_no_bound():
    g = {"w": torch.tensor([30.0, 40.0])}
    clip = mo.clip_by_global_norm(INF)  # as torch.nn.utils.clip_grad_norm_: no clipping
    updates, _ = clip.update(g, clip.init(g))
    assert torch.equal(updates["w"], g["w"])
    for opt in [mo.rprop(step_sizes=(1e-6, INF)), mo.asgd(t0=INF)]:
        params = {"w": torch.ones(2)}
        updates, _ = opt.update(g, opt.init(params), params)
        assert torch.isfinite(updates["w"]).all()


# ------------------------------------------------------------ the state of another optimizer
def _state_error(call, seen, where, expected):
    return (
        rf"{re.escape(call)}: expected the state from this optimizer's init, got a {seen}"
        rf"{re.escape(where)} a {expected}\. Pass the state from this optimizer's init "
        r"\(state = opt.init\(params\)"
    )


@pytest.mark.parametrize(
    ("opt", "state", "call", "seen", "where", "expected"),
    [
        (  # was an AttributeError: 'ScaleByAdamState' object has no attribute 'trace'
            mo.sgd(lr=0.1, momentum=0.9),
            mo.adam().init(P),
            "sgd(...).update",
            "ScaleByAdamState",
            " at state[0], where sgd keeps",
            "TraceState",
        ),
        (
            mo.adam(),
            mo.sgd(lr=0.1, momentum=0.9).init(P),
            "adam(...).update",
            "TraceState",
            " at state[0], where adam keeps",
            "ScaleByAdamState",
        ),
        (  # was silent: RMSprop ran on Adam's second moment
            mo.rmsprop(),
            mo.adam().init(P),
            "rmsprop(...).update",
            "ScaleByAdamState",
            " at state[0], where rmsprop keeps",
            "ScaleByRmsState",
        ),
        (
            mo.adamw(weight_decay=0.0),
            mo.rmsprop().init(P),
            "adamw(...).update",
            "ScaleByRmsState",
            " at state[0], where adamw keeps",
            "ScaleByAdamState",
        ),
        (  # a user chain around a named optimizer: the position, and the optimizer's name
            mo.chain(mo.clip_by_global_norm(1.0), mo.rmsprop()),
            mo.chain(mo.clip_by_global_norm(1.0), mo.adam()).init(P),
            "chain(...).update",
            "ScaleByAdamState",
            " at state[1][0], where rmsprop keeps",
            "ScaleByRmsState",
        ),
        (  # was an AttributeError: 'tuple' object has no attribute 'inner_state'
            mo.masked(mo.adam(), {"w": True, "b": False}),
            mo.adam().init(P),
            "masked(inner, mask).update",
            "tuple",
            "; masked keeps",
            "MaskedState",
        ),
        (
            mo.masked(mo.adam(), {"w": True, "b": False}),
            mo.masked(mo.sgd(momentum=0.9), {"w": True, "b": False}).init(P),
            "masked(inner, mask).update",
            "TraceState",
            " at state.inner_state[0], where adam keeps",
            "ScaleByAdamState",
        ),
    ],
)
def test_state_of_another_optimizer_names_both_state_types(opt, state, call, seen, where, expected):
    with pytest.raises(TypeError, match=_state_error(call, seen, where, expected)):
        opt.update(_grads(), state, P)


STATEFUL = [
    (mo.trace(0.9), "trace", "TraceState"),
    (mo.scale_by_adam(), "scale_by_adam", "ScaleByAdamState"),
    (mo.scale_by_adamax(), "scale_by_adamax", "ScaleByAdamaxState"),
    (mo.scale_by_nadam(), "scale_by_nadam", "ScaleByNadamState"),
    (mo.scale_by_radam(), "scale_by_radam", "ScaleByRadamState"),
    (mo.scale_by_rms(), "scale_by_rms", "ScaleByRmsState"),
    (mo.scale_by_adagrad(), "scale_by_adagrad", "ScaleByAdagradState"),
    (mo.scale_by_adadelta(), "scale_by_adadelta", "ScaleByAdadeltaState"),
    (mo.scale_by_rprop(), "scale_by_rprop", "ScaleByRpropState"),
    (mo.scale_by_asgd(), "scale_by_asgd", "ScaleByAsgdState"),
]


@pytest.mark.parametrize(("opt", "name", "expected"), STATEFUL, ids=[s[1] for s in STATEFUL])
def test_every_stateful_transform_checks_its_state_type(opt, name, expected):
    other = mo.scale_by_adam() if name == "scale_by_adagrad" else mo.scale_by_adagrad()
    seen = type(other.init(P)).__name__
    pattern = _state_error(f"{name}.update", seen, f"; {name} keeps", expected)
    with pytest.raises(TypeError, match=pattern):
        opt.update(_grads(), other.init(P), P)
    opt.update(_grads(), opt.init(P), P)  # its own state still works


def test_the_state_error_names_its_fields_and_each_wrapper_prepends_its_position():
    """Was a positional 5-tuple ``e.info`` whose position string each wrapper rewrote."""
    mask = {"w": True, "b": False}
    opt = mo.chain(mo.clip_by_global_norm(1.0), mo.masked(mo.adam(), mask))
    state = mo.chain(mo.clip_by_global_norm(1.0), mo.masked(mo.sgd(momentum=0.9), mask)).init(P)
    with pytest.raises(TypeError) as caught:
        opt.update(_grads(), state, P)
    e = caught.value
    assert (e.call, e.owner, e.named, e.expected, e.seen, e.path) == (
        "chain(...).update",
        "adam",
        True,
        "ScaleByAdamState",
        "TraceState",
        (1, "inner_state", 0),
    )
    where = " at state[1].inner_state[0], where adam keeps"
    assert re.match(_state_error(e.call, e.seen, where, e.expected), str(e))
    copy = pickle.loads(pickle.dumps(e))  # e.g. from a worker process
    assert type(copy) is type(e) and str(copy) == str(e) and copy.path == e.path


def test_every_state_field_must_have_the_updates_structure():
    """Only the first field (``mu``) was compared with the updates; the others were zipped with
    them by position, so a second moment of another structure was used silently."""
    opt = mo.scale_by_adam()
    state = opt.init(P)
    for nu in ((state.nu["b"], state.nu["w"]), {"x": state.nu["b"], "y": state.nu["w"]}):
        with pytest.raises(
            ValueError,
            match=r"scale_by_adam.update: expected state.nu to have the same structure and shapes "
            r"as updates, but leaves in updates but not in state.nu: \['b'\], \['w'\]",
        ):
            opt.update(_grads(), state._replace(nu=nu), P)


def test_chain_rejects_a_single_transforms_state():
    """A NamedTuple of the right length is not a chain's state (sgd keeps one EmptyState)."""
    state = mo.masked(mo.sgd(lr=0.1), {"w": True, "b": True}).init(P)
    with pytest.raises(ValueError, match=r"sgd\(...\).update: expected the state returned by"):
        mo.sgd(lr=0.1).update(_grads(), state, P)


# ------------------------------------------------------- tensor hyperparameters and shapes
def test_shared_hyperparameter_tensor_must_broadcast_to_every_leaf_unchanged():
    opt = mo.sgd(lr=torch.tensor([0.1, 0.2]))  # b has shape (3,)
    with pytest.raises(
        ValueError,
        match=r"scale_by_learning_rate.init: the lr tensor has shape \(2,\), which does not "
        r"broadcast to params leaf \['b'\] of shape \(3,\) without changing it.*0-d tensor",
    ):
        opt.init(P)
    opt = mo.scale_by_learning_rate(torch.full((2, 1), 0.1))  # fits w (2, 3), not b (3,)
    with pytest.raises(ValueError, match=r"scale_by_learning_rate.update: the lr tensor"):
        opt.update(_grads(), mo.EmptyState(), P)
    # one that broadcasts to every leaf unchanged is accepted (as higher's per-group tensors)
    lr = torch.tensor([0.1, 0.2, 0.3])
    opt = mo.sgd(lr=lr)
    updates, _ = opt.update(_grads(), opt.init(P), P)
    torch.testing.assert_close(updates["w"], -lr.expand(2, 3))


@pytest.mark.parametrize(
    "shape", [(3,), (2,), (3, 2), (2, 3, 1), (2, 1), (1, 1, 1)], ids=lambda s: str(s)
)
def test_per_parameter_lr_of_another_shape_names_the_key_and_both_shapes(shape):
    """Was a raw broadcast RuntimeError in update, or (shapes (3,), (2, 1)) a silent broadcast."""
    lr = {"w": torch.full(shape, 0.1), "b": torch.full((3,), 0.1)}
    pattern = (
        rf"scale_by_learning_rate.init: lr\['w'\] has shape {re.escape(str(shape))}, but params "
        r"leaf \['w'\] has shape \(2, 3\). A per-parameter lr is a 0-d tensor or a tensor of "
        r"exactly its param's shape"
    )
    with pytest.raises(ValueError, match=pattern):
        mo.sgd(lr=lr).init(P)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (2, 3)], ids=lambda s: str(s))
def test_per_parameter_lr_of_one_number_or_the_params_shape_is_accepted(shape):
    lr = {"w": torch.full(shape, 0.1), "b": torch.tensor(0.2)}
    opt = mo.sgd(lr=lr)
    updates, _ = opt.update(_grads(), opt.init(P), P)
    assert updates["w"].shape == (2, 3)
    torch.testing.assert_close(updates["w"], torch.full((2, 3), -0.1))


def test_per_parameter_shape_checked_for_other_hyperparameters_and_in_update():
    momentum = {"w": torch.full((3,), 0.9), "b": torch.tensor(0.9)}
    with pytest.raises(ValueError, match=r"trace.init: momentum\['w'\] has shape \(3,\)"):
        mo.sgd(lr=0.1, momentum=momentum).init(P)
    lr = {"w": torch.full((3,), 0.1), "b": torch.tensor(0.1)}
    with pytest.raises(ValueError, match=r"scale_by_learning_rate.update: lr\['w'\] has shape"):
        mo.scale_by_learning_rate(lr).update(_grads(), mo.EmptyState(), P)


# ---------------------------------------------------------------------- the public names
@pytest.mark.parametrize("name", ["safe_sqrt", "MaskedNode", "MaskedState"])
def test_implementation_names_are_not_exported_and_their_error_says_where_they_went(name):
    assert name not in mo.__all__
    assert name not in dir(mo)
    with pytest.raises(
        AttributeError,
        match=rf"^metafunc\.optim\.{name} was removed from the public API: it is .* it is "
        rf"private now \(metafunc\.optim\._\w+\.{name}, which may change\)\.",
    ):
        getattr(mo, name)


def test_an_unknown_name_is_the_usual_attribute_error():
    with pytest.raises(AttributeError, match=r"^module 'metafunc.optim' has no attribute 'adamm'$"):
        mo.adamm  # noqa: B018
