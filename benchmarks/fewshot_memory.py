"""Peak memory per task of one MAML meta-step on the few-shot backbones, plain and with
metafunc's memory-saving modes: so that a user can see what fits.

Workload: 5-way 1-shot episodes with 15 queries per class (5 support and 75 query images),
84x84 RGB, cross-entropy; the backbones of metafunc.models with a 5-way head: Conv-4 (32
filters, MAML's miniImageNet network) and ResNet-12 (64-160-320-640, 16000 features flattened).
One task per meta-step (meta-batch 1, tasks run one at a time): the peak is one task's. Inner
SGD (lr 0.01), 5 steps on Conv-4 (MAML's miniImageNet setting) and 4 on ResNet-12 (few, for
the CPU's sake: each step is a forward and a double backward through 5 images at 84x84).

Rows: "MAML" (second order, the MAML learner); "MAML checkpoint=sqrt" (the same unroll by
metafunc.inner_loop(checkpoint="sqrt"), segments of round(sqrt(steps)) steps recomputed in the
backward pass; the MAML learner has no such option, so the script calls inner_loop itself);
"first-order MAML"; "iMAML" (the IMAML learner: the same inner steps with a proximal term,
lam 1, and an implicit meta-gradient by 5 conjugate-gradient iterations; memory does not grow
with the steps).

Method: each row runs in a fresh subprocess (``--quick``: all in this process, a smoke test):
one meta-step to warm up, then the peak of the CPU allocator's running total above its level when
the second meta-step starts (torch.profiler with profile_memory=True; allocated_peak_cpu of
imaml.py), in MiB. Not a timing, not a test.

Run: ``python benchmarks/fewshot_memory.py [--quick] [--backbones conv4,resnet12]``
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness
from imaml import allocated_peak_cpu

import metafunc
from metafunc.algorithms import IMAML, MAML
from metafunc.implicit import solve_cg
from metafunc.models import Conv4, ResNet12

WAYS, SHOTS, QUERIES = 5, 1, 15
MODES = ("MAML", "MAML checkpoint=sqrt", "first-order MAML", "iMAML")


def setting(backbone: str, quick: bool) -> dict:
    """The backbone's constructor arguments, image side and inner steps (small when quick)."""
    if backbone == "conv4":
        if quick:
            return {"kwargs": {"hidden": 4, "image_size": 16}, "side": 16, "steps": 4}
        return {"kwargs": {"hidden": 32, "image_size": 84}, "side": 84, "steps": 5}
    if quick:
        return {"kwargs": {"channels": (4, 6, 8, 10), "image_size": 16}, "side": 16, "steps": 4}
    return {"kwargs": {"image_size": 84}, "side": 84, "steps": 4}


def make_step(backbone: str, mode: str, quick: bool):
    """One meta-step (meta-gradient of one task) as a function of no arguments."""
    s = setting(backbone, quick)
    torch.manual_seed(0)
    net = (Conv4 if backbone == "conv4" else ResNet12)(WAYS, **s["kwargs"])
    fm = metafunc.functionalize(net)
    g = torch.Generator().manual_seed(1)

    def part(per_class):
        x = torch.randn(1, WAYS * per_class, 3, s["side"], s["side"], generator=g)
        return x, torch.arange(WAYS).repeat_interleave(per_class)[None]

    support, query = part(SHOTS), part(QUERIES)
    steps, lr = s["steps"], 0.01
    if mode == "MAML checkpoint=sqrt":

        def loss(p, batch):
            return F.cross_entropy(fm(p, batch[0]), batch[1])

        def step():
            theta = {k: v.detach().requires_grad_() for k, v in fm.params.items()}
            one = (support[0][0], support[1][0])
            result = metafunc.inner_loop(
                loss, theta, metafunc.optim.sgd(lr=lr), one, steps=steps, checkpoint="sqrt",
                record="endpoints",
            )  # fmt: skip
            outer = loss(result.params, (query[0][0], query[1][0]))
            return torch.autograd.grad(outer, list(theta.values()))

        return step
    if mode == "iMAML":
        learner = IMAML(
            fm, "cross_entropy", inner_lr=lr, steps=steps, lam=1.0, if_not_converged="ignore",
            solve=functools.partial(solve_cg, maxiter=5, tol=0.0), strategy="loop",
        )  # fmt: skip
    else:
        learner = MAML(
            fm, "cross_entropy", inner_lr=lr, steps=steps, first_order=mode == "first-order MAML",
            strategy="loop",
        )  # fmt: skip
    meta = learner.init()
    return lambda: learner.meta_grad(meta, support, query)


def child(backbone: str, mode: str, quick: bool) -> dict:
    step = make_step(backbone, mode, quick)
    step()  # warm-up: kernels, allocator pools, lazy imports
    start = time.perf_counter()
    peak = allocated_peak_cpu(step) / 2**20
    return {"alloc": peak, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 16x16 images, narrow backbones"
    )
    parser.add_argument(
        "--backbones", default="conv4,resnet12", help="comma-separated: conv4, resnet12"
    )
    _harness.add_threads_argument(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        backbone, mode = args.child.split(":", 1)
        print(json.dumps(child(backbone, mode, args.quick)))
        return
    backbones = args.backbones.split(",")
    unknown = set(backbones) - {"conv4", "resnet12"}
    if unknown:
        parser.error(f"--backbones: unknown {sorted(unknown)}; choose from conv4, resnet12")
    _harness.print_header(
        torch.device("cpu"),
        f"{torch.get_num_threads()} thread(s)",
        f"metafunc {metafunc.__version__}",
    )
    print(
        f"workload: {WAYS}-way {SHOTS}-shot, {QUERIES} queries per class, meta-batch 1 "
        f"({'quick: 16x16 images, narrow backbones' if args.quick else '84x84x3 images'})"
    )
    start = time.perf_counter()
    print(f"\n  {'backbone':<10} {'steps':>5}  {'mode':<22} {'peak MiB':>9} {'vs MAML':>8}  s")
    for backbone in backbones:
        base = None
        for mode in MODES:
            if args.quick:  # in this process: a smoke test of the code, not a measurement
                out = child(backbone, mode, quick=True)
            else:
                flags = ["--threads", str(torch.get_num_threads()), "--child", f"{backbone}:{mode}"]
                out = _harness.run_child(__file__, flags)
            base = base or out["alloc"]
            steps = setting(backbone, args.quick)["steps"]
            print(
                f"  {backbone:<10} {steps:>5}  {mode:<22} {out['alloc']:>9.1f} "
                f"{out['alloc'] / base:>7.2f}x  {out['seconds']:.1f}"
            )
    _harness.print_footer(start)


if __name__ == "__main__":
    main()
