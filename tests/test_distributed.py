"""metafunc.distributed: two gloo processes give the single-process meta-gradient.

The oracle is the same learner's ``meta_grad`` over the whole meta-batch in this process; the
sharded result may differ only by the order of a floating-point sum (one all-reduce), so the
tolerance is float64 round-off (1e-13 absolute on gradients of order 1).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile

import optree
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import metafunc
import metafunc._train
from metafunc import distributed as mdist
from metafunc.algorithms import IMAML, MAML, Leap, PerParamLR, Reptile
from metafunc.data import Sinusoid

ALGORITHMS = ("maml", "fomaml", "metasgd", "reptile", "leap", "imaml")


def _learner(name: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    fm = metafunc.functionalize(model)
    if name == "maml":
        return MAML(fm, steps=2, inner_lr=0.05, strategy="vmap")
    if name == "fomaml":
        return MAML(fm, steps=2, inner_lr=0.05, first_order=True, strategy="vmap")
    if name == "metasgd":
        return MAML(fm, steps=1, inner_lr=0.05, learn_lr=PerParamLR(), strategy="vmap")
    if name == "reptile":
        return Reptile(fm, steps=3, inner_lr=0.05, strategy="vmap")
    if name == "leap":
        return Leap(fm, steps=3, inner_lr=0.05, strategy="vmap")
    # a tight CG tolerance: the shares' different batch sizes round differently, and a looser
    # solve would amplify that to its own tolerance
    solve = functools.partial(metafunc.implicit.solve_cg, tol=1e-13, maxiter=200)
    # 100 inner steps: with 20 the inner problem is not solved (residual 0.49 against a tolerance
    # of 0.0056), the implicit gradient is ~10 % off, and IMAML now warns
    return IMAML(fm, steps=100, inner_lr=0.1, lam=2.0, solve=solve, strategy="vmap")


def _episode(n_tasks: int):
    gen = torch.Generator().manual_seed(3)
    return Sinusoid().sample(n_tasks, 5, generator=gen, dtype=torch.float64)


def _worker(rank: int, world: int, path: str, n_tasks: int, queue) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{path}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    try:
        results = {}
        for name in ALGORITHMS:
            learner = _learner(name)
            episode = _episode(n_tasks)
            grads, metrics = mdist.meta_grad(
                learner, learner.init(), episode.support, episode.query
            )
            leaves = [g.tolist() for g in optree.tree_leaves(grads)]
            results[name] = (leaves, metrics["loss"].tolist())
        share = mdist.shard(torch.arange(n_tasks)).tolist()
        # mixed dtypes reduce at the widest one: 1 + 1e-12 survives next to a float32 leaf
        mixed = mdist.all_reduce_mean(
            {"a": torch.ones(2), "b": torch.full((2,), 1 + 1e-12, dtype=torch.float64)}, 1 + rank
        )
        results["mixed"] = {k: (v.dtype, v.tolist()) for k, v in mixed.items()}
        learner = _learner("maml")
        for n in (7, 1):  # shared out 4 + 3; one task: evaluated whole by both
            episode = _episode(n)
            metrics = mdist.evaluate(learner, learner.init(), episode.support, episode.query)
            results[f"evaluate{n}"] = {k: v.tolist() for k, v in metrics.items()}
        try:  # one task, two processes
            one = _episode(1)
            mdist.meta_grad(_learner("maml"), _learner("maml").init(), one.support, one.query)
            results["too_few"] = None
        except ValueError as e:
            results["too_few"] = str(e)
        queue.put((rank, results, share, None))
    except Exception as e:  # report to the parent instead of hanging it
        queue.put((rank, None, None, repr(e)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes():
    """Runs every algorithm once in 2 gloo processes on 7 tasks (uneven shares: 4 and 3)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    path = tempfile.mktemp(prefix="metafunc-dist-")
    procs = [ctx.Process(target=_worker, args=(r, 2, path, 7, queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        rank, results, share, error = queue.get(timeout=300)
        assert error is None, f"rank {rank}: {error}"
        out[rank] = (results, share)
    for p in procs:
        p.join(timeout=60)
    return out


@pytest.mark.parametrize("name", ALGORITHMS)
def test_two_processes_give_the_single_process_meta_gradient(two_processes, name):
    learner = _learner(name)
    episode = _episode(7)
    grads, metrics = learner.meta_grad(learner.init(), episode.support, episode.query)
    expected = [g.detach() for g in optree.tree_leaves(grads)]
    for rank in (0, 1):  # every process ends with the same, whole-batch result
        leaves, losses = two_processes[rank][0][name]
        for e, a in zip(expected, leaves):
            torch.testing.assert_close(torch.tensor(a, dtype=e.dtype), e, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(
            torch.tensor(losses, dtype=torch.float64), metrics["loss"], rtol=1e-12, atol=1e-14
        )


def test_uneven_shares_are_contiguous_and_cover_the_batch(two_processes):
    assert two_processes[0][1] == [0, 1, 2, 3]
    assert two_processes[1][1] == [4, 5, 6]


@pytest.mark.parametrize("n_tasks", [7, 1])
def test_two_processes_evaluate_like_one(two_processes, n_tasks):
    learner = _learner("maml")
    episode = _episode(n_tasks)
    expected = learner.evaluate(learner.init(), episode.support, episode.query)
    for rank in (0, 1):
        got = two_processes[rank][0][f"evaluate{n_tasks}"]
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            torch.testing.assert_close(torch.tensor(got[k], dtype=v.dtype), v, rtol=1e-12, atol=0)


def test_mixed_dtypes_are_reduced_without_downcasting(two_processes):
    for rank in (0, 1):
        mixed = two_processes[rank][0]["mixed"]
        assert mixed["a"] == (torch.float32, [1.0, 1.0])
        assert mixed["b"] == (torch.float64, [1 + 1e-12] * 2)


def test_fewer_tasks_than_processes_is_rejected_by_name(two_processes):
    for rank in (0, 1):
        message = two_processes[rank][0]["too_few"]
        assert message == (
            "metafunc.distributed.meta_grad: a meta-batch of 1 tasks cannot be shared by 2 "
            "processes (each needs at least one); use a meta-batch of at least 2 tasks, or fewer "
            "processes."
        )


def test_single_process_is_a_no_op():
    assert not mdist.is_initialized()
    assert mdist.rank() == 0 and mdist.world_size() == 1
    x = torch.arange(5.0)
    assert mdist.shard(x) is not None and torch.equal(mdist.shard(x), x)
    grads = {"w": torch.ones(3)}
    assert mdist.all_reduce_mean(grads, 3) is grads


def test_bounds_split_any_batch_into_near_equal_contiguous_shares():
    for n in range(1, 20):
        for w in range(1, 6):
            spans = [mdist._bounds(n, r, w) for r in range(w)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
            sizes = [b - a for a, b in spans]
            assert max(sizes) - min(sizes) <= 1


def test_shard_errors():
    with pytest.raises(TypeError, match="expected a pytree holding stacked task tensors"):
        mdist.shard({"a": 1})
    with pytest.raises(ValueError, match="disagree on the task dimension"):
        mdist.shard((torch.zeros(3), torch.zeros(4)))


ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=2 -m metafunc train ARGS`` (standalone: a free
    port, so that runs at the same time do not collide)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "metafunc", "train", *args],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip


def test_the_runner_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node=2 -m metafunc train` = the single-process run (float32 round-off:
    the all-reduce sums in another order), with one progress bar and one set of files. Adam's
    moments are compared too: its update hides a gradient's scale, its second moment does not."""
    args = [
        "--algorithm", "maml", "--task", "sinusoid", "--steps", "4", "--meta-batch", "5",
        "--eval-every", "2", "--val-tasks", "4", "--eval-tasks", "6", "--strategy", "vmap",
        "--no-plot",
    ]  # fmt: skip
    two = _torchrun(*args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("post-adaptation on 6 held-out test tasks") == 1  # rank 0 only
    assert two.stderr.count("step 4/4") == 1  # one progress bar
    metafunc._train.main([*args, "--out", str(tmp_path / "one"), "--quiet"])
    one_ckpt = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    two_ckpt = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    for a, b in zip(one_ckpt["meta"], two_ckpt["meta"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    one_state, two_state = one_ckpt["outer"]["state"], two_ckpt["outer"]["state"]
    assert one_state.keys() == two_state.keys()
    for i in one_state:
        for key in ("exp_avg", "exp_avg_sq"):
            want = one_state[i][key]  # entries near 0 carry cancellation: atol by the scale
            atol = 1e-5 * want.abs().max().item()
            torch.testing.assert_close(two_state[i][key], want, rtol=1e-4, atol=atol)
    # per-task metrics are gathered: the smoothed meta-loss and the validation losses agree
    one_history, two_history = one_ckpt["history"], two_ckpt["history"]
    for key in ("meta_loss", "val_loss"):
        torch.testing.assert_close(two_history[key], one_history[key], rtol=1e-5, atol=0)
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["processes"] == 2
    single = json.loads((tmp_path / "one" / "results.json").read_text())
    for when in ("test_before", "test_after"):  # the test tasks, shared out 3 + 3
        for key in ("mean", "ci95"):
            got, want = results[when]["loss"][key], single[when]["loss"][key]
            assert got == pytest.approx(want, rel=1e-5), (when, key)


def test_warpgrad_resumes_each_process_buffer_under_torchrun(tmp_path):
    """WarpGrad's replay buffer is per process: the checkpoint keeps both, a resumed 2-process
    run continues bit for bit, and a resume with another process count is refused."""
    args = [
        "--algorithm", "warpgrad", "--task", "sinusoid", "--meta-batch", "4", "--eval-every",
        "2", "--val-tasks", "2", "--eval-tasks", "4", "--strategy", "vmap", "--no-plot",
        "--quiet",
    ]  # fmt: skip
    whole = _torchrun(*args, "--steps", "4", "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    part = _torchrun(*args, "--steps", "2", "--out", str(tmp_path / "parts"))
    assert part.returncode == 0, part.stderr[-2000:]
    with pytest.raises(SystemExit, match="holds 2 per-process warpgrad states"):
        metafunc._train.main([*args, "--steps", "4", "--resume", "--out", str(tmp_path / "parts")])
    rest = _torchrun(*args, "--steps", "4", "--resume", "--out", str(tmp_path / "parts"))
    assert rest.returncode == 0, rest.stderr[-2000:]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=False)
    assert len(a["learner"]) == len(b["learner"]) == 2
    first, second = (state["buffer"] for state in a["learner"])
    assert len(first) == len(second) == 4 * 2 * 5  # steps x tasks per process x inner steps
    assert not torch.equal(first[0][1][0], second[0][1][0])  # different tasks' support sets
    assert all(torch.equal(x, y) for x, y in zip(a["meta"], b["meta"]))
    for sa, sb in zip(a["learner"], b["learner"]):
        assert torch.equal(sa["generator"], sb["generator"])
        for ea, eb in zip(sa["buffer"], sb["buffer"]):
            assert all(map(torch.equal, optree.tree_leaves(ea), optree.tree_leaves(eb)))


def test_the_runner_rejects_a_meta_batch_smaller_than_the_world(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        metafunc._train.parse(["--meta-batch", "2"])
    assert "--meta-batch 2 is smaller than the 3 torchrun processes" in capsys.readouterr().err
