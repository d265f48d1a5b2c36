"""A meta-batch that lacks its task dimension is named, not run as one-example tasks.

``learner.meta_grad(meta, (x, y), (x, y))`` with one task's ``x`` of shape ``(examples, 1)``
used to run as ``examples`` tasks of one example each (a Linear reads a 1-D input as one
example). Legitimate per-task inputs without a feature dimension (token ids for an Embedding,
scalars a model unsqueezes itself) still run.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import metafunc
from metafunc.algorithms import MAML, Reptile

D = torch.float64
MISSING = r"the tasks have no example dimension\. Is the task dimension missing\?"


def _mlp(device: str) -> metafunc.FunctionalModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
    return metafunc.functionalize(net.to(device=device, dtype=D))


def test_the_issues_call_one_task_without_its_task_dimension_is_named(device):
    learner = MAML(_mlp(device), "mse")
    x = torch.linspace(-1, 1, 10, dtype=D, device=device).unsqueeze(1)  # (10, 1): one task
    y = torch.sin(x)
    pattern = (
        r"MAML\.meta_grad\(meta, support, query\): support inputs of shape \(10, 1\) give each "
        r"of 10 tasks an input of shape \(1,\), which the model's first layer \(Linear\("
        r"in_features=1, out_features=40, bias=True\)\) reads as one example: " + MISSING
    )
    with pytest.raises(ValueError, match=pattern):
        learner.meta_grad(learner.init(), (x, y), (x, y))
    with pytest.raises(ValueError, match=r"Reptile\.evaluate\(.*support inputs.*" + MISSING):
        learner = Reptile(_mlp(device), "mse")
        learner.evaluate(learner.init(), (x, y), (x, y))
    # the fix the message gives runs, as one task of 10 examples
    _, metrics = learner.meta_grad(learner.init(), (x[None], y[None]), (x[None], y[None]))
    assert metrics["loss"].shape == (1,)


def test_a_query_set_without_its_task_dimension_is_named_too(device):
    learner = MAML(_mlp(device), "mse")
    x = torch.randn(4, 10, 1, dtype=D, device=device)
    query = (x[:, 0], x[:, 0])  # one query per task, stacked without its example dimension
    with pytest.raises(ValueError, match=r"query inputs of shape \(4, 1\) .*" + MISSING):
        learner.meta_grad(learner.init(), (x, x), query)


@pytest.mark.parametrize(
    "layer, x",
    [
        (lambda: nn.Conv2d(1, 4, 3), torch.zeros(5, 1, 8, 8)),
        (lambda: nn.Conv1d(1, 4, 3), torch.zeros(5, 1, 8)),
        (lambda: nn.GRU(3, 4, batch_first=True), torch.zeros(5, 1, 3)),
    ],
    ids=["conv2d", "conv1d", "gru"],
)
def test_conv_and_recurrent_first_layers_catch_it_too(layer, x):
    # one task of 5 examples with targets (5, 1): with one channel (one time step), the leading
    # sizes agree, so only the first layer tells that dim 0 holds examples, not tasks
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = layer()

        def forward(self, x):
            out = self.first(x)
            return (out[0] if isinstance(out, tuple) else out).flatten(1).sum(-1, keepdim=True)

    learner = MAML(metafunc.functionalize(Net()), "mse")
    y = torch.zeros(5, 1)
    with pytest.raises(
        ValueError, match=rf"input of shape {re.escape(str(tuple(x.shape[1:])))}.*" + MISSING
    ):
        learner.meta_grad(learner.init(), (x, y), (x, y))


def test_inputs_without_a_feature_dimension_still_run():
    # token ids (tasks, examples) for an Embedding
    torch.manual_seed(0)
    tokens = metafunc.functionalize(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)))
    ids = torch.randint(10, (2, 6))
    learner = MAML(tokens, "cross_entropy")
    learner.meta_grad(learner.init(), (ids, ids % 3), (ids, ids % 3))

    # scalars (tasks, examples) that the model unsqueezes itself
    class Unsqueeze(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(1, 1)

        def forward(self, x):
            return self.linear(x.unsqueeze(-1)).squeeze(-1)

    x = torch.randn(2, 6)
    learner = MAML(metafunc.functionalize(Unsqueeze()), "mse")
    _, metrics = learner.meta_grad(learner.init(), (x, x), (x, x))
    assert metrics["loss"].shape == (2,)
