"""Before/after timing of metafunc's hot paths: the working tree against a git revision, in one run.

The revision (``--against``, default ``HEAD``) is checked out into a temporary ``git worktree``
(removed at the end). Each tree runs in its own worker process, which imports that tree's
metafunc (and checks that it did), started once and asked for one timing sample at a time, the two
trees alternating (the order swapped each round) so that load on a shared machine falls on both
alike.
With the working tree's uncommitted change against ``HEAD`` this is exactly before/after.

Workloads (float32, as users run them): ``inner_loop`` with ``sgd`` and with ``adam`` (50 steps,
the learning rate a tensor that requires grad), an MLP 1-40-40-1 on one sinusoid task (10 support,
10 query points), the query loss at the adapted params differentiated through the unroll (second
order) into the params and the learning rate; and the MAML meta-step,
``metafunc.algorithms.MAML(..., steps=5, strategy="vmap").meta_grad`` on a meta-batch of 25
sinusoid tasks. Before timing, both trees compute every workload in float64; their values must
agree (``|a - b| <= 1e-12 (|b| + max|b|)``) or the script exits 1. Outside a git checkout it exits
2 (with ``--quick`` it then compares the working tree with itself). The table gives, per workload
and tree, the median ms per iteration and the interquartile range of the samples, and the ratio of
the medians new/old (below 1: the working tree is faster) with the IQR of the per-round ratios.
Not part of the test suite (``--quick``, tiny sizes, is).

Run: ``python benchmarks/ab.py [--against REV] [--quick] [--repeats N] [--threads N]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _tree_to_import() -> str:
    """The tree whose metafunc this process imports, first on ``sys.path`` before ``_harness``
    imports it: a worker's (``--worker TREE``), else the one holding this script (whatever the
    installed metafunc is)."""
    if "--worker" in sys.argv[:-1]:
        return sys.argv[sys.argv.index("--worker") + 1]
    return str(Path(__file__).resolve().parents[1])


sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), _tree_to_import()]
import _harness  # noqa: E402  (after the path is set: it imports metafunc)

WORKLOADS = ("inner_loop sgd", "inner_loop adam", "MAML meta-step")
RTOL = 1e-12
REPLY = "@ab.py "  # marks the worker's replies on its stdout


@dataclasses.dataclass(frozen=True)
class Sizes:
    steps: int  # inner_loop steps
    maml_steps: int
    tasks: int  # MAML meta-batch
    width: int  # hidden units of the MLP 1-width-width-1
    points: int  # support (and query) points per task


FULL = Sizes(steps=50, maml_steps=5, tasks=25, width=40, points=10)
QUICK = Sizes(steps=3, maml_steps=2, tasks=2, width=8, points=5)


# ------------------------------------------------------------------------------ workloads
def sinusoids(n_tasks: int, k: int, generator: torch.Generator, dtype: torch.dtype, device):
    """Sinusoid tasks (Finn et al. 2017, 5.1), support and query halves. Written out here rather
    than imported, so that both trees get the same data whatever their internals."""

    def uniform(lo, hi, *shape):
        return torch.empty(*shape, dtype=torch.float64).uniform_(lo, hi, generator=generator)

    amplitude, phase = uniform(0.1, 5.0, n_tasks, 1, 1), uniform(0.0, math.pi, n_tasks, 1, 1)
    x = uniform(-5.0, 5.0, n_tasks, 2 * k, 1)
    x, y = (t.to(device, dtype) for t in (x, amplitude * torch.sin(x - phase)))
    return (x[:, :k], y[:, :k]), (x[:, k:], y[:, k:])


def build(name: str, sizes: Sizes, dtype: torch.dtype, device) -> Callable[[], list[torch.Tensor]]:
    """One iteration of workload ``name``, returning the gradients it computes."""
    import metafunc

    torch.manual_seed(0)
    w = sizes.width
    model = nn.Sequential(nn.Linear(1, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 1))
    fm = metafunc.functionalize(model.to(device, dtype))
    gen = torch.Generator().manual_seed(1)
    if name == "MAML meta-step":
        support, query = sinusoids(sizes.tasks, sizes.points, gen, dtype, device)
        learner = metafunc.algorithms.MAML(
            fm, "mse", inner_lr=0.01, steps=sizes.maml_steps, strategy="vmap"
        )
        meta = {"params": fm.params}

        def meta_step():
            grads, _ = learner.meta_grad(meta, support, query)
            return [grads["params"][k] for k in fm.params]

        return meta_step

    (sx, sy), (qx, qy) = (
        tuple(t[0] for t in s) for s in sinusoids(1, sizes.points, gen, dtype, device)
    )
    lr = torch.tensor(0.01, dtype=dtype, device=device, requires_grad=True)
    opt = metafunc.optim.sgd(lr=lr) if name == "inner_loop sgd" else metafunc.optim.adam(lr=lr)
    wrt = [*fm.params.values(), lr]

    def loss(p, batch):
        return F.mse_loss(fm(p, batch[0]), batch[1])

    def unroll():
        result = metafunc.inner_loop(loss, fm.params, opt, (sx, sy), steps=sizes.steps)
        return list(torch.autograd.grad(loss(result.params, (qx, qy)), wrt))

    return unroll


# ------------------------------------------------------------------------------ the worker
def serve(args: argparse.Namespace) -> None:
    """The worker: answers the parent's requests (one JSON line each) on its stdout."""
    tree = os.path.realpath(args.worker)
    sizes, device = (QUICK if args.quick else FULL), torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    import metafunc

    found = os.path.realpath(metafunc.__file__)
    if not found.startswith(tree + os.sep):
        raise SystemExit(f"ab.py worker for {tree} imported metafunc from {found}")
    runs = {name: build(name, sizes, torch.float32, device) for name in WORKLOADS}
    for line in sys.stdin:
        request = json.loads(line)
        if request["do"] == "values":
            answer: Any = {
                name: torch.cat([g.flatten() for g in build(name, sizes, torch.float64, device)()])
                .cpu()
                .tolist()
                for name in WORKLOADS
            }
        else:  # "time": seconds per iteration, averaged over n iterations
            run, n = runs[request["workload"]], request["n"]
            answer = _harness.clock(lambda run=run, n=n: [run() for _ in range(n)], device) / n
        print(REPLY + json.dumps(answer), flush=True)


class Worker:
    """A worker process for one tree."""

    def __init__(self, label: str, tree: Path, args: argparse.Namespace) -> None:
        self.label, self.tree = label, tree
        flags = ["--device", args.device, "--threads", str(args.threads)]
        flags += ["--quick"] if args.quick else []
        self.stderr = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", str(tree), *flags],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )

    def ask(self, **request: Any) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        self.stderr.seek(0)
        raise RuntimeError(f"the worker for {self.label} ({self.tree}) died:\n{self.stderr.read()}")

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait()
        self.stderr.close()


# ------------------------------------------------------------------------------ the trees
def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def in_checkout(here: Path) -> bool:
    try:
        return git(here, "rev-parse", "--is-inside-work-tree") == "true"
    except (RuntimeError, FileNotFoundError):
        return False


def describe(here: Path, rev: str) -> str:
    sha = git(here, "rev-parse", "--short", rev)
    subject = git(here, "log", "-1", "--format=%s", rev)
    return f"{sha} {subject[:60]}{'...' if len(subject) > 60 else ''}"


# ------------------------------------------------------------------------------ measurement
def agreement(new: dict[str, list[float]], old: dict[str, list[float]]) -> bool:
    """Prints, per workload, the largest difference of the float64 values relative to their
    largest magnitude; they agree when |a - b| <= RTOL (|b| + max|b|) entrywise."""
    ok = True
    print(f"\nfloat64 values, working tree against the revision (agree: rtol {RTOL:g}):")
    for name in WORKLOADS:
        a, b = (
            torch.tensor(new[name], dtype=torch.float64),
            torch.tensor(old[name], dtype=torch.float64),
        )
        same = a.shape == b.shape
        scale = b.abs().max() if same else torch.tensor(1.0)
        agree = same and bool(((a - b).abs() <= RTOL * (b.abs() + scale)).all())
        err = ((a - b).abs().max() / scale).item() if same else math.inf
        print(f"  {name:<18} max|diff|/max|value| = {err:.1e}  {'agree' if agree else 'DISAGREE'}")
        ok = ok and agree
    return ok


def measure(
    workers: list[Worker], repeats: int, min_sample_s: float
) -> dict[str, list[list[float]]]:
    """Per workload, each worker's samples (s per iteration): warm-up, then `repeats` rounds, one
    sample per worker each, the order of the workers swapped every round."""
    samples = {}
    for name in WORKLOADS:
        warm = [min(w.ask(do="time", workload=name, n=1) for _ in range(2)) for w in workers]
        n = max(1, round(min_sample_s / min(warm)))
        rows: list[list[float]] = [[] for _ in workers]
        for r in range(repeats):
            order = range(len(workers)) if r % 2 == 0 else reversed(range(len(workers)))
            for i in order:
                rows[i].append(workers[i].ask(do="time", workload=name, n=n))
        samples[name] = rows
    return samples


def print_table(samples: dict[str, list[list[float]]], sizes: Sizes) -> None:
    steps = {"inner_loop sgd": sizes.steps, "inner_loop adam": sizes.steps}
    print(
        f"\n  {'workload':<38}{'new ms':>9}  {'IQR (n)':<18}{'old ms':>9}  {'IQR (n)':<18}"
        f"{'new/old':>7}  IQR of round ratios"
    )
    for name, (new, old) in samples.items():
        label = (
            f"{name} ({steps[name]} steps)"
            if name in steps
            else (f"{name} ({sizes.tasks} tasks, {sizes.maml_steps} steps)")
        )
        ratios = [a / b for a, b in zip(new, old)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [min(ratios), 0, max(ratios)]
        print(
            f"  {label:<38}{1000 * statistics.median(new):>9.2f}  {_harness.spread(new):<18}"
            f"{1000 * statistics.median(old):>9.2f}  {_harness.spread(old):<18}"
            f"{statistics.median(new) / statistics.median(old):>7.3f}  {q[0]:.3f}-{q[-1]:.3f}"
        )


def main() -> None:
    parser = _harness.argument_parser(
        __doc__, quick_help="smoke test: tiny sizes (3 inner steps, 2 tasks, MLP 1-8-8-1)"
    )
    parser.add_argument("--against", default="HEAD", help="the git revision to compare with")
    parser.add_argument("--repeats", type=int, help="samples per tree and workload (15; quick 3)")
    _harness.add_threads_argument(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(args)
        return

    here = Path(__file__).resolve().parents[1]  # the working tree: the one holding this script
    sizes = QUICK if args.quick else FULL
    scratch = None
    if in_checkout(here):
        try:
            old_label = f"{args.against} = {describe(here, args.against)}"
        except RuntimeError as e:
            parser.error(f"--against {args.against}: not a revision of this checkout ({e})")
        scratch = Path(tempfile.mkdtemp(prefix="metafunc-ab-"))
        old_tree = scratch / "tree"
        git(here, "worktree", "add", "--detach", "--quiet", str(old_tree), args.against)
        changed = git(here, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
        new_label = f"working tree ({'HEAD + uncommitted changes' if changed else 'clean HEAD'})"
    elif args.quick:
        print("not inside a git checkout: --quick compares the working tree with itself")
        old_tree, old_label, new_label = here, "the working tree again", "working tree"
    else:
        print(
            f"ab.py: {here} is not inside a git checkout, so there is no revision to compare with."
        )
        print("Run it from a clone of metafunc (or --quick, which compares the tree with itself).")
        sys.exit(2)

    start = time.perf_counter()
    workers = [Worker("new", here, args), Worker("old", old_tree, args)]
    try:
        _harness.print_header(
            torch.device(args.device),
            f"{args.threads or torch.get_num_threads()} thread(s) per worker",
            f"new: {new_label}, {here}",
            f"old: {old_label}" + (f", git worktree {old_tree}" if scratch else ""),
        )
        print(
            f"sizes: MLP 1-{sizes.width}-{sizes.width}-1, {sizes.points}+{sizes.points} points per "
            f"task; inner_loop {sizes.steps} steps; MAML {sizes.tasks} tasks, "
            f"{sizes.maml_steps} steps"
        )
        if not agreement(workers[0].ask(do="values"), workers[1].ask(do="values")):
            print("\nthe two trees compute different values: no timing")
            sys.exit(1)
        repeats = args.repeats or (3 if args.quick else 15)
        min_sample_s = _harness.min_sample_seconds(args.quick)
        print(f"\n{repeats} samples per tree and workload, each averaging >= {min_sample_s} s")
        print_table(measure(workers, repeats, min_sample_s), sizes)
        _harness.print_footer(start)
    finally:
        for worker in workers:
            worker.close()
        if scratch is not None:
            try:
                git(here, "worktree", "remove", "--force", str(old_tree))
            except RuntimeError:  # its files are gone below; then forget it
                shutil.rmtree(scratch, ignore_errors=True)
                git(here, "worktree", "prune")
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
