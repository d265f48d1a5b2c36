"""How a FunctionalModel places the caller's tensors into its skeleton for a forward pass.

It assigns them into the owning modules' ``_parameters``/``_buffers`` itself (the owners found
once), where ``torch.func.functional_call`` found them on every call; these tests hold it to
``functional_call``'s behaviour. Oracle: ``torch.func.functional_call`` on the original module,
and the module's own forward with its own weights, in float64.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

import metafunc

D = torch.float64


class _Symmetric(nn.Module):
    def forward(self, w):
        return (w + w.T) / 2


def _models():
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    tied[2].weight = tied[0].weight  # shared across two modules
    sym = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    parametrize.register_parametrization(sym[0], "weight", _Symmetric())
    return {
        "mlp": nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)),
        "batchnorm": nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
        "tied": tied,
        "parametrized": sym,
        "gru": nn.GRU(3, 4, batch_first=True),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_the_forward_equals_functional_call_and_the_modules_own(name, device):
    module = _models()[name].to(device, D)
    fm = metafunc.functionalize(module)
    x = (
        torch.randn(5, 2, 3, dtype=D, device=device)
        if name == "gru"
        else torch.randn(5, 3, dtype=D, device=device)
    )
    params = {k: v.detach() + 0.1 for k, v in fm.params.items()}
    out, _ = fm.apply(params, fm.buffers, x)
    tensors = {**params, **{k: b.clone() for k, b in fm.buffers.items()}}
    for alias, canonical in fm.tied.items():
        tensors[alias] = tensors[canonical]
    expected = functional_call(module, tensors, (x,), tie_weights=False)
    for a, b in zip(
        torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(expected)
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    own = module(x)  # the module's own weights: fm.params as given
    for a, b in zip(
        torch.utils._pytree.tree_leaves(fm(fm.params, x)), torch.utils._pytree.tree_leaves(own)
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_skeleton_holds_none_of_the_callers_tensors_after_a_call_even_a_failed_one():
    fm = metafunc.functionalize(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    params = {k: v.detach().clone() for k, v in fm.params.items()}
    refs = [weakref.ref(t) for t in params.values()]
    fm(params, torch.randn(2, 3))
    with pytest.raises(RuntimeError):
        fm(params, torch.randn(2, 5))  # a shape error inside the forward pass
    skeleton = [t for t in fm._skeleton.parameters()]
    assert all(t.device.type == "meta" for t in skeleton)  # the meta tensors are back
    del params, skeleton
    gc.collect()
    assert all(r() is None for r in refs)


def test_copies_with_their_own_skeleton_place_into_their_own(device):
    """``train()``/``eval()`` copy the skeleton; each copy places into its own."""
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(device, D)
    fm = metafunc.functionalize(module)
    x = torch.randn(6, 3, dtype=D, device=device)
    evaluated = fm.eval()
    assert evaluated._skeleton is not fm._skeleton
    torch.testing.assert_close(evaluated(fm.params, x), module.eval()(x), rtol=0, atol=0)
    torch.testing.assert_close(fm(fm.params, x), module.train()(x), rtol=0, atol=0)
    assert all(t.device.type == "meta" for t in evaluated._skeleton.parameters())
