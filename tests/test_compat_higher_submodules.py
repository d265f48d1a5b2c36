"""``metafunc.compat.higher``: the functional model mirrors the module's structure (issue 14,
cause 4): ``fmodel.f(x)`` runs submodule ``f`` with the current fast weights, ``fmodel.f.weight``
is the current fast weight, nested submodules too, after ``diffopt.step`` and with
``track_higher_grads=False``.

Oracles: the same submodules of a ``torch.optim``-trained copy of the model, and central finite
differences of a ``torch.optim`` unroll for meta-gradients through a submodule call.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_compat_higher_common import (
    QUERY,
    SUPPORT,
    finite_differences,
    flat,
    float64_default,  # noqa: F401 (an autouse fixture)
    mse,
    torch_meta_loss,
    torch_unroll,
)
from torch import nn
from torch.func import functional_call

import metafunc.compat.higher as compat


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x):
        return torch.tanh(self.norm(self.inner(x)))


class Net(nn.Module):
    """Nested submodules: a Sequential, a block with a BatchNorm, a head, and a method."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
        self.block = Block()
        self.head = nn.Linear(4, 1)

    def features(self, x):
        return self.block(self.body(x))

    def forward(self, x):
        return self.head(self.features(x))


def momentum_sgd(net):
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)


def probes(model, x):
    """What the tests look at, on a module or a functional model."""
    return {
        "body(x)": model.body(x),
        "body[2](h)": model.body[2](torch.tanh(model.body[0](x))),
        "block.inner(h)": model.block.inner(model.body(x)),
        "features(x)": model.features(x),
        "head.weight": model.head.weight,
        "body[0].bias": model.body[0].bias,
        "block.inner.weight": model.block.inner.weight,
    }


@pytest.mark.parametrize("track_higher_grads", [True, False])
def test_submodules_run_with_the_current_fast_weights_after_every_step(track_higher_grads):
    model = Net()
    with compat.innerloop_ctx(
        model, momentum_sgd(model), track_higher_grads=track_higher_grads
    ) as (fmodel, diffopt):
        for t in range(1, 4):
            diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))
            reference, _, _ = torch_unroll(Net, momentum_sgd, steps=t)
            reference.eval()  # compare outputs without moving any running statistics
            fmodel.eval()
            got, want = probes(fmodel, QUERY[0]), probes(reference, QUERY[0])
            fmodel.train()
            for key in want:
                assert (got[key] - want[key]).abs().max() < 1e-14, (t, key)
            fast = dict(zip(fmodel.names, fmodel.fast_params))
            assert fmodel.head.weight is fast["head.weight"]
            assert fmodel.block.inner.bias is fast["block.inner.bias"]
            assert (fmodel.block.inner.weight.grad_fn is None) != track_higher_grads


def test_meta_gradient_through_submodule_calls_matches_finite_differences():
    """The inner loop and the meta-loss both call submodules directly (never fmodel(x))."""

    def chained(model, x):
        return model.head(model.block(model.body(x)))

    model = Net()
    with compat.innerloop_ctx(model, momentum_sgd(model), copy_initial_weights=False) as (
        fmodel,
        diffopt,
    ):
        for _ in range(3):
            diffopt.step(mse(chained(fmodel, SUPPORT[0]), SUPPORT[1]))
        mse(chained(fmodel, QUERY[0]), QUERY[1]).backward()
    got = flat(p.grad for p in model.parameters())
    oracle = finite_differences(
        lambda theta: torch_meta_loss(Net, momentum_sgd, theta=theta),
        flat(Net().parameters()),
    )
    assert (got - oracle).abs().max() < 1e-8


def test_a_submodule_call_updates_the_functional_models_buffers_not_the_modules():
    model = Net()
    fmodel = compat.monkeypatch(model)
    reference = copy.deepcopy(model)
    h = reference.body(SUPPORT[0])
    out = fmodel.block(fmodel.body(SUPPORT[0]))
    assert torch.equal(out, reference.block(h))  # training mode: batch statistics
    assert torch.equal(fmodel.block.norm.running_mean, reference.block.norm.running_mean)
    assert torch.equal(model.block.norm.running_mean, torch.zeros(4))
    assert fmodel.block.norm.running_mean is dict(fmodel._fm.buffers)["block.norm.running_mean"]
    fmodel.eval()
    assert not fmodel.block.training and model.block.training
    reference.eval()
    assert torch.equal(fmodel.block(h.detach()), reference.block(h.detach()))


def test_assigning_a_fast_weight_makes_it_current_as_in_higher():
    model = Net()
    fmodel = compat.monkeypatch(model)
    w = torch.full((1, 4), 0.5, requires_grad=True)
    fmodel.head.weight = w
    assert fmodel.head.weight is w and len(list(fmodel.parameters(time=1))) == len(fmodel.names)
    tensors = {n: p for n, p in zip(fmodel.names, fmodel.fast_params)}
    assert torch.equal(fmodel(QUERY[0]), functional_call(copy.deepcopy(model), tensors, QUERY[0]))
    with pytest.raises(ValueError, match=r"fmodel\.head\.weight = \.\.\.: expected shape \(1, 4\)"):
        fmodel.head.weight = torch.ones(4)
    with pytest.raises(TypeError, match="expected a tensor, got float"):
        fmodel.head.bias = 0.5


def test_containers_index_and_iterate_like_the_module():
    model = Net()
    fmodel = compat.monkeypatch(model)
    x = SUPPORT[0]
    h = x
    for layer in fmodel.body:
        h = layer(h)
    assert torch.equal(h, model.body(x)) and len(fmodel.body) == 3
    assert fmodel.body[-1].weight is fmodel.body[2].weight
    sequential = compat.monkeypatch(nn.Sequential(nn.Linear(3, 2), nn.ModuleDict({"a": nn.Tanh()})))
    assert list(sequential[1]) == ["a"] and sequential[1]["a"](x).shape == x.shape
    assert torch.equal(sequential[0](x), sequential.module[0](x))


def test_submodule_access_errors_are_clear():
    model = Net()
    fmodel = compat.monkeypatch(model)
    with pytest.raises(AttributeError, match=r"fmodel\.nope: Net has no attribute 'nope' \(its "):
        _ = fmodel.nope
    with pytest.raises(AttributeError, match=r"fmodel\.block\.nope: Block has no attribute"):
        _ = fmodel.block.nope
    with pytest.raises(AttributeError, match=r"Module\.state_dict is torch's own method"):
        fmodel.body.state_dict()
    with pytest.raises(TypeError, match=r"fmodel\.head: a Linear is not indexable"):
        fmodel.head[0]
    with pytest.raises(IndexError, match="index 3 is out of range for 3 submodules"):
        fmodel.body[3]
    with pytest.raises(ValueError, match=r"fmodel\.body\(\.\.\., params=\.\.\.\): expected 10 "):
        fmodel.body(SUPPORT[0], params=list(model.body.parameters()))
    assert fmodel.head.in_features == 4  # other attributes are the module's


def test_parameters_takes_module_parameters_signature_as_in_higher():
    """higher's fmodel.parameters(recurse=True, time=None): a positional argument is recurse."""
    model = Net()
    with compat.innerloop_ctx(model, momentum_sgd(model)) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))
        latest = list(fmodel.parameters())
        with pytest.warns(UserWarning, match=r"recurse=False\) still returns the fast weights"):
            assert all(a is b for a, b in zip(fmodel.parameters(False), latest))
        assert all(a is b for a, b in zip(fmodel.parameters(True, 1), latest))
        names = [n for n, _ in fmodel.named_parameters(time=0)]
        assert names == [n for n, _ in model.named_parameters()]
