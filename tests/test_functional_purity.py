"""A ``FunctionalModel`` must not write into what the caller passed: inputs, params, buffers.

A model that writes in place into its input (``x.mul_(2)`` in ``forward``) would silently modify
the caller's tensor through ``fm(params, x)``. The call detects it (tensor version counters) and
raises, naming the tensor and the (sub)module that wrote it. In-place ops on intermediates, and
the running statistics that ``apply`` returns as new buffers, stay allowed. Oracles: the
``nn.Module`` itself, and the caller's tensors compared with copies taken before the call.
"""

from __future__ import annotations

import pytest
import torch
from _purity import assert_unchanged, snapshot
from torch import nn
from torch.func import grad, vmap

import metafunc

D = torch.float64


class DoublesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        x.mul_(2)
        return self.lin(x)


class AddOne(nn.Module):
    def forward(self, x):
        return x.add_(1)


class WithAddOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.block = AddOne()
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.lin(x) + self.block(x))


class ClampsItsWeight(nn.Module):
    """Writes into its own parameter during the forward pass (weight clipping in ``forward``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.clamp_(-0.1, 0.1)
        return self.lin(x)


class ZeroesTheMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, pair, *, mask):
        x, y = pair
        y.zero_()
        mask.fill_(1.0)
        return self.lin(x * mask) + y


class Counter(nn.Module):
    """Legitimate: counts calls in a buffer, which ``apply`` returns as a new buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls.add_(1)
        return self.lin(x)


def _model(cls, device):
    torch.manual_seed(0)
    return cls().to(device=device, dtype=D)


def _x(device, *shape):
    return torch.randn(*(shape or (4, 3)), generator=torch.Generator().manual_seed(1), dtype=D).to(
        device
    )


WROTE_X = r"the forward pass wrote in place into args\[0\]"


def test_a_model_that_writes_into_its_input_raises_naming_the_model(device):
    fm = metafunc.functionalize(_model(DoublesInput, device))
    x = _x(device)
    with pytest.raises(ValueError, match=r"FunctionalModel\(params, \.\.\.\): " + WROTE_X):
        fm(fm.params, x)
    with pytest.raises(
        ValueError,
        match=r"FunctionalModel\.apply\(params, buffers, \.\.\.\): "
        + WROTE_X
        + r" \(DoublesInput\.forward itself wrote it\).*x = x \* 2, not x\.mul_\(2\)",
    ):
        fm.apply(fm.params, fm.buffers, x)


def test_a_submodule_that_writes_into_its_input_is_named(device):
    fm = metafunc.functionalize(_model(WithAddOne, device))
    with pytest.raises(ValueError, match=WROTE_X + r" \(submodule 'block' \(AddOne\) wrote it\)"):
        fm(fm.params, _x(device))


def test_a_model_that_writes_into_its_params_raises(device):
    fm = metafunc.functionalize(_model(ClampsItsWeight, device))
    params = {k: v.detach().clone() for k, v in fm.params.items()}
    with pytest.raises(
        ValueError,
        match=r"wrote in place into params\['lin\.weight'\] \(ClampsItsWeight\.forward itself",
    ):
        fm(params, _x(device))


def test_writes_into_nested_and_keyword_inputs_are_named(device):
    fm = metafunc.functionalize(_model(ZeroesTheMask, device))
    pair = (_x(device), _x(device, 4, 2))
    with pytest.raises(
        ValueError, match=r"wrote in place into kwargs\['mask'\] and args\[0\]\[1\]"
    ):
        fm(fm.params, pair, mask=torch.zeros(3, dtype=D, device=device))


def test_writes_are_detected_under_vmap_and_grad(device):
    fm = metafunc.functionalize(_model(WithAddOne, device))
    xs = _x(device, 2, 4, 3)
    with pytest.raises(ValueError, match=WROTE_X + r" \(submodule 'block' \(AddOne\)"):
        vmap(fm, in_dims=(None, 0))(fm.params, xs)
    with pytest.raises(ValueError, match=WROTE_X + r" \(submodule 'block' \(AddOne\)"):
        grad(lambda p, x: fm(p, x).sum())(fm.params, _x(device))
    with pytest.raises(ValueError, match=WROTE_X):
        metafunc.vmap_tasks(fm, in_dims=(None, 0), strategy="vmap")(fm.params, xs)


def test_in_place_ops_on_intermediates_stay_allowed(device):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)).to(device, D)
    fm = metafunc.functionalize(net)
    x = _x(device)
    before = snapshot((x, fm.params))
    out = fm(fm.params, x)
    assert_unchanged(before)
    torch.testing.assert_close(out, net(x.clone()), rtol=0, atol=0)
    xs = _x(device, 2, 4, 3)
    batched = vmap(fm, in_dims=(None, 0))(fm.params, xs)
    torch.testing.assert_close(batched, torch.stack([net(xi) for xi in xs]), rtol=1e-12, atol=0)


def test_buffers_written_by_the_model_are_returned_not_flagged(device):
    """BatchNorm's running statistics and a call counter: the model writes into the copies that
    ``apply`` passes it and returns them; the caller's buffers are unchanged."""
    torch.manual_seed(0)
    for module in (_model(Counter, device), nn.BatchNorm1d(3).to(device, D)):
        fm = metafunc.functionalize(module)
        x = _x(device)
        buffers = {k: v.clone() for k, v in fm.buffers.items()}
        before = snapshot((x, buffers, fm.buffers, fm.params))
        out, new = fm.apply(fm.params, buffers, x)
        fm(fm.params, x)
        vmap(fm.apply, in_dims=(None, None, 0))(fm.params, buffers, _x(device, 2, 4, 3))
        assert_unchanged(before)
        torch.testing.assert_close(out, module(x.clone()))
        name = "calls" if "calls" in new else "num_batches_tracked"
        assert new[name].item() == 1


def test_inference_mode_tensors_are_accepted(device):
    """Inference tensors have no version counter: they are not checked, and do not fail."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2)).to(device, D)
    fm = metafunc.functionalize(net)
    with torch.inference_mode():
        x = _x(device)
        out = fm(fm.params, x)
    torch.testing.assert_close(out, net(x.clone()))


def test_the_check_adds_no_graph_break_under_torch_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)).to(dtype=D)
    fm = metafunc.functionalize(net)
    explained = torch._dynamo.explain(lambda p, x: fm(p, x))(fm.params, _x("cpu"))
    torch._dynamo.reset()
    assert explained.graph_count == 1
    assert explained.graph_break_count == 0


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.gru = nn.GRU(4, 2, batch_first=True)

    def forward(self, x):
        return self.gru(self.lstm(x)[0])[0]


def test_recurrent_layers_are_not_flagged(device):
    """On CUDA, cuDNN re-points the recurrent weights into one flat buffer at every call (their
    storage moves; their values and version counters do not): not a write, so not an error."""
    net = _model(Recurrent, device)
    fm = metafunc.functionalize(net)
    params = {k: v.detach().clone() for k, v in fm.params.items()}
    x = _x(device, 2, 5, 3)
    values = {k: v.clone() for k, v in params.items()}
    out = fm(params, x)
    torch.testing.assert_close(out, net(x.clone()), rtol=1e-12, atol=1e-12)
    for k in params:
        assert torch.equal(params[k], values[k])
