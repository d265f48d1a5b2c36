""":func:`metafunc.vmap_tasks` with torch.func.vmap's arguments; stack_tasks and unstack_tasks.

``randomness`` (different, same, error) in every strategy; dict inputs, shared params, keyword
arguments and tuple/dict outputs with the tape; negative, nonzero and ``None`` ``in_dims`` and
``out_dims``; per-task running statistics as batched inputs; ``stack_tasks``/``unstack_tasks``
round trip.

Oracle: a Python ``for`` loop over the tasks written here (outside any ``torch.func`` transform,
outputs stacked with optree), in float64.
"""

from __future__ import annotations

import optree
import pytest
import torch
from _vmap_tasks_helpers import (
    N_TASKS,
    D,
    _assert_trees_close,
    _init,
    _linear_norm,
    _loop,
    _meta_grad,
    _mlp_setup,
)
from torch import nn
from torch.func import vmap

import metafunc
import metafunc.optim as mo

pytestmark = pytest.mark.usefixtures("one_thread")


def _dropout_setup(device):
    torch.manual_seed(0)
    net = _init(nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5)), seed=8).to(device)
    fm = metafunc.functionalize(net.train())
    x = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(9), dtype=D).to(device)
    plain = net[0](x[0]).detach()  # the output without dropout
    return fm, x.expand(4, 5, 3), plain  # four tasks with identical inputs


def _check_dropped(out, plain):
    """Every entry is either dropped (0) or kept and scaled by 1 / (1 - p) = 2."""
    kept = out != 0
    torch.testing.assert_close(out[kept], (2 * plain).expand_as(out)[kept], rtol=1e-12, atol=0)
    assert 0 < kept.sum() < kept.numel()


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_randomness_different_draws_a_mask_per_task(strategy, device):
    fm, x, plain = _dropout_setup(device)
    run = metafunc.vmap_tasks(fm, in_dims=(None, 0), randomness="different", strategy=strategy)
    out = run(fm.params, x).detach()
    for i in range(4):
        _check_dropped(out[i], plain)
        for j in range(i):
            assert not torch.equal(out[i] != 0, out[j] != 0), (i, j)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_randomness_same_draws_one_mask_for_all_tasks(strategy, device):
    fm, x, plain = _dropout_setup(device)
    run = metafunc.vmap_tasks(fm, in_dims=(None, 0), randomness="same", strategy=strategy)
    out = run(fm.params, x).detach()
    _check_dropped(out[0], plain)
    for i in range(1, 4):
        assert torch.equal(out[i], out[0]), i
    assert not torch.equal(run(fm.params, x)[0], out[0])  # the next call draws a new mask


_RANDOM_ERROR = r"vmap: called random operation while in randomness error mode"


def test_randomness_error_is_torchs_error_under_vmap():
    fm, x, _ = _dropout_setup("cpu")
    with pytest.raises(RuntimeError, match=_RANDOM_ERROR):
        vmap(fm, in_dims=(None, 0))(fm.params, x)
    with pytest.raises(RuntimeError, match=_RANDOM_ERROR):
        metafunc.vmap_tasks(fm, in_dims=(None, 0), strategy="vmap")(fm.params, x)
    out = metafunc.vmap_tasks(fm.eval(), in_dims=(None, 0), strategy="vmap")(fm.params, x)
    assert out.shape == (4, 5, 16)  # eval mode: no random op, no error


@pytest.mark.parametrize("strategy", ["loop", "auto"])
def test_randomness_error_raises_in_every_strategy_and_every_call(strategy):
    # "Both give the same numbers" and the default randomness="error": a random op must not
    # pass silently in the loop, nor make "auto" succeed on call 1 (loop) and fail on call 2.
    fm, x, _ = _dropout_setup("cpu")
    run = metafunc.vmap_tasks(fm, in_dims=(None, 0), strategy=strategy)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="randomness"):
            run(fm.params, x)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_dict_inputs_shared_params_kwargs_and_tuple_dict_outputs_with_the_tape(strategy):
    fm, _, support, query = _mlp_setup("cpu")
    loss = lambda p, b: ((fm(p, b["x"]) - b["y"]) ** 2).mean()

    def task(params, batch, *, lr_scale):
        support = {"x": batch["x"], "y": batch["y"]}
        opt = mo.sgd(lr=0.1 * lr_scale)
        result = metafunc.inner_loop(loss, params, opt, support, steps=2)
        query = {"x": batch["xq"], "y": batch["yq"]}
        return loss(result.params, query), {"tape": result.tape, "adapted": result.params}

    # y carries the task dimension in dim 1, everything else in dim 0
    batch = {"x": support[0], "y": support[1].movedim(0, 1), "xq": query[0], "yq": query[1]}
    in_dims = (None, {"x": 0, "y": 1, "xq": 0, "yq": 0})
    lr_scale = torch.tensor(2.0, dtype=D, requires_grad=True)
    out_dims = (0, {"tape": 0, "adapted": 0})
    run = metafunc.vmap_tasks(task, in_dims=in_dims, out_dims=out_dims, strategy=strategy)
    losses, extra = run(fm.params, batch, lr_scale=lr_scale)

    per_task = {"x": support[0], "y": support[1], "xq": query[0], "yq": query[1]}
    e_losses, e_extra = _loop(lambda b: task(fm.params, b, lr_scale=lr_scale), (), (per_task,))
    tape = extra["tape"]
    assert isinstance(tape, metafunc.Tape)
    assert tape.steps == [0, 1, 2] and tape.num_steps == 2
    assert tape.losses.shape == (N_TASKS, 2)
    for k, v in fm.params.items():
        assert torch.equal(tape[0][k], v.expand(N_TASKS, *v.shape))  # shared, broadcast
    _assert_trees_close((losses, extra), (e_losses, e_extra), rtol=1e-12)
    # the meta-gradient reaches the shared params and the unbatched keyword argument
    wrt = {**fm.params, "lr_scale": lr_scale}
    _assert_trees_close(_meta_grad(losses.sum(), wrt), _meta_grad(e_losses.sum(), wrt))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_negative_nonzero_and_none_dims(strategy):
    g = torch.Generator().manual_seed(10)
    w = torch.randn(3, 2, generator=g, dtype=D)
    x = torch.randn(5, 3, N_TASKS, generator=g, dtype=D)  # task dimension last
    b = torch.randn(2, N_TASKS, generator=g, dtype=D)  # task dimension in the middle of nothing

    def f(w, x, b):
        h = x @ w + b
        return h, {"sum": h.sum(0), "w": 2 * w}

    run = metafunc.vmap_tasks(
        f, in_dims=(None, -1, 1), out_dims=(1, {"sum": -1, "w": None}), strategy=strategy
    )
    h, extra = run(w, x, b)
    rows = [f(w, x[..., i], b[:, i]) for i in range(N_TASKS)]
    assert h.shape == (5, N_TASKS, 2)
    assert extra["sum"].shape == (2, N_TASKS)
    for i, (h_i, e_i) in enumerate(rows):
        torch.testing.assert_close(h[:, i], h_i, rtol=1e-14, atol=0)
        torch.testing.assert_close(extra["sum"][..., i], e_i["sum"], rtol=1e-14, atol=0)
    assert torch.equal(extra["w"], 2 * w)  # out_dims None: the unbatched output as it is


def test_per_task_running_stats_as_batched_inputs():
    fm = metafunc.functionalize(_init(_linear_norm(nn.BatchNorm1d(4)), seed=11))
    g = torch.Generator().manual_seed(12)
    buffers = {k: torch.stack([b] * N_TASKS) for k, b in fm.buffers.items()}
    buffers["1.running_mean"] = buffers["1.running_mean"] + torch.randn(N_TASKS, 4, generator=g)
    x = torch.randn(N_TASKS, 6, 3, generator=g, dtype=D)
    apply = lambda p, b, x: fm.apply(p, b, x)
    expected = _loop(apply, (fm.params,), (buffers, x))
    for strategy in ("vmap", "loop"):
        run = metafunc.vmap_tasks(apply, in_dims=(None, 0, 0), strategy=strategy)
        _assert_trees_close(run(fm.params, buffers, x), expected, rtol=1e-12)


def test_stack_and_unstack_tasks_round_trip():
    g = torch.Generator().manual_seed(13)
    tasks = [
        {"x": torch.randn(2, 3, generator=g), "nested": (torch.randn(4, generator=g), [i * 1.0])}
        for i in range(N_TASKS)
    ]
    tasks = [optree.tree_map(torch.as_tensor, t) for t in tasks]
    batch = metafunc.stack_tasks(tasks)
    assert batch["x"].shape == (N_TASKS, 2, 3)
    assert batch["nested"][0].shape == (N_TASKS, 4) and batch["nested"][1][0].shape == (N_TASKS,)
    back = metafunc.unstack_tasks(batch)
    assert len(back) == N_TASKS
    for got, want in zip(back, tasks):
        _assert_trees_close(got, want, rtol=0)
    assert metafunc.unstack_tasks({}) == []
    assert metafunc.stack_tasks((torch.zeros(1),)).shape == (1, 1)  # a tuple of tasks is fine


_NT = __import__("collections").namedtuple("_NT", "loss parts")


@pytest.mark.parametrize(
    ("out_dims", "chunk_size"), [(0, None), (1, None), (0, 2), ((0, {"w": 1, "s": 0}), None)]
)
def test_nested_outputs_come_back_as_torch_func_vmap_gives_them(out_dims, chunk_size):
    """vmap_tasks hands its outputs out of vmap as one flat tuple and rebuilds them (with an
    int out_dims): the same containers, types, shapes and values as torch.func.vmap's own."""
    x = torch.randn(N_TASKS, 3, 2, dtype=D, generator=torch.Generator().manual_seed(0))

    def task(x):
        return x.sum(), {"w": x * 2, "s": [x.mean(), _NT(x.max(), (x.min(),))]}

    def task_nt(x):
        return _NT(x.sum(), {"w": x * 2, "s": x.mean()})

    def task_1d(x):  # outputs of at least one dimension per task, for out_dims=1
        return {"w": x * 2, "s": [x.mean(0), _NT(x.amax(0), (x,))]}

    if out_dims == 1:
        fns = (task_1d,)
    elif isinstance(out_dims, int):
        fns = (task, task_nt)
    else:
        fns = (lambda x: (x.sum(), {"w": x * 2, "s": x.mean()}),)
    for f in fns:
        ours = metafunc.vmap_tasks(f, out_dims=out_dims, chunk_size=chunk_size, strategy="vmap")(x)
        theirs = vmap(f, out_dims=out_dims, chunk_size=chunk_size)(x)
        assert optree.tree_structure(ours) == optree.tree_structure(theirs)
        for a, b in zip(optree.tree_leaves(ours), optree.tree_leaves(theirs)):
            assert type(a) is type(b)
            assert torch.equal(a, b)
