"""How :func:`metafunc.vmap_tasks` chooses between vmap and a loop.

``strategy="auto"`` times both strategies over the call and its backward pass (a stand-in clock, no
real timing), then keeps one; deterministic algorithms and inputs off the CPU take vmap at once; a
fixed strategy says so; when the vmap trial fails the loop is kept and the reason given, and an
in-place write into a shared tensor is named with its fix; checkpointed inner loops need the loop
strategy.

Oracle: a Python ``for`` loop over the tasks written here (outside any ``torch.func`` transform,
outputs stacked with optree), in float64.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _vmap_tasks_helpers import D, _assert_trees_close, _loop, _meta_grad, _mlp_setup
from torch._C._functorch import is_batchedtensor
from torch.func import vmap

import metafunc
import metafunc.optim as mo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_auto_times_both_strategies_then_keeps_one_and_always_equals_the_loop(
    device, fresh_decisions
):
    fm, task, support, query = _mlp_setup(device)
    losses, _ = _loop(task, (fm.params, fm.buffers), (support, query))
    expected = (losses.detach(), _meta_grad(losses.sum(), fm.params))

    run = metafunc.vmap_tasks(task, in_dims=(None, None, 0, 0))
    assert run.strategy is None
    chosen = []
    for call in range(1, 9):
        losses, _ = run(fm.params, fm.buffers, support, query)
        _assert_trees_close((losses.detach(), _meta_grad(losses.sum(), fm.params)), expected)
        if device == "cpu":  # loop, vmap x2 (x3 unless one is twice as fast): then decided
            assert run.strategy is None or call >= 5, call
        else:
            assert run.strategy == "vmap", call  # accelerator inputs: vmap from the first call
        chosen.append(run.strategy)
    assert chosen[-1] in ("vmap", "loop")
    assert chosen[-1] == chosen[-2]
    assert run.__wrapped__ is task and run.__name__ == task.__name__
    assert ("per step" if device == "cpu" else "on an accelerator") in run.reason


@pytest.fixture
def fresh_decisions():
    """A clean slate for "auto": its decisions are kept per process."""
    from metafunc import _vmap

    saved = dict(_vmap._DECISIONS)
    _vmap._DECISIONS.clear()
    yield _vmap
    _vmap._DECISIONS.clear()
    _vmap._DECISIONS.update(saved)


class _Clock:
    """A stand-in for time.perf_counter: the test moves it, as a backward pass would take time."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def _counting_task():
    """A per-task function that counts its calls: a loop over 3 tasks makes 3, vmap one."""
    calls = []

    def task(w, x):
        calls.append(1)
        return (x @ w).sum()

    return task, calls


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward pass moves the test's clock: ``per_task`` seconds for each task's
    gradient when run per task (the loop), ``batched`` once for all tasks under vmap."""

    generate_vmap_rule = True
    clock: _Clock | None = None
    per_task = batched = 0.0

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        clock = _SlowBackward.clock
        clock.now += _SlowBackward.batched if is_batchedtensor(grad) else _SlowBackward.per_task
        return grad


@pytest.mark.parametrize(("loop_ms", "vmap_ms", "winner"), [(1, 5, "loop"), (5, 1, "vmap")])
def test_auto_times_the_call_and_its_backward_not_what_runs_between_calls(
    loop_ms, vmap_ms, winner, fresh_decisions, monkeypatch
):
    """The forward passes take no time on this clock and the backward passes ``loop_ms`` and
    ``vmap_ms``; between calls the caller spends 50 ms after each loop call and none after a
    vmap call (data loading, another call site: timing from call to call chose vmap whatever
    the backward cost). A clear win (5x) decides after one timed call of each: call 5."""
    clock = _Clock()
    monkeypatch.setattr(fresh_decisions, "time", clock)
    monkeypatch.setattr(_SlowBackward, "clock", clock)
    monkeypatch.setattr(_SlowBackward, "per_task", loop_ms / 1000 / 3)
    monkeypatch.setattr(_SlowBackward, "batched", vmap_ms / 1000)
    w = torch.ones(2, dtype=D, requires_grad=True)
    x = torch.ones(3, 4, 2, dtype=D)
    calls = []

    def task(w, x):
        calls.append(1)
        return _SlowBackward.apply(x @ w).sum()

    run = metafunc.vmap_tasks(task, in_dims=(None, 0))
    for call in range(1, 6):
        before = len(calls)
        run(w, x).sum().backward()
        clock.now += 0.050 if len(calls) - before == 3 else 0.0  # the caller's other work
        assert (run.strategy is None) == (call < 5), call
    assert run.strategy == winner
    assert run.reason.startswith(f"{winner} {min(loop_ms, vmap_ms):.1f} ms per step")
    assert "backward" in run.reason


def test_auto_times_the_forward_alone_when_no_backward_runs(fresh_decisions, monkeypatch):
    """Evaluation (no gradient) or a backward after the next call: the call's own time."""
    clock = _Clock()
    monkeypatch.setattr(fresh_decisions, "time", clock)
    calls = []

    def task(w, x):  # the forward pass moves the clock: 1 ms per task in the loop, 1 ms batched
        calls.append(1)
        clock.now += 0.001
        return (x @ w).sum()

    run = metafunc.vmap_tasks(task, in_dims=(None, 0))
    for call in range(1, 6):
        run(torch.ones(2, dtype=D), torch.ones(3, 4, 2, dtype=D))
        clock.now += 1.0  # the caller's other work, which does not count
        assert (run.strategy is None) == (call < 5), call
    assert run.strategy == "vmap" and run.reason.startswith("vmap 1.0 ms per step, loop 3.0 ms")


def test_auto_decides_after_six_calls_when_neither_is_twice_as_fast(fresh_decisions, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(fresh_decisions, "time", clock)
    calls = []

    def task(w, x):  # 4 ms for the loop's 3 tasks, 3 ms batched
        calls.append(1)
        clock.now += 0.003 if is_batchedtensor(x) else 0.004 / 3
        return (x @ w).sum()

    run = metafunc.vmap_tasks(task, in_dims=(None, 0))
    for call in range(1, 8):
        run(torch.ones(2, dtype=D), torch.ones(3, 4, 2, dtype=D))
        assert (run.strategy is None) == (call < 7), call
    assert run.strategy == "vmap"


@dataclasses.dataclass(frozen=True)
class _Learner:
    steps: int

    def task(self, w, x):
        return (x @ w).sum() * self.steps


def test_bound_methods_share_a_decision_only_with_equal_objects(fresh_decisions, monkeypatch):
    """A learner's task method: an equal learner made anew each step finds the decision; a
    learner with other settings (first_order, steps) is timed on its own."""
    clock = _Clock()
    monkeypatch.setattr(fresh_decisions, "time", clock)
    w, x = torch.ones(2, dtype=D), torch.ones(3, 4, 2, dtype=D)
    for _ in range(7):
        run = metafunc.vmap_tasks(_Learner(steps=1).task, in_dims=(None, 0))
        run(w, x)
        clock.now += 0.001
    again = metafunc.vmap_tasks(_Learner(steps=1).task, in_dims=(None, 0))
    again(w, x)
    assert again.strategy in ("loop", "vmap")  # decided: no trial
    other = metafunc.vmap_tasks(_Learner(steps=2).task, in_dims=(None, 0))
    other(w, x)
    assert other.strategy is None  # timed anew


def test_the_inline_idiom_times_once_then_runs_the_decision_at_once(fresh_decisions, caplog):
    """vmap_tasks(...) made anew every step (as users write torch.func.vmap(...)(...)): the
    decision is found by the function's code and the arguments' shapes; other shapes are timed
    anew."""
    w, x = torch.ones(2, dtype=D), torch.ones(3, 4, 2, dtype=D)
    task, calls = _counting_task()

    def step(x):
        return metafunc.vmap_tasks(task, in_dims=(None, 0))(w, x)

    with caplog.at_level("INFO", logger="metafunc"):
        for _ in range(7):
            step(x)
    run = metafunc.vmap_tasks(task, in_dims=(None, 0))
    before = len(calls)
    run(w, x)
    assert run.strategy in ("loop", "vmap")
    assert len(calls) - before == (3 if run.strategy == "loop" else 1)  # no trial ran
    assert [r.getMessage() for r in caplog.records] == [
        f"vmap_tasks(task): auto chose {run.strategy!r}: {run.reason}"
    ]
    other = metafunc.vmap_tasks(task, in_dims=(None, 0))
    other(w, torch.ones(5, 4, 2, dtype=D))  # another meta-batch size: timed anew
    assert other.strategy is None


def test_deterministic_algorithms_make_auto_take_vmap_without_timing(fresh_decisions):
    task, calls = _counting_task()
    run = metafunc.vmap_tasks(task, in_dims=(None, 0))
    torch.use_deterministic_algorithms(True)
    try:
        run(torch.ones(2, dtype=D), torch.ones(3, 4, 2, dtype=D))
    finally:
        torch.use_deterministic_algorithms(False)
    assert run.strategy == "vmap" and len(calls) == 1
    assert "use_deterministic_algorithms" in run.reason


def test_a_fixed_strategy_says_so():
    run = metafunc.vmap_tasks(lambda x: x, strategy="loop")
    assert run.strategy == "loop" and run.reason == "strategy='loop' was asked for"


def test_auto_picks_vmap_at_once_for_inputs_off_the_cpu():
    # meta tensors stand in for an accelerator on machines without one
    run = metafunc.vmap_tasks(lambda w, x: x @ w, in_dims=(None, 0))
    out = run(torch.ones(3, 2, device="meta"), torch.ones(5, 4, 3, device="meta"))
    assert run.strategy == "vmap"
    assert out.shape == (5, 4, 2) and out.device.type == "meta"


def test_checkpointed_inner_loop_needs_the_loop_strategy_and_matches_the_plain_unroll():
    fm, _, support, query = _mlp_setup("cpu")
    loss = lambda p, b: ((fm(p, b[0]) - b[1]) ** 2).mean()

    def task(params, support, query, checkpoint=None):
        opt = mo.adam(lr=0.05)
        result = metafunc.inner_loop(loss, params, opt, support, steps=4, checkpoint=checkpoint)
        return loss(result.params, query)

    pattern = r"inner_loop\(\.\.\., checkpoint=\.\.\.\):.*strategy='loop'"
    with pytest.raises(RuntimeError, match=pattern):
        vmap(task, in_dims=(None, 0, 0))(fm.params, support, query, checkpoint=2)
    with pytest.raises(RuntimeError, match=pattern):
        metafunc.vmap_tasks(task, in_dims=(None, 0, 0), strategy="vmap")(
            fm.params, support, query, checkpoint=2
        )

    plain = metafunc.vmap_tasks(task, in_dims=(None, 0, 0), strategy="vmap")
    expected = plain(fm.params, support, query)
    expected = (expected.detach(), _meta_grad(expected.sum(), fm.params))
    checkpointed = metafunc.vmap_tasks(task, in_dims=(None, 0, 0), strategy="loop")
    for checkpoint in (2, "sqrt"):
        losses = checkpointed(fm.params, support, query, checkpoint=checkpoint)
        _assert_trees_close((losses.detach(), _meta_grad(losses.sum(), fm.params)), expected)


def _accumulate(x):
    acc = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
    acc += 2 * x.sum(0)  # in place into a tensor without the task dimension
    return acc


def _assign(x):
    acc = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
    acc[0] = x.sum()
    return acc


def test_auto_keeps_the_loop_when_the_vmap_trial_fails_and_says_why(device):
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0), dtype=D).to(device)
    expected = torch.stack([2 * x[i].sum(0) for i in range(3)])
    run = metafunc.vmap_tasks(_accumulate)
    for call in range(1, 5):  # call 1: the loop; call 2: the vmap trial fails, the loop runs
        torch.testing.assert_close(run(x), expected, rtol=1e-12, atol=0)
        assert run.strategy == (None if call == 1 and device == "cpu" else "loop"), call
    assert run.fallback is not None and "out of place: acc = acc + f(x)" in run.fallback


def test_auto_keeps_the_loop_off_the_cpu_when_vmap_fails():
    # meta tensors stand in for an accelerator on machines without one
    run = metafunc.vmap_tasks(_accumulate)
    out = run(torch.ones(3, 4, 2, device="meta"))
    assert run.strategy == "loop" and run.fallback is not None
    assert out.shape == (3, 2)


def test_auto_raises_the_loops_own_error_when_the_loop_fails_too():
    run = metafunc.vmap_tasks(lambda x: x.sum(), in_dims=1)
    run(torch.ones(3, 4))  # call 1: the loop
    with pytest.raises(ValueError, match=r"strategy='loop'\): in_dims entry 1 is out of range"):
        run(torch.ones(3))  # call 2: the vmap trial fails, and so does the loop: its error
    assert run.strategy is None and run.fallback is None


@pytest.mark.parametrize("func", [_accumulate, _assign], ids=["add-in-place", "index-assign"])
def test_strategy_vmap_names_an_in_place_write_into_a_shared_tensor_and_the_fix(func):
    run = metafunc.vmap_tasks(func, strategy="vmap")
    pattern = (
        r"vmap_tasks\(func, strategy='vmap'\): func writes per-task values in place into a "
        r"tensor without the task dimension \(.*\)\. .* Write it out of place: acc = acc \+ f\(x\)"
    )
    with pytest.raises(RuntimeError, match=pattern):
        run(torch.ones(3, 4, 2))
