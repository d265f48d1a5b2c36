"""Recurrent layers (RNN, LSTM, GRU and their cells) under ``torch.func.vmap``.

On torch 2.13 the fused recurrent kernels (``torch._VF.gru``, ``lstm``, ``rnn_tanh``, ``rnn_relu``
and the ``*_cell`` variants) have no batching rule: with per-task weights, ``nn.GRU`` and ``nn.RNN``
fail with ``output with shape [N, H] doesn't match the broadcast shape [tasks, N, H]`` (their
decomposition writes in place into an unbatched state), ``nn.LSTM`` and ``nn.LSTMCell`` with
``Batching rule not implemented for aten::lstm``, and the GRU/RNN cells fall back to a slow
per-task loop with a warning. Inside :func:`exact_rnns` these functions are computed from
elementary ops (``F.linear``, ``sigmoid``, ``tanh``, one time step at a time), as the PyTorch docs
state them; their batching rules and double backward are exact, so a vmapped meta-gradient equals
the per-task loop's to round-off. Everything else runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["exact_rnns", "has_rnns"]

Cell = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


def has_rnns(module: nn.Module) -> bool:
    """Whether ``module`` contains a recurrent layer or cell that :func:`exact_rnns` replaces."""
    return any(isinstance(m, (nn.RNNBase, nn.RNNCellBase)) for m in module.modules())


def _rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch.tanh(F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh))


def _rnn_relu_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch.relu(F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh))


def _gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    i_r, i_z, i_n = F.linear(input, w_ih, b_ih).chunk(3, -1)
    h_r, h_z, h_n = F.linear(hx, w_hh, b_hh).chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * hx


def _lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    h, c = hx
    i, f, g, o = (F.linear(input, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _sequence(
    cell: Cell,
    input: torch.Tensor,
    hx: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The multi-layer (bi)directional unroll of ``torch._VF.gru`` and friends.

    ``hx`` holds the initial states stacked over layers and directions (``(h,)``, or ``(h, c)``
    for the LSTM); returns the last layer's outputs and the final states, stacked the same way.
    """
    dirs = 2 if bidirectional else 1
    per_layer = len(params) // (num_layers * dirs)  # w_ih, w_hh[, b_ih, b_hh][, w_hr]
    proj = per_layer == 3 + 2 * has_biases  # LSTM with proj_size: h = (o * tanh(c)) @ w_hr.T
    x = input.transpose(0, 1) if batch_first else input  # (time, batch, features)
    finals: list[list[torch.Tensor]] = [[] for _ in hx]
    for layer in range(num_layers):
        outputs = []
        for d in range(dirs):
            k = layer * dirs + d
            w = params[k * per_layer : (k + 1) * per_layer]
            biases = (w[2], w[3]) if has_biases else (None, None)
            state = tuple(s[k] for s in hx)
            ys: list[torch.Tensor] = []
            for t in reversed(range(x.shape[0])) if d else range(x.shape[0]):
                new = cell(x[t], state if len(state) > 1 else state[0], w[0], w[1], *biases)
                state = tuple(new) if isinstance(new, tuple) else (new,)
                if proj:
                    state = (F.linear(state[0], w[-1]), *state[1:])
                ys.append(state[0])
            outputs.append(torch.stack(ys[::-1] if d else ys))
            for final, s in zip(finals, state):
                final.append(s)
        x = torch.cat(outputs, -1) if dirs == 2 else outputs[0]
        if dropout > 0 and train and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    output = x.transpose(0, 1) if batch_first else x
    return output, [torch.stack(f) for f in finals]


def _full(cell: Cell, name: str, lstm: bool) -> Callable[..., tuple[torch.Tensor, ...]]:
    def run(input, hx, params, *options):
        # The other overload, (data, batch_sizes, hx, params, has_biases, ...), is a
        # PackedSequence's: there the fourth argument is the weights, not has_biases.
        if not isinstance(options[0], bool):
            raise RuntimeError(
                f"{name} over a PackedSequence cannot run under torch.func.vmap (torch has no "
                "batching rule for it and metafunc's exact recurrent layers take padded "
                "sequences). Pass padded sequences, or map the tasks with strategy='loop'."
            )
        output, finals = _sequence(cell, input, hx if lstm else (hx,), params, *options)
        return (output, *finals)

    return run


_REPLACEMENTS: list[tuple[Callable[..., object], Callable[..., object]]] = [
    (torch._VF.gru, _full(_gru_cell, "nn.GRU", lstm=False)),
    (torch._VF.lstm, _full(_lstm_cell, "nn.LSTM", lstm=True)),
    (torch._VF.rnn_tanh, _full(_rnn_tanh_cell, "nn.RNN", lstm=False)),
    (torch._VF.rnn_relu, _full(_rnn_relu_cell, "nn.RNN", lstm=False)),
    (torch._VF.gru_cell, _gru_cell),
    (torch._VF.lstm_cell, _lstm_cell),
    (torch._VF.rnn_tanh_cell, _rnn_tanh_cell),
    (torch._VF.rnn_relu_cell, _rnn_relu_cell),
]


class _ExactRNNs(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for fused, replacement in _REPLACEMENTS:
            if func == fused:  # ``==``: torch._VF hands out a new bound builtin on each access
                return replacement(*args, **kwargs)
        return func(*args, **kwargs)


def exact_rnns() -> contextlib.AbstractContextManager:
    """A context in which the fused recurrent kernels behind ``nn.RNN``, ``nn.LSTM``, ``nn.GRU``
    and their cells are computed from elementary ops, which ``torch.func.vmap`` batches exactly.

    The learners of :mod:`metafunc.algorithms` enter it by themselves when their model has a
    recurrent layer and the tasks are vmapped.

    Example:
        >>> import torch
        >>> from metafunc._rnn import exact_rnns
        >>> gru = torch.nn.GRU(3, 4, batch_first=True, dtype=torch.float64)
        >>> x = torch.randn(2, 5, 3, dtype=torch.float64)
        >>> with exact_rnns():
        ...     out, h = gru(x)
        >>> torch.allclose(out, gru(x)[0])
        True
    """
    return _ExactRNNs()
