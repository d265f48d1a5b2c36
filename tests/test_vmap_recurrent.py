"""Recurrent models (``nn.GRU``, ``nn.LSTM``, ``nn.RNN`` and their cells) under vmap.

Oracle: torch's own fused kernels, run per task in a Python ``for`` loop written here (MAML's
inner SGD steps by ``torch.autograd.grad(create_graph=True)`` on ``torch.func.functional_call``),
in float64; no metafunc code in the oracle.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import metafunc
from metafunc._rnn import exact_rnns
from metafunc.algorithms import MAML

D = torch.float64
TASKS, SHOTS, TIME, FEATURES, HIDDEN = 3, 4, 3, 2, 3
LR = 0.3


class Sequence(nn.Module):
    """A recurrent layer read out at the last time step; inputs are (examples, time, features)."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        width = rnn.proj_size or rnn.hidden_size  # type: ignore[union-attr]
        self.head = nn.Linear(width * (2 if rnn.bidirectional else 1), 1)

    def forward(self, x):
        out, _ = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))
        out = out if self.rnn.batch_first else out.transpose(0, 1)
        return self.head(out[:, -1])


class Cells(nn.Module):
    """A recurrent cell unrolled over time by hand."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


MODELS = {
    "gru": lambda: Sequence(nn.GRU(FEATURES, HIDDEN, batch_first=True)),
    "gru-2-layers-bidirectional": lambda: Sequence(
        nn.GRU(FEATURES, HIDDEN, num_layers=2, bidirectional=True)
    ),
    "lstm": lambda: Sequence(nn.LSTM(FEATURES, HIDDEN, batch_first=True)),
    "lstm-proj-2-layers-bidirectional": lambda: Sequence(
        nn.LSTM(FEATURES, HIDDEN, num_layers=2, bidirectional=True, proj_size=2, batch_first=True)
    ),
    "rnn-tanh": lambda: Sequence(nn.RNN(FEATURES, HIDDEN, batch_first=True)),
    "rnn-relu-no-bias": lambda: Sequence(nn.RNN(FEATURES, HIDDEN, nonlinearity="relu", bias=False)),
    "gru-cell": lambda: Cells(nn.GRUCell(FEATURES, HIDDEN)),
    "lstm-cell": lambda: Cells(nn.LSTMCell(FEATURES, HIDDEN)),
    "rnn-cell": lambda: Cells(nn.RNNCell(FEATURES, HIDDEN)),
    "rnn-cell-relu": lambda: Cells(nn.RNNCell(FEATURES, HIDDEN, nonlinearity="relu")),
}


def _model(name: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().to(device=device, dtype=D)


def _data(device: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=D).to(device)
    support = (make(TASKS, SHOTS, TIME, FEATURES), make(TASKS, SHOTS, 1))
    query = (make(TASKS, SHOTS, TIME, FEATURES), make(TASKS, SHOTS, 1))
    return support, query


def _oracle(module: nn.Module, support, query, steps: int, first_order: bool):
    """The MAML meta-gradient by a per-task loop over torch's fused kernels (not cuDNN's, which
    have no double backward)."""
    with torch.backends.cudnn.flags(enabled=False):
        return _loop_meta_grad(module, support, query, steps, first_order)


def _loop_meta_grad(module: nn.Module, support, query, steps: int, first_order: bool):
    params = {k: v.detach().requires_grad_() for k, v in module.named_parameters()}
    total = 0
    for i in range(TASKS):
        fast = dict(params)
        for _ in range(steps):
            out = functional_call(module, fast, (support[0][i],))
            loss = F.mse_loss(out, support[1][i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - LR * g for (k, v), g in zip(fast.items(), grads)}
        total = total + F.mse_loss(functional_call(module, fast, (query[0][i],)), query[1][i])
    grads = torch.autograd.grad(total / TASKS, list(params.values()))
    return dict(zip(params, grads))


def _assert_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("name", list(MODELS))
def test_vmapped_maml_meta_gradient_equals_the_per_task_loop(name, first_order, device):
    module = _model(name, device)
    support, query = _data(device)
    expected = _oracle(module, support, query, steps=2, first_order=first_order)
    learner = MAML(
        metafunc.functionalize(module),
        inner_lr=LR,
        steps=2,
        first_order=first_order,
        strategy="vmap",
    )
    grads, _ = learner.meta_grad(learner.init(), support, query)
    _assert_close(grads["params"], expected)


@pytest.mark.parametrize("name", ["gru", "lstm", "rnn-tanh"])
def test_auto_strategy_runs_every_call_and_equals_the_loop(name, device):
    # the report: call 1 (the loop) worked, call 2 (the vmap trial) crashed
    module = _model(name, device)
    support, query = _data(device)
    expected = _oracle(module, support, query, steps=1, first_order=False)
    learner = MAML(metafunc.functionalize(module), inner_lr=LR)
    meta = learner.init()
    for _ in range(7):
        grads, _ = learner.meta_grad(meta, support, query)
        _assert_close(grads["params"], expected)
    task_map = learner._maps["task_loss"]
    assert task_map.strategy in ("loop", "vmap") and task_map.fallback is None


@pytest.mark.parametrize(
    "layer",
    [
        lambda: nn.GRU(FEATURES, HIDDEN, num_layers=2, bidirectional=True, batch_first=True),
        lambda: nn.LSTM(FEATURES, HIDDEN, num_layers=2, proj_size=2, bidirectional=True),
        lambda: nn.LSTM(FEATURES, HIDDEN, num_layers=2, dropout=0.5).eval(),
        lambda: nn.RNN(FEATURES, HIDDEN, nonlinearity="relu", bias=False),
    ],
    ids=["gru", "lstm-proj", "lstm-eval-dropout", "rnn-relu"],
)
@pytest.mark.parametrize("unbatched", [False, True])
def test_exact_rnns_equal_torchs_kernels_with_and_without_initial_states(layer, unbatched, device):
    torch.manual_seed(0)
    rnn = layer().to(device=device, dtype=D)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, FEATURES, generator=g, dtype=D).to(device)
    x = x[:, 0] if unbatched else x
    expected = rnn(x)
    states = expected[1]  # final states of the right shape, reused as initial ones
    with exact_rnns():
        got = rnn(x)
        got_from_states = rnn(x, states)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_from_states, rnn(x, states), rtol=1e-12, atol=1e-14)


def test_a_packed_sequence_under_exact_rnns_names_the_layer_and_the_fix():
    gru = nn.GRU(FEATURES, HIDDEN, batch_first=True)
    packed = pack_padded_sequence(torch.randn(2, 3, FEATURES), [3, 2], batch_first=True)
    with exact_rnns(), pytest.raises(RuntimeError, match=r"nn\.GRU over a PackedSequence .*"):
        gru(packed)
    with exact_rnns(), pytest.raises(RuntimeError, match=r"strategy='loop'"):
        nn.LSTM(FEATURES, HIDDEN, batch_first=True)(packed)


@pytest.mark.parametrize(
    "name, layer", [("gru", "GRU"), ("lstm", "LSTM"), ("rnn-tanh", "RNN")], ids=str
)
def test_vmap_tasks_strategy_vmap_names_the_recurrent_layer_and_the_fix(name, layer):
    # vmap_tasks over a FunctionalModel directly: no learner to compute the layer exactly
    fm = metafunc.functionalize(_model(name, "cpu"))
    support, _ = _data("cpu")
    params = {k: v.expand(TASKS, *v.shape) for k, v in fm.params.items()}
    run = metafunc.vmap_tasks(fm, in_dims=(0, 0), strategy="vmap")
    pattern = (
        rf"vmap_tasks\(func, strategy='vmap'\): nn\.{layer} cannot run under torch\.func\.vmap: "
        r"torch has no batching rule .* Use strategy='loop', or a metafunc\.algorithms learner"
    )
    with pytest.raises(RuntimeError, match=pattern):
        run(params, support[0])
