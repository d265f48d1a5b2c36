"""Time of one MAML meta-iteration (forward + meta-backward + outer Adam step): metafunc against a
hand-written ``torch.func`` baseline, and against higher and torchopt where they are installed.

Workloads: (a) sinusoid MAML, MLP 1-40-40-1, 5 inner SGD steps, meta-batch 25, second order;
(b) Omniglot-shaped 5-way 1-shot, 4 conv blocks with BatchNorm, meta-batch 32, 1 and 5 steps;
(c) one long unroll of T steps (MLP 1-256-256-1, 512 points): ``inner_loop`` plain against
``checkpoint="sqrt"``, time and peak memory (each configuration in a fresh subprocess).

Everything is timed in one process, round-robin over the implementations (the order rotated each
repeat) after a warm-up; tables give the median ms per meta-iteration. Not part of the test suite.

Run: ``python benchmarks/maml.py [--device cpu|cuda] [--quick] [--workloads a,b,c] [--repeats N]``
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import metafunc
from metafunc._quickstart import sample_sinusoids

warnings.filterwarnings("ignore")
try:
    import higher
except ImportError:
    higher = None
try:
    import torchopt
except ImportError:
    torchopt = None


# ------------------------------------------------------------------------------ problems
@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    make_model: Callable[[], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    data: tuple  # (support_x, support_y, query_x, query_y), each with a leading task dimension
    steps: int
    lr: float


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
    )


def convnet(ways: int = 5) -> nn.Module:
    def block(c_in):
        return [nn.Conv2d(c_in, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(1), *block(64), *block(64), *block(64), nn.Flatten(), nn.Linear(64, ways)
    )


def sinusoid(device, tasks=25, k=10, steps=5, width=40, name=None) -> Problem:
    name = name or "(a) sinusoid MAML, MLP 1-40-40-1, 5 inner SGD steps (lr 0.01), meta-batch 25"
    (sx, sy), (qx, qy) = sample_sinusoids(tasks, k, torch.Generator().manual_seed(0))
    data = tuple(t.to(device) for t in (sx, sy, qx, qy))
    return Problem(name, lambda: mlp(width), F.mse_loss, data, steps, 0.01)


def omniglot(device, tasks=32, steps=1, ways=5, shots=1, queries=15) -> Problem:
    gen = torch.Generator().manual_seed(0)
    sx = torch.randn(tasks, ways * shots, 1, 28, 28, generator=gen)
    qx = torch.randn(tasks, ways * queries, 1, 28, 28, generator=gen)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    data = tuple(t.to(device) for t in (sx, sy, qx, qy))
    name = f"(b) Omniglot 5-way 1-shot, meta-batch {tasks}, {steps} inner step(s), lr 0.4"
    return Problem(name, convnet, F.cross_entropy, data, steps, 0.4)


def long_unroll(device, steps: int) -> Problem:
    name = f"(c) long unroll T={steps}, MLP 1-256-256-1, 512 points, one task"
    return sinusoid(device, tasks=1, k=512, steps=steps, width=256, name=name)


# ------------------------------------------------------------------------------ implementations
# Each builder takes a Problem and a fresh model; it returns meta_backward(data), which puts the
# meta-gradient of the mean query loss into the model's .grad.


def _over_tasks(task, params, vmapped):
    if vmapped:
        batched = vmap(task, in_dims=(None, 0, 0, 0, 0))
        return lambda data: batched(params, *data).mean().backward()
    return lambda data: torch.stack([task(params, *t) for t in zip(*data)]).mean().backward()


def _functional_loss(prob: Problem, model: nn.Module):
    torch.func.replace_all_batch_norm_modules_(model)  # batch statistics only, as in training mode
    return lambda p, x, y: prob.loss(functional_call(model, p, (x,)), y)


def hand_written(prob: Problem, model: nn.Module, vmapped: bool):
    """The least code between torch.func and the maths: functional_call, grad, a dict update."""
    loss, lr = _functional_loss(prob, model), prob.lr

    def task(p, sx, sy, qx, qy):
        for _ in range(prob.steps):
            g = grad(loss)(p, sx, sy)
            p = {k: v - lr * g[k] for k, v in p.items()}
        return loss(p, qx, qy)

    return _over_tasks(task, dict(model.named_parameters()), vmapped)


def with_metafunc(prob: Problem, model: nn.Module, strategy="auto", checkpoint=None):
    fm = metafunc.functionalize(model)
    opt = metafunc.optim.sgd(lr=prob.lr)

    def loss(p, batch):
        return prob.loss(fm(p, batch[0]), batch[1])

    def task(p, sx, sy, qx, qy):
        result = metafunc.inner_loop(
            loss, p, opt, (sx, sy), steps=prob.steps, checkpoint=checkpoint
        )
        return loss(result.params, (qx, qy))

    run = metafunc.vmap_tasks(task, in_dims=(None, 0, 0, 0, 0), strategy=strategy)

    def meta_backward(data):
        run(fm.params, *data).mean().backward()

    meta_backward.task_map = run  # type: ignore[attr-defined]  # .strategy: what "auto" picked
    return meta_backward


def with_higher(prob: Problem, model: nn.Module):
    inner = torch.optim.SGD(model.parameters(), lr=prob.lr)

    def meta_backward(data):
        n = data[0].shape[0]
        for sx, sy, qx, qy in zip(*data):  # higher cannot batch tasks
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, dopt):
                for _ in range(prob.steps):
                    dopt.step(prob.loss(fmodel(sx), sy))
                (prob.loss(fmodel(qx), qy) / n).backward()

    return meta_backward


def with_torchopt(prob: Problem, model: nn.Module, vmapped: bool):
    loss, opt = _functional_loss(prob, model), torchopt.sgd(lr=prob.lr)

    def task(p, sx, sy, qx, qy):
        state = opt.init(p)
        for _ in range(prob.steps):
            updates, state = opt.update(grad(loss)(p, sx, sy), state, inplace=False)
            p = torchopt.apply_updates(p, updates, inplace=False)
        return loss(p, qx, qy)

    return _over_tasks(task, dict(model.named_parameters()), vmapped)


def hand_loop(prob: Problem, model: nn.Module):
    return hand_written(prob, model, vmapped=False)


def builders(workload: str) -> dict[str, Callable]:
    """Row name -> builder. "metafunc" uses strategy "auto" on (a), (b) and "loop" on (c) (one task;
    checkpointing needs it); "metafunc ckpt" is ``checkpoint="sqrt"``. The fastest correct row
    whose name starts with "hand-written" is the reference."""
    if workload == "c":
        return {
            "hand-written loop": hand_loop,
            "metafunc": lambda p, m: with_metafunc(p, m, "loop"),
            "metafunc ckpt": lambda p, m: with_metafunc(p, m, "loop", "sqrt"),
        }
    rows = {
        "metafunc": with_metafunc,
        "hand-written vmap": lambda p, m: hand_written(p, m, vmapped=True),
        "hand-written loop": hand_loop,
    }
    if higher is not None:
        rows["higher (loop)"] = with_higher
    if torchopt is not None:
        rows["torchopt (vmap)"] = lambda p, m: with_torchopt(p, m, vmapped=True)
        rows["torchopt (loop)"] = lambda p, m: with_torchopt(p, m, vmapped=False)
    return rows


# ------------------------------------------------------------------------------ measurement
def fresh_model(prob: Problem, device) -> nn.Module:
    torch.manual_seed(0)  # same initial weights for every implementation
    return prob.make_model().to(device)


def meta_grads(builder, prob: Problem, device, tasks: int) -> list[torch.Tensor]:
    model = fresh_model(prob, device)
    builder(prob, model)(tuple(t[:tasks] for t in prob.data))
    return [p.grad for p in model.parameters()]


def check_agreement(key: str, prob: Problem, device, tasks: int) -> set[str]:
    """Meta-gradients against the hand-written per-task loop (exact; vmapped BatchNorm is not, see
    pytorch/functorch#534): agree when |a - b| <= 1e-4 (|b| + max|b|) elementwise in float32, max
    over all tensors (conv biases before BatchNorm have meta-gradient 0 plus round-off). Returns
    the names that disagree or fail."""
    candidates = {k: v for k, v in builders(key).items() if k != "hand-written loop"}
    if key != "c":  # "metafunc" runs "auto": check both strategies it may pick
        del candidates["metafunc"]
        candidates["metafunc (vmap)"] = lambda p, m: with_metafunc(p, m, "vmap")
        candidates["metafunc (loop)"] = lambda p, m: with_metafunc(p, m, "loop")
    ref = meta_grads(hand_loop, prob, device, tasks)
    scale = max(b.abs().max() for b in ref)
    bad = set()
    print(f"  meta-gradient check on {tasks} task(s) against the hand-written loop (rtol 1e-4):")
    for name, builder in candidates.items():
        try:
            got = meta_grads(builder, prob, device, tasks)
        except Exception as e:  # a peer that cannot run this workload is reported, not fatal
            print(f"    {name:<30} failed: {type(e).__name__}: {str(e)[:80]}")
            bad.add(name)
            continue
        err = (max((a - b).abs().max() for a, b in zip(got, ref)) / scale).item()
        agree = all(
            bool(((a - b).abs() <= 1e-4 * (b.abs() + scale)).all()) for a, b in zip(got, ref)
        )
        print(f"    {name:<30} max|diff|/max|grad| = {err:.1e}  {'agree' if agree else 'DISAGREE'}")
        bad |= set() if agree else {name}
    if any(name.startswith("metafunc") for name in bad):
        raise SystemExit("metafunc's meta-gradient disagrees with the hand-written baseline")
    return bad


def clock(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@dataclasses.dataclass
class Row:
    name: str
    iteration: Callable[[], None]
    task_map: Any = None  # metafunc's vmap_tasks function (its .strategy), else None
    samples: list[float] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def make_row(name, builder, prob: Problem, device) -> Row:
    model = fresh_model(prob, device)
    meta_backward = builder(prob, model)
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def iteration():
        outer.zero_grad()
        meta_backward(prob.data)
        outer.step()

    return Row(name, iteration, getattr(meta_backward, "task_map", None))


def run_rows(rows: list[Row], device, repeats: int, min_sample_s: float) -> None:
    """Warm-up (2 iterations; 7 for metafunc "auto", which times loop and vmap alternately on its
    first 6 calls and keeps the faster), then `repeats` round-robin samples, the order rotated
    each round; a sample averages enough iterations to last `min_sample_s`. A row slower than 1 s
    and more than 2x slower than the fastest in warm-up cannot be the fastest and is not
    repeated: its best warm-up iteration is its only sample (noted in the table)."""
    best = {}
    for row in rows:
        auto = row.task_map is not None and row.task_map.strategy is None
        times = [clock(row.iteration, device) for _ in range(7 if auto else 2)]
        best[row.name] = min(times)
        if auto:
            row.notes.append(f"auto picked {row.task_map.strategy!r} in {sum(times[:6]):.1f} s")
    fastest = min(best.values())
    active = [r for r in rows if best[r.name] < max(1.0, 2 * fastest)]
    for row in rows:
        if row not in active:
            row.samples = [best[row.name]]
            row.notes.append(">2x slower: warm-up sample only")
    inner = {r.name: max(1, round(min_sample_s / best[r.name])) for r in active}
    for rep in range(repeats):
        for row in active[rep % len(active) :] + active[: rep % len(active)]:
            n = inner[row.name]
            row.samples.append(
                clock(lambda r=row, n=n: [r.iteration() for _ in range(n)], device) / n
            )


def print_table(rows: list[Row], bad: set[str], memory: dict | None = None) -> dict:
    """Prints the table; returns {row name: median / median of the fastest correct hand-written}."""
    med = {r.name: statistics.median(r.samples) for r in rows}
    ref = min(v for k, v in med.items() if k.startswith("hand-written") and k not in bad)
    head = f"  {'implementation':<30}{'median ms':>10}  {'IQR (or range) ms':<22}{'min ms':>8}"
    print(head + "  x hand" + ("  peak MiB  ckpt/plain" if memory else "") + "  note")
    for row in rows:
        ms = sorted(1000 * s for s in row.samples)
        spread = statistics.quantiles(ms, n=4)[::2] if len(ms) >= 4 else [ms[0], ms[-1]]
        spread_s = f"{spread[0]:.1f}-{spread[1]:.1f} (n={len(ms)})"
        line = f"  {row.name:<30}{1000 * med[row.name]:>10.1f}  {spread_s:<22}{ms[0]:>8.1f}"
        line += f"  {med[row.name] / ref:>5.2f}x"
        if memory:
            ratio = memory[row.name] / memory["metafunc"]
            line += f"  {memory[row.name]:>8.1f}  " + (
                f"{ratio:>10.2f}" if "ckpt" in row.name else " " * 10
            )
        notes = row.notes + (["WRONG meta-gradient (see check)"] if row.name in bad else [])
        print(line + (f"  {'; '.join(notes)}" if notes else ""))
    return {k: v / ref for k, v in med.items()}


# ------------------------------------------------------------------------------ peak memory
MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() minus memory_allocated() just before it",
    "cpu": "peak RSS (VmHWM of /proc/self/status, reset through /proc/self/clear_refs) minus the "
    "RSS just before it. Not ru_maxrss: Linux carries ru_maxrss across exec, so a child started "
    "from this large process reports the parent's peak",
}


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


def memory_child(steps: int, name: str, device) -> float:
    """In a fresh process: the peak memory growth of one meta-iteration, in MiB."""
    for t in (1, steps):  # the T=1 iteration loads kernels and allocator pools
        prob = long_unroll(device, t)
        row = make_row(name, builders("c")[name], prob, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before = _proc_kib("VmRSS:") * 1024
        row.iteration()
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return (_proc_kib("VmHWM:") * 1024 - before) / 2**20


def peak_memory(steps: int, name: str, device) -> float:
    args = [sys.executable, __file__, "--device", device.type, "--memory-child", f"{steps}:{name}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["mib"]


# ------------------------------------------------------------------------------ main
def bench(key: str, prob: Problem, device, repeats: int, min_sample_s: float, targets: list):
    print(f"\n{prob.name}")
    tasks = len(prob.data[0]) if key != "b" else min(4, len(prob.data[0]))
    bad = check_agreement(key, prob, device, tasks)
    rows = [make_row(n, b, prob, device) for n, b in builders(key).items()]
    run_rows(rows, device, repeats, min_sample_s)
    memory = None
    if key == "c":
        memory = {row.name: peak_memory(prob.steps, row.name, device) for row in rows}
    ratios = print_table(rows, bad, memory)
    tag = prob.name.split(",")[0] + (f", {prob.steps} step(s)" if key == "b" else "")
    ours = ratios["metafunc"]
    targets.append((f"metafunc <= 1.10x fastest correct hand-written: {tag}", ours, ours <= 1.1))
    if key == "a" and "higher (loop)" in ratios:
        speedup = ratios["higher (loop)"] / ours
        targets.append(("metafunc >= 5x faster than higher: (a)", speedup, speedup >= 5))
    if key == "c" and prob.steps == 200:
        mem = memory["metafunc ckpt"] / memory["metafunc"]
        targets.append(("checkpointed T=200 peak memory <= 1/3 of plain", mem, mem <= 1 / 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="smoke test: few repeats, small")
    parser.add_argument("--workloads", default="a,b,c", help="comma-separated subset of a,b,c")
    parser.add_argument("--repeats", type=int, help="samples per row (default a 15, b 5, c 5)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.memory_child:
        steps, name = args.memory_child.split(":", 1)
        print(json.dumps({"mib": memory_child(int(steps), name, device)}))
        return

    repeats = dict.fromkeys("abc", args.repeats) if args.repeats else {"a": 15, "b": 5, "c": 5}
    repeats = dict.fromkeys("abc", 2) if args.quick else repeats
    min_sample_s = 0.05 if args.quick else 0.2
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"device: {device} ({platform.machine()}, {os.cpu_count()} cores)", end="; ")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peers = (
        f"higher {'yes' if higher else 'missing'}, torchopt {getattr(torchopt, '__version__', '-')}"
    )
    print(f"metafunc {metafunc.__version__}; peers: {peers}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes share the machine)")
    print(f"repeats per row: {repeats} after warm-up; a sample averages >= {min_sample_s} s")
    start = time.perf_counter()
    targets: list[tuple[str, float, bool]] = []
    workloads = args.workloads.split(",")
    if "a" in workloads:
        bench("a", sinusoid(device), device, repeats["a"], min_sample_s, targets)
    for steps in (1, 5) if "b" in workloads else ():
        prob = omniglot(device, 2 if args.quick else 32, steps)
        bench("b", prob, device, repeats["b"], min_sample_s, targets)
    if "c" in workloads:
        print(
            '\n(c) "metafunc" is inner_loop plain, "metafunc ckpt" inner_loop(checkpoint="sqrt"). '
            f"Peak memory of one meta-iteration, each in a fresh subprocess after a T=1 warm-up: "
            f"{MEMORY_METHOD[device.type]}."
        )
    for steps in ((10,) if args.quick else (10, 50, 200)) if "c" in workloads else ():
        prob = long_unroll(device, steps)
        bench("c", prob, device, repeats["c"], min_sample_s, targets)
    print(f"\ntotal {time.perf_counter() - start:.0f} s", end="; ")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print("targets:")
    for what, value, ok in targets:
        print(f"  {'PASS' if ok else 'MISS'}  {what}: {value:.2f}")


if __name__ == "__main__":
    main()
