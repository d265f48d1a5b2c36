"""``learner.evaluate`` is forward and adaptation only: the values of a per-task SGD loop, and no
graph beyond the support forward passes that the inner gradients need (no second order)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import metafunc
from metafunc import algorithms

STEPS, LR, TASKS = 2, 0.1, 3
HEAD = ["4.weight", "4.bias"]  # the last Linear of _module()
WARP = ["2.weight", "2.bias"]  # WarpGrad's warp layer: fixed while tasks adapt


def _module(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
        torch.nn.Linear(8, 1),
    ).to(device, torch.float64)  # fmt: skip


def _learner(name: str, fm, strategy: str):
    """The learner and, for the oracle, ``lr(key, step)`` and the names it adapts."""
    names = list(fm.params)
    if name == "maml":
        learner = algorithms.MAML(fm, inner_lr=LR, steps=STEPS, strategy=strategy)
    elif name == "metasgd":
        learner = algorithms.MAML(fm, inner_lr=LR, steps=STEPS, learn_lr=algorithms.PerParamLR(),
                                  strategy=strategy)  # fmt: skip
    elif name == "anil":
        learner = algorithms.MAML(fm, inner_lr=LR, steps=STEPS, adapted=HEAD, strategy=strategy)
    elif name == "mamlpp":
        learner = algorithms.MAML(fm, inner_lr=LR, steps=STEPS, learn_lr=algorithms.PerStepLR(),
                                  step_weights=[0.5, 0.5], strategy=strategy)  # fmt: skip
    elif name == "reptile":
        learner = algorithms.Reptile(fm, inner_lr=LR, steps=STEPS, strategy=strategy)
    elif name == "leap":
        learner = algorithms.Leap(fm, inner_lr=LR, steps=STEPS, strategy=strategy)
    else:
        learner = algorithms.WarpGrad(fm, warp=WARP, inner_lr=LR, steps=STEPS, strategy=strategy)
    meta = learner.init()
    if "lr" in meta:  # learned rates, each its own value, so that a mix-up shows
        meta["lr"] = {
            k: (v.detach() * (1 + 0.25 * i) + 0.01 * torch.arange(v.numel()).reshape(v.shape))
            for i, (k, v) in enumerate(meta["lr"].items())
        }
    adapted = {"anil": HEAD, "warpgrad": [n for n in names if n not in WARP]}.get(name, names)

    def lr(key: str, step: int):
        if name == "metasgd":
            return meta["lr"][key]
        if name == "mamlpp":
            return meta["lr"][key][step]
        return LR

    return learner, meta, lr, adapted


def _data(device: str):
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(TASKS, 5, 1, generator=g), torch.randn(TASKS, 7, 1, generator=g)
    support = (xs.to(device, torch.float64), torch.sin(xs).to(device, torch.float64))
    query = (xq.to(device, torch.float64), torch.sin(xq).to(device, torch.float64))
    return support, query


def _oracle(module, params, lr, adapted, support, query, task: int, create_graph: bool):
    """One task's query loss after STEPS SGD steps on its support set, by torch.autograd.grad
    (with ``create_graph``: as a second-order meta-gradient would need)."""
    p = {k: v.detach().requires_grad_(create_graph) for k, v in params.items()}
    for t in range(STEPS):
        fast = {k: p[k] if create_graph else p[k].detach().requires_grad_() for k in adapted}
        out = functional_call(module, {**p, **fast}, (support[0][task],))
        loss = torch.nn.functional.mse_loss(out, support[1][task])
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
        p = {**p, **{k: fast[k] - lr(k, t) * g for k, g in zip(adapted, grads)}}
    out = functional_call(module, p, (query[0][task],))
    return torch.nn.functional.mse_loss(out, query[1][task])


LEARNERS = ["maml", "metasgd", "anil", "mamlpp", "reptile", "leap", "warpgrad"]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("name", LEARNERS)
def test_evaluate_gives_the_query_loss_of_a_per_task_sgd_loop(device, name, strategy):
    module = _module(device)
    learner, meta, lr, adapted = _learner(name, metafunc.functionalize(module), strategy)
    support, query = _data(device)
    got = learner.evaluate(meta, support, query)["loss"]
    want = torch.stack(
        [
            _oracle(module, meta["params"], lr, adapted, support, query, i, False).detach()
            for i in range(TASKS)
        ]
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


class _Saved:
    """Counts the tensors that autograd saves for a backward pass (refused by torch.func.grad,
    which always records its backward pass for a second order)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def _pack(self, tensor):
        self.count += 1
        return tensor

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


@pytest.mark.parametrize("name", LEARNERS)
def test_evaluate_keeps_no_graph_beyond_the_support_forward_passes(device, name):
    module = _module(device)
    learner, meta, lr, adapted = _learner(name, metafunc.functionalize(module), "loop")
    support, query = _data(device)
    with _Saved() as evaluation:
        metrics = learner.evaluate(meta, support, query)
    with _Saved() as first_order:  # the support forward passes, what the inner gradients need
        for i in range(TASKS):
            _oracle(module, meta["params"], lr, adapted, support, query, i, False)
    with _Saved() as second_order:
        for i in range(TASKS):
            _oracle(module, meta["params"], lr, adapted, support, query, i, True)
    assert evaluation.count <= first_order.count < second_order.count
    assert all(m.grad_fn is None and not m.requires_grad for m in metrics.values())


def test_evaluate_adapts_under_no_grad_too(device):
    module = _module(device)
    learner, meta, _, _ = _learner("maml", metafunc.functionalize(module), "loop")
    support, query = _data(device)
    with torch.no_grad():
        got = learner.evaluate(meta, support, query)["loss"]
    torch.testing.assert_close(got, learner.evaluate(meta, support, query)["loss"])
    before = learner.model(meta["params"], query[0][0])
    loss = torch.nn.functional.mse_loss(before, query[1][0]).detach()
    assert not torch.isclose(got[0], loss)  # adapted: the loss moved
