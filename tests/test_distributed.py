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
from metafunc.algorithms import IMAML, MAML, Leap, Reptile
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
        return MAML(fm, steps=1, inner_lr=0.05, learn_lr="per_param", strategy="vmap")
    if name == "reptile":
        return Reptile(fm, steps=3, inner_lr=0.05, strategy="vmap")
    if name == "leap":
        return Leap(fm, steps=3, inner_lr=0.05, strategy="vmap")
    # a tight CG tolerance: the shares' different batch sizes round differently, and a looser
    # solve would amplify that to its own tolerance
    solve = functools.partial(metafunc.implicit.solve_cg, tol=1e-13, maxiter=200)
    return IMAML(fm, steps=20, inner_lr=0.05, lam=2.0, solve=solve, strategy="vmap")


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


def test_the_runner_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node=2 -m metafunc train` = the single-process run (float32 round-off:
    the all-reduce sums in another order), with one progress bar and one set of files."""
    args = [
        "--algorithm", "maml", "--task", "sinusoid", "--steps", "4", "--meta-batch", "5",
        "--eval-every", "2", "--val-tasks", "4", "--eval-tasks", "6", "--strategy", "vmap",
        "--no-plot",
    ]  # fmt: skip
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "metafunc",
         "train", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("post-adaptation on 6 held-out test tasks") == 1  # rank 0 only
    metafunc._train.main([*args, "--out", str(tmp_path / "one"), "--quiet"])
    one_ckpt = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    two_ckpt = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    for a, b in zip(one_ckpt["meta"], two_ckpt["meta"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["processes"] == 2
