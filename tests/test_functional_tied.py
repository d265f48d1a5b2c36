"""Tied weights and shared submodules in a :class:`metafunc.FunctionalModel`.

A weight used in two places is one entry of the params, its value is used in both places, its
gradient (and meta-gradient) is the sum of both uses and lands on the shared parameter, and the
tie survives ``to_module``; submodules shared between parents tie their params and buffers.

Every numerical check compares against the module's own ``forward``/``backward`` (run on a deep
copy), in float64, exactly or to 1e-12.
"""

from __future__ import annotations

import copy

import torch
from _functional_helpers import (
    DTYPE,
    TiedLM,
    assert_close,
    assert_dicts_close,
    assert_dicts_equal,
    loss_of,
    module_grads,
    randn,
    randomize_,
    tied_lm,
)
from torch import nn

from metafunc import functionalize


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
