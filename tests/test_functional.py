"""Tests for :func:`metafunc.functionalize` and :class:`metafunc.FunctionalModel`.

Every numerical check compares against the module's own ``forward``/``backward`` (run on a deep
copy), in float64, exactly or to 1e-12.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from metafunc import FunctionalModel, functionalize

DTYPE = torch.float64
TOL = 1e-12
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def assert_dicts_close(actual: dict, expected: dict, tol: float = TOL) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        assert_close(actual[k], expected[k], tol)


def assert_dicts_equal(actual: dict, expected: dict) -> None:
    """Exactly equal keys, values, dtypes and devices."""
    assert actual.keys() == expected.keys()
    for k in expected:
        assert actual[k].dtype == expected[k].dtype, k
        assert actual[k].device == expected[k].device, k
        assert torch.equal(actual[k], expected[k]), k


def randn(gen: torch.Generator, *shape: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=DTYPE).to(device)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fills every float parameter and buffer with values from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
            elif b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
    return module


def snapshot(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Values and versions of all of a module's params and buffers (aliases included)."""
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    return {k: (t.detach().clone(), t._version) for k, t in named}


def assert_unchanged(module: nn.Module, before: dict[str, tuple[torch.Tensor, int]]) -> None:
    after = snapshot(module)
    assert after.keys() == before.keys()
    for k, (value, version) in before.items():
        assert torch.equal(after[k][0], value), f"{k} changed value"
        assert after[k][1] == version, f"{k} changed version"


def tensor_dict_snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
    return {k: (t.detach().clone(), t._version) for k, t in tensors.items()}


def assert_tensor_dict_unchanged(
    tensors: dict[str, torch.Tensor], before: dict[str, tuple[torch.Tensor, int]]
) -> None:
    assert tensors.keys() == before.keys()
    for k, (value, version) in before.items():
        assert torch.equal(tensors[k], value), f"{k} changed value"
        assert tensors[k]._version == version, f"{k} changed version"


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return (out.square() + out.sin()).sum()


def module_grads(module: nn.Module, *args, seed: int | None = None) -> dict[str, torch.Tensor]:
    """``.grad`` of ``loss_of(module(*args))`` for a deep copy of ``module``, by trainable name."""
    reference = copy.deepcopy(module)
    if seed is not None:
        torch.manual_seed(seed)
    loss_of(reference(*args)).backward()
    grads = {}
    for k, p in reference.named_parameters():
        if p.requires_grad:
            grads[k] = p.grad
        else:
            assert p.grad is None, k
    return grads


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def small_mlp(device: str = "cpu", seed: int = 0) -> nn.Sequential:
    """``Linear(3, 4) -> Tanh -> Linear(4, 2)``: params 0.weight, 0.bias, 2.weight, 2.bias."""
    return randomize_(mlp([3, 4, 2]), seed).to(device=device, dtype=DTYPE)


def small_bn_net(device: str = "cpu", seed: int = 0) -> nn.Sequential:
    """``Linear(3, 4) -> BatchNorm1d(4)``."""
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    return randomize_(net, seed).to(device=device, dtype=DTYPE)


# ---------------------------------------------------------------------------------------------
# Layer zoo: each case builds a module and an input
# ---------------------------------------------------------------------------------------------
def _with_frozen() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    net[0].weight.requires_grad_(False)
    return net


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], torch.Tensor]
    has_batchnorm: bool = False

    def make(self, device: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
        module = randomize_(self.build(), seed).to(device=device, dtype=DTYPE)
        x = self.make_input(torch.Generator().manual_seed(seed + 1)).to(device)
        return module, x


CASES = [
    Case("linear", lambda: nn.Linear(3, 4), lambda g: randn(g, 5, 3)),
    Case("linear_no_bias", lambda: nn.Linear(3, 4, bias=False), lambda g: randn(g, 5, 3)),
    Case(
        "conv1d_maxpool",
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2)),
        lambda g: randn(g, 2, 2, 8),
    ),
    Case(
        "conv2d_avgpool",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 2)
        ),
        lambda g: randn(g, 2, 2, 6, 6),
    ),
    Case(
        "conv2d_maxpool",
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=1, padding=1), nn.MaxPool2d(2)),
        lambda g: randn(g, 2, 2, 4, 4),
    ),
    Case(
        "batchnorm1d",
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)),
        lambda g: randn(g, 6, 3),
        has_batchnorm=True,
    ),
    Case(
        "batchnorm1d_cumulative",  # momentum=None: running stats use num_batches_tracked
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None)),
        lambda g: randn(g, 6, 3),
        has_batchnorm=True,
    ),
    Case(
        "batchnorm2d",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten()
        ),
        lambda g: randn(g, 3, 2, 4, 4),
        has_batchnorm=True,
    ),
    Case(
        "layernorm",
        lambda: nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 2)),
        lambda g: randn(g, 4, 3),
    ),
    Case(
        "groupnorm",
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten()),
        lambda g: randn(g, 2, 2, 5, 5),
    ),
    Case(
        "dropout",
        lambda: nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 2)),
        lambda g: randn(g, 5, 3),
    ),
    Case(
        "embedding",
        lambda: nn.Sequential(nn.Embedding(7, 3, padding_idx=0), nn.Linear(3, 2)),
        lambda g: torch.randint(0, 7, (3, 4), generator=g),
    ),
    Case("frozen_param", _with_frozen, lambda g: randn(g, 4, 3)),
]
CASE_IDS = [c.name for c in CASES]
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


# ---------------------------------------------------------------------------------------------
# Construction: what functionalize exposes
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Forward: equal to the module's own forward, for every layer kind
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Train / eval
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_func_grad_matches_backward(case: Case, training: bool, device: str):
    module, x = case.make(device)
    module.train(training)
    fm = functionalize(module)
    before = snapshot(module)

    torch.manual_seed(99)
    grads = torch.func.grad(lambda p: loss_of(fm(p, x)))(fm.params)
    expected = module_grads(module, x, seed=99)

    assert grads.keys() == fm.params.keys()
    assert_dicts_close(grads, expected)
    assert any(g.abs().sum() > 0 for g in grads.values())
    # torch.func.grad does not populate .grad and changes nothing.
    assert all(p.grad is None for p in module.parameters())
    assert_unchanged(module, before)
    # The model is still usable after the transform.
    assert_dicts_equal(fm.to_module().state_dict(), module.state_dict())
    assert fm.eval().training is False


def test_frozen_params_get_no_gradient_but_are_used(device: str):
    module, x = CASES[CASE_IDS.index("frozen_param")].make(device)
    fm = functionalize(module)
    assert "0.weight" not in fm.params
    assert fm.frozen["0.weight"] is module[0].weight
    assert fm.trainable["0.weight"] is False

    grads = torch.func.grad(lambda p: loss_of(fm(p, x)))(fm.params)
    assert "0.weight" not in grads
    assert grads.keys() == {"0.bias", "2.weight", "2.bias"}

    # The output depends on the frozen value: fm sees in-place changes to the module's tensor.
    out_before = fm(fm.params, x)
    with torch.no_grad():
        module[0].weight.mul_(2.0)
    out_after = fm(fm.params, x)
    assert not torch.equal(out_before, out_after)
    assert_close(out_after, module(x))

    # A frozen name may be passed in params: it overrides the stored value for that call.
    w = randn(torch.Generator().manual_seed(3), 5, 3, device=device)
    reference = copy.deepcopy(module)
    with torch.no_grad():
        reference[0].weight.copy_(w)
    assert_close(fm({**fm.params, "0.weight": w}, x), reference(x))
    assert_close(fm(fm.params, x), module(x))  # stored frozen value untouched by the override
    g = torch.func.grad(lambda p: loss_of(fm(p, x)))({**fm.params, "0.weight": w})
    assert g.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_meta_gradient_lands_on_module(device: str):
    module, x = CASES[CASE_IDS.index("batchnorm1d")].make(device)
    fm = functionalize(module)
    expected = module_grads(module, x)
    loss = loss_of(fm(fm.params, x))
    loss.backward()
    for k, p in module.named_parameters():
        assert p.grad is not None, k
        assert_close(p.grad, expected[k])


def test_meta_gradient_through_inner_step_lands_on_module(device: str):
    """MAML: one differentiable inner SGD step, outer loss backpropagated to the module."""
    module = small_mlp(device)
    gen = torch.Generator().manual_seed(4)
    xs, ys = randn(gen, 5, 3, device=device), randn(gen, 5, 2, device=device)
    xq, yq = randn(gen, 5, 3, device=device), randn(gen, 5, 2, device=device)
    fm = functionalize(module)

    def outer(params: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = torch.func.grad(lambda p: (fm(p, xs) - ys).square().sum())(params)
        adapted = {k: params[k] - 0.1 * inner[k] for k in params}
        return (fm(adapted, xq) - yq).square().sum()

    outer(fm.params).backward()
    expected = torch.func.grad(outer)({k: p.detach() for k, p in fm.params.items()})
    for k, p in module.named_parameters():
        assert_close(p.grad, expected[k])

    # The second-order gradient is right: numerical check on the float64 params.
    names = list(fm.params)
    leaves = [p.detach().clone().requires_grad_() for p in fm.params.values()]
    assert torch.autograd.gradcheck(lambda *ts: outer(dict(zip(names, ts))), leaves)


# ---------------------------------------------------------------------------------------------
# Tied weights
# ---------------------------------------------------------------------------------------------
class TiedLM(nn.Module):
    """Embedding whose weight is reused by the output projection."""

    def __init__(self, vocab: int = 7, dim: int = 4, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(idx)))


def tied_lm(device: str) -> tuple[TiedLM, torch.Tensor]:
    net = randomize_(TiedLM(), 0).to(device=device, dtype=DTYPE)
    idx = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1)).to(device)
    return net, idx


def test_tied_weights_have_one_entry(device: str):
    net, idx = tied_lm(device)
    fm = functionalize(net)
    assert fm.params.keys() == {"emb.weight", "out.bias"}
    assert fm.params["emb.weight"] is net.emb.weight
    assert fm.tied == {"out.weight": "emb.weight"}
    assert "out.weight" not in fm.trainable
    assert_close(fm(fm.params, idx), net(idx))


def test_tied_weights_value_is_used_in_both_places(device: str):
    net, idx = tied_lm(device)
    fm = functionalize(net)
    w = randn(torch.Generator().manual_seed(2), 7, 4, device=device)
    reference = copy.deepcopy(net)
    assert reference.out.weight is reference.emb.weight
    with torch.no_grad():
        reference.emb.weight.copy_(w)
    assert_close(fm({**fm.params, "emb.weight": w}, idx), reference(idx))


def test_tied_weights_gradient_is_sum_of_both_uses(device: str):
    net, idx = tied_lm(device)
    fm = functionalize(net)
    grads = torch.func.grad(lambda p: loss_of(fm(p, idx)))(fm.params)
    assert grads.keys() == {"emb.weight", "out.bias"}
    expected = module_grads(net, idx)
    assert expected.keys() == {"emb.weight", "out.bias"}
    assert_dicts_close(grads, expected)

    # Untied copy with equal values: the tied gradient is the sum of the two separate ones.
    untied = TiedLM(tie=False).to(device=device, dtype=DTYPE)
    with torch.no_grad():
        untied.emb.weight.copy_(net.emb.weight)
        untied.out.weight.copy_(net.emb.weight)
        untied.out.bias.copy_(net.out.bias)
    separate = module_grads(untied, idx)
    assert_close(grads["emb.weight"], separate["emb.weight"] + separate["out.weight"])
    assert not torch.equal(separate["emb.weight"], grads["emb.weight"])


def test_tied_weights_meta_gradient_lands_on_shared_parameter(device: str):
    net, idx = tied_lm(device)
    fm = functionalize(net)
    expected = module_grads(net, idx)
    loss_of(fm(fm.params, idx)).backward()
    assert_close(net.emb.weight.grad, expected["emb.weight"])
    assert net.out.weight.grad is net.emb.weight.grad


class SharedSubmodules(nn.Module):
    """One Linear and one BatchNorm each registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        lin, bn = nn.Linear(3, 3), nn.BatchNorm1d(3)
        self.a, self.b, self.bn1, self.bn2 = lin, lin, bn, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.b(torch.tanh(self.bn1(self.a(x)))))


def test_shared_submodules_are_tied_params_and_buffers(device: str):
    net = randomize_(SharedSubmodules(), 0).to(device=device, dtype=DTYPE)
    x = randn(torch.Generator().manual_seed(1), 5, 3, device=device)
    fm = functionalize(net)
    assert fm.params.keys() == {"a.weight", "a.bias", "bn1.weight", "bn1.bias"}
    assert fm.buffers.keys() == {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"}
    assert fm.tied["b.weight"] == "a.weight"
    assert fm.tied["bn2.running_mean"] == "bn1.running_mean"

    reference = copy.deepcopy(net)
    out, new_buffers = fm.apply(fm.params, fm.buffers, x)
    assert_close(out, reference(x))
    assert_dicts_close(new_buffers, dict(reference.named_buffers()))
    assert new_buffers["bn1.num_batches_tracked"].item() == 2  # both uses update the one buffer
    grads = torch.func.grad(lambda p: loss_of(fm(p, x)))(fm.params)
    assert_dicts_close(grads, module_grads(net, x))

    # The model is still whole after a torch.func transform ran through it.
    m2 = fm.to_module()
    assert m2.a is m2.b and m2.bn1 is m2.bn2
    assert_dicts_equal(m2.state_dict(), net.state_dict())
    assert_close(fm.eval()(fm.params, x), copy.deepcopy(net).eval()(x))


def test_tied_weights_survive_to_module(device: str):
    net, idx = tied_lm(device)
    fm = functionalize(net)
    new = {k: v.detach() + 1.0 for k, v in fm.params.items()}
    m2 = fm.to_module(new)
    assert isinstance(m2, TiedLM)
    assert m2.out.weight is m2.emb.weight
    assert isinstance(m2.emb.weight, nn.Parameter)
    assert torch.equal(m2.emb.weight, new["emb.weight"])
    assert_close(m2(idx), fm(new, idx))
    fm2 = functionalize(m2)
    assert fm2.tied == fm.tied
    assert_dicts_equal(fm2.params, new)
    # load_into a tied module writes the shared tensor once.
    target = randomize_(TiedLM(), 5).to(device=device, dtype=DTYPE)
    fm.load_into(target, new)
    assert target.out.weight is target.emb.weight
    assert torch.equal(target.emb.weight, new["emb.weight"])


# ---------------------------------------------------------------------------------------------
# Purity
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Round trip: to_module / load_into
# ---------------------------------------------------------------------------------------------
class RoundTripNet(nn.Module):
    """Linear + BatchNorm, a frozen scale and a non-persistent mask buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.lin2 = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("mask", torch.tensor([1.0, 0.5]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.bn(self.lin1(x)))) * self.mask * self.scale


def round_trip_net(device: str, seed: int = 0) -> RoundTripNet:
    return randomize_(RoundTripNet(), seed).to(device=device, dtype=DTYPE)


def new_values(fm: FunctionalModel, seed: int) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    params = {k: v.detach() + randn(gen, *v.shape, device=v.device) for k, v in fm.params.items()}
    buffers = {}
    for k, v in fm.buffers.items():
        if k.endswith("running_var"):
            buffers[k] = v + 1.0
        elif v.is_floating_point():
            buffers[k] = v + randn(gen, *v.shape, device=v.device)
        else:
            buffers[k] = v + 5
    return params, buffers


def test_to_module_default_is_an_exact_detached_copy(device: str):
    net = round_trip_net(device)
    x = randn(torch.Generator().manual_seed(1), 5, 3, device=device)
    fm = functionalize(net)
    m2 = fm.to_module()
    assert type(m2) is RoundTripNet
    assert m2 is not net
    assert m2.training is net.training
    assert_dicts_equal(m2.state_dict(), net.state_dict())
    assert_dicts_equal(dict(m2.named_buffers()), dict(net.named_buffers()))
    assert "mask" not in m2.state_dict()
    assert "mask" in dict(m2.named_buffers())
    assert {k: p.requires_grad for k, p in m2.named_parameters()} == {
        k: p.requires_grad for k, p in net.named_parameters()
    }
    assert m2.scale.requires_grad is False
    # Copies, not the same storage.
    own = {t.data_ptr() for t in [*net.parameters(), *net.buffers()]}
    assert not own & {t.data_ptr() for t in [*m2.parameters(), *m2.buffers()]}
    assert_close(copy.deepcopy(m2)(x), copy.deepcopy(net)(x))
    with torch.no_grad():
        m2.lin1.weight.add_(1.0)
    assert not torch.equal(m2.lin1.weight, net.lin1.weight)


def test_to_module_with_new_values_round_trips_exactly(device: str):
    net = round_trip_net(device)
    x = randn(torch.Generator().manual_seed(1), 5, 3, device=device)
    fm = functionalize(net)
    params, buffers = new_values(fm, seed=3)
    # Params that are part of a graph come out detached, as leaves.
    graph_params = {k: v.clone().requires_grad_() * 1.0 for k, v in params.items()}
    m2 = fm.to_module(graph_params, buffers)

    for k, p in m2.named_parameters():
        assert isinstance(p, nn.Parameter)
        assert p.is_leaf and p.grad_fn is None
        assert p.requires_grad is fm.trainable[k]
    assert m2.scale.requires_grad is False
    assert "mask" not in m2.state_dict()
    assert m2._non_persistent_buffers_set == {"mask"}

    fm2 = functionalize(m2)
    assert_dicts_equal(fm2.params, params)
    assert_dicts_equal(fm2.frozen, fm.frozen)
    assert_dicts_equal(fm2.buffers, buffers)
    assert fm2.trainable == fm.trainable
    assert fm2.tied == fm.tied
    assert fm2.training == fm.training
    expected_state = {**params, **{k: fm.frozen[k] for k in fm.frozen}}
    expected_state.update({k: v for k, v in buffers.items() if k != "mask"})
    assert_dicts_equal(m2.state_dict(), {k: expected_state[k] for k in m2.state_dict()})

    out, new_buffers = fm.apply(params, buffers, x)
    reference = copy.deepcopy(m2)
    assert_close(reference(x), out)
    assert_dicts_close(dict(reference.named_buffers()), new_buffers)
    # m2 holds copies: the dicts passed in were not captured.
    assert all(m2.get_buffer(k) is not buffers[k] for k in buffers)


def test_to_module_frozen_override_and_eval_mode():
    net = round_trip_net("cpu")
    stored = net.scale.detach().clone()
    fm = functionalize(net).eval()
    scale = torch.tensor([2.0, 3.0], dtype=DTYPE)
    m2 = fm.to_module({**fm.params, "scale": scale})
    assert m2.training is False
    assert all(not m.training for m in m2.modules())
    assert torch.equal(m2.scale, scale)
    assert m2.scale.requires_grad is False
    assert torch.equal(net.scale, stored)
    assert torch.equal(fm.to_module().scale, stored)


def test_load_into_round_trip(device: str):
    net = round_trip_net(device)
    fm = functionalize(net)
    params, buffers = new_values(fm, seed=4)
    target = round_trip_net(device, seed=9)
    ids_before = {k: id(t) for k, t in [*target.named_parameters(), *target.named_buffers()]}

    fm.load_into(target, params, buffers)
    ids_after = {k: id(t) for k, t in [*target.named_parameters(), *target.named_buffers()]}
    assert ids_after == ids_before  # in place
    assert_dicts_equal(target.state_dict(), fm.to_module(params, buffers).state_dict())
    assert_dicts_equal(dict(target.named_buffers()), buffers)
    for k, p in target.named_parameters():
        assert p.is_leaf and p.grad_fn is None, k
        assert p.requires_grad is fm.trainable[k], k

    # Default values: the model's own (i.e. the original module's).
    fm.load_into(target)
    assert_dicts_equal(target.state_dict(), net.state_dict())
    assert_dicts_equal(dict(target.named_buffers()), dict(net.named_buffers()))


def test_load_into_shape_error_leaves_module_untouched():
    """Names match but a shape does not: the error comes before anything is written."""
    fm = functionalize(small_mlp())
    wider = randomize_(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)), 3).to(DTYPE)
    before = snapshot(wider)
    with pytest.raises(ValueError, match=re.escape("'2.weight' has shape (5, 4) in the module")):
        fm.load_into(wider)
    assert_unchanged(wider, before)


def test_load_into_does_not_record_gradients():
    net = round_trip_net("cpu")
    fm = functionalize(net)
    graph_params = {k: v * 2.0 for k, v in fm.params.items()}  # requires grad, has grad_fn
    target = round_trip_net("cpu", seed=2)
    fm.load_into(target, graph_params)
    for k, p in target.named_parameters():
        assert p.grad_fn is None, k
        assert torch.equal(p, graph_params.get(k, fm.frozen.get(k))), k


def test_load_into_unwraps_data_parallel():
    net = round_trip_net("cpu")
    fm = functionalize(net)
    params, buffers = new_values(fm, seed=6)
    target = round_trip_net("cpu", seed=1)
    wrapped = nn.DataParallel(target)  # with one GPU present, this moves target onto it
    fm.load_into(wrapped, params, buffers)
    device = target.lin1.weight.device
    # load_into keeps the target's devices: compare with the values moved there
    moved = {k: v.to(device) for k, v in buffers.items()}
    assert_dicts_equal(dict(target.named_buffers()), moved)
    assert_dicts_equal(
        {k: target.get_parameter(k) for k in params}, {k: v.to(device) for k, v in params.items()}
    )


# ---------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------
def test_unwraps_data_parallel():
    net = small_mlp()
    x = randn(torch.Generator().manual_seed(1), 4, 3)
    fm = functionalize(nn.DataParallel(net))  # with one GPU present, this moves net onto it
    assert fm.params.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert fm.params["0.weight"] is net[0].weight
    x = x.to(net[0].weight.device)
    assert_close(fm(fm.params, x), net(x))
    assert type(fm.to_module()) is nn.Sequential


def test_unwraps_torch_compile():
    net = small_mlp()
    x = randn(torch.Generator().manual_seed(1), 4, 3)
    fm = functionalize(torch.compile(net, backend="eager"))
    assert fm.params.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert fm.params["2.bias"] is net[2].bias
    assert_close(fm(fm.params, x), net(x))


def test_unwraps_nested_wrappers():
    net = small_mlp()
    fm = functionalize(nn.DataParallel(torch.compile(net, backend="eager")))
    assert fm.params["0.weight"] is net[0].weight


def test_lazy_module_works_after_a_forward_pass():
    net = nn.LazyLinear(3).to(DTYPE)
    x = randn(torch.Generator().manual_seed(1), 2, 4)
    net(x)
    fm = functionalize(net)
    assert fm.params.keys() == {"weight", "bias"}
    assert_close(fm(fm.params, x), net(x))


# ---------------------------------------------------------------------------------------------
# Error messages
# ---------------------------------------------------------------------------------------------
CALL = "FunctionalModel(params, ...)"
APPLY = "FunctionalModel.apply(params, buffers, ...)"
MLP_KEYS = "['0.bias', '0.weight', '2.bias', '2.weight']"
BN_KEYS = "['1.num_batches_tracked', '1.running_mean', '1.running_var']"


def _x() -> torch.Tensor:
    return randn(torch.Generator().manual_seed(1), 4, 3)


def test_error_missing_param():
    fm = functionalize(small_mlp())
    params = {k: v for k, v in fm.params.items() if k != "0.bias"}
    msg = (
        f"{CALL}: params do not match the model: missing key(s) ['0.bias']. "
        f"Expected the keys of fm.params: {MLP_KEYS}."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm(params, _x())


def test_error_unknown_param():
    fm = functionalize(small_mlp())
    msg = (
        f"{CALL}: params do not match the model: unknown key 'foo'. "
        f"Expected the keys of fm.params: {MLP_KEYS}."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm({**fm.params, "foo": torch.zeros(1)}, _x())


def test_error_misspelled_param_suggests_the_right_name():
    fm = functionalize(small_mlp())
    params = dict(fm.params)
    params["0.wieght"] = params.pop("0.weight")
    msg = (
        f"{CALL}: params do not match the model: missing key(s) ['0.weight']; unknown key "
        f"'0.wieght' (did you mean '0.weight'?). Expected the keys of fm.params: {MLP_KEYS}."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm(params, _x())


def test_error_misspelled_frozen_name_suggests_it():
    net = _with_frozen().to(DTYPE)
    fm = functionalize(net)
    with pytest.raises(
        ValueError, match=re.escape("unknown key '0.weigth' (did you mean '0.weight'?)")
    ):
        fm({**fm.params, "0.weigth": net[0].weight}, _x())


def test_error_tied_alias_names_the_key_to_pass():
    net, idx = tied_lm("cpu")
    fm = functionalize(net)
    extra = "key 'out.weight' is tied to 'emb.weight': pass 'emb.weight' only"
    with pytest.raises(ValueError, match=re.escape(f"params do not match the model: {extra}.")):
        fm({**fm.params, "out.weight": net.emb.weight}, idx)
    instead = {"out.weight": net.emb.weight, "out.bias": net.out.bias}
    msg = (
        f"{CALL}: params do not match the model: missing key(s) ['emb.weight']; {extra}. "
        "Expected the keys of fm.params: ['emb.weight', 'out.bias']."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm(instead, idx)


@pytest.mark.parametrize(
    "make_params",
    [
        pytest.param(lambda net: list(net.parameters()), id="list"),
        pytest.param(lambda net: net.parameters(), id="generator"),
        pytest.param(lambda net: tuple(net.parameters()), id="tuple"),
    ],
)
def test_error_params_not_a_mapping_hints_named_parameters(make_params):
    net = small_mlp()
    fm = functionalize(net)
    params = make_params(net)
    msg = (
        f"{CALL}: expected params to be a dict of tensors keyed by parameter name (as in "
        f"fm.params), got {type(params).__name__}. Did you pass model.parameters()? Use "
        "fm.params, or dict(model.named_parameters())."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm(params, _x())


def test_error_params_a_tensor_has_no_parameters_hint():
    fm = functionalize(small_mlp())
    msg = (
        f"{CALL}: expected params to be a dict of tensors keyed by parameter name (as in "
        "fm.params), got Tensor."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm(torch.zeros(3), _x())


def test_error_input_dtype_or_device_differs_from_the_params():
    """A float32 batch into a float64 model (or the reverse) and data on another device are named
    before torch fails deep inside; autocast regions mix dtypes on purpose and pass."""
    fm = functionalize(small_mlp())  # DTYPE (float64)
    x = _x()
    msg = (
        f"{CALL}: an input is torch.float32 but the params are torch.float64; convert the data "
        "(x.to(torch.float64)) or the model (model.to(torch.float32) before functionalize)."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm(fm.params, x.float())
    with pytest.raises(TypeError, match=r"^FunctionalModel\.apply\(params, buffers, \.\.\.\): an "):
        fm.apply(fm.params, fm.buffers, x.float())
    with pytest.raises(ValueError, match=r"an input is on meta but the params are on cpu; move"):
        fm(fm.params, x.to("meta"))
    with pytest.raises(TypeError, match=r"an input is torch.float32"):
        fm(fm.params, [x.float()])  # one level into lists and tuples
    emb = functionalize(nn.Embedding(5, 2).double())
    assert emb(emb.params, torch.tensor([0, 4])).shape == (2, 2)  # integer inputs: not checked
    single = functionalize(small_mlp().float())  # autocast casts float32 (not float64) tensors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert single(single.params, x.bfloat16()).dtype == torch.bfloat16


def test_error_param_wrong_shape():
    fm = functionalize(small_mlp())
    params = {**fm.params, "0.weight": torch.zeros(3, 4, dtype=DTYPE)}
    msg = (
        f"{CALL}: expected params['0.weight'] to have shape (4, 3), got (3, 4). Under "
        "torch.func.vmap, give the per-task shape (in_dims maps the batch dimension away)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm(params, _x())


def test_error_frozen_override_wrong_shape():
    fm = functionalize(_with_frozen().to(DTYPE))
    with pytest.raises(ValueError, match=re.escape("params['0.weight'] to have shape (5, 3)")):
        fm({**fm.params, "0.weight": torch.zeros(5, dtype=DTYPE)}, _x())


@pytest.mark.parametrize(
    ("value", "type_name"), [([[0.0] * 3] * 4, "list"), (1.0, "float"), (None, "NoneType")]
)
def test_error_param_not_a_tensor(value, type_name):
    fm = functionalize(small_mlp())
    msg = f"{CALL}: expected params['0.weight'] to be a torch.Tensor, got {type_name}."
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm({**fm.params, "0.weight": value}, _x())


def test_error_params_are_checked_by_apply():
    fm = functionalize(small_bn_net())
    params = {k: v for k, v in fm.params.items() if k != "1.bias"}
    with pytest.raises(ValueError, match=re.escape(f"{APPLY}: params do not match the model")):
        fm.apply(params, fm.buffers, _x())
    with pytest.raises(TypeError, match=re.escape(f"{APPLY}: expected params to be a dict")):
        fm.apply(list(fm.params.values()), fm.buffers, _x())


def test_error_buffers_missing():
    fm = functionalize(small_bn_net())
    buffers = {k: v for k, v in fm.buffers.items() if k != "1.running_var"}
    msg = (
        f"{APPLY}: buffers do not match the model: missing key(s) ['1.running_var']. "
        f"Expected the keys of fm.buffers: {BN_KEYS}."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm.apply(fm.params, buffers, _x())


def test_error_buffers_unknown_and_misspelled():
    fm = functionalize(small_bn_net())
    msg = (
        f"{APPLY}: buffers do not match the model: unknown key 'foo'. "
        f"Expected the keys of fm.buffers: {BN_KEYS}."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm.apply(fm.params, {**fm.buffers, "foo": torch.zeros(1)}, _x())

    buffers = dict(fm.buffers)
    buffers["1.running_mena"] = buffers.pop("1.running_mean")
    msg = (
        f"{APPLY}: buffers do not match the model: missing key(s) ['1.running_mean']; unknown "
        f"key '1.running_mena' (did you mean '1.running_mean'?). Expected the keys of "
        f"fm.buffers: {BN_KEYS}."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm.apply(fm.params, buffers, _x())


def test_error_buffers_not_a_mapping():
    fm = functionalize(small_bn_net())
    msg = (
        f"{APPLY}: expected buffers to be a dict of tensors keyed by buffer name (as in "
        "fm.buffers), got list."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm.apply(fm.params, list(fm.buffers.values()), _x())


def test_error_buffer_wrong_shape_and_not_a_tensor():
    fm = functionalize(small_bn_net())
    msg = (
        f"{APPLY}: expected buffers['1.running_mean'] to have shape (4,), got (5,). Under "
        "torch.func.vmap, give the per-task shape (in_dims maps the batch dimension away)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm.apply(fm.params, {**fm.buffers, "1.running_mean": torch.zeros(5, dtype=DTYPE)}, _x())
    msg = f"{APPLY}: expected buffers['1.num_batches_tracked'] to be a torch.Tensor, got int."
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm.apply(fm.params, {**fm.buffers, "1.num_batches_tracked": 0}, _x())


def test_error_to_module_checks_params_and_buffers():
    fm = functionalize(small_bn_net())
    with pytest.raises(ValueError, match=re.escape("FunctionalModel.to_module: params do not")):
        fm.to_module({})
    with pytest.raises(ValueError, match=re.escape("FunctionalModel.to_module: buffers do not")):
        fm.to_module(buffers={})
    with pytest.raises(TypeError, match=re.escape("Did you pass model.parameters()?")):
        fm.to_module(list(fm.params.values()))


def test_error_load_into_mismatched_module():
    fm = functionalize(small_mlp())
    call = "FunctionalModel.load_into(module, ...)"
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Linear(2, 2))
    msg = (
        f"{call}: the module's parameter and buffer names differ from this model's: missing "
        "[], unknown ['3.bias', '3.weight']. Load into a module of the same architecture."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm.load_into(other)

    renamed = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    msg = "missing ['2.bias', '2.weight'], unknown ['1.bias', '1.weight']"
    with pytest.raises(ValueError, match=re.escape(msg)):
        fm.load_into(renamed)

    wider = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).to(DTYPE)
    msg = f"{call}: '2.weight' has shape (5, 4) in the module and (2, 4) here. Nothing was loaded."
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm.load_into(wider)

    msg = f"{call}: expected an nn.Module, got dict."
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm.load_into(dict(fm.params))

    with pytest.raises(ValueError, match=re.escape(f"{call}: params do not match the model")):
        fm.load_into(small_mlp(), {})


@pytest.mark.parametrize("not_a_module", [lambda x: x, {"w": torch.zeros(1)}, None])
def test_error_functionalize_not_a_module(not_a_module):
    msg = (
        "functionalize(module): expected a torch.nn.Module, got "
        f"{type(not_a_module).__name__}. Pass the model instance, e.g. functionalize(MyNet())."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        functionalize(not_a_module)


def test_error_functionalize_a_functional_model():
    fm = functionalize(small_mlp())
    with pytest.raises(TypeError, match=re.escape("got FunctionalModel.")):
        functionalize(fm)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: nn.LazyLinear(3), "weight"),
        (lambda: nn.Sequential(nn.Linear(2, 3), nn.LazyLinear(3)), "1.weight"),
        (lambda: nn.LazyBatchNorm1d(affine=False), "running_mean"),
    ],
)
def test_error_functionalize_uninitialized_lazy_module(make, name):
    msg = (
        f"functionalize(module): {name!r} is an uninitialized lazy tensor. Run one forward "
        "pass of the module on example inputs first, then functionalize it."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        functionalize(make())


def test_error_train_mode_not_a_bool():
    fm = functionalize(small_mlp())
    msg = "FunctionalModel.train(mode): expected a bool, got str."
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm.train("eval")
    assert fm.training is True


# ---------------------------------------------------------------------------------------------
# torch.func.vmap over a batch of params
# ---------------------------------------------------------------------------------------------
def _task_params(fm: FunctionalModel, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {k: randn(gen, *v.shape, device=v.device.type) for k, v in fm.params.items()}
        for _ in range(n)
    ]


def _stack(tasks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([t[k] for t in tasks]) for k in tasks[0]}


def test_vmap_over_params_matches_loop(device: str):
    net = randomize_(mlp([3, 5, 4, 2]), 0).to(device=device, dtype=DTYPE)
    fm = functionalize(net)
    tasks = _task_params(fm, 4, seed=2)
    x = randn(torch.Generator().manual_seed(3), 6, 3, device=device)

    out = torch.func.vmap(fm, in_dims=(0, None))(_stack(tasks), x)
    expected = torch.stack([fm(p, x) for p in tasks])
    assert out.shape == (4, 6, 2)
    assert_close(out, expected)
    # And each task equals the module holding that task's params.
    for i, p in enumerate(tasks):
        assert_close(out[i], fm.to_module(p)(x))


def test_vmap_over_params_and_inputs_and_per_task_grads(device: str):
    net = randomize_(mlp([3, 4, 2]), 0).to(device=device, dtype=DTYPE)
    fm = functionalize(net)
    tasks = _task_params(fm, 3, seed=5)
    xs = randn(torch.Generator().manual_seed(6), 3, 5, 3, device=device)

    out = torch.func.vmap(fm)(_stack(tasks), xs)
    assert_close(out, torch.stack([fm(p, xs[i]) for i, p in enumerate(tasks)]))

    grad_fn = torch.func.grad(lambda p, x: loss_of(fm(p, x)))
    grads = torch.func.vmap(grad_fn)(_stack(tasks), xs)
    expected = _stack([module_grads(fm.to_module(p), xs[i]) for i, p in enumerate(tasks)])
    assert_dicts_close(grads, expected)


def test_vmap_with_batched_shapes_gives_per_task_hint():
    fm = functionalize(small_mlp())
    stacked = _stack(_task_params(fm, 2, seed=0))
    with pytest.raises(ValueError, match=re.escape("to have shape (4, 3), got (2, 4, 3)")):
        fm(stacked, _x())


# ---------------------------------------------------------------------------------------------
# Property-based: random MLP shapes
# ---------------------------------------------------------------------------------------------
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


def test_distributed_data_parallel_is_unwrapped(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        net = nn.Linear(3, 2).to(DTYPE)
        ddp = nn.parallel.DistributedDataParallel(net)
        fm = functionalize(ddp)
        assert sorted(fm.params) == ["bias", "weight"]
        assert fm.params["weight"] is net.weight
        x = torch.randn(4, 3, dtype=DTYPE)
        assert_close(fm(fm.params, x), net(x))
    finally:
        dist.destroy_process_group()
