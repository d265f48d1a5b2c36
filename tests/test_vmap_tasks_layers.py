""":func:`metafunc.vmap_tasks` and the exact norms, for every layer kind, against a per-task loop.

MAML meta-gradients and per-task running statistics under vmap (whole and in chunks) equal the
loop for every layer kind of ``CASES``, with SGD and Adam, second order, first order and truncated;
running statistics equal torch's in-place updates; the exact-norms context serves models that call
the norm functions themselves; random MLPs and norm models drawn by hypothesis.

Oracle: a Python ``for`` loop over the tasks written here (outside any ``torch.func`` transform,
outputs stacked with optree), in float64.
The upstream bug the exact norms work around (pytorch/functorch#534) is reproduced with a
hand-written ``functional_call`` model and ``torch.func.grad``, with no metafunc code in the oracle.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from _vmap_tasks_helpers import (
    CASES,
    N_TASKS,
    D,
    _assert_trees_close,
    _data,
    _init,
    _linear_norm,
    _loop,
    _maml_task,
    _meta_grad,
    _take,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

import metafunc
import metafunc.optim as mo
from metafunc.testing import assert_vmap_matches_loop

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel_err(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


class _SharedBatchNorm(nn.Module):
    """One BatchNorm applied twice per forward pass: its running stats are updated twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h = torch.relu(self.bn(self.a(x)))
        return self.out(torch.relu(self.bn(self.b(h))))


OPTS = {"sgd": lambda: mo.sgd(lr=0.1), "adam": lambda: mo.adam(lr=0.05)}
MODES = {"second_order": {}, "first_order": {"first_order": True}, "truncate1": {"truncate": 1}}
STRATEGIES = {
    "vmap": {"strategy": "vmap"},
    "loop": {"strategy": "loop"},
    "vmap_chunk2": {"strategy": "vmap", "chunk_size": 2},
}


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm1d"])
def test_raw_vmap_meta_gradient_through_norms_is_wrong_and_vmap_tasks_is_exact(norm, device):
    layer = nn.LayerNorm(4) if norm == "layernorm" else nn.BatchNorm1d(4, track_running_stats=False)
    net = _init(nn.Sequential(nn.Linear(3, 4), layer, nn.ReLU(), nn.Linear(4, 1)), 0).to(device)
    params = dict(net.named_parameters())
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 5, d, generator=g, dtype=D).to(device) for d in (3, 1, 3, 1)]

    # hand-written MAML task: one SGD step with torch.func.grad, no metafunc involved
    def loss(p, x, y):
        return ((functional_call(net, p, (x,)) - y) ** 2).mean()

    def task(p, xs, ys, xq, yq):
        grads = grad(loss)(p, xs, ys)
        return loss({k: p[k] - 0.5 * grads[k] for k in p}, xq, yq)

    expected = _meta_grad(_loop(task, (params,), data, n=4).sum(), params)
    raw = _meta_grad(vmap(task, in_dims=(None, 0, 0, 0, 0))(params, *data).sum(), params)

    fm = metafunc.functionalize(net)
    fm_loss = lambda p, b: ((fm(p, b[0]) - b[1]) ** 2).mean()

    def fm_task(p, xs, ys, xq, yq):
        result = metafunc.inner_loop(fm_loss, p, mo.sgd(lr=0.5), (xs, ys), steps=1)
        return fm_loss(result.params, (xq, yq))

    run = metafunc.vmap_tasks(fm_task, in_dims=(None, 0, 0, 0, 0), strategy="vmap")
    _assert_trees_close(_meta_grad(run(fm.params, *data).sum(), fm.params), expected)

    # the weight matrix feeding the norm: wrong under raw vmap (pytorch/functorch#534)
    err = _rel_err(raw["0.weight"], expected["0.weight"])
    if err <= 1e-3:
        msg = (
            f"raw torch.func.vmap gave the {norm} meta-gradient right on {device} with torch "
            f"{torch.__version__} (rel. error {err:.1e}): the upstream bug does not show here"
        )
        if device != "cpu":
            pytest.skip(msg)
        pytest.fail(msg + "; if torch fixed it, the exact norms can go")
    assert err > 1e-3


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("case", list(CASES))
def test_meta_gradient_and_running_stats_equal_the_per_task_loop(case, opt, mode, device):
    fm = metafunc.functionalize(_init(CASES[case][0](), seed=3).to(device))
    task = _maml_task(fm, OPTS[opt](), MODES[mode])
    support, query = _data(case, seed=4, device=device)

    losses, buffers = _loop(task, (fm.params, fm.buffers), (support, query))
    expected = (losses.detach(), buffers, _meta_grad(losses.sum(), fm.params))
    for name, kwargs in STRATEGIES.items():
        run = metafunc.vmap_tasks(task, in_dims=(None, None, 0, 0), **kwargs)
        losses, buffers = run(fm.params, fm.buffers, support, query)
        assert losses.shape == (N_TASKS,), name
        actual = (losses.detach(), buffers, _meta_grad(losses.sum(), fm.params))
        _assert_trees_close(actual, expected)
    assert all(b.grad is None for b in fm.buffers.values())


# name -> (module factory, per-sample input shape); modules whose forward updates buffers
RUNNING_STATS = {
    "batchnorm1d": (CASES["batchnorm1d"][0], (3,)),
    "batchnorm1d_cumulative": (CASES["batchnorm1d_cumulative"][0], (3,)),
    "batchnorm2d": (CASES["batchnorm2d"][0], (1, 6, 6)),
    "batchnorm1d_applied_twice": (_SharedBatchNorm, (3,)),
    "instancenorm_tracked": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
        ),
        (2, 6),
    ),
}


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("case", list(RUNNING_STATS))
def test_per_task_running_stats_equal_torchs_in_place_updates(case, strategy, device):
    build, x_shape = RUNNING_STATS[case]
    fm = metafunc.functionalize(_init(build(), seed=5).to(device))
    before = {k: b.clone() for k, b in fm.buffers.items()}
    g = torch.Generator().manual_seed(6)
    x = torch.randn(N_TASKS, 6, *x_shape, generator=g, dtype=D).to(device)
    x[1] = 2 * x[1] + 1  # a task with other statistics

    apply = lambda p, b, x: fm.apply(p, b, x)
    run = metafunc.vmap_tasks(apply, in_dims=(None, None, 0), strategy=strategy)
    _, new = run(fm.params, fm.buffers, x)
    # independent oracle: torch's own module (train mode) updates its buffers in place, per task
    for i in range(N_TASKS):
        module = _init(build(), seed=5).to(device)
        module(x[i])
        _assert_trees_close(_take(new, i), dict(module.named_buffers()), rtol=1e-12)
    mean = next(k for k in new if k.endswith("running_mean"))
    assert not torch.allclose(new[mean][0], new[mean][1])
    _assert_trees_close(fm.buffers, before, rtol=0)  # returned, never written


def test_batchnorm_with_one_value_per_channel_raises_torchs_error_in_every_strategy():
    fm = metafunc.functionalize(_init(_linear_norm(nn.BatchNorm1d(4)), seed=5))
    x = torch.randn(N_TASKS, 1, 3, generator=torch.Generator().manual_seed(6), dtype=D)
    for strategy in ("loop", "vmap"):
        run = metafunc.vmap_tasks(fm, in_dims=(None, 0), strategy=strategy)
        with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when train"):
            run(fm.params, x)


class _FunctionalLayerNorm(nn.Module):
    """Calls ``F.layer_norm`` itself: no norm module for the FunctionalModel to detect."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.gain = nn.Parameter(torch.ones(4))
        self.shift = nn.Parameter(torch.zeros(4))
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h = nn.functional.layer_norm(self.lin(x), (4,), self.gain, self.shift)
        return self.out(torch.relu(h))


def test_exact_norms_context_for_models_that_call_the_norm_functions_themselves():
    fm = metafunc.functionalize(_init(_FunctionalLayerNorm(), seed=14))
    task = _maml_task(fm, mo.sgd(lr=0.3), {})
    support, query = _data("layernorm", seed=15, device="cpu")
    losses, _ = _loop(task, (fm.params, fm.buffers), (support, query))
    expected = _meta_grad(losses.sum(), fm.params)

    def exact_task(*args):
        with metafunc.exact_norms():
            return task(*args)

    for func in (task, exact_task):
        run = metafunc.vmap_tasks(func, in_dims=(None, None, 0, 0), strategy="vmap")
        got = _meta_grad(run(fm.params, fm.buffers, support, query)[0].sum(), fm.params)
        if func is exact_task:
            _assert_trees_close(got, expected)
        else:  # documented: only norm *modules* are detected; the upstream bug shows
            assert _rel_err(got["lin.weight"], expected["lin.weight"]) > 1e-3


def _mlp_params(widths, g):
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        params[f"w{i}"] = (torch.randn(b, a, generator=g, dtype=D) / a**0.5).requires_grad_()
        params[f"b{i}"] = (0.1 * torch.randn(b, generator=g, dtype=D)).requires_grad_()
    return params


def _mlp(params, x):
    n = len(params) // 2
    for i in range(n):
        x = x @ params[f"w{i}"].T + params[f"b{i}"]
        x = torch.tanh(x) if i < n - 1 else x
    return x


@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    n_tasks=st.integers(1, 4),
    chunk_size=st.sampled_from([None, 1, 2, 3]),
    steps=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_vmap_strategy_equals_the_loop_for_random_mlps(
    widths, n_tasks, chunk_size, steps, seed
):
    g = torch.Generator().manual_seed(seed)
    params = _mlp_params(widths, g)
    xs = torch.randn(n_tasks, 3, widths[0], generator=g, dtype=D)
    ys = torch.randn(n_tasks, 3, widths[-1], generator=g, dtype=D)
    loss = lambda p, b: ((_mlp(p, b[0]) - b[1]) ** 2).mean()

    def task(p, x, y):
        result = metafunc.inner_loop(loss, p, mo.sgd(lr=0.3), (x, y), steps=steps)
        return loss(result.params, (x, y))

    expected = _loop(task, (params,), (xs, ys), n=n_tasks)
    run = metafunc.vmap_tasks(task, in_dims=(None, 0, 0), strategy="vmap", chunk_size=chunk_size)
    losses = run(params, xs, ys)
    _assert_trees_close(losses.detach(), expected.detach(), rtol=1e-12)
    _assert_trees_close(_meta_grad(losses.sum(), params), _meta_grad(expected.sum(), params))
    # and task by task, through the public check (vmap_tasks as the vmap under test)
    vmap = functools.partial(metafunc.vmap_tasks, strategy="vmap", chunk_size=chunk_size)
    assert_vmap_matches_loop(task, (None, 0, 0), params, xs, ys, grads=1, vmap=vmap, rtol=1e-10)


@given(
    norm=st.sampled_from(["batchnorm1d", "layernorm", "groupnorm"]),
    hidden=st.sampled_from([2, 4]),
    n_samples=st.integers(2, 4),
    n_tasks=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_norm_models_vmap_equals_the_loop(norm, hidden, n_samples, n_tasks, seed):
    layers = {
        "batchnorm1d": lambda: nn.BatchNorm1d(hidden),
        "layernorm": lambda: nn.LayerNorm(hidden),
        "groupnorm": lambda: nn.GroupNorm(2, hidden),
    }
    net = nn.Sequential(
        nn.Linear(3, hidden, bias=norm != "batchnorm1d"),
        layers[norm](),
        nn.Tanh(),
        nn.Linear(hidden, 1),
    )
    fm = metafunc.functionalize(_init(net, seed))
    task = _maml_task(fm, mo.sgd(lr=0.3), {}, steps=1)
    g = torch.Generator().manual_seed(seed)
    batch = lambda: tuple(torch.randn(n_tasks, n_samples, d, generator=g, dtype=D) for d in (3, 1))
    support, query = batch(), batch()

    losses, buffers = _loop(task, (fm.params, fm.buffers), (support, query), n=n_tasks)
    expected = (losses.detach(), buffers, _meta_grad(losses.sum(), fm.params))
    run = metafunc.vmap_tasks(task, in_dims=(None, None, 0, 0), strategy="vmap")
    losses, buffers = run(fm.params, fm.buffers, support, query)
    _assert_trees_close((losses.detach(), buffers, _meta_grad(losses.sum(), fm.params)), expected)
