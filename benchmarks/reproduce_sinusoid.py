"""Reproduce the published sinusoid-regression numbers of MAML (Finn et al. 2017) and Meta-SGD
(Li et al. 2017): K-shot post-adaptation MSE for K in {5, 10, 20}, Table 1 of the Meta-SGD paper
(arXiv:1707.09835), with metafunc's public API, and print ours beside the paper's.

Setup (Li et al. 2017, 4.1, following Finn et al. 2017, 5.1): tasks y = A sin(x - phase), A in
[0.1, 5], phase in [0, pi], x in [-5, 5]; learner an MLP 1-40-40-1 with ReLU; one inner SGD step
on the K support points, trained on the MSE of K query points; MAML's inner learning rate 0.01,
Meta-SGD's learned per parameter (``MAML(..., learn_lr=PerParamLR())``), initialised uniformly in
[0.005, 0.1] as in the paper (``--metasgd-lr-init inner-lr`` keeps metafunc's constant start);
outer Adam (lr 1e-3) over meta-batches of 25 tasks; then one step on K points of each of
``--eval-tasks`` held-out tasks (the same tasks for both algorithms) and the MSE on
``--eval-queries`` points of each, reported as mean +- 1.96 standard errors over the tasks.

Each (algorithm, K, seed) is one run; ``--workers`` runs them in parallel processes, each with
``--threads`` torch threads (1 by default: this MLP is too small for intra-op threads, and on a
busy machine two threads per process were ~20x slower than one). Not part of the test suite.

Run: ``python benchmarks/reproduce_sinusoid.py [--quick] [--steps N] [--shots 5,10,20]
[--algorithms maml,metasgd] [--seeds 0] [--workers N] [--device cpu|cuda] [--out FILE]``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import math
import multiprocessing
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import optree
import torch
from torch import nn

import metafunc
from metafunc import algorithms, data

Z95 = 1.959963984540054
PAPER_STEPS = 60000
OUT = Path(__file__).resolve().with_name("reproduce_sinusoid.md")
BEGIN, END = "<!-- results: begin -->", "<!-- results: end -->"

# Li et al. 2017, Table 1: MSE +- 95 % confidence interval on 100 held-out tasks, one step. The
# values as the issue gives them; not yet checked against the paper's PDF (see the .md file).
PAPER = {
    ("maml", 5): (0.686, 0.070),
    ("maml", 10): (0.435, 0.039),
    ("maml", 20): (0.228, 0.024),
    ("metasgd", 5): (0.482, 0.061),
    ("metasgd", 10): (0.258, 0.026),
    ("metasgd", 20): (0.127, 0.013),
}
NAMES = {"maml": "MAML", "metasgd": "Meta-SGD"}


# ------------------------------------------------------------------------------------ one run
def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def build(cfg: dict[str, Any]):
    """The learner, its meta-parameters and the outer Adam for one run."""
    torch.manual_seed(cfg["seed"])
    device = torch.device(cfg["device"])
    fm = metafunc.functionalize(mlp().to(device))
    kwargs: dict[str, Any] = (
        {"learn_lr": algorithms.PerParamLR()} if cfg["algorithm"] == "metasgd" else {}
    )
    learner = algorithms.MAML(
        fm, "mse", inner_lr=cfg["inner_lr"], steps=1, strategy=cfg["strategy"], **kwargs
    )
    meta = learner.init()
    if cfg["algorithm"] == "metasgd" and cfg["metasgd_lr_init"] == "paper":
        with torch.no_grad():  # Li et al.: alpha initialised uniformly at random in [0.005, 0.1]
            for lr in meta["lr"].values():
                lr.uniform_(0.005, 0.1)
    leaves = optree.tree_leaves(meta)
    outer = torch.optim.Adam(leaves, lr=cfg["outer_lr"])
    return learner, meta, leaves, outer


def evaluate(learner, meta, cfg: dict[str, Any]) -> torch.Tensor:
    """Per-task query MSE after one step on K points, on ``eval_tasks`` fixed held-out tasks."""
    tasks = data.Sinusoid()
    generator = torch.Generator().manual_seed(cfg["eval_seed"])
    losses, left = [], cfg["eval_tasks"]
    while left > 0:
        n = min(left, 250)
        episode = tasks.sample(
            n, cfg["shots"], cfg["eval_queries"], generator=generator, device=cfg["device"]
        )
        losses.append(learner.evaluate(meta, episode.support, episode.query)["loss"].cpu())
        left -= n
    return torch.cat(losses).double()


def meta_step(cfg, learner, meta, leaves, outer, tasks, generator) -> dict[str, torch.Tensor]:
    """One meta-step: a meta-batch of K-shot tasks (K queries), the meta-gradient, an outer Adam
    step on ``leaves``; returns the per-task metrics."""
    episode = tasks.sample(
        cfg["meta_batch"], cfg["shots"], cfg["shots"], generator=generator, device=cfg["device"]
    )
    grads, metrics = learner.meta_grad(meta, episode.support, episode.query)
    for leaf, g in zip(leaves, optree.tree_leaves(grads)):
        leaf.grad = g
    outer.step()
    return metrics


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Meta-trains one (algorithm, K, seed) for ``steps`` meta-steps, then evaluates it."""
    torch.set_num_threads(cfg["threads"])
    tag = f"[{NAMES[cfg['algorithm']]} {cfg['shots']}-shot seed {cfg['seed']}]"
    learner, meta, leaves, outer = build(cfg)
    tasks = data.Sinusoid()
    generator = torch.Generator().manual_seed(cfg["seed"])
    steps, smooth, report = cfg["steps"], None, max(cfg["steps"] // 10, 1)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        metrics = meta_step(cfg, learner, meta, leaves, outer, tasks, generator)
        loss = metrics["loss"].mean().item()
        smooth = loss if smooth is None else 0.99 * smooth + 0.01 * loss
        if step % report == 0 or step == steps:
            elapsed = time.perf_counter() - t0
            eta = elapsed / step * (steps - step)
            print(
                f"{tag} step {step}/{steps}  train query MSE (smoothed) {smooth:.3f}  "
                f"{1e3 * elapsed / step:.1f} ms/step  eta {eta / 60:.1f} min",
                flush=True,
            )
    seconds = time.perf_counter() - t0
    mse = evaluate(learner, meta, cfg)
    result = {
        **cfg,
        "train_seconds": seconds,
        "mean": mse.mean().item(),
        "ci95": Z95 * mse.std().item() / math.sqrt(mse.numel()),
        "n": mse.numel(),
        "train_mse": smooth,
    }
    if cfg["algorithm"] == "metasgd":
        lr = torch.cat([v.detach().flatten().cpu() for v in meta["lr"].values()])
        result["lr"] = {
            "mean": lr.mean().item(),
            "median": lr.median().item(),
            "min": lr.min().item(),
            "max": lr.max().item(),
            "negative": (lr < 0).double().mean().item(),
        }
    print(f"{tag} done in {seconds / 60:.1f} min: post-adaptation MSE {result['mean']:.3f} "
          f"+- {result['ci95']:.3f} on {result['n']} held-out tasks", flush=True)  # fmt: skip
    return result


def time_steps(cfg: dict[str, Any], steps: int = 30) -> float:
    """Seconds per meta-step of one configuration (after a short warm-up)."""
    torch.set_num_threads(cfg["threads"])
    learner, meta, leaves, outer = build(cfg)
    tasks, generator = data.Sinusoid(), torch.Generator().manual_seed(0)
    t0 = 0.0
    for i in range(steps + 5):
        if i == 5:
            t0 = time.perf_counter()
        meta_step(cfg, learner, meta, leaves, outer, tasks, generator)
    if cfg["device"] != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


# ---------------------------------------------------------------------------------- reporting
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: ours against the paper's, one per run, plus seed means."""
    lines = [
        "| algorithm | K | meta-steps | seed | ours: MSE ± 95 % CI | paper: MSE ± 95 % CI "
        "| ours / paper | paper value inside our CI |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    keys = sorted({(r["algorithm"], r["shots"]) for r in results}, key=lambda k: (k[0], k[1]))
    for algorithm, shots in keys:
        rows = [r for r in results if (r["algorithm"], r["shots"]) == (algorithm, shots)]
        paper = PAPER.get((algorithm, shots))
        for r in sorted(rows, key=lambda r: r["seed"]):
            lines.append(
                row(algorithm, shots, r["steps"], str(r["seed"]), r["mean"], r["ci95"], paper)
            )
        if len(rows) > 1:
            means = [r["mean"] for r in rows]
            mean = sum(means) / len(means)
            spread = f"mean of {len(rows)} (range {min(means):.3f}-{max(means):.3f})"
            lines.append(row(algorithm, shots, rows[0]["steps"], spread, mean, None, paper))
    return lines


def row(algorithm, shots, steps, seed, mean, ci, paper) -> str:
    ours = f"{mean:.3f}" + (f" ± {ci:.3f}" if ci is not None else "")
    if paper is None:
        return f"| {NAMES[algorithm]} | {shots} | {steps} | {seed} | {ours} | - | - | - |"
    inside = "-" if ci is None else ("yes" if abs(paper[0] - mean) <= ci else "no")
    return (f"| {NAMES[algorithm]} | {shots} | {steps} | {seed} | {ours} | "
            f"{paper[0]:.3f} ± {paper[1]:.3f} | {mean / paper[0]:.2f} | {inside} |")  # fmt: skip


def report(args, results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The generated part of the results file (between the markers)."""
    lines = [
        BEGIN,
        "",
        f"Command: `{info['command']}`",
        "",
        f"- date: {info['date']}; total wall time {info['seconds'] / 60:.1f} min",
        f"- machine: {info['machine']}; load average {info['load_start']} at the start, "
        f"{info['load_end']} at the end",
        f"- python {platform.python_version()}, torch {torch.__version__} "
        f"({args.threads} thread(s) per run, {args.workers} run(s) at a time), "
        f"metafunc {metafunc.__version__}, device {args.device}, strategy {args.strategy!r}",
        f"- schedule: {args.steps} meta-steps per run (the paper: {PAPER_STEPS}), meta-batch "
        f"{args.meta_batch}, K support + K query points per training task, one inner step, "
        f"MAML inner lr {args.inner_lr}, outer Adam lr {args.outer_lr}, Meta-SGD lr init "
        f"{'U[0.005, 0.1]' if args.metasgd_lr_init == 'paper' else f'{args.inner_lr} (constant)'}",
        f"- evaluation: {args.eval_tasks} held-out tasks (seed {args.eval_seed}, the same for "
        f"every run of a K), one step on K points, MSE on {args.eval_queries} query points; "
        "CI = 1.96 standard errors over the tasks",
        "",
        *table(results),
        "",
        "| run | train time | ms / meta-step | final train query MSE (smoothed) | "
        "Meta-SGD learned lr: median [min, max], share < 0 |",
        "|---|---:|---:|---:|---|",
    ]
    for r in sorted(results, key=lambda r: (r["algorithm"], r["shots"], r["seed"])):
        lr = r.get("lr")
        lr_text = (
            f"{lr['median']:.3f} [{lr['min']:.3f}, {lr['max']:.3f}], {100 * lr['negative']:.1f} %"
            if lr
            else "-"
        )
        lines.append(
            f"| {NAMES[r['algorithm']]} {r['shots']}-shot seed {r['seed']} | "
            f"{r['train_seconds'] / 60:.1f} min | {1e3 * r['train_seconds'] / r['steps']:.1f} | "
            f"{r['train_mse']:.3f} | {lr_text} |"
        )
    lines += ["", END]
    return "\n".join(lines)


HEADER = """# Sinusoid regression: MAML and Meta-SGD against Li et al. 2017, Table 1

Written by `benchmarks/reproduce_sinusoid.py`, which rewrites only the block between the
`results` markers; the sections around it are kept.

"""

FOOTER = """

## Reading

(Written by hand after a full run; the script keeps this section.)
"""


def write(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = HEADER + block + FOOTER
    path.write_text(text)


# --------------------------------------------------------------------------------------- main
def ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def names(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in NAMES]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"expected a subset of maml,metasgd, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shots", type=ints, default=[5, 10, 20], help="K values, e.g. 5,10,20")
    p.add_argument("--algorithms", type=names, default=["maml", "metasgd"])
    p.add_argument("--steps", type=int, default=PAPER_STEPS, help="meta-steps per run")
    p.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-step")
    p.add_argument("--inner-lr", type=float, default=0.01, help="MAML's inner SGD lr")
    p.add_argument("--outer-lr", type=float, default=1e-3, help="outer Adam lr")
    p.add_argument(
        "--metasgd-lr-init",
        choices=("paper", "inner-lr"),
        default="paper",
        help="paper: uniform in [0.005, 0.1]; inner-lr: metafunc's constant start",
    )
    p.add_argument("--eval-tasks", type=int, default=1000, help="held-out tasks (paper: 100)")
    p.add_argument("--eval-queries", type=int, default=100, help="query points per eval task")
    p.add_argument("--eval-seed", type=int, default=2017)
    p.add_argument("--seeds", type=ints, default=[0], help="training seeds, e.g. 0,1,2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--strategy", choices=("vmap", "loop", "auto"), default="vmap")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--workers", type=int, default=1, help="runs at a time (processes)")
    p.add_argument("--quick", action="store_true", help="smoke run: 300 steps, 200 eval tasks")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results file (default {OUT.name} next to this script; a --quick run "
                   "writes none unless given)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parser().parse_args(argv)
    if args.quick:
        args.steps, args.eval_tasks = min(args.steps, 300), min(args.eval_tasks, 200)
    for name in ("steps", "meta_batch", "eval_tasks", "eval_queries", "threads", "workers"):
        if getattr(args, name) < 1:
            parser().error(f"--{name.replace('_', '-')} must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser().error(f"--device {args.device}: CUDA is not available here")
    out = args.out if args.out is not None else (None if args.quick else OUT)
    command = shlex.join(["python", "benchmarks/reproduce_sinusoid.py", *(argv or sys.argv[1:])])
    common = {
        "steps": args.steps,
        "meta_batch": args.meta_batch,
        "inner_lr": args.inner_lr,
        "outer_lr": args.outer_lr,
        "metasgd_lr_init": args.metasgd_lr_init,
        "eval_tasks": args.eval_tasks,
        "eval_queries": args.eval_queries,
        "eval_seed": args.eval_seed,
        "device": args.device,
        "strategy": args.strategy,
        "threads": args.threads,
    }
    jobs = [
        {**common, "algorithm": a, "shots": k, "seed": s}
        for a in args.algorithms
        for k in args.shots
        for s in args.seeds
    ]
    load_start, t0 = load(), time.perf_counter()
    per_step = {
        a: time_steps({**common, "algorithm": a, "shots": max(args.shots), "seed": 0})
        for a in args.algorithms
    }
    estimate = sum(per_step[job["algorithm"]] for job in jobs) * args.steps / args.workers
    timing = ", ".join(f"{NAMES[a]} ~{1e3 * t:.1f} ms" for a, t in per_step.items())
    print(f"{len(jobs)} run(s) of {args.steps} meta-steps; one step takes {timing} here now "
          f"(K={max(args.shots)}, load average {load_start}): ~{estimate / 60:.1f} min with "
          f"{args.workers} run(s) at a time", flush=True)  # fmt: skip
    if args.workers == 1:
        results = [run(job) for job in jobs]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
            results = list(pool.map(run, jobs))
    seconds = time.perf_counter() - t0
    info = {
        "command": command,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} "
        f"{platform.machine()}",
        "load_start": load_start,
        "load_end": load(),
        "seconds": seconds,
    }
    print()
    print("\n".join(table(results)))
    print(f"\ntotal {seconds / 60:.1f} min")
    if out is not None:
        write(out, report(args, results, info))
        print(f"results written to {out}")
    return results


if __name__ == "__main__":
    main()
