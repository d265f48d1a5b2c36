"""Back from a :class:`metafunc.FunctionalModel` to an ``nn.Module``: ``to_module``, ``load_into``.

``to_module`` makes an exact detached copy, with new values, frozen overrides and eval mode;
``load_into`` writes values into a module without recording gradients, leaves it untouched on a
shape error and unwraps ``DataParallel``.

Every numerical check compares against the module's own ``forward``/``backward`` (run on a deep
copy), in float64, exactly or to 1e-12.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from _functional_helpers import (
    DTYPE,
    assert_close,
    assert_dicts_close,
    assert_dicts_equal,
    assert_unchanged,
    randn,
    randomize_,
    small_mlp,
    snapshot,
)
from torch import nn

from metafunc import FunctionalModel, functionalize


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
