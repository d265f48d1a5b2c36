"""Conv meta-batches on the CPU: where vmapped conv loses to the per-task loop, and which exact
techniques beat the loop (issue 13, item 5).

Workload (b) of maml.py: Omniglot-shaped 5-way 1-shot, 15 queries per class, 4 conv blocks (64
filters, BatchNorm, ReLU, maxpool), 28x28, 1 inner SGD step (lr 0.4), second order; one
meta-iteration is forward + meta-backward + an outer Adam step. Rows, each an exact way to compute
the same meta-gradient: the hand-written per-task loop at 1 and 2 intra-op threads (the reference:
the faster of the two), metafunc ``strategy="loop"`` and ``"vmap"`` (also ``chunk_size`` 2 and 4),
the loop on NHWC (channels_last) tensors three ways (``model.to(memory_format=channels_last)``
with channels_last image strides; a functional net that forces NHWC in forward and backward; the
same with the max-pool before the ReLU, an identity), the last at 2 threads; the loop and the
last split over 2 Python threads of 1 intra-op thread each (task-parallel); and, with
``--compile``, a per-task loop over a ``torch.compile``d task meta-gradient. Each row's float64
meta-gradient is first checked against the hand-written loop (rtol 1e-9), then the rows are timed
round-robin (see _harness.py) and the table gives each median over the reference's.
``--profile`` prints, before, torch.profiler's top ops by self CPU time for one meta-iteration of
metafunc's loop and vmap. ``--quick`` (2 tasks, fewer rows) runs in the test suite.

Run: ``python benchmarks/conv_cpu.py [--quick] [--tasks 32] [--repeats 5] [--threads 1]
[--profile] [--profile-tasks 8] [--compile]``
"""

from __future__ import annotations

import concurrent.futures
import copy
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness
import maml  # the workload and the hand-written loop

import metafunc

warnings.filterwarnings("ignore")  # torch.jit deprecation warnings from inductor's imports
CL = torch.channels_last


# ------------------------------------------------------------------------------ implementations
# Each builder takes a Problem and a fresh model and returns meta_backward(data), which puts the
# meta-gradient of the mean query loss into the model's .grad (maml.py's convention).


def in_threads(n: int, builder: Callable) -> Callable:
    """`builder` whose meta_backward runs with ``torch.set_num_threads(n)`` (restored after)."""

    def build(prob: maml.Problem, model: nn.Module):
        meta_backward = builder(prob, model)

        def run(data):
            before = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                meta_backward(data)
            finally:
                torch.set_num_threads(before)

        return run

    return build


def with_metafunc(strategy: str, chunk_size: int | None = None) -> Callable:
    """maml.py's metafunc row (``inner_loop`` per task under ``vmap_tasks``) with `strategy` and
    `chunk_size`."""
    return lambda prob, model: maml.with_metafunc(prob, model, strategy, chunk_size=chunk_size)


def _task_fn(prob: maml.Problem, model: nn.Module) -> Callable:
    """maml.hand_written's task: the query loss after `prob.steps` SGD steps on the support set."""
    return _task_of(prob, maml._functional_loss(prob, model))


def _task_of(prob: maml.Problem, loss: Callable) -> Callable:
    """The task of maml.hand_written for the loss ``loss(params, x, y)``."""

    def task(p, sx, sy, qx, qy):
        for _ in range(prob.steps):
            g = grad(loss)(p, sx, sy)
            p = {k: v - prob.lr * g[k] for k, v in p.items()}
        return loss(p, qx, qy)

    return task


def channels_last(prob: maml.Problem, model: nn.Module):
    """The hand-written loop after ``model.to(memory_format=torch.channels_last)``, the images
    channels_last too: what the PyTorch docs suggest. Layouts still mix (see `nhwc_loop`)."""
    model.to(memory_format=CL)
    meta_backward = maml.hand_loop(prob, model)
    return lambda data: meta_backward(tuple(_nhwc_images(t) for t in data))


def _nhwc_images(t: torch.Tensor) -> torch.Tensor:
    """A (..., 1, h, w) image batch with channels_last strides (a view: with one channel the
    elements do not move, only the strides that oneDNN reads the layout from); others as given."""
    if t.dim() < 4:
        return t
    return t.as_strided(t.shape, (*t.stride()[:-3], 1, t.shape[-1], 1))


class _ToNHWC(torch.autograd.Function):
    """x in channels_last, and its gradient too (so the backward pass stays NHWC); its backward
    is itself, hence differentiable to any order."""

    @staticmethod
    def forward(x):
        return x.contiguous(memory_format=CL)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return _ToNHWC.apply(g)


def nhwc_convnet(p: dict, x: torch.Tensor, pool_first: bool) -> torch.Tensor:
    """maml.convnet (training-mode batch statistics) written with torch.nn.functional on
    `p` (its named parameters), NHWC throughout: the 1-channel input and first conv weight get
    channels_last strides (`_nhwc_images`; oneDNN picks the layout from them), every conv output
    is forced NHWC in forward and backward (`_ToNHWC`). ``pool_first``: max-pool before the ReLU,
    the same function (``max(relu(a), relu(b)) = relu(max(a, b))``) with the ReLU on a quarter
    of the elements."""
    x = _nhwc_images(x)
    for i in range(4):
        w = p[f"{4 * i}.weight"]
        w = _nhwc_images(w) if i == 0 else w
        x = _ToNHWC.apply(F.conv2d(x, w, p[f"{4 * i}.bias"], padding=1))
        x = F.batch_norm(x, None, None, p[f"{4 * i + 1}.weight"], p[f"{4 * i + 1}.bias"], True)
        x = F.relu(F.max_pool2d(x, 2)) if pool_first else F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), p["17.weight"], p["17.bias"])


def nhwc_loop(pool_first: bool) -> Callable:
    """The hand-written per-task loop over `nhwc_convnet`, the model's weights channels_last."""

    def build(prob: maml.Problem, model: nn.Module):
        model.to(memory_format=CL)

        def loss(p, x, y):
            return prob.loss(nhwc_convnet(p, x, pool_first), y)

        return maml._over_tasks(_task_of(prob, loss), dict(model.named_parameters()), False)

    return build


def task_parallel(workers: int, nhwc: bool) -> Callable:
    """The per-task loop (over `nhwc_convnet` with the pool first if `nhwc`, else over a copy of
    the module per thread: ``functional_call`` swaps the parameters into the module while it runs,
    so two threads cannot share one) with the tasks split over `workers` Python threads (torch
    releases the GIL in its kernels), each with 1 intra-op thread: parallel over tasks instead of
    inside each small kernel. Each thread backpropagates its tasks' summed loss with
    ``torch.autograd.grad``; the parts are added and written into .grad."""
    pool = concurrent.futures.ThreadPoolExecutor(workers)

    def build(prob: maml.Problem, model: nn.Module):
        if nhwc:
            model.to(memory_format=CL)
            task = _task_of(prob, lambda p, x, y: prob.loss(nhwc_convnet(p, x, True), y))
            tasks = [task] * workers
        else:
            tasks = [_task_fn(prob, copy.deepcopy(model)) for _ in range(workers)]
        params = dict(model.named_parameters())

        def part(task, data, n: int):
            torch.set_num_threads(1)
            total = sum(task(params, *t) for t in zip(*data)) / n
            return torch.autograd.grad(total, list(params.values()))

        def run(data):
            n = len(data[0])
            slices = [tuple(t[i::workers] for t in data) for i in range(min(workers, n))]
            parts = list(pool.map(lambda t, s: part(t, s, n), tasks, slices))
            for p, *gs in zip(params.values(), *parts):
                g = torch.stack(gs).sum(0)
                p.grad = g if p.grad is None else p.grad + g

        return run

    return build


def compiled_loop(prob: maml.Problem, model: nn.Module):
    """The per-task loop over a ``torch.compile``d (inductor) task meta-gradient,
    ``grad(task)(params, *task_data)``; the per-task meta-gradients are summed into .grad."""
    task = _task_fn(prob, model)
    params = dict(model.named_parameters())
    meta_grad = torch.compile(grad(task), fullgraph=True)

    def run(data):
        n = len(data[0])
        detached = {k: v.detach() for k, v in params.items()}
        total: dict[str, torch.Tensor] = {}
        for t in zip(*data):
            for k, g in meta_grad(detached, *t).items():
                total[k] = total[k] + g if k in total else g
        for k, p in params.items():
            g = total[k] / n
            p.grad = g if p.grad is None else p.grad + g

    return run


def builders(threads: int, quick: bool, compile_: bool) -> dict[str, Callable]:
    """Row name -> builder. The rows starting with "hand-written" are the per-task loops the
    others are measured against (the faster of them is the reference). `quick` leaves out the
    2-thread rows (on a loaded machine a 2-thread iteration can stall for seconds) and chunk 4."""
    rows = {
        f"hand-written loop, {threads} thr": maml.hand_loop,
        "hand-written loop, 2 thr": in_threads(2, maml.hand_loop),
        "metafunc loop": with_metafunc("loop"),
        "metafunc vmap": with_metafunc("vmap"),
        "metafunc vmap chunk 2": with_metafunc("vmap", 2),
        "metafunc vmap chunk 4": with_metafunc("vmap", 4),
        "channels_last loop": channels_last,
        "NHWC loop": nhwc_loop(pool_first=False),
        "NHWC loop, pool first": nhwc_loop(pool_first=True),
        "NHWC loop, pool first, 2 thr": in_threads(2, nhwc_loop(pool_first=True)),
        "task-parallel loop, 2x1 thr": task_parallel(2, nhwc=False),
        "NHWC task-parallel, 2x1 thr": task_parallel(2, nhwc=True),
    }
    if compile_:
        rows["compiled loop"] = compiled_loop
    if threads == 2 or quick:
        del rows["hand-written loop, 2 thr"]
    if quick:
        del rows["NHWC loop, pool first, 2 thr"], rows["metafunc vmap chunk 4"]
    return rows


# ------------------------------------------------------------------------------ profile
def profile(prob: maml.Problem, device) -> None:
    """torch.profiler's top ops by self CPU time, one meta-iteration (after one warm-up) of
    metafunc's loop and vmap."""
    for strategy in ("loop", "vmap"):
        row = maml.make_row(f"metafunc {strategy}", with_metafunc(strategy), prob, device)
        row.iteration()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            row.iteration()
            took = time.perf_counter() - start
        print(f"\nprofile: metafunc strategy={strategy!r}, {took:.2f} s (profiled)")
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
        print(table)


# ------------------------------------------------------------------------------ main
def main() -> None:
    parser = _harness.argument_parser(
        __doc__, quick_help="smoke test: 2 tasks, 2 repeats, fewer rows"
    )
    parser.add_argument("--tasks", type=int, default=32, help="meta-batch size (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="samples per row (default 5)")
    parser.add_argument("--check-tasks", type=int, default=2, help="tasks in the float64 check")
    parser.add_argument("--profile", action="store_true", help="profile metafunc loop and vmap")
    parser.add_argument("--profile-tasks", type=int, default=8, help="meta-batch when profiling")
    parser.add_argument(
        "--compile", action="store_true", help="add the compiled loop (a cold inductor compile)"
    )
    _harness.add_threads_argument(parser)
    args = parser.parse_args()
    cache = tempfile.TemporaryDirectory(prefix="metafunc_conv_cpu_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name  # a cold compile, timed as the warm-up
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tasks, repeats = (2, 2) if args.quick else (args.tasks, args.repeats)
    min_sample_s = _harness.min_sample_seconds(args.quick)
    _harness.print_header(
        device, f"{torch.get_num_threads()} thread(s)", f"metafunc {metafunc.__version__}"
    )
    start = time.perf_counter()
    if args.profile:
        profile(maml.omniglot(device, args.profile_tasks), device)

    prob = maml.omniglot(device, tasks)
    print(f"\n{prob.name}")
    rows_of = builders(torch.get_num_threads(), args.quick, args.compile and not args.quick)
    ref = next(iter(rows_of.values()))
    check_tasks = min(args.check_tasks, tasks)
    print(
        f"  meta-gradient check on {check_tasks} task(s) against the hand-written loop (float64, "
        "rtol 1e-9):"
    )
    bad = _harness.check_agreement(
        {
            n: lambda b=b: maml.meta_grads(b, prob, device, check_tasks)
            for n, b in list(rows_of.items())[1:]
        },
        maml.meta_grads(ref, prob, device, check_tasks),
        rtol=1e-9,
    )
    rows = [maml.make_row(n, b, prob, device) for n, b in rows_of.items()]
    warm = {}
    for row in rows:
        times = [_harness.clock(row.iteration, device) for _ in range(2)]
        warm[row.name] = min(times)
        if row.name == "compiled loop":
            row.notes.append(f"first call (cold compile) {times[0]:.0f} s")
    _harness.round_robin(_harness.drop_slow(rows, warm), warm, device, repeats, min_sample_s)
    print(f"  x hand: median over the faster hand-written loop's; repeats {repeats}")
    ratios = _harness.print_table(rows, bad)
    best = min(v for k, v in ratios.items() if not k.startswith("hand-written") and k not in bad)
    _harness.print_footer(
        start,
        [("best exact technique >= 1.3x faster than the per-task loop", 1 / best, best < 1 / 1.3)],
    )
    cache.cleanup()


if __name__ == "__main__":
    main()
