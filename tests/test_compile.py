"""torch.compile of a MAML meta-step: inner loop, query loss and meta-gradient in one graph.

The meta-step is written as a user would: ``inner_loop`` per task, the tasks mapped with
``vmap_tasks(strategy="vmap")`` (or ``torch.func.vmap``), the meta-gradient by
``torch.func.grad``. (``torch.autograd.grad`` would be a graph break in the caller's code: dynamo
does not trace it unless ``torch._dynamo.config.trace_autograd_ops = True``.)

``torch._dynamo.explain`` must report one graph and no break. A break inside a functorch transform
makes dynamo drop the whole frame (``graph_count == 0``), so the graph count is checked too.
The compiled meta-gradient (``backend="aot_eager"``: fast to compile, the same aten graph that
inductor receives) must equal the eager one to float64 round-off. Tiny models: the file is about
compile time, which grows with the graph, not with the tensors.
"""

from __future__ import annotations

import inspect
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

import metafunc
from metafunc import _norms
from metafunc.algorithms import PerParamLR, PerStepLR

STEPS = 2
TASKS = 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (explain's and compile's caches would mix otherwise); one
    thread: the tensors are tiny."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def _mlp_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)).double()

    def data(seed):
        gen = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(TASKS, 5, 1, generator=gen, dtype=torch.float64) for _ in range(4))

    return net, F.mse_loss, data


def _conv_bn_problem():
    """Omniglot-shaped in miniature: conv + BatchNorm (training mode, exact norms under vmap)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).double()

    def data(seed):
        gen = torch.Generator().manual_seed(seed)
        sx = torch.randn(TASKS, 3, 1, 8, 8, generator=gen, dtype=torch.float64)
        qx = torch.randn(TASKS, 6, 1, 8, 8, generator=gen, dtype=torch.float64)
        sy = torch.arange(3).repeat(TASKS, 1)
        qy = torch.arange(3).repeat_interleave(2).repeat(TASKS, 1)
        return sx, sy, qx, qy

    return net, F.cross_entropy, data


PROBLEMS = {"mlp": _mlp_problem, "conv_bn": _conv_bn_problem}
OPTIMIZERS = {
    "sgd": lambda: metafunc.optim.sgd(lr=0.1),
    "adam": lambda: metafunc.optim.adam(lr=0.01),
}


def _meta_step(fm, loss_fn, opt, strategy="vmap", first_order=False):
    def loss(p, batch):
        return loss_fn(fm(p, batch[0]), batch[1])

    def task(p, sx, sy, qx, qy):
        result = metafunc.inner_loop(loss, p, opt, (sx, sy), steps=STEPS, first_order=first_order)
        return loss(result.params, (qx, qy))

    run = metafunc.vmap_tasks(task, in_dims=(None, 0, 0, 0, 0), strategy=strategy)

    def meta_step(params, sx, sy, qx, qy):
        return grad(lambda p: run(p, sx, sy, qx, qy).mean())(params)

    return meta_step


def _assert_one_graph(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    reasons = [
        f"{b.reason.splitlines()[0]} at "
        + ", ".join(f"{f.filename}:{f.lineno}" for f in b.user_stack[-3:])
        for b in explanation.break_reasons
    ]
    assert not reasons, reasons
    assert explanation.graph_count == 1, (
        f"{explanation.graph_count} graphs; 0: dynamo ran the frame eagerly (a graph break inside "
        "grad/vmap, listed with TORCH_LOGS=graph_breaks)"
    )
    assert explanation.graph_break_count == 0


def _assert_round_off(got, want):
    scale = max(w.abs().max() for w in want.values())  # conv biases before BN: 0 plus round-off
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-13 * scale, msg=k)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_meta_step_is_one_graph_and_matches_eager(problem, opt_name):
    net, loss_fn, data = PROBLEMS[problem]()
    fm = metafunc.functionalize(net)
    meta_step = _meta_step(fm, loss_fn, OPTIMIZERS[opt_name]())
    params = {k: v.detach() for k, v in fm.params.items()}
    buffers = {k: v.clone() for k, v in fm.buffers.items()}
    _assert_one_graph(meta_step, params, *data(0))

    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    compiled = torch.compile(meta_step, backend="aot_eager", fullgraph=True)
    for seed in (1, 2):  # new data, same shapes: no recompilation
        _assert_round_off(compiled(params, *data(seed)), meta_step(params, *data(seed)))
    assert stats["unique_graphs"] - before == 1
    assert all(torch.equal(fm.buffers[k], b) for k, b in buffers.items())  # nothing written


@pytest.mark.parametrize("strategy", ["auto", "loop"])
def test_other_strategies_compile(strategy):
    """ "auto" traces vmap inside torch.compile (no timing); "loop" unrolls the tasks (traceable
    with randomness="different": the "error" check reads the RNG state)."""
    net, loss_fn, data = _mlp_problem()
    fm = metafunc.functionalize(net)

    def loss(p, batch):
        return loss_fn(fm(p, batch[0]), batch[1])

    def task(p, sx, sy, qx, qy):
        result = metafunc.inner_loop(loss, p, metafunc.optim.sgd(lr=0.1), (sx, sy), steps=STEPS)
        return loss(result.params, (qx, qy))

    run = metafunc.vmap_tasks(
        task,
        in_dims=(None, 0, 0, 0, 0),
        strategy=strategy,
        randomness="different" if strategy == "loop" else "error",
    )

    def meta_step(params, sx, sy, qx, qy):
        return grad(lambda p: run(p, sx, sy, qx, qy).mean())(params)

    params = {k: v.detach() for k, v in fm.params.items()}
    _assert_one_graph(meta_step, params, *data(0))
    assert run.strategy == (None if strategy == "auto" else "loop")  # eager auto still undecided
    torch._dynamo.reset()
    compiled = torch.compile(meta_step, backend="aot_eager", fullgraph=True)
    _assert_round_off(compiled(params, *data(1)), meta_step(params, *data(1)))


def test_first_order_meta_step_is_one_graph():
    net, loss_fn, data = _mlp_problem()
    fm = metafunc.functionalize(net)
    meta_step = _meta_step(fm, loss_fn, metafunc.optim.sgd(lr=0.1), first_order=True)
    params = {k: v.detach() for k, v in fm.params.items()}
    _assert_one_graph(meta_step, params, *data(0))


LEARNERS = {
    "maml": {},
    "maml_adam": {"inner_opt": "adam"},
    "fomaml": {"first_order": True},
    "fomaml_adam": {"first_order": True, "inner_opt": "adam"},
    "meta_sgd": {"learn_lr": PerParamLR()},
    "anil": {"adapted": ["2.weight", "2.bias"]},
    "mamlpp": {"learn_lr": PerStepLR(), "step_weights": [0.25, 0.75]},
    # first-order algorithms whose meta-step is one graph too
    "reptile": {"algorithm": "Reptile"},
    "reptile_adam": {"algorithm": "Reptile", "inner_opt": "adam"},
    "leap": {"algorithm": "Leap"},
}


@pytest.mark.parametrize("variant", sorted(LEARNERS))
def test_learner_meta_grad_is_one_graph(variant):
    """``torch.compile(learner.meta_grad)`` for the MAML family (and Reptile, Leap), SGD or Adam
    inside: metafunc's own meta-step (per-task metrics included) is one graph, and the compiled
    meta-gradient is the eager one. (iMAML's implicit Function and WarpGrad's replay sampling are
    not traced whole: not claimed.)"""
    net, loss_fn, data = _mlp_problem()
    kwargs = dict(LEARNERS[variant])
    algorithm = getattr(metafunc.algorithms, kwargs.pop("algorithm", "MAML"))
    if "inner_opt" in kwargs:
        kwargs["inner_opt"] = OPTIMIZERS[kwargs["inner_opt"]]()
    else:
        kwargs["inner_lr"] = 0.1
    learner = algorithm(
        metafunc.functionalize(net), loss_fn, steps=STEPS, strategy="vmap", **kwargs
    )
    meta = learner.init()
    sx, sy, qx, qy = data(0)
    _assert_one_graph(learner.meta_grad, meta, (sx, sy), (qx, qy))

    torch._dynamo.reset()
    compiled = torch.compile(learner.meta_grad, backend="aot_eager", fullgraph=True)
    sx, sy, qx, qy = data(1)
    got, got_metrics = compiled(meta, (sx, sy), (qx, qy))
    want, want_metrics = learner.meta_grad(meta, (sx, sy), (qx, qy))
    assert sorted(got) == sorted(want) and sorted(got_metrics) == sorted(want_metrics)
    for key in want:
        _assert_round_off(got[key], want[key])
    for key in want_metrics:
        torch.testing.assert_close(got_metrics[key], want_metrics[key], rtol=1e-12, atol=0)
    assert not any(g.requires_grad for g in torch.utils._pytree.tree_leaves(got))


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (_norms._batch_norm, F.batch_norm),
        (_norms._layer_norm, F.layer_norm),
        (_norms._instance_norm, F.instance_norm),
    ],
)
def test_exact_norms_take_torch_signatures(ours, theirs):
    """The exact-norm mode calls its replacements with torch's (args, kwargs) as they come."""
    a, b = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
    assert [(p.name, p.default, p.kind) for p in a.values()] == [
        (p.name, p.default, p.kind) for p in b.values()
    ]


def test_buffer_updates_are_per_thread():
    inside, release = threading.Event(), threading.Event()
    seen = []

    def other():
        with _norms.buffer_updates() as updates:
            seen.append(_norms._STATE.updates is updates)
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    assert inside.wait(10)
    assert _norms._STATE.updates is None  # this thread does not see the other's collection
    release.set()
    thread.join()
    assert seen == [True]
