"""The measurement harness shared by the benchmark scripts (maml.py, imaml.py, compile.py).

A benchmark is a list of rows (`Row`), one per implementation, each with a callable that runs one
iteration. The scripts warm the rows up (each its own way) and drop the rows that cannot be the
fastest (`drop_slow`); `round_robin` then samples the others interleaved, the order rotated each
round, so that a burst of load on a shared machine spreads over all rows; `print_table` gives the
median, the interquartile range and the minimum of the samples, the ratio of medians to the fastest
correct hand-written row, and the paired ratio (`paired_ratios`: each round's sample over the
reference's from the same round, the median over rounds; a load that changes during a run moves both
samples of a round, so it is steadier than the ratio of medians on a shared machine).
`peak_memory_growth` measures the peak memory of one iteration in a fresh process started by
`run_child`. The header and footer of a run (`print_header`, `print_footer`), the meta-gradient
check (`check_agreement`), metafunc's meta-backward (`vmap_tasks_meta_backward`) and the common
command-line flags (`argument_parser`, `add_threads_argument`, `min_sample_seconds`) are here too.

Imported as ``import _harness``: a script run as ``python benchmarks/<script>.py`` has this folder
first on ``sys.path``, and the scripts insert it there themselves for importers (compile.py
imports maml.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F

import metafunc

# ------------------------------------------------------------------------------ command line


def argument_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the script's docstring, with ``--device``
    (cpu or cuda, default cpu) and ``--quick`` (a smoke test; `quick_help` says what it runs)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: the script passes it to torch.set_num_threads unless it is 0."""
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0: torch's)"
    )


def min_sample_seconds(quick: bool) -> float:
    """The least time one timing sample averages over (see `round_robin`): 0.2 s, 0.05 s quick."""
    return 0.05 if quick else 0.2


# ------------------------------------------------------------------------------ header, footer


def print_header(device: torch.device, torch_details: str, *lines: str) -> None:
    """Prints the date, the machine and torch version followed by `torch_details`, then `lines`,
    then the load average."""
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"device: {device} ({platform.machine()}, {os.cpu_count()} cores)", end="; ")
    print(f"torch {torch.__version__}, {torch_details}")
    for line in lines:
        print(line)
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes share the machine)")


def print_footer(start: float, targets: list[tuple[str, float, bool]] | None = None) -> None:
    """Prints the run time since `start` (a time.perf_counter()) and the load average, then, if
    given, the targets: (what, value, met)."""
    print(f"\ntotal {time.perf_counter() - start:.0f} s", end="; ")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if targets is None:
        return
    print("targets:")
    for what, value, ok in targets:
        print(f"  {'PASS' if ok else 'MISS'}  {what}: {value:.2f}")


# ------------------------------------------------------------------------------ correctness


def check_agreement(
    candidates: dict[str, Callable[[], list[torch.Tensor]]],
    ref: list[torch.Tensor],
    rtol: float,
    other_estimators: Collection[str] = (),
) -> set[str]:
    """Compares each candidate's meta-gradient (its callable computes it) with `ref`, printing a
    line per candidate: they agree when |a - b| <= rtol (|b| + max|b|) elementwise, the max over
    all tensors (the max|b| term absorbs entries that are 0 up to round-off). A candidate in
    `other_estimators` computes another quantity: its distance and cosine to `ref` are printed,
    not checked. A candidate that raises is reported as failed, unless it is metafunc's (its name
    starts with "metafunc"), whose error propagates; a metafunc candidate that disagrees stops the
    run. Returns the names that disagree or fail."""
    scale = max(b.abs().max() for b in ref)
    bad = set()
    for name, meta_grads in candidates.items():
        try:
            got = meta_grads()
        except Exception as e:  # a peer that cannot run this workload is reported, not fatal
            if name.startswith("metafunc"):
                raise
            print(f"    {name:<30} failed: {type(e).__name__}: {str(e)[:80]}")
            bad.add(name)
            continue
        err = (max((a - b).abs().max() for a, b in zip(got, ref)) / scale).item()
        if name in other_estimators:
            flat = [torch.cat([t.flatten() for t in grads]) for grads in (got, ref)]
            cos = F.cosine_similarity(*flat, dim=0)
            print(
                f"    {name:<30} max|diff|/max|grad| = {err:.1e}  (another estimator, not "
                f"checked; cosine {cos.item():.3f})"
            )
            continue
        agree = all(
            bool(((a - b).abs() <= rtol * (b.abs() + scale)).all()) for a, b in zip(got, ref)
        )
        print(f"    {name:<30} max|diff|/max|grad| = {err:.1e}  {'agree' if agree else 'DISAGREE'}")
        bad |= set() if agree else {name}
    if any(name.startswith("metafunc") for name in bad):
        raise SystemExit("metafunc's meta-gradient disagrees with the hand-written baseline")
    return bad


# ------------------------------------------------------------------------------ timing


def clock(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds that fn() takes, the device synchronized before and after on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@dataclasses.dataclass
class Row:
    """One implementation in a table: its iteration, timing samples (s) and notes."""

    name: str
    iteration: Callable[[], Any]
    task_map: Any = None  # metafunc's vmap_tasks function (its .strategy), else None
    samples: list[float] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def vmap_tasks_meta_backward(
    task: Callable, params: dict, strategy: str, chunk_size: int | None = None
):
    """meta_backward(data) for a metafunc row: the mean over tasks of task(params, *data) (data
    with a leading task dimension), the tasks mapped by metafunc.vmap_tasks with `strategy` (and
    `chunk_size`), backpropagated into the params' .grad. Its task_map is the vmap_tasks
    function, whose .strategy says what "auto" picked."""
    run = metafunc.vmap_tasks(
        task, in_dims=(None, 0, 0, 0, 0), strategy=strategy, chunk_size=chunk_size
    )

    def meta_backward(data):
        run(params, *data).mean().backward()

    meta_backward.task_map = run  # type: ignore[attr-defined]
    return meta_backward


def meta_iteration_row(name: str, model: torch.nn.Module, meta_backward, data) -> Row:
    """A row whose iteration is one meta-iteration: meta_backward(data) puts the meta-gradient
    into the model's .grad, then an outer Adam step (lr 1e-3). Its task_map is meta_backward's,
    if it has one (metafunc's rows)."""
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def iteration():
        outer.zero_grad()
        meta_backward(data)
        outer.step()

    return Row(name, iteration, getattr(meta_backward, "task_map", None))


def drop_slow(rows: list[Row], warm: dict[str, float]) -> list[Row]:
    """The rows worth repeating, given each row's warm-up iteration time `warm` (s). A row slower
    than 1 s and more than 2x slower than the fastest cannot be the fastest and is not repeated:
    its warm-up time becomes its only sample (noted in the table)."""
    fastest = min(warm.values())
    active = [r for r in rows if warm[r.name] < max(1.0, 2 * fastest)]
    for row in rows:
        if row not in active:
            row.samples = [warm[row.name]]
            row.notes.append(">2x slower: warm-up sample only")
    return active


def round_robin(
    rows: list[Row],
    warm: dict[str, float],
    device: torch.device,
    repeats: int,
    min_sample_s: float,
    budget_s: float = math.inf,
) -> None:
    """`repeats` rounds, each appending one sample to every row, the order rotated each round;
    fewer rounds (at least 3) once they have taken `budget_s`. A sample averages enough
    iterations to last `min_sample_s`, as many as the warm-up time `warm` (s) says."""
    inner = {r.name: max(1, round(min_sample_s / warm[r.name])) for r in rows}
    start = time.perf_counter()
    for rep in range(repeats):
        if rep >= 3 and time.perf_counter() - start > budget_s:
            break
        for row in rows[rep % len(rows) :] + rows[: rep % len(rows)]:
            n = inner[row.name]
            row.samples.append(
                clock(lambda r=row, n=n: [r.iteration() for _ in range(n)], device) / n
            )


def spread(samples: list[float]) -> str:
    """The interquartile range of the samples (s) in ms, or their range below 4 samples, and their
    count: "lo-hi (n=N)"."""
    ms = sorted(1000 * s for s in samples)
    lo, hi = statistics.quantiles(ms, n=4)[::2] if len(ms) >= 4 else [ms[0], ms[-1]]
    return f"{lo:.1f}-{hi:.1f} (n={len(ms)})"


def _reference(rows: list[Row], bad: set[str]) -> Row:
    """The fastest (by median) row whose name starts with "hand-written" and is not in `bad`."""
    correct = [r for r in rows if r.name.startswith("hand-written") and r.name not in bad]
    return min(correct, key=lambda r: statistics.median(r.samples))


def paired_ratios(rows: list[Row], bad: set[str]) -> dict[str, float]:
    """{row name: the median over rounds of (its sample / the reference's sample of the same
    round)} for the rows sampled in every round with the reference (at least 3 rounds):
    `round_robin` times a round's rows back to back, so a load that changes during the run
    moves both."""
    ref = _reference(rows, bad)
    return {
        r.name: statistics.median(a / b for a, b in zip(r.samples, ref.samples))
        for r in rows
        if len(r.samples) == len(ref.samples) >= 3
    }


def print_table(
    rows: list[Row],
    bad: set[str],
    widths: tuple[int, int] = (22, 8),
    extra_head: str = "",
    extra: Callable[[str], str] | None = None,
) -> dict[str, float]:
    """Prints a line per row: median, spread and minimum in ms, the ratio to the reference, the
    median of the fastest row whose name starts with "hand-written" and is not in `bad`, the
    paired ratio (`paired_ratios`; "-" for a row not sampled every round), and the notes (a row
    in `bad` is marked wrong). `widths`: of the spread and minimum columns; `extra(name)` gives
    further cells, after the ratios, under `extra_head`. Returns {row name: median /
    reference}."""
    med = {r.name: statistics.median(r.samples) for r in rows}
    ref = statistics.median(_reference(rows, bad).samples)
    paired = paired_ratios(rows, bad)
    w_spread, w_min = widths
    head = f"  {'implementation':<30}{'median ms':>10}  {'IQR (or range) ms':<{w_spread}}"
    print(head + f"{'min ms':>{w_min}}  x hand  paired{extra_head}  note")
    for row in rows:
        line = f"  {row.name:<30}{1000 * med[row.name]:>10.1f}  {spread(row.samples):<{w_spread}}"
        line += f"{1000 * min(row.samples):>{w_min}.1f}  {med[row.name] / ref:>5.2f}x"
        line += f"  {paired[row.name]:>5.2f}x" if row.name in paired else f"  {'-':>6}"
        line += extra(row.name) if extra else ""
        notes = row.notes + (["WRONG meta-gradient (see check)"] if row.name in bad else [])
        print(line + (f"  {'; '.join(notes)}" if notes else ""))
    return {k: v / ref for k, v in med.items()}


# ------------------------------------------------------------------------------ peak memory
CUDA_PEAK = "torch.cuda.max_memory_allocated() minus memory_allocated() just before"
RSS_PEAK = (
    "peak RSS (VmHWM of /proc/self/status, reset through /proc/self/clear_refs) minus the RSS just "
    "before"
)


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


def peak_memory_growth(
    iteration_at: Callable[[int], Callable[[], Any]], steps: int, device: torch.device
) -> tuple[float, Callable[[], Any]]:
    """The peak memory growth (MiB) of one call of iteration_at(steps)(), after one of
    iteration_at(1)() that loads kernels and allocator pools; each iteration is built, then the
    peak reset, then it runs. On CUDA: `CUDA_PEAK`; on the CPU: `RSS_PEAK`. Meant for a fresh
    process (see `run_child`). Returns it with the measured iteration."""
    for t in (1, steps):
        iteration = iteration_at(t)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before = _proc_kib("VmRSS:") * 1024
        iteration()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, iteration
    return (_proc_kib("VmHWM:") * 1024 - before) / 2**20, iteration


def run_child(script: str, args: list[str]) -> dict:
    """Runs ``python script *args`` in a fresh process; returns the JSON object that it prints on
    its last line of output."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
