"""Time and peak memory of one iMAML meta-iteration against the number of inner steps T:
metafunc's ``implicit.imaml`` against a hand-written ``torch.func`` version, torchopt's implicit
API (when installed) and unrolled second-order MAML.

Workload: sinusoid regression (Finn et al. 2017, 5.1), MLP 1-40-40-1 (ReLU), K=10 support and 10
query points, meta-batch 25. iMAML's inner problem min_phi L_train(phi) + lam/2 ||phi - theta||^2
(lam = 2) is solved from theta by T in {10, 100, 1000} SGD steps (lr 0.01); the meta-gradient of
the mean query loss is lam (H + lam I)^-1 grad L_query(phi_T) per task (Rajeswaran et al. 2019,
eq. 7), by exactly 5 conjugate-gradient iterations on Hessian-vector products; then an outer Adam
step on theta.

Rows: "metafunc imaml" (vmap_tasks "auto" on the first T, its pick reused after); "hand-written
vmap", the reference (closed-form proximal gradient in the inner steps, CG written out, the
meta-gradient assembled by hand); "hand-written, autograd prox" (the same with the proximal term
differentiated by autograd, as metafunc and torchopt do); "hand-written loop" (T <= 100);
"torchopt (loop)" (custom_root + solve_cg, one task at a time); "unrolled MAML (metafunc)"
(inner_loop differentiating the same T steps, for the memory contrast).

Convergence checks: neither side checks. metafunc runs with if_not_converged="ignore" (no test of
the residual in its backward pass), and the hand-written rows compute no residual; metafunc's
IMAMLResult.grad_norm (one more gradient per task) is evaluated only when read, and the timed task
does not read it.

Before timing, every meta-gradient is compared with the hand-written vmap in float64. Everything is
timed in one process, round-robin over the rows (the order rotated each repeat) after a warm-up,
with 1 torch thread by default; tables give the median ms per meta-iteration and the ratio to the
fastest correct hand-written row. Peak memory: one meta-iteration in a fresh subprocess per row
and T. Not a test.

Run: ``python benchmarks/imaml.py [--device cpu|cuda] [--quick] [--steps 10,100,1000]
[--repeats N] [--threads N]``
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import textwrap
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness

import metafunc
from metafunc.implicit import imaml, solve_cg

warnings.filterwarnings("ignore", category=FutureWarning)  # torchopt calls functorch.vjp
try:
    import torchopt
except ImportError:
    torchopt = None


# ------------------------------------------------------------------------------ problem
@dataclasses.dataclass(frozen=True)
class Config:
    steps: int  # inner SGD steps T
    tasks: int = 25  # meta-batch
    k: int = 10  # support points per task (and as many query points)
    lam: float = 2.0  # proximal strength lambda
    lr: float = 0.01  # inner SGD learning rate
    cg_iters: int = 5  # conjugate-gradient iterations (fixed: tolerance 0)


def sinusoids(cfg: Config, device, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    """(support_x, support_y, query_x, query_y), each (tasks, k, 1): amplitude U[0.1, 5], phase
    U[0, pi], x U[-5, 5], y = amplitude sin(x - phase); seeded, the same in every process."""
    gen = torch.Generator().manual_seed(0)
    amplitude = torch.empty(cfg.tasks, 1, 1).uniform_(0.1, 5.0, generator=gen)
    phase = torch.empty(cfg.tasks, 1, 1).uniform_(0.0, math.pi, generator=gen)
    x = torch.empty(cfg.tasks, 2 * cfg.k, 1).uniform_(-5.0, 5.0, generator=gen)
    y = amplitude * torch.sin(x - phase)
    parts = (x[:, : cfg.k], y[:, : cfg.k], x[:, cfg.k :], y[:, cfg.k :])
    return tuple(t.to(device, dtype).contiguous() for t in parts)


def fresh_model(device, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights for every implementation
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    return model.to(device, dtype)


def sq_dist(a, b) -> torch.Tensor:
    """||a - b||^2 over two equally ordered collections of tensors."""
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b))


# ------------------------------------------------------------------------------ implementations
# Each builder takes a Config and a fresh model and returns meta_backward(data), which puts the
# meta-gradient of the mean query loss over the tasks into the model's .grad.


def hand_written(cfg: Config, model: nn.Module, vmapped: bool = True, autograd_prox: bool = False):
    """The least code between torch.func and the maths. Inner steps: phi <- phi - lr (grad
    L(phi) + lam (phi - theta)) by torch.func.grad (no graph: theta is detached). Then v = grad
    L_query(phi), u = (H + lam I)^-1 v by 5 CG iterations whose products H p reuse one
    torch.func.vjp of the training gradient at phi, and the meta-gradient lam u, averaged over
    tasks and written into .grad by hand. With autograd_prox, the inner steps take torch.func.grad
    of L(phi) + lam/2 ||phi - theta||^2 instead (the formulation metafunc and torchopt use)."""
    lr, lam = cfg.lr, cfg.lam

    def loss(p, x, y):
        return F.mse_loss(functional_call(model, p, (x,)), y)

    grad_loss = grad(loss)
    grad_prox = grad(
        lambda p, th, x, y: loss(p, x, y) + 0.5 * lam * sq_dist(p.values(), th.values())
    )

    def dot(a, b):
        return sum((a[k] * b[k]).sum() for k in a)

    def task(theta, sx, sy, qx, qy):
        phi = theta
        for _ in range(cfg.steps):
            if autograd_prox:
                g = grad_prox(phi, theta, sx, sy)
                phi = {k: v - lr * g[k] for k, v in phi.items()}
            else:
                g = grad_loss(phi, sx, sy)
                phi = {k: v - lr * (g[k] + lam * (v - theta[k])) for k, v in phi.items()}
        v = grad_loss(phi, qx, qy)
        _, hvp = vjp(lambda p: grad_loss(p, sx, sy), phi)  # H w = hvp(w), H symmetric
        x = {k: torch.zeros_like(t) for k, t in v.items()}
        r, p, rs = v, v, dot(v, v)
        for _ in range(cfg.cg_iters):
            hp = hvp(p)[0]
            ap = {k: hp[k] + lam * p[k] for k in p}
            alpha = rs / dot(p, ap)
            x = {k: x[k] + alpha * p[k] for k in x}
            r = {k: r[k] - alpha * ap[k] for k in r}
            rs_new = dot(r, r)
            p = {k: r[k] + (rs_new / rs) * p[k] for k in p}
            rs = rs_new
        return {k: lam * t for k, t in x.items()}

    params = dict(model.named_parameters())
    batched = vmap(task, in_dims=(None, 0, 0, 0, 0))

    def meta_backward(data):
        theta = {k: t.detach() for k, t in params.items()}
        if vmapped:
            per_task = batched(theta, *data)
            for k, t in params.items():
                t.grad = per_task[k].mean(0)
        else:
            outs = [task(theta, *d) for d in zip(*data)]
            for k, t in params.items():
                t.grad = torch.stack([o[k] for o in outs]).mean(0)

    return meta_backward


def with_metafunc(cfg: Config, model: nn.Module, strategy: str = "auto"):
    fm = metafunc.functionalize(model)
    opt = metafunc.optim.sgd(lr=cfg.lr)
    solve = functools.partial(solve_cg, tol=0.0, maxiter=cfg.cg_iters)

    def loss(p, batch):
        return F.mse_loss(fm(p, batch[0]), batch[1])

    def task(p, sx, sy, qx, qy):
        kw = dict(lam=cfg.lam, steps=cfg.steps, solve=solve, if_not_converged="ignore")
        r = imaml(loss, p, opt, (sx, sy), **kw)
        return loss(r.params, (qx, qy))

    return _harness.vmap_tasks_meta_backward(task, fm.params, strategy)


def with_torchopt(cfg: Config, model: nn.Module):
    """torchopt.diff.implicit.custom_root around a torchopt.sgd inner loop, with
    torchopt.linear_solve.solve_cg; one task at a time (its autograd.Function has no vmap
    rule). Params are tuples of tensors, as custom_root requires."""
    names = [n for n, _ in model.named_parameters()]
    theta = tuple(model.parameters())

    def loss(phi, x, y):
        return F.mse_loss(functional_call(model, dict(zip(names, phi)), (x,)), y)

    def optimality(phi, theta, sx, sy):
        regularised = lambda p: loss(p, sx, sy) + 0.5 * cfg.lam * sq_dist(p, theta)
        return grad(regularised)(phi)

    solve = torchopt.linear_solve.solve_cg(maxiter=cfg.cg_iters, rtol=0.0)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver(phi, theta, sx, sy):
        opt = torchopt.sgd(lr=cfg.lr)
        state = opt.init(phi)
        for _ in range(cfg.steps):
            updates, state = opt.update(optimality(phi, theta, sx, sy), state, inplace=False)
            phi = torchopt.apply_updates(phi, updates, inplace=False)
        return phi

    def meta_backward(data):
        n = data[0].shape[0]
        for sx, sy, qx, qy in zip(*data):
            phi = solver(tuple(t.detach() for t in theta), theta, sx, sy)
            (loss(phi, qx, qy) / n).backward()

    return meta_backward


def unrolled_maml(cfg: Config, model: nn.Module):
    """Second-order MAML through the same T proximal SGD steps: metafunc.inner_loop (record
    "none") under vmap_tasks(strategy="vmap"). A different meta-gradient (exact for the T
    steps, not implicit), for the memory contrast."""
    fm = metafunc.functionalize(model)
    opt = metafunc.optim.sgd(lr=cfg.lr)

    def task(theta, sx, sy, qx, qy):
        def inner(phi, batch):
            return F.mse_loss(fm(phi, batch[0]), batch[1]) + 0.5 * cfg.lam * sq_dist(
                phi.values(), theta.values()
            )

        r = metafunc.inner_loop(inner, theta, opt, (sx, sy), steps=cfg.steps, record="none")
        return F.mse_loss(fm(r.params, qx), qy)

    return _harness.vmap_tasks_meta_backward(task, fm.params, "vmap")


UNROLLED = "unrolled MAML (metafunc)"
AUTOGRAD_PROX = "hand-written, autograd prox"
HAND_LOOP_MAX_STEPS = 100  # the hand-written loop: ~3 s per meta-iteration at T=100, linear in T


def builders(metafunc_strategy: str = "auto") -> dict[str, Callable]:
    """Row name -> builder. The fastest correct row whose name starts with "hand-written" is the
    reference."""
    rows = {
        "metafunc imaml": lambda c, m: with_metafunc(c, m, metafunc_strategy),
        "hand-written vmap": hand_written,
        AUTOGRAD_PROX: lambda c, m: hand_written(c, m, autograd_prox=True),
        "hand-written loop": lambda c, m: hand_written(c, m, vmapped=False),
    }
    if torchopt is not None:
        rows["torchopt (loop)"] = with_torchopt
    rows[UNROLLED] = unrolled_maml
    return rows


# ------------------------------------------------------------------------------ correctness
def meta_grads(builder, cfg: Config, device) -> list[torch.Tensor]:
    model = fresh_model(device, torch.float64)
    builder(cfg, model)(sinusoids(cfg, device, torch.float64))
    return [p.grad for p in model.parameters()]


def check_agreement(cfg: Config, device) -> set[str]:
    """Meta-gradients in float64 against the hand-written vmap: agree when |a - b| <= 1e-6 (|b| +
    max|b|) elementwise (implementation differences alone give ~1e-13 here; a wrong formula
    gives O(1)). metafunc is checked with both strategies "auto" may pick. Unrolled MAML computes
    a different quantity: only its distance is printed. Returns the names that disagree."""
    candidates = {k: v for k, v in builders().items() if k != "hand-written vmap"}
    del candidates["metafunc imaml"]
    candidates["metafunc imaml (vmap)"] = lambda c, m: with_metafunc(c, m, "vmap")
    candidates["metafunc imaml (loop)"] = lambda c, m: with_metafunc(c, m, "loop")
    ref = meta_grads(hand_written, cfg, device)
    print(f"  meta-gradient check in float64 on {cfg.tasks} task(s) against the hand-written vmap:")
    return _harness.check_agreement(
        {n: lambda b=b: meta_grads(b, cfg, device) for n, b in candidates.items()},
        ref,
        rtol=1e-6,
        other_estimators={UNROLLED},
    )


def inner_residual(cfg: Config, device) -> float:
    """Mean over tasks of ||grad of the regularised inner loss|| at phi_T (IMAMLResult.grad_norm)
    over the same at phi_0 = theta (there ||grad L_train||): how far T steps are from solving the
    inner problem, which the implicit gradient assumes."""
    fm = metafunc.functionalize(fresh_model(device))
    theta = metafunc.stop_gradient(fm.params)
    loss = lambda p, x, y: F.mse_loss(fm(p, x), y)
    opt = metafunc.optim.sgd(lr=cfg.lr)

    def norms(x, y):
        g0 = grad(loss)(theta, x, y)
        r = imaml(lambda p, b: loss(p, *b), theta, opt, (x, y), lam=cfg.lam, steps=cfg.steps)
        return r.grad_norm, torch.stack([(t * t).sum() for t in g0.values()]).sum().sqrt()

    sx, sy, _, _ = sinusoids(cfg, device)
    at_t, at_0 = vmap(norms)(sx, sy)
    return (at_t / at_0).mean().item()


# ------------------------------------------------------------------------------ timing
def make_row(name, builder, cfg: Config, device) -> _harness.Row:
    model = fresh_model(device)
    return _harness.meta_iteration_row(name, model, builder(cfg, model), sinusoids(cfg, device))


def run_rows(
    rows: list[_harness.Row], device, repeats: int, min_sample_s: float, budget_s: float
) -> None:
    """Warm-up: metafunc "auto" first runs until it has decided (on the CPU it times loop and
    vmap alternately on its first 6 calls), then every row 1 iteration. Then `repeats`
    round-robin samples of the rows that can be the fastest, judged by that iteration, fewer
    (at least 3) if the rounds exceed `budget_s`."""
    warm = {}
    for row in rows:
        if row.task_map is not None and row.task_map.strategy is None:
            start = time.perf_counter()
            while row.task_map.strategy is None:
                row.iteration()
            spent = time.perf_counter() - start
            row.notes.append(f"auto picked {row.task_map.strategy!r} in {spent:.1f} s")
        warm[row.name] = _harness.clock(row.iteration, device)
    active = _harness.drop_slow(rows, warm)
    _harness.round_robin(active, warm, device, repeats, min_sample_s, budget_s)


# ------------------------------------------------------------------------------ peak memory
MEMORY_METHOD = {
    "cuda": f"alloc: {_harness.CUDA_PEAK} the iteration",
    "cpu": "alloc: the peak of the CPU allocator's running total (total_allocated of the "
    "profiler's allocation events, torch.profiler profile_memory=True; exact, like CUDA's "
    "max_memory_allocated) above its level when the iteration starts, in a second iteration; "
    f"RSS: {_harness.RSS_PEAK} the first iteration",
}
TORCHOPT_MEMORY_TASKS = 2  # its loop backpropagates task by task: the peak is one task's


def allocated_peak_cpu(fn) -> float:
    """Runs fn under the profiler; returns, in bytes, the peak of the memory allocated while it
    ran and not yet freed. The CPU allocator reports each allocation and free with its running
    total; blocks allocated before profiling are not counted (nor their frees)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            f = node.extra_fields
            events.append((node.start_time_ns, f.alloc_size, f.total_allocated))
        stack.extend(node.children)
    if not events:
        return 0.0
    events.sort()
    base = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - base


def memory_child(steps: int, tasks: int, name: str, strategy: str, device) -> dict:
    """In a fresh process: the peak memory growth of one meta-iteration, in MiB: "alloc" and, on
    the CPU, "rss" (see MEMORY_METHOD)."""

    def iteration_at(t: int):
        cfg = Config(steps=t, tasks=tasks)
        return make_row(name, builders(strategy)[name], cfg, device).iteration

    mib, iteration = _harness.peak_memory_growth(iteration_at, steps, device)
    if device.type == "cuda":
        return {"alloc": mib, "rss": None}
    return {"alloc": allocated_peak_cpu(iteration) / 2**20, "rss": mib}


def peak_memory(steps: int, tasks: int, name: str, strategy: str, args) -> dict:
    child = ["--device", args.device, "--threads", str(torch.get_num_threads())]
    child += ["--memory-child", f"{steps}:{tasks}:{strategy}:{name}"]
    return _harness.run_child(__file__, child)


# ------------------------------------------------------------------------------ main
def print_memory(memory: dict[int, dict[str, dict]], tasks: int, device) -> None:
    names = list(next(iter(memory.values())))
    width = {n: max(len(n), 16) for n in names}
    head = (
        f"Peak memory of one meta-iteration (MiB), meta-batch {tasks} (torchopt: "
        f"{TORCHOPT_MEMORY_TASKS} tasks; it backpropagates task by task, so its peak is one "
        f"task's), each in a fresh subprocess after a T=1 warm-up. {MEMORY_METHOD[device.type]}."
    )
    print("\n" + textwrap.fill(head, width=100))
    print(f"  {'T':>6}" + "".join(f"  {n:>{width[n]}}" for n in names))
    for steps, row in memory.items():
        cells = []
        for n in names:
            m = row[n]
            text = f"{m['alloc']:.2f}" + (f" (RSS {m['rss']:.1f})" if m["rss"] is not None else "")
            cells.append(f"  {text:>{width[n]}}")
        print(f"  {steps:>6}" + "".join(cells))


def main() -> None:
    parser = _harness.argument_parser(__doc__, quick_help="smoke test: 5 tasks, T in 10,50")
    parser.add_argument("--steps", help="comma-separated inner steps (default 10,100,1000)")
    parser.add_argument(
        "--repeats", type=int, help="samples per row (default 7, fewer past 60 s per T; quick 2)"
    )
    _harness.add_threads_argument(parser)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        steps, tasks, strategy, name = args.memory_child.split(":", 3)
        print(json.dumps(memory_child(int(steps), int(tasks), name, strategy, device)))
        return

    default_steps = "10,50" if args.quick else "10,100,1000"
    all_steps = [int(s) for s in (args.steps or default_steps).split(",")]
    tasks = 5 if args.quick else 25
    repeats = args.repeats or (2 if args.quick else 7)
    min_sample_s = _harness.min_sample_seconds(args.quick)
    check_tasks = 2 if args.quick else 3
    _harness.print_header(
        device,
        f"{torch.get_num_threads()} thread(s)",
        f"metafunc {metafunc.__version__}; torchopt {getattr(torchopt, '__version__', 'missing')}",
    )
    print(
        f"repeats per row: {repeats} after warm-up (at least 3, fewer once the rounds of one T "
        f"pass 60 s); a sample averages >= {min_sample_s} s"
    )
    c = Config(steps=0, tasks=tasks)
    print(
        f"workload: sinusoids, MLP 1-40-40-1, K={c.k}+{c.k}, meta-batch {c.tasks}, lam {c.lam}, "
        f"inner SGD lr {c.lr}, {c.cg_iters} CG iterations (tolerance 0: always {c.cg_iters}); "
        "no convergence checks (metafunc: if_not_converged='ignore', grad_norm not read)"
    )
    start = time.perf_counter()
    targets: list[tuple[str, float, bool]] = []
    strategy = "auto"  # metafunc's: "auto" decides on the first T; later T reuse its pick
    memory: dict[int, dict[str, dict]] = {}
    for steps in all_steps:
        cfg = Config(steps=steps, tasks=tasks)
        print(f"\nT={steps} inner steps, meta-batch {tasks}")
        residual = inner_residual(Config(steps=steps, tasks=check_tasks), device)
        print(f"  inner problem: ||grad|| at phi_T / at theta = {residual:.2g} (mean of tasks)")
        bad = check_agreement(Config(steps=steps, tasks=check_tasks), device)
        chosen = builders(strategy)
        if steps > HAND_LOOP_MAX_STEPS:
            del chosen["hand-written loop"]
        rows = [make_row(n, b, cfg, device) for n, b in chosen.items()]
        if strategy != "auto":
            rows[0].notes.append(f"strategy {strategy!r} (auto's pick at T={all_steps[0]})")
        run_rows(rows, device, repeats, min_sample_s, budget_s=60.0)
        if rows[0].task_map is not None:
            strategy = rows[0].task_map.strategy
        ratios = _harness.print_table(rows, bad, widths=(24, 9))
        if steps > HAND_LOOP_MAX_STEPS:
            print(f"  (hand-written loop not timed above T={HAND_LOOP_MAX_STEPS}: run time)")
        ours = _harness.paired_ratios(rows, bad).get("metafunc imaml", ratios["metafunc imaml"])
        target = f"metafunc imaml <= 1.10x hand-written (paired): T={steps}"
        targets.append((target, ours, ours <= 1.1))
        memory[steps] = {}
        for name in builders():
            if name in ("hand-written loop", AUTOGRAD_PROX):
                continue
            n_tasks = TORCHOPT_MEMORY_TASKS if name.startswith("torchopt") else tasks
            memory[steps][name] = peak_memory(steps, n_tasks, name, strategy, args)
    print_memory(memory, tasks, device)
    lo, hi = all_steps[0], all_steps[-1]
    if hi != lo:
        flat = memory[hi]["metafunc imaml"]["alloc"] / memory[lo]["metafunc imaml"]["alloc"]
        grows = memory[hi][UNROLLED]["alloc"] / memory[lo][UNROLLED]["alloc"]
        targets.append((f"metafunc imaml peak memory T={hi} <= 1.2x T={lo}", flat, flat <= 1.2))
        targets.append((f"unrolled MAML peak memory T={hi} > 1.2x T={lo}", grows, grows > 1.2))
    _harness.print_footer(start, targets)


if __name__ == "__main__":
    main()
