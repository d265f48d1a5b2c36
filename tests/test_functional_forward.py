"""What :func:`metafunc.functionalize` exposes, and calls of a :class:`metafunc.FunctionalModel`.

Params and buffers are the module's own tensors; ``fm(params, x)`` equals the module's forward for
every layer kind of the layer zoo, in train and eval mode, with new params, keyword inputs and any
mapping of params; ``train``/``eval`` return new models; calls write into nothing and ``apply``
threads buffers like repeated module calls; random MLP shapes drawn by hypothesis.

Every numerical check compares against the module's own ``forward``/``backward`` (run on a deep
copy), in float64, exactly or to 1e-12.
"""

from __future__ import annotations

import copy
from types import MappingProxyType

import pytest
import torch
from _functional_helpers import (
    CASE_IDS,
    CASES,
    DTYPE,
    MODES,
    Case,
    _with_frozen,
    assert_close,
    assert_dicts_close,
    assert_dicts_equal,
    assert_unchanged,
    loss_of,
    mlp,
    module_grads,
    randn,
    randomize_,
    small_bn_net,
    small_mlp,
    snapshot,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from metafunc import FunctionalModel, functionalize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tensor_dict_snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
    return {k: (t.detach().clone(), t._version) for k, t in tensors.items()}


def assert_tensor_dict_unchanged(
    tensors: dict[str, torch.Tensor], before: dict[str, tuple[torch.Tensor, int]]
) -> None:
    assert tensors.keys() == before.keys()
    for k, (value, version) in before.items():
        assert torch.equal(tensors[k], value), f"{k} changed value"
        assert tensors[k]._version == version, f"{k} changed version"


def test_params_are_the_modules_own_tensors():
    net = _with_frozen().to(DTYPE)
    net.register_buffer("mask", torch.ones(2, dtype=DTYPE), persistent=False)
    fm = functionalize(net)
    assert isinstance(fm, FunctionalModel)
    assert list(fm.params) == ["0.bias", "2.weight", "2.bias"]
    assert list(fm.frozen) == ["0.weight"]
    for k, p in fm.params.items():
        assert p is net.get_parameter(k)
    assert fm.frozen["0.weight"] is net[0].weight
    assert fm.buffers.keys() == {"mask"}
    assert fm.buffers["mask"] is net.mask
    assert fm.trainable == {"0.weight": False, "0.bias": True, "2.weight": True, "2.bias": True}
    assert fm.tied == {}
    assert fm.training is True


def test_buffers_include_batchnorm_stats_and_non_persistent():
    net = small_bn_net()
    net.register_buffer("mask", torch.ones(4, dtype=DTYPE), persistent=False)
    fm = functionalize(net)
    assert fm.buffers.keys() == {
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "mask",
    }
    for k, b in fm.buffers.items():
        assert b is net.get_buffer(k)


def test_training_flag_follows_module():
    assert functionalize(small_mlp().eval()).training is False
    assert functionalize(small_mlp().train()).training is True


def test_functionalize_does_not_modify_module():
    net = small_bn_net()
    before = snapshot(net)
    state = copy.deepcopy(net.state_dict())
    functionalize(net)
    assert_unchanged(net, before)
    assert_dicts_equal(net.state_dict(), state)
    assert net.training


def test_repr():
    fm = functionalize(small_bn_net())
    assert repr(fm) == (
        "FunctionalModel(Sequential, params=4 tensors (24 values), frozen=0, buffers=3, "
        "training=True)"
    )


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_module(case: Case, training: bool, device: str):
    module, x = case.make(device)
    module.train(training)
    fm = functionalize(module)
    assert fm.training is training
    before = snapshot(module)
    reference = copy.deepcopy(module)

    torch.manual_seed(1234)
    expected = reference(x)
    expected_buffers = dict(reference.named_buffers())

    torch.manual_seed(1234)
    out, new_buffers = fm.apply(fm.params, fm.buffers, x)
    assert_close(out, expected)
    assert_dicts_close(new_buffers, expected_buffers)
    for k in new_buffers:
        assert new_buffers[k] is not fm.buffers[k]

    torch.manual_seed(1234)
    assert_close(fm(fm.params, x), expected)

    # Nothing of the original module was touched, though the reference's stats moved.
    assert_unchanged(module, before)
    if case.has_batchnorm:
        moved = [k for k in new_buffers if not torch.equal(new_buffers[k], before[k][0])]
        if training:
            assert any(k.endswith("running_mean") for k in moved)
            assert any(k.endswith("num_batches_tracked") for k in moved)
        else:
            assert moved == []


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_with_new_params_matches_module_holding_them(
    case: Case, training: bool, device: str
):
    """Params other than the module's own: same as a module loaded with those values."""
    module, x = case.make(device)
    module.train(training)
    fm = functionalize(module)
    other, _ = case.make(device, seed=7)
    other.train(training)
    new_params = {k: other.get_parameter(k).detach().clone() for k in fm.params}
    # Keep the module's frozen params and buffers in the reference.
    reference = copy.deepcopy(module)
    with torch.no_grad():
        for k, v in new_params.items():
            reference.get_parameter(k).copy_(v)
    torch.manual_seed(5)
    expected = reference(x)
    torch.manual_seed(5)
    out = fm(new_params, x)
    assert_close(out, expected)
    torch.manual_seed(5)
    assert not torch.equal(out, fm(fm.params, x))  # the params did matter


def test_dropout_train_mode_depends_on_rng_and_eval_mode_is_deterministic(device: str):
    case = CASES[CASE_IDS.index("dropout")]
    module, x = case.make(device)
    fm = functionalize(module)
    torch.manual_seed(0)
    a = fm(fm.params, x)
    torch.manual_seed(1)
    b = fm(fm.params, x)
    assert not torch.equal(a, b)

    fm_eval = fm.eval()
    torch.manual_seed(0)
    c = fm_eval(fm.params, x)
    torch.manual_seed(1)
    d = fm_eval(fm.params, x)
    assert torch.equal(c, d)
    assert_close(c, copy.deepcopy(module).eval()(x))


def test_kwargs_are_forwarded(device: str):
    class WithKwarg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
            return self.lin(x) * scale

    net = randomize_(WithKwarg(), 0).to(device=device, dtype=DTYPE)
    x = randn(torch.Generator().manual_seed(1), 4, 3, device=device)
    fm = functionalize(net)
    assert_close(fm(fm.params, x, scale=3.0), net(x, scale=3.0))
    out, _ = fm.apply(fm.params, fm.buffers, x, scale=-2.0)
    assert_close(out, net(x, scale=-2.0))


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(small_mlp, id="no_buffers"),
        pytest.param(lambda: _with_frozen().to(DTYPE), id="frozen"),
        pytest.param(lambda: small_bn_net().eval(), id="buffers"),
    ],
)
def test_params_may_be_any_mapping(build):
    """The check accepts any Mapping, so the call must work with one, whatever the model."""
    net = build()
    fm = functionalize(net)
    x = randn(torch.Generator().manual_seed(1), 4, 3)
    assert_close(fm(MappingProxyType(dict(fm.params)), x), net(x))
    out, _ = fm.apply(MappingProxyType(dict(fm.params)), MappingProxyType(dict(fm.buffers)), x)
    assert_close(out, net(x))


def test_train_and_eval_return_new_models_and_leave_original_unchanged(device: str):
    case = CASES[CASE_IDS.index("batchnorm1d")]
    module, x = case.make(device)
    fm = functionalize(module)

    fm_eval = fm.eval()
    assert isinstance(fm_eval, FunctionalModel)
    assert fm_eval is not fm
    assert fm_eval.training is False
    assert fm.training is True
    for name in ("params", "frozen", "buffers"):  # shared, not copied
        own, other = getattr(fm, name), getattr(fm_eval, name)
        assert own.keys() == other.keys()
        assert all(own[k] is other[k] for k in own)

    expected_train = copy.deepcopy(module).train()(x)
    expected_eval = copy.deepcopy(module).eval()(x)
    assert not torch.equal(expected_train, expected_eval)
    assert_close(fm_eval(fm.params, x), expected_eval)
    assert_close(fm(fm.params, x), expected_train)  # original still in training mode

    fm_train = fm_eval.train()
    assert fm_train.training is True
    assert fm_eval.training is False
    assert_close(fm_train(fm.params, x), expected_train)
    assert_close(fm_eval(fm.params, x), expected_eval)
    assert_close(fm_eval.train(False)(fm.params, x), expected_eval)

    # Eval-mode apply leaves the stats as they were (but as new tensors).
    _, new_buffers = fm_eval.apply(fm.params, fm.buffers, x)
    assert_dicts_equal(new_buffers, dict(module.named_buffers()))
    assert module.training  # the module itself was never switched


def test_train_mode_applies_to_every_submodule():
    """A module in training mode with one BatchNorm in eval mode: fm.train() trains all."""
    net = randomize_(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), 0).to(DTYPE)
    net[1].eval()
    x = randn(torch.Generator().manual_seed(1), 6, 3)
    fm = functionalize(net)
    assert_close(fm(fm.params, x), net(x))  # mixed modes preserved
    assert_close(fm.train()(fm.params, x), copy.deepcopy(net).train()(x))
    assert_close(fm.eval()(fm.params, x), copy.deepcopy(net).eval()(x))


def test_calls_mutate_nothing_in_train_mode_with_batchnorm(device: str):
    module, x = CASES[CASE_IDS.index("batchnorm2d")].make(device)
    fm = functionalize(module)
    assert fm.training
    module_before = snapshot(module)
    params = {k: v.detach().clone() + 0.5 for k, v in fm.params.items()}
    buffers = {k: v.clone() for k, v in fm.buffers.items()}
    params_before = tensor_dict_snapshot(params)
    buffers_before = tensor_dict_snapshot(buffers)

    fm(params, x)
    fm(fm.params, x)
    _, new_buffers = fm.apply(params, buffers, x)
    fm.apply(fm.params, fm.buffers, x)
    torch.func.grad(lambda p: loss_of(fm(p, x)))(params)
    torch.func.grad(lambda p: loss_of(fm.apply(p, buffers, x)[0]))(params)

    assert_tensor_dict_unchanged(params, params_before)
    assert_tensor_dict_unchanged(buffers, buffers_before)
    assert_unchanged(module, module_before)
    for k in new_buffers:
        assert new_buffers[k] is not buffers[k]
    assert not torch.equal(new_buffers["1.running_mean"], buffers["1.running_mean"])
    assert new_buffers["1.num_batches_tracked"].item() == 1


def test_apply_threads_buffers_like_repeated_module_calls(device: str):
    module, x = CASES[CASE_IDS.index("batchnorm1d")].make(device)
    fm = functionalize(module)
    reference = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(8)
    buffers = fm.buffers
    for _ in range(3):
        xi = x + randn(gen, *x.shape, device=device)
        out, buffers = fm.apply(fm.params, buffers, xi)
        assert_close(out, reference(xi))
    assert_dicts_close(buffers, dict(reference.named_buffers()))
    assert buffers["1.num_batches_tracked"].item() == 3
    assert module[1].num_batches_tracked.item() == 0


@pytest.mark.parametrize("device", DEVICES)
@given(
    in_features=st.integers(1, 5),
    hidden=st.integers(1, 5),
    out_features=st.integers(1, 5),
    depth=st.integers(1, 3),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_mlp_matches_module(device, in_features, hidden, out_features, depth, batch, seed):
    sizes = [in_features] + [hidden] * (depth - 1) + [out_features]
    net = randomize_(mlp(sizes), seed).to(device=device, dtype=DTYPE)
    gen = torch.Generator().manual_seed(seed + 1)
    x = randn(gen, batch, in_features, device=device)
    fm = functionalize(net)
    assert len(fm.params) == 2 * depth

    assert_close(fm(fm.params, x), net(x))
    grads = torch.func.grad(lambda p: loss_of(fm(p, x)))(fm.params)
    assert_dicts_close(grads, module_grads(net, x))

    # Other params: same as the module holding them.
    params = {k: randn(gen, *v.shape, device=device) for k, v in fm.params.items()}
    assert_close(fm(params, x), fm.to_module(params)(x))
