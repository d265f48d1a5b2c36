"""What a run reports: the progress bar, warnings, the summaries with 95 % confidence intervals,
``results.json``, the training plot and the final table."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import optree
import torch
from tqdm import tqdm

from .. import data
from ._errors import PROG, RunError, _why
from ._folder import RunFolder, _replacing
from ._tasks import _TEST_SEED, Tasks

_Z95 = 1.959963984540054


class Progress:
    """Progress on stderr: a tqdm bar on a terminal or in a notebook, a line per 10 % in a log.

    On a terminal (or in a Jupyter notebook) the bar is tqdm's, redrawn in place, with the rate
    and the time left; when stderr is a file or a pipe (a log, CI) a redrawn bar would be one
    line of carriage returns, so each tenth of the way is a line of its own instead, the
    training's with the time spent, the time left and the rate. The training steps' lines read
    ``step k/N <text>``; with a ``label`` (another phase, such as ``"evaluating 600 test
    tasks:"``) both the lines and the bar start with it instead.
    """

    def __init__(self, total: int, start: int, enabled: bool = True, label: str | None = None):
        self.total, self.start_step, self.enabled = total, start, enabled
        self.label = label
        self.t0, self.last_decile = time.perf_counter(), -1
        self.bar: Any = None
        if enabled and (sys.stderr.isatty() or _in_notebook()):
            self.bar = _bar_class()(
                total=total,
                initial=start,
                file=sys.stderr,  # read now: a caller may have replaced sys.stderr
                desc="" if label is None else f"{label} ",
                bar_format=_BAR_FORMAT,
                ascii=".#",
                unit=" it",
                mininterval=0.2,
                dynamic_ncols=True,
            )

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.text = text
            self.bar.update(step - self.bar.n)
            if step == self.total:
                self.close()
            return
        decile = 10 * step // self.total
        if decile != self.last_decile:
            line = f"{self.label or 'step'} {step}/{self.total} {text}".rstrip()
            if self.label is None and step > self.start_step:
                line += f" [{self._timing(step)}]"
            sys.stderr.write(f"{line}\n")
            self.last_decile = decile

    def _timing(self, step: int) -> str:
        """``elapsed<left, rate it/s`` in tqdm's words, for the lines of a log."""
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.start_step) / max(elapsed, 1e-9)
        left = tqdm.format_interval((self.total - step) / rate)
        return f"{tqdm.format_interval(elapsed)}<{left}, {rate:.1f} it/s"

    def close(self) -> None:
        """Ends the bar's line, so that what follows starts on a line of its own."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# the bar on a terminal: "[label ][####......] k/N <text> [elapsed<left, rate it/s]"
_BAR_FORMAT = "{desc}[{bar:30}] {n_fmt}/{total_fmt} {text} [{elapsed}<{remaining}, {rate_fmt}]"


def _in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (whose stderr is no terminal, but shows a bar)."""
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    return get is not None and "IPKernelApp" in getattr(get(), "config", {})


def _bar_class() -> type:
    """tqdm's bar (its notebook widget in a notebook), with the caller's ``text`` in the line.

    tqdm's own ``postfix`` would print ``, <text>``; a ``text`` key in ``format_dict`` puts it
    where the runner's lines have it.
    """
    base: type = tqdm
    if _in_notebook():  # tqdm.auto's bar is a notebook widget there (with ipywidgets)
        base = importlib.import_module("tqdm.auto").tqdm

    class _Bar(base):
        text = ""

        @property
        def format_dict(self) -> dict[str, Any]:
            return {**super().format_dict, "text": self.text}

    return _Bar


def _warn(text: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {text}\n")


def _summary(values: torch.Tensor) -> dict[str, Any]:
    """Mean and 95 % CI half-width over tasks; ``None`` for both (and the count of non-finite
    tasks) when a task's value is not finite: strict JSON has no NaN."""
    values = values.double().cpu()
    n = values.numel()
    finite = torch.isfinite(values)
    if not finite.all():
        return {"mean": None, "ci95": None, "n": n, "non_finite": int((~finite).sum())}
    mean = values.mean().item()
    half = _Z95 * values.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": half, "n": n}


def _summaries(values: dict[str, torch.Tensor], what: str | None) -> dict[str, dict[str, Any]]:
    """:func:`_summary` of each metric; a warning for each that is not finite, unless ``what``
    (when the values were taken) is None."""
    out = {key: _summary(v) for key, v in values.items()}
    for key, summary in out.items():
        if summary["mean"] is None and what is not None:
            _warn(
                f"the test {key} {what} is not finite on {summary['non_finite']} of "
                f"{summary['n']} tasks; results.json records null"
            )
    return out


def _plot(path: Path, history: dict, learner, meta, tasks: Tasks, device, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sinusoid = tasks.kind == "sinusoid"
    fig, axes = plt.subplots(1, 2 if sinusoid else 1, figsize=(11 if sinusoid else 6, 4))
    ax = axes[0] if sinusoid else axes

    def gaps(values: list) -> list[float]:  # non-finite values are null in the history
        return [math.nan if v is None else v for v in values]

    ax.plot(history["step"], gaps(history["meta_loss"]), lw=0.8, label="meta-loss (smoothed)")
    if history["val_step"]:
        ax.plot(
            history["val_step"], gaps(history["val_loss"]), "o-", label="post-adaptation val loss"
        )
    ax.set_xlabel("meta-step")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    if sinusoid:
        ax = axes[1]
        generator = torch.Generator().manual_seed(_TEST_SEED)
        episode = tasks.sample("test", 1, generator, device)
        x = torch.linspace(-5, 5, 200, device=device).reshape(1, -1, 1)
        params = learner.adapt(optree.tree_map(lambda t: t[0], _task0(meta)), _first(episode))
        init = {k: v.detach() for k, v in meta["params"].items()}
        truth = data.Sinusoid.evaluate(x, **episode.info)
        with torch.no_grad():
            before = learner.model(init, x[0])
            after = learner.model(params, x[0])
        xs = x[0, :, 0].cpu()
        ax.plot(xs, truth[0, :, 0].cpu(), "k-", label="true function")
        ax.plot(xs, before[:, 0].cpu(), "--", label="meta-learned init")
        ax.plot(xs, after[:, 0].cpu(), label="after adaptation")
        sx, sy = episode.support
        ax.plot(sx[0, :, 0].cpu(), sy[0, :, 0].cpu(), "^", label=f"{tasks.shots} support points")
        ax.set_title("a held-out task")
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with _replacing(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return True


def _task0(meta):
    return optree.tree_map(lambda t: t.detach().unsqueeze(0), meta)


def _first(episode: data.Episode):
    x, y = episode.support
    return x[0], y[0]


def _threads(count: int) -> str:
    return f"{count} thread" + ("s" if count != 1 else "")


def _print_table(results: dict, out: Path, plotted: bool) -> None:
    def cell(summary: dict | None) -> str:
        if summary is None:
            return "-"
        if summary["mean"] is None:
            return "not finite"
        return f"{summary['mean']:.4f} +- {summary['ci95']:.4f}"

    n = results["test_after"]["loss"]["n"]
    print(f"\n{results['algorithm']} on {results['task']}: {results['meta_steps']} meta-steps in "
          f"{results['train_seconds']:.1f} s ({results['strategy']} over tasks, "
          f"{results['device']}, {_threads(results['threads']['count'])})")  # fmt: skip
    if results["skipped_steps"]:
        print(f"skipped {len(results['skipped_steps'])} non-finite steps (--on-nonfinite skip)")
    print(f"post-adaptation on {n} held-out test tasks (mean +- 95 % CI):")
    print(f"  {'metric':<10} {'before meta-training':>24} {'after':>24}")
    for key, after in results["test_after"].items():
        before = cell(results["test_before"].get(key))
        print(f"  {key:<10} {before:>24} {cell(after):>24}")
    print(f"results: {out / 'results.json'}; checkpoint: {out / 'checkpoint.pt'}", end="")
    print(f"; plot: {out / 'training.png'}" if plotted else "")


def _write(
    results: dict, args: argparse.Namespace, folder: RunFolder, learner, meta, tasks: Tasks, device
) -> None:
    """Writes ``results.json`` and ``training.png`` (unless --no-plot) into the run's folder and
    prints the table (unless --quiet); a RunError that says what is kept when a file cannot be
    written."""
    out = folder.path
    path = out / "results.json"
    try:
        with _replacing(path) as tmp:
            tmp.write_text(json.dumps(results, indent=1, allow_nan=False))
        path = out / "training.png"
        title = f"{args.algorithm} on {args.task}"
        history = results["history"]
        plotted = not args.no_plot and _plot(path, history, learner, meta, tasks, device, title)
    except OSError as e:
        raise RunError(
            f"cannot write {path}: {_why(e)}. Is the disk full? {folder.kept()} Once there is "
            "room, run again with --resume: it evaluates and writes the results again."
        ) from None
    if not args.quiet:
        _print_table(results, out, plotted)
