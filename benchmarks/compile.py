"""Time of one MAML meta-step, eager against ``torch.compile``, on the MAML workloads of maml.py.

The meta-step is written as a metafunc user would: ``inner_loop`` per task (inner SGD, or Adam with
``--inner adam``), the query loss at the adapted params, the tasks mapped with ``vmap_tasks``, and
the meta-gradient of the mean query loss by ``torch.func.grad``; it returns the meta-gradient (no
outer optimizer step). Workloads (built by maml.py): (a) sinusoid, MLP 1-40-40-1, 5 inner steps
(lr 0.01), meta-batch 25; (b) Omniglot-shaped, 4 conv blocks with BatchNorm, 5-way 1-shot, 15
queries per class, meta-batch 32, 1 inner step (lr 0.4; ``--steps-b 5`` for five). float32.

Rows: "eager vmap" (``strategy="vmap"``); "compiled vmap": ``torch.compile(meta_step,
fullgraph=True)`` of that same function (inductor unless ``--backend``; fullgraph: a graph break
would stop the script); "eager loop" (``strategy="loop"``, what ``vmap_tasks``' "auto" picks for
(b) on a CPU; not compiled: the graph would hold every task). The compile time is the first
compiled call, with a fresh inductor cache (a cold compile). Before timing, the compiled
meta-gradient is compared with the eager one (``max|diff| / max|grad|``). Then the rows are warmed
up (2 calls) and timed round-robin, the order rotated each round; a sample averages enough calls
to last ``min_sample_s``. Tables give the median, the interquartile range and the minimum, and the
ratio of medians to "eager vmap". Not part of the test suite.

Run: ``python benchmarks/compile.py [--quick] [--workloads a,b] [--steps-b 1] [--inner sgd|adam]
[--backend inductor] [--repeats N] [--threads N] [--device cpu|cuda]``
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch.func import grad

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness
import maml  # the workloads

import metafunc

warnings.filterwarnings("ignore")  # torch.jit deprecation warnings from inductor's imports


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(prob: maml.Problem, device, strategy: str, inner: str):
    """``(meta_step, params)`` for a fresh copy of the workload's model (same initial weights)."""
    fm = metafunc.functionalize(maml.fresh_model(prob, device))
    lr = prob.lr if inner == "sgd" else prob.lr / 10
    opt = metafunc.optim.sgd(lr=lr) if inner == "sgd" else metafunc.optim.adam(lr=lr)

    def loss(p, batch):
        return prob.loss(fm(p, batch[0]), batch[1])

    def task(p, sx, sy, qx, qy):
        result = metafunc.inner_loop(loss, p, opt, (sx, sy), steps=prob.steps)
        return loss(result.params, (qx, qy))

    run = metafunc.vmap_tasks(task, in_dims=(None, 0, 0, 0, 0), strategy=strategy)

    def meta_step(params, sx, sy, qx, qy):
        return grad(lambda p: run(p, sx, sy, qx, qy).mean())(params)

    return meta_step, {k: v.detach() for k, v in fm.params.items()}


def bench(prob: maml.Problem, device, args, repeats: int, min_sample_s: float) -> dict:
    print(f"\n{prob.name}" + (f", inner {args.inner}" if args.inner != "sgd" else ""))
    eager_vmap, params = build(prob, device, "vmap", args.inner)
    eager_loop, _ = build(prob, device, "loop", args.inner)
    torch._dynamo.reset()
    compiled = torch.compile(eager_vmap, backend=args.backend, fullgraph=True)
    data = prob.data

    start = time.perf_counter()
    got = compiled(params, *data)
    sync(device)
    compile_s = time.perf_counter() - start
    want = eager_vmap(params, *data)
    scale = max(w.abs().max() for w in want.values())
    err = (max((got[k] - want[k]).abs().max() for k in want) / scale).item()
    print(
        f"  compiled ({args.backend}) first call {compile_s:.1f} s; meta-gradient against eager "
        f"vmap: max|diff|/max|grad| = {err:.1e}"
    )

    rows = [
        _harness.Row("eager vmap", lambda: eager_vmap(params, *data)),
        _harness.Row("compiled vmap", lambda: compiled(params, *data)),
        _harness.Row("eager loop", lambda: eager_loop(params, *data)),
    ]
    best = {r.name: min(_harness.clock(r.iteration, device) for _ in range(2)) for r in rows}
    _harness.round_robin(rows, best, device, repeats, min_sample_s)

    med = {r.name: statistics.median(r.samples) for r in rows}
    print(
        f"  {'meta-step':<16}{'compile s':>10}{'median ms':>11}  {'IQR (or range) ms':<22}"
        f"{'min ms':>8}  x eager vmap"
    )
    for r in rows:
        comp = f"{compile_s:.1f}" if r.name.startswith("compiled") else "-"
        print(
            f"  {r.name:<16}{comp:>10}{1000 * med[r.name]:>11.1f}  {_harness.spread(r.samples):<22}"
            f"{1000 * min(r.samples):>8.1f}  {med[r.name] / med['eager vmap']:>5.2f}x"
        )
    return {"compile_s": compile_s, "err": err, **med}


def main() -> None:
    parser = _harness.argument_parser(
        __doc__,
        quick_help="smoke test: few repeats; (b) 2 tasks; backend aot_eager unless --backend "
        "is given (inductor's cold compile alone takes minutes)",
    )
    parser.add_argument("--workloads", default="a,b", help="comma-separated subset of a,b")
    parser.add_argument("--steps-b", type=int, default=1, help="inner steps of (b) (default 1)")
    parser.add_argument("--inner", default="sgd", choices=["sgd", "adam"], help="inner optimizer")
    parser.add_argument(
        "--backend", help="torch.compile backend (default inductor; aot_eager with --quick)"
    )
    parser.add_argument("--repeats", type=int, help="samples per row (default a 15, b 5)")
    _harness.add_threads_argument(parser)
    args = parser.parse_args()
    if args.backend is None:
        args.backend = "aot_eager" if args.quick else "inductor"
    # a cold compile: inductor's on-disk caches (kept across runs) would hide the compile time
    cache = tempfile.TemporaryDirectory(prefix="metafunc_compile_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = {"a": args.repeats or 15, "b": args.repeats or 5}
    if args.quick:
        repeats = {"a": args.repeats or 3, "b": args.repeats or 2}
    min_sample_s = _harness.min_sample_seconds(args.quick)
    _harness.print_header(
        device,
        f"{torch.get_num_threads()} thread(s); metafunc {metafunc.__version__}; "
        f"backend {args.backend}",
    )
    print(f"repeats per row: {repeats} after warm-up; a sample averages >= {min_sample_s} s")
    start = time.perf_counter()
    workloads = args.workloads.split(",")
    if "a" in workloads:
        bench(maml.sinusoid(device), device, args, repeats["a"], min_sample_s)
    if "b" in workloads:
        prob = maml.omniglot(device, 2 if args.quick else 32, args.steps_b)
        bench(prob, device, args, repeats["b"], min_sample_s)
    _harness.print_footer(start)
    cache.cleanup()


if __name__ == "__main__":
    main()
