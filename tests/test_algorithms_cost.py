"""What a learner's meta-step spends, counted in model forward passes (no timing): the query
forward that gives the task loss also gives the reported metrics, so a MAML-family meta-step runs
the model ``steps + 1`` times per task, as a hand-written MAML does, not ``steps + 2``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metafunc
from metafunc.algorithms import IMAML, MAML

D = torch.float64


CALLS = {"n": 0}  # functionalize works on its own copy of the module: count outside it


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        CALLS["n"] += 1
        return self.net(x)


def _tasks(n: int = 2, k: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2 * k, 1, generator=g, dtype=D)
    y = torch.randint(0, 3, (n, 2 * k), generator=g)
    return (x[:, :k], y[:, :k]), (x[:, k:], y[:, k:])


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_grad_runs_the_query_forward_once(first_order):
    module = _Counting().double()
    fm = metafunc.functionalize(module)
    learner = MAML(
        fm, "cross_entropy", inner_lr=0.1, steps=3, first_order=first_order, strategy="loop"
    )
    support, query = _tasks()
    meta = learner.init()
    CALLS["n"] = 0
    _, metrics = learner.meta_grad(meta, support, query)
    assert CALLS["n"] == 2 * (3 + 1)
    # the metrics are those of the loss that was differentiated: the mean query loss, whose
    # gradient is checked against an independent per-task computation
    losses = []
    for t in range(2):
        p = {k: v.detach().requires_grad_() for k, v in meta["params"].items()}
        q = dict(p)
        for _ in range(3):
            g = torch.autograd.grad(
                nn.functional.cross_entropy(
                    torch.func.functional_call(module, q, support[0][t]), support[1][t]
                ),
                list(q.values()),
                create_graph=not first_order,
            )
            q = {
                k: v - 0.1 * (gi if not first_order else gi.detach())
                for (k, v), gi in zip(q.items(), g)
            }
        losses.append(
            nn.functional.cross_entropy(
                torch.func.functional_call(module, q, query[0][t]), query[1][t]
            )
        )
    torch.testing.assert_close(metrics["loss"], torch.stack(losses).detach(), rtol=1e-12, atol=0)
    assert metrics["accuracy"].shape == (2,)


def test_imaml_meta_grad_forward_count():
    """Per task: ``steps`` inner steps, the query forward (loss and metrics together), the
    gradient at phi* for the ``inner_grad_norm`` metric, and one in the backward pass for the
    Hessian-vector products."""
    module = _Counting().double()
    fm = metafunc.functionalize(module)
    learner = IMAML(
        fm,
        "cross_entropy",
        inner_lr=0.1,
        steps=4,
        lam=1.0,
        strategy="loop",
        if_not_converged="ignore",
    )
    support, query = _tasks()
    meta = learner.init()
    CALLS["n"] = 0
    _, metrics = learner.meta_grad(meta, support, query)
    assert CALLS["n"] == 2 * (4 + 1 + 1 + 1)
    assert metrics["inner_grad_norm"].shape == (2,)
