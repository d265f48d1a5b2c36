"""``python -m metafunc train``: meta-train, evaluate, checkpoint and report an algorithm on a task.

Every run writes to ``--out`` (default ``runs/<algorithm>-<task>-seed<seed>``, or the next free
``...-2``, ``-3``, ... when that holds an earlier run): ``checkpoint.pt`` (resumable exactly with
``--resume``), ``results.json`` and ``training.png`` (with matplotlib). A run holds its folder for
its life (a lock that the OS releases when the process dies), never overwrites another run unless
told to (``--overwrite``), stops at the first non-finite meta-loss or meta-gradient without saving
it, and on Ctrl-C saves the last completed step and prints how to resume. A failure is a
:class:`RunError`: ``main`` prints it as ``python -m metafunc train: <message>`` and exits with
its code (2: the command line asks for what cannot be done; 1: the files, the data or the
training failed; 130: interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import pickle
import platform
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import filelock
import optree
import torch
from torch import nn

import metafunc

from . import algorithms, data, distributed, implicit

PROG = "python -m metafunc train"
ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "mamlpp", "reptile", "imaml", "leap", "warpgrad")
TASKS = ("sinusoid", "glyphs", "omniglot")
_Z95 = 1.959963984540054
# the fixed val/test tasks' generator seeds: far from the small --seed values people use, so that
# sinusoid's held-out tasks never come from the training tasks' stream (there is no class split)
_VAL_SEED, _TEST_SEED = 2_000_000_011, 2_000_000_029
# flags that a resumed run must share with its checkpoint (they decide the run or its test tasks;
# --data-path is checked by the data's fingerprint instead, so that moved data still resumes)
_RESUME_KEYS = (
    "algorithm", "task", "seed", "meta_batch", "inner_steps", "inner_lr", "outer_lr",
    "first_order", "lam", "cg_steps", "shots", "queries", "ways", "hidden", "classes", "data_seed",
    "eval_tasks",
)  # fmt: skip
# the files of a run in --out (what --overwrite deletes), and the lock held while a run lives
RUN_FILES = ("checkpoint.pt", "results.json", "training.png")
_LOCK, _OWNER = ".run.lock", ".run.lock.json"
_FORMAT = "metafunc train checkpoint 1"
_MAX_SKIPS = 10  # --on-nonfinite skip: this many skipped steps in a row stop the run


class RunError(Exception):
    """A run that cannot start or go on; ``main`` prints the message and exits with ``code``
    (2: the command line asks for what cannot be done; 1: a failure; 130: interrupted)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class _Taken(RunError):
    """``--out`` holds another run or is in use by one (the default folder then moves on)."""

    def __init__(self, message: str, code: int, reason: str):
        super().__init__(message, code)
        self.reason = reason


class _Exit(SystemExit):
    """``SystemExit(code)`` whose ``str`` is the message (which ``main`` printed already)."""

    def __init__(self, error: RunError):
        super().__init__(error.code)
        self.message = str(error)

    def __str__(self) -> str:
        return self.message


def _why(error: BaseException) -> str:
    """An exception in a few words: an OSError's strerror, else the first line of its text."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ------------------------------------------------------------------------------------- models
def _mlp(warp: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(1, 40), nn.ReLU()]
    if warp:  # WarpGrad: warp layers between the task layers, never adapted
        layers += [nn.Linear(40, 40), nn.ReLU()]
    layers += [nn.Linear(40, 40), nn.ReLU()]
    if warp:
        layers += [nn.Linear(40, 40), nn.ReLU()]
    layers += [nn.Linear(40, 1)]
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """The 4-block few-shot conv net (Vinyals et al. 2016): conv3x3-BatchNorm-ReLU-maxpool blocks
    and a linear head; with ``warp=True`` a warp conv (3x3, never adapted) follows blocks 1-3."""

    def __init__(self, ways: int, hidden: int = 32, image_size: int = 28, warp: bool = False):
        super().__init__()
        blocks: list[nn.Module] = []
        channels = 1
        for i in range(4):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(channels, hidden, 3, padding=1),
                    nn.BatchNorm2d(hidden, track_running_stats=False),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                )
            )
            if warp and i < 3:
                blocks.append(nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU()))
            channels = hidden
        self.features = nn.Sequential(*blocks)
        size = image_size
        for _ in range(4):
            size //= 2
        self.head = nn.Linear(hidden * max(size, 1) ** 2, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _warp_names(model: nn.Module, task: str) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    if task == "sinusoid":
        return [n for n in names if n.split(".")[0] in ("2", "6")]
    warp_blocks = {str(i) for i in (1, 3, 5)}  # features.<i> are the warp blocks
    return [n for n in names if n.startswith("features.") and n.split(".")[1] in warp_blocks]


def _head_names(model: nn.Module, task: str) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    last = names[-1].rsplit(".", 1)[0]
    return [n for n in names if n.rsplit(".", 1)[0] == last]


# -------------------------------------------------------------------------------------- tasks
class Tasks:
    """Samples meta-batches from the train/val/test splits of a task family."""

    def __init__(self, args: argparse.Namespace):
        self.kind = args.task
        self.shots, self.queries = args.shots, args.queries
        if args.task == "sinusoid":
            self.sinusoid = data.Sinusoid()
            self.loss = "mse"
            return
        self.loss = "cross_entropy"
        if args.task == "glyphs":
            dataset = data.procedural_glyphs(args.classes, 20, seed=args.data_seed)
            sizes: Any = (0.64, 0.16, 0.2)
        else:
            if args.data_path is None:
                raise RunError(
                    "--task omniglot needs --data-path, the folder that holds "
                    "images_background/ and images_evaluation/ (or one of them). There is no "
                    "download; use --task glyphs for a built-in image task.",
                    2,
                )
            try:
                dataset = data.load_omniglot(args.data_path)
            except (OSError, ValueError, ImportError) as e:
                raise RunError(f"--data-path {args.data_path}: {e}", 2) from None
            # Vinyals et al. 2016: 1200 characters for meta-training (here 1100 + 100 for
            # validation), the rest for testing; a character's rotations stay together
            n_chars = len(set(dataset.class_groups or range(dataset.num_classes)))
            sizes = (1100, 100, None) if n_chars > 1300 else (0.6, 0.1, 0.3)
        splits = data.split_classes(dataset, sizes, seed=args.data_seed)
        self.samplers = {}
        for name, classes in zip(("train", "val", "test"), splits):
            try:
                self.samplers[name] = data.EpisodeSampler(
                    dataset, classes, ways=args.ways, shots=args.shots, queries=args.queries
                )
            except ValueError as e:
                more = "raise --classes" if args.task == "glyphs" else "use more characters"
                raise RunError(
                    f"the meta-{name} split has {len(classes)} of the "
                    f"{dataset.num_classes} classes and cannot give --ways {args.ways} --shots "
                    f"{args.shots} --queries {args.queries} episodes ({e}). Lower --ways, "
                    f"--shots or --queries, or {more}.",
                    2,
                ) from None

    def sample(self, split: str, n: int, generator: torch.Generator, device) -> data.Episode:
        if self.kind == "sinusoid":
            return self.sinusoid.sample(
                n, self.shots, self.queries, generator=generator, device=device
            )
        return self.samplers[split].sample(n, generator=generator, device=device)


# ---------------------------------------------------------------------------------- learners
def _learner(args: argparse.Namespace, fm, model: nn.Module, loss: str, strategy: str):
    common: dict[str, Any] = {"strategy": strategy}
    a = args.algorithm
    if a in ("maml", "fomaml", "metasgd", "anil", "mamlpp"):
        kwargs: dict[str, Any] = {
            "inner_lr": args.inner_lr,
            "steps": args.inner_steps,
            "first_order": args.first_order or a == "fomaml",
        }
        if a == "metasgd":
            kwargs["learn_lr"] = "per_param"
        if a == "anil":
            kwargs["adapt"] = _head_names(model, args.task)
        if a == "mamlpp":
            kwargs["learn_lr"] = "per_layer_per_step"
            kwargs["step_weights"] = _msl_weights(args.inner_steps, 0.0)
        return algorithms.MAML(fm, loss, **kwargs, **common)
    if a == "reptile":
        return algorithms.Reptile(
            fm, loss, inner_lr=args.inner_lr, steps=args.inner_steps, **common
        )
    if a == "imaml":
        return algorithms.IMAML(
            fm, loss, inner_lr=args.inner_lr, steps=args.inner_steps, lam=args.lam,
            solve=functools.partial(implicit.solve_cg, maxiter=args.cg_steps),
            if_not_converged="ignore", **common,
        )  # fmt: skip
    if a == "leap":
        return algorithms.Leap(fm, loss, inner_lr=args.inner_lr, steps=args.inner_steps, **common)
    return algorithms.WarpGrad(
        fm, loss, warp=_warp_names(model, args.task), inner_lr=args.inner_lr,
        steps=args.inner_steps, seed=args.seed,
        buffer_size=1000 if args.task == "sinusoid" else 200, **common,
    )  # fmt: skip


def _msl_weights(steps: int, progress: float) -> list[float]:
    """MAML++'s multi-step loss: from uniform weights to the last step only, over ``progress``."""
    a = min(max(progress, 0.0), 1.0)
    w = [(1 - a) / steps] * steps
    w[-1] += a
    return w


# ------------------------------------------------------------------------------- reporting
class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per 10 % otherwise."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.total, self.start_step, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self.t0, self.last_draw, self.last_decile = time.perf_counter(), 0.0, -1
        self.open_line = False  # a bar drawn on a terminal, not ended by a newline yet

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        decile = 10 * step // self.total
        if self.tty and (now - self.last_draw > 0.2 or step == self.total):
            done = int(30 * step / self.total)
            rate = (step - self.start_step) / max(now - self.t0, 1e-9)
            bar = "#" * done + "." * (30 - done)
            sys.stderr.write(f"\r[{bar}] {step}/{self.total} {text} {rate:.1f} it/s ")
            sys.stderr.flush()
            self.last_draw, self.open_line = now, True
        elif not self.tty and decile != self.last_decile:
            sys.stderr.write(f"step {step}/{self.total} {text}\n")
            self.last_decile = decile
        if step == self.total and self.tty:
            self.close()

    def close(self) -> None:
        """Ends the bar's line, so that what follows starts on a line of its own."""
        if self.open_line:
            sys.stderr.write("\n")
            self.open_line = False


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


def _evaluate(learner, meta, tasks: Tasks, split: str, n: int, seed: int, device, chunk: int):
    """Post-adaptation query metrics on ``n`` fixed tasks of ``split`` (same tasks every time)."""
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {}
    left = n
    while left > 0:
        k = min(chunk, left)
        episode = tasks.sample(split, k, generator, device)
        # under torchrun each process adapts to its share of the tasks; all get every metric
        metrics = distributed.evaluate(learner, meta, episode.support, episode.query)
        for key, value in metrics.items():
            parts.setdefault(key, []).append(value.detach())
        left -= k
    return {key: torch.cat(v) for key, v in parts.items()}


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
          f"{results['device']})")  # fmt: skip
    if results["skipped_steps"]:
        print(f"skipped {len(results['skipped_steps'])} non-finite steps (--on-nonfinite skip)")
    print(f"post-adaptation on {n} held-out test tasks (mean +- 95 % CI):")
    print(f"  {'metric':<10} {'before meta-training':>24} {'after':>24}")
    for key, after in results["test_after"].items():
        before = cell(results["test_before"].get(key))
        print(f"  {key:<10} {before:>24} {cell(after):>24}")
    print(f"results: {out / 'results.json'}; checkpoint: {out / 'checkpoint.pt'}", end="")
    print(f"; plot: {out / 'training.png'}" if plotted else "")


# ------------------------------------------------------------------------------ run folder
@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (named by this process, so runs never collide), moved onto
    ``path`` when the block succeeds and removed when it fails: no half-written file, ever."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _stale_temps(folder: Path) -> list[Path]:
    """Temporary files that runs killed while writing left in ``folder``."""
    names = (*RUN_FILES, _OWNER)
    temps = [p for name in names for p in folder.glob(f"{name}.*.tmp")]
    return temps + [p for p in (folder / "checkpoint.tmp",) if p.exists()]  # metafunc <= 0.x


class RunFolder:
    """``--out``, held for the run's life by the main process: made if missing, checked writable,
    locked against a second live run and cleared of an old run's files only with --overwrite.

    The lock is a ``flock`` on ``.run.lock`` (the ``filelock`` package): the OS releases it when
    the process ends, ``kill -9`` included. ``.run.lock.json`` names its owner for the message a
    second run gets. :meth:`close` releases the lock and removes the folders the run made when
    it left nothing in them. Other torchrun processes get a ``RunFolder`` without a lock.
    """

    def __init__(
        self, path: Path, lock: filelock.FileLock | None = None, made: Sequence[Path] = ()
    ):
        self.path, self.lock, self.made = path, lock, list(made)
        self.checkpoint = path / "checkpoint.pt"
        self.saved: int | None = None  # the step that checkpoint.pt holds, once it is this run's

    def kept(self) -> str:
        """What a failed or interrupted run leaves, as a sentence."""
        if self.saved is None:
            return "Nothing was saved."
        return f"{self.checkpoint} (step {self.saved}) is kept."

    def close(self) -> None:
        if self.lock is None:
            return
        lock, self.lock = self.lock, None
        with contextlib.suppress(OSError):
            (self.path / _OWNER).unlink()
            if self.made and {p.name for p in self.path.iterdir()} <= {_LOCK}:
                (self.path / _LOCK).unlink()
        lock.release()
        _remove_dirs(self.made)


def _make_dirs(path: Path) -> list[Path]:
    """Makes ``path`` and its missing parents; returns those it made, deepest first."""
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_dirs(missing)
        raise RunError(
            f"cannot create --out {path}: {_why(e)}. Choose a folder you can write to."
        ) from None
    return missing


def _remove_dirs(made: list[Path]) -> None:
    for p in made:  # deepest first; a folder that something else wrote to stays
        try:
            p.rmdir()
        except OSError:
            return


def _owner(path: Path) -> str:
    """``: pid ... on <host>, started ..., command: ...`` from the lock's owner file."""
    owner = path / _OWNER
    try:
        info = json.loads(owner.read_text())
        return (
            f": pid {int(info['pid'])} on {info['host']}, started {info['started']}, command: "
            f"{info['command']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return f" (its owner file {owner} is missing or unreadable)"


def _lock(path: Path, command: str) -> filelock.FileLock:
    """Takes ``path``'s run lock and writes its owner file (the check that the folder is
    writable), or raises."""
    lock = filelock.FileLock(str(path / _LOCK), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise _Taken(
            f"--out {path} is in use by another run{_owner(path)}. Wait for it to finish, or "
            "choose another --out.",
            1,
            reason="is in use by another run",
        ) from None
    except OSError as e:
        raise RunError(
            f"cannot write to --out {path}: {_why(e)}. Choose a folder you can write to."
        ) from None
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": command,
    }
    try:
        with _replacing(path / _OWNER) as tmp:
            tmp.write_text(json.dumps(owner))
    except OSError as e:
        lock.release()
        raise RunError(
            f"cannot write to --out {path}: {_why(e)}. Choose a folder you can write to."
        ) from None
    return lock


def _open_folder(path: Path, resume: bool, overwrite: bool, command: str) -> RunFolder:
    """Checks, makes and locks ``path`` for a run; a refused start leaves no new folder."""
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} is a file, not a folder. Pass a folder as --out.", 2)
    if resume and not (path / "checkpoint.pt").exists():
        raise RunError(
            f"--resume: no checkpoint at {path / 'checkpoint.pt'}. Run without --resume first, "
            "or point --out at the run's folder.",
            2,
        )
    made = _make_dirs(path)
    try:
        folder = RunFolder(path, _lock(path, command), made)
    except BaseException:
        _remove_dirs(made)
        raise
    try:
        present = [name for name in RUN_FILES if (path / name).exists()]
        if present and not (resume or overwrite):
            written = max((path / name).stat().st_mtime for name in present)
            raise _Taken(
                f"--out {path} holds another run ({', '.join(present)}; last written "
                f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(written))}). Pass --resume to "
                "continue it, --overwrite to replace it, or another --out.",
                2,
                reason="holds an earlier run",
            )
        for stale in _stale_temps(path) + [path / n for n in present if overwrite]:
            try:
                stale.unlink()
            except OSError as e:
                raise RunError(f"--out {path}: cannot remove {stale}: {_why(e)}.") from None
    except BaseException:
        folder.close()
        raise
    return folder


def _claim(args: argparse.Namespace, command: str) -> RunFolder:
    """The run's folder: ``--out``, else ``runs/<algorithm>-<task>-seed<seed>`` or, when that
    holds an earlier run or a live one (and neither --resume nor --overwrite is given), the
    first free ``...-2``, ``-3``, ..."""
    if args.out is not None:
        return _open_folder(Path(args.out), args.resume, args.overwrite, command)
    base = Path("runs", f"{args.algorithm}-{args.task}-seed{args.seed}")
    if args.resume or args.overwrite:
        return _open_folder(base, args.resume, args.overwrite, command)
    reason = ""
    for n in itertools.count(1):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            folder = _open_folder(path, False, False, command)
        except _Taken as taken:
            reason = reason or taken.reason
            continue
        if n > 1 and not args.quiet:
            sys.stderr.write(
                f"{PROG}: {base} {reason}; this run writes to {path} (--out chooses the folder; "
                f"--resume or --overwrite use {base})\n"
            )
        return folder
    raise AssertionError("unreachable")


def _share_folder(args: argparse.Namespace, command: str, main_process: bool) -> RunFolder:
    """:func:`_claim` in the main process; under torchrun the others learn its folder, or its
    error, and raise that too."""
    folder: RunFolder | None = None
    error: RunError | None = None
    if main_process:
        try:
            folder = _claim(args, command)
        except RunError as e:
            error = e
    if distributed.world_size() > 1:
        shared: list[Any] = [None]
        if folder is not None:
            shared = [(str(folder.path), None)]
        elif error is not None:
            shared = [(None, (str(error), error.code))]
        torch.distributed.broadcast_object_list(shared, src=0)
        path, failure = shared[0]
        if not main_process:
            folder = RunFolder(Path(path)) if failure is None else None
            error = RunError(*failure) if failure is not None else None
    if error is not None:
        raise error
    assert folder is not None
    return folder


def _fingerprint(args: argparse.Namespace) -> dict[str, Any] | None:
    """Omniglot's PNG files by relative path and size (no file is read): what a resume checks."""
    if args.task != "omniglot":
        return None
    root = Path(args.data_path)
    try:
        files = sorted(
            (p.relative_to(root).as_posix(), p.stat().st_size)
            for p in root.rglob("*")
            if p.suffix.lower() == ".png" and p.is_file()
        )
    except OSError as e:
        raise RunError(f"--data-path {root}: cannot list the PNG files: {_why(e)}.") from None
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return {"png_files": len(files), "bytes": sum(size for _, size in files), "sha256": digest}


class _CtrlC:
    """While active, the first Ctrl-C (SIGINT) only sets ``pressed``: the training loop finishes
    its step, saves and stops. A second one interrupts at once. Only in the main thread of a
    single process (under torchrun the processes would not agree on the step)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.pressed = False
        self.previous: Any = None

    def __enter__(self) -> _CtrlC:
        # only over Python's own handler: not over one of the caller's, nor SIGINT ignored
        self.enabled &= signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.pressed = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)


def _resume_command(argv: Sequence[str], args: argparse.Namespace, out: Path) -> str:
    """The command that continues this run: its own flags, with --resume and its folder."""
    words = [w for w in argv if not (len(w) > 4 and "--overwrite".startswith(w))]
    if not args.resume:
        words.append("--resume")
    if args.out is None and out != Path("runs", f"{args.algorithm}-{args.task}-seed{args.seed}"):
        words += ["--out", str(out)]
    return f"{PROG} {shlex.join(words)}"


# ------------------------------------------------------------------------------ checkpoints
# what a checkpoint holds, by type: torch.load(weights_only=True) reads it (plain containers,
# tensors, numbers and strings), so that loading a checkpoint, which is user input, runs no code
_PAYLOAD: dict[str, Any] = {
    "args": dict, "step": int, "strategy": str, "meta": list, "outer": dict,
    "generator": torch.Tensor, "torch_rng": torch.Tensor, "learner": (list, type(None)),
    "history": dict, "seconds": float, "smooth": (float, type(None)),
    "before": (dict, type(None)), "data": (dict, type(None)), "skipped": list,
}  # fmt: skip
_DAMAGED = "Restore it from a copy, or start again with --overwrite (which deletes it)."


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """``path``'s payload, or a RunError that names the file and the problem."""
    try:
        # on the CPU: RNG states must stay there; parameters and Adam's state are copied over
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever a damaged file makes torch.load raise
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            why = "it holds objects other than tensors and plain containers; loading those "
            why += "could run code"
        else:
            why = f"{type(e).__name__}: {_why(e)}"
        raise RunError(
            f"--resume: {path} cannot be read ({why}). It is damaged, or it is not a checkpoint "
            f"of {PROG}. {_DAMAGED}"
        ) from None
    if (
        not isinstance(payload, dict)
        or payload.get("format") != _FORMAT
        or not all(isinstance(payload.get(key), kind) for key, kind in _PAYLOAD.items())
    ):
        raise RunError(
            f"--resume: {path} is not a checkpoint of {PROG} (of this version: format "
            f"{_FORMAT!r}). {_DAMAGED}"
        )
    return payload


def _check_resume(args: argparse.Namespace, resumed: dict[str, Any]) -> None:
    """Refuses a resume whose flags would make another run than the checkpoint's."""
    saved, config = resumed["args"], _config(args)
    for key in _RESUME_KEYS:
        if saved.get(key) != config.get(key):
            raise RunError(
                f"--resume: the checkpoint was made with {_flag(key, saved.get(key))}, this run "
                f"asks for {_flag(key, config.get(key))}. Resume with the same settings, or "
                "start a new run in another --out.",
                2,
            )
    if args.strategy not in ("auto", resumed["strategy"]):
        raise RunError(
            f"--resume: the checkpoint was made with --strategy {resumed['strategy']}, this run "
            f"asks for --strategy {args.strategy}. Resume with --strategy "
            f"{resumed['strategy']} (or auto).",
            2,
        )
    if resumed["step"] > args.steps:
        raise RunError(
            f"--resume: the checkpoint is at step {resumed['step']}, past --steps {args.steps}. "
            f"Pass --steps {resumed['step']} or more.",
            2,
        )


def _check_data(args: argparse.Namespace, resumed: dict[str, Any], now: dict | None) -> None:
    if resumed["data"] == now:
        return

    def files(fingerprint: dict | None) -> str:
        if not fingerprint:
            return "no data files"
        return f"{fingerprint['png_files']} PNG files, {fingerprint['bytes']} bytes"

    raise RunError(
        f"--resume: --data-path {args.data_path} holds other data than the checkpoint's: "
        f"{files(now)} now, {files(resumed['data'])} in {resumed['args'].get('data_path')} when "
        "the run started (file names and sizes are compared). Resume on the data it started "
        "with.",
        2,
    )


def _restore(path: Path, resumed: dict[str, Any], leaves, outer, generator) -> None:
    """Copies a checkpoint's meta-parameters, Adam state and RNG states into the run's."""
    try:
        meta = resumed["meta"]
        if len(meta) != len(leaves) or not all(
            isinstance(v, torch.Tensor) and v.shape == leaf.shape for v, leaf in zip(meta, leaves)
        ):
            raise ValueError("its meta-parameters do not fit the model")
        with torch.no_grad():
            for leaf, value in zip(leaves, meta):
                leaf.copy_(value)
        outer.load_state_dict(resumed["outer"])
        generator.set_state(resumed["generator"])
        torch.set_rng_state(resumed["torch_rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise RunError(
            f"--resume: {path} does not fit this run ({_why(e)}). It is damaged, or it is not "
            f"a checkpoint of {PROG}. {_DAMAGED}"
        ) from None


def _choose_strategy(args, fm, model, tasks, device) -> str:
    if args.strategy != "auto":
        return args.strategy
    if device.type != "cpu" or args.compile:  # a compiled loop would unroll every task
        return "vmap"
    probe = _learner(args, fm, model, tasks.loss, "auto")
    meta = probe.init()
    generator = torch.Generator().manual_seed(10**6 + args.seed)
    rng = torch.get_rng_state()
    share = -(-args.meta_batch // distributed.world_size())  # the largest share of a process
    for _ in range(6):  # vmap_tasks(strategy="auto") times loop and vmap three times each
        episode = tasks.sample("train", share, generator, device)
        probe.meta_grad(meta, episode.support, episode.query)
    torch.set_rng_state(rng)
    chosen = [m.strategy for m in probe._maps.values() if getattr(m, "strategy", None)]
    return chosen[0] if chosen else "vmap"


def _nonfinite(step: int, loss: float, finite: list, grads, episode, args, in_a_row: int) -> str:
    """What went non-finite at ``step`` and the likely cause (the data is checked only now)."""
    what = [f"the meta-loss is {loss}"] if not math.isfinite(loss) else []
    bad = ["/".join(map(str, p)) for p, ok in zip(optree.tree_paths(grads), finite) if not ok]
    if bad:
        more = " and more" if len(bad) > 3 else ""
        what.append(f"the meta-gradient of {', '.join(bad[:3])}{more} is not finite")
    text = " and ".join(what)
    if in_a_row >= _MAX_SKIPS:
        text = f"{in_a_row} meta-steps in a row had a non-finite meta-loss or gradient ({text})"
    tensors = [t for t in (*episode.support, *episode.query) if t.is_floating_point()]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        where = f" in --data-path {args.data_path}" if args.task == "omniglot" else ""
        cause = f"the meta-batch's data holds NaN or infinity; check the data{where}."
    else:
        cause = (
            f"the learning rates are too high (--inner-lr {args.inner_lr}, --outer-lr "
            f"{args.outer_lr}). Lower --outer-lr or --inner-lr and start again with --overwrite."
        )
    if args.on_nonfinite == "stop":
        cause += " Or pass --on-nonfinite skip to skip such steps."
    return f"step {step}: {text}. Likely cause: {cause}"


# -------------------------------------------------------------------------------------- run
def _launched_processes() -> int:
    """How many processes ``torchrun`` started (its WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed(args: argparse.Namespace) -> torch.device:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA);
    each CUDA process takes the device of its LOCAL_RANK."""
    device = torch.device(args.device)
    if _launched_processes() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not distributed.is_initialized():  # a caller may have made the group already
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Runs ``args`` (parsed from ``argv``, which the lock's owner file and the resume command
    repeat): folder, data, model, snapshot or fresh start, training loop, report."""
    device = _init_distributed(args)
    main_process = distributed.rank() == 0
    folder = _share_folder(args, f"{PROG} {shlex.join(argv)}", main_process)
    try:
        return _run(args, argv, device, folder, main_process)
    except KeyboardInterrupt:  # a second Ctrl-C, one outside the training loop, or torchrun
        again = folder.saved is not None
        resume = f" Resume with: {_resume_command(argv, args, folder.path)}" if again else ""
        raise RunError(f"interrupted. {folder.kept()}{resume}", 130) from None
    finally:
        folder.close()


def _run(args, argv, device: torch.device, folder: RunFolder, main_process: bool) -> dict:
    out = folder.path
    resumed = None
    if args.resume:  # the flags first: a refused resume loads no data
        resumed = _load_checkpoint(folder.checkpoint)
        _check_resume(args, resumed)
        folder.saved = resumed["step"]
    torch.manual_seed(args.seed)
    tasks = Tasks(args)
    fingerprint = _fingerprint(args)
    if resumed is not None:
        _check_data(args, resumed, fingerprint)
    warp = args.algorithm == "warpgrad"
    if args.task == "sinusoid":
        model: nn.Module = _mlp(warp)
    else:
        model = ConvNet(args.ways, args.hidden, warp=warp)
    model = model.to(device)
    fm = metafunc.functionalize(model)
    if resumed is not None:
        strategy = resumed["strategy"]
    elif distributed.world_size() == 1:
        strategy = _choose_strategy(args, fm, model, tasks, device)
    else:  # rank 0 times one process's share alone; every process runs its pick
        chosen = [_choose_strategy(args, fm, model, tasks, device) if main_process else None]
        torch.distributed.broadcast_object_list(chosen, src=0)
        strategy = chosen[0]
    learner = _learner(args, fm, model, tasks.loss, strategy)
    if args.compile:
        # compiled on first use; MAML++'s annealed step weights are a tensor input, no recompiles
        learner.meta_grad = torch.compile(learner.meta_grad, backend=args.compile)
    meta = learner.init()
    leaves = optree.tree_leaves(meta)
    outer = torch.optim.Adam(leaves, lr=args.outer_lr)
    generator = torch.Generator().manual_seed(args.seed)
    history: dict[str, list] = {"step": [], "meta_loss": [], "val_step": [], "val_loss": []}
    if args.task != "sinusoid":
        history["val_accuracy"] = []
    start, seconds, smooth, skipped = 0, 0.0, None, []
    before = None
    if resumed is not None:
        _restore(folder.checkpoint, resumed, leaves, outer, generator)
        if hasattr(learner, "load_state_dict"):  # WarpGrad: one replay buffer per process
            states = resumed["learner"] or []
            if len(states) != distributed.world_size():
                raise RunError(
                    f"--resume: the checkpoint holds {len(states)} per-process "
                    f"{args.algorithm} states (replay buffers), this run has "
                    f"{distributed.world_size()} processes. Resume with the same number of "
                    "processes.",
                    2,
                )
            learner.load_state_dict(states[distributed.rank()])
        history, start, seconds = resumed["history"], resumed["step"], resumed["seconds"]
        smooth, skipped, before = resumed["smooth"], resumed["skipped"], resumed["before"]
    if start == 0:
        before = _evaluate(learner, meta, tasks, "test", args.eval_tasks, _TEST_SEED, device, 100)
        _summaries(before, "before meta-training" if main_process else None)
    progress = Progress(args.steps, start, enabled=not args.quiet and main_process)
    t0 = time.perf_counter()

    def checkpoint(step: int) -> None:
        # one host sync per checkpoint: parameters are never saved non-finite
        if not torch.stack([torch.isfinite(leaf).all() for leaf in leaves]).all():
            raise RunError(
                f"step {step}: the meta-parameters are not finite, so they were not saved. "
                f"Lower --outer-lr ({args.outer_lr}) and start again. {folder.kept()}"
            )
        states = None
        if hasattr(learner, "state_dict"):  # per-process state (WarpGrad's replay buffer)
            state = learner.state_dict()
            states = [state]
            if distributed.world_size() > 1:
                states = [None] * distributed.world_size()
                torch.distributed.all_gather_object(states, state)
        if main_process:  # one writer; the others hold the same parameters
            payload = {
                "format": _FORMAT,
                "args": _config(args),
                "step": step,
                "strategy": strategy,
                "meta": [leaf.detach().clone() for leaf in leaves],
                "outer": outer.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "learner": states,
                "history": history,
                "seconds": seconds + time.perf_counter() - t0,
                "smooth": smooth,
                "before": before,
                "data": fingerprint,
                "skipped": skipped,
            }
            try:
                with _replacing(folder.checkpoint) as tmp:
                    torch.save(payload, tmp)
            except (OSError, RuntimeError) as e:  # RuntimeError: torch's zip writer, disk full
                raise RunError(
                    f"step {step}: cannot save {folder.checkpoint}: {_why(e)}. Is the disk full? "
                    f"{folder.kept()}"
                ) from None
        folder.saved = step

    in_a_row = 0  # non-finite steps skipped just before this one (resumes continue the count)
    while start - in_a_row in skipped:
        in_a_row += 1
    val_text = ""
    with _CtrlC(enabled=distributed.world_size() == 1) as ctrl_c:
        try:
            for step in range(start + 1, args.steps + 1):
                if args.algorithm == "mamlpp":  # anneal the multi-step loss over the first 25 %
                    learner.step_weights = _msl_weights(
                        args.inner_steps, step / (0.25 * args.steps)
                    )
                episode = tasks.sample("train", args.meta_batch, generator, device)
                # one process: learner.meta_grad; under torchrun each process takes its share
                # of the tasks and the task-weighted mean is all-reduced (metafunc.distributed)
                grads, metrics = distributed.meta_grad(
                    learner, meta, episode.support, episode.query
                )
                grad_leaves = optree.tree_leaves(grads)
                # the step's one host sync: the mean meta-loss and each gradient's largest
                # |entry|, NaN or inf when an entry is not finite (one fused kernel over all
                # leaves, where isfinite(g).all() would take two per leaf)
                peaks = torch._foreach_norm(grad_leaves, math.inf)
                loss, *peak = torch.stack([metrics["loss"].detach().mean(), *peaks]).tolist()
                finite = [math.isfinite(p) for p in peak]
                if math.isfinite(loss) and all(finite):
                    for leaf, g in zip(leaves, grad_leaves):
                        leaf.grad = g
                    outer.step()
                    smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
                    in_a_row = 0
                else:  # the step is not applied
                    in_a_row += 1
                    if args.on_nonfinite == "stop" or in_a_row >= _MAX_SKIPS:
                        message = _nonfinite(step, loss, finite, grads, episode, args, in_a_row)
                        raise RunError(f"{message} {folder.kept()}")
                    skipped.append(step)
                history["step"].append(step)
                history["meta_loss"].append(smooth)
                if step % args.eval_every == 0 or step == args.steps:
                    val_text = _validate(learner, meta, tasks, args, device, step, history)
                if step % args.checkpoint_every == 0 or step == args.steps:
                    checkpoint(step)
                shown = "-" if smooth is None else f"{smooth:.3f}"
                progress.update(step, f"meta-loss {shown} {val_text}")
                if ctrl_c.pressed:
                    if folder.saved != step:
                        checkpoint(step)
                    raise RunError(
                        f"interrupted after step {step}; saved {folder.checkpoint} (step {step})."
                        f" Resume with: {_resume_command(argv, args, out)}",
                        130,
                    )
        finally:
            progress.close()
    seconds += time.perf_counter() - t0
    final = _evaluate(learner, meta, tasks, "test", args.eval_tasks, _TEST_SEED, device, 100)
    results: dict[str, Any] = {
        "algorithm": args.algorithm,
        "task": args.task,
        "config": _config(args),
        "strategy": strategy,
        "device": str(device),
        "processes": distributed.world_size(),
        "versions": {
            "metafunc": metafunc.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "meta_steps": args.steps,
        "train_seconds": seconds,
        "skipped_steps": skipped,
        "test_before": _summaries(before or {}, None),
        "test_after": _summaries(final, "after meta-training" if main_process else None),
        "history": history,
    }
    if not main_process:
        return results
    path = out / "results.json"
    try:
        with _replacing(path) as tmp:
            tmp.write_text(json.dumps(results, indent=1, allow_nan=False))
        path = out / "training.png"
        title = f"{args.algorithm} on {args.task}"
        plotted = not args.no_plot and _plot(path, history, learner, meta, tasks, device, title)
    except OSError as e:
        raise RunError(
            f"cannot write {path}: {_why(e)}. Is the disk full? {folder.kept()} Once there is "
            "room, run again with --resume: it evaluates and writes the results again."
        ) from None
    if not args.quiet:
        _print_table(results, out, plotted)
    return results


def _validate(learner, meta, tasks, args, device, step: int, history: dict) -> str:
    """Post-adaptation loss (and accuracy) on the val tasks into ``history``; null when not
    finite, with a warning. Returns the progress bar's text."""
    val = _evaluate(learner, meta, tasks, "val", args.val_tasks, _VAL_SEED, device, 100)
    loss = val["loss"].mean().item()
    accuracy = val["accuracy"].mean().item() if "accuracy" in val else None
    if not math.isfinite(loss):
        if distributed.rank() == 0:
            bad = int((~torch.isfinite(val["loss"])).sum())
            _warn(
                f"step {step}: the validation loss is not finite on {bad} of "
                f"{val['loss'].numel()} tasks; results.json records null"
            )
        loss = accuracy = None
    history["val_step"].append(step)
    history["val_loss"].append(loss)
    if "accuracy" in val:
        history["val_accuracy"].append(accuracy)
    if loss is None:
        return "val loss not finite"
    return f"val loss {loss:.3f}" + (f" acc {accuracy:.3f}" if accuracy is not None else "")


def _flag(key: str, value: Any) -> str:
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return name if value else f"no {name}"
    return f"{name} {value}"


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's flags that apply to its algorithm and task (results.json, the checkpoint)."""
    return {
        key: value
        for key, value in vars(args).items()
        if key not in _SCOPED or getattr(args, _SCOPED[key][2]) in _SCOPED[key][1]
    }


# ----------------------------------------------------------------------------------- parser
def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    noun = "integer" if kind is int else "finite number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {text!r}") from None
        if not 0 < value < math.inf:  # also rejects nan
            raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


# defaults that depend on the task: (sinusoid, glyphs and omniglot)
_TASK_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "meta_batch": (25, 16),
    "shots": (10, 1),
    "queries": (10, 15),
    "inner_lr": (0.01, 0.4),
}
_INNER_STEPS = {a: 1 for a in ALGORITHMS} | {"reptile": 5, "leap": 5, "warpgrad": 5, "imaml": 10}
_MAML_FAMILY = ("maml", "fomaml", "metasgd", "anil", "mamlpp")
# flags that apply to some algorithms or tasks only: (default, the algorithms or tasks it applies
# to, "algorithm" or "task"); they default to None in the parser (a given flag that does not
# apply is an error), get these defaults in parse(), and only those that apply are recorded
_SCOPED: dict[str, tuple[Any, tuple[str, ...], str]] = {
    "first_order": (False, _MAML_FAMILY, "algorithm"),
    "lam": (2.0, ("imaml",), "algorithm"),
    "cg_steps": (5, ("imaml",), "algorithm"),
    "ways": (5, ("glyphs", "omniglot"), "task"),
    "hidden": (32, ("glyphs", "omniglot"), "task"),
    "classes": (300, ("glyphs",), "task"),
    "data_path": (None, ("omniglot",), "task"),
    "data_seed": (0, ("glyphs", "omniglot"), "task"),
}


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _shown(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "on" if value else "off"
    return str(value)


def _default_help(dest: str, default: Any) -> str:
    """``(default: ...)`` for ``dest``, spelled out per task or algorithm where it depends."""
    if dest in _TASK_DEFAULTS:
        sinusoid, images = _TASK_DEFAULTS[dest]
        return f"(default: {sinusoid} for sinusoid, {images} for glyphs and omniglot)"
    if dest == "inner_steps":
        groups: dict[int, list[str]] = {}
        for algorithm, steps in _INNER_STEPS.items():
            groups.setdefault(steps, []).append(algorithm)
        each = "; ".join(f"{steps} for {_and(names)}" for steps, names in groups.items())
        return f"(default: {each})"
    if dest in _SCOPED:
        value, scope, _ = _SCOPED[dest]
        if dest == "data_path":
            return f"({_and(scope)} only; no default: required there)"
        return f"({_and(scope)} only; default: {_shown(value)})"
    return f"(default: {_shown(default)})"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Meta-train an algorithm on a task family, evaluate it on held-out tasks, "
        "and write a checkpoint, results.json and a plot. Exit status: 0 done, 1 failed (the "
        "files, the data or the training), 2 a usage error, 130 interrupted (Ctrl-C saves the "
        "last step and prints the command that resumes it).",
    )

    def add(flag: str, text: str, default: Any = None, **kwargs: Any) -> None:
        dest = flag[2:].replace("-", "_")
        if kwargs.get("action") == "store_true" and dest not in _SCOPED:
            default = False
        shown = "runs/<algorithm>-<task>-seed<seed>" if dest == "out" else default
        kwargs.setdefault("default", default)
        p.add_argument(flag, help=f"{text} {_default_help(dest, shown)}".strip(), **kwargs)

    add("--algorithm", "", "maml", choices=ALGORITHMS)
    add("--task", "", "sinusoid", choices=TASKS)
    add("--steps", "meta-training steps", 10000, type=_positive(int))
    add("--meta-batch", "tasks per step", type=_positive(int))
    add("--inner-steps", "adaptation steps per task", type=_positive(int))
    add("--inner-lr", "adaptation learning rate", type=_positive(float))
    add("--outer-lr", "meta-learning rate (Adam)", 1e-3, type=_positive(float))
    add("--first-order", "first-order meta-gradient", action="store_true")
    add("--lam", "iMAML's proximal strength", type=_positive(float))
    add("--cg-steps", "iMAML's conjugate-gradient steps", type=_positive(int))
    add("--shots", "support examples (per class for images)", type=_positive(int))
    add("--queries", "query examples (per class for images)", type=_positive(int))
    add("--ways", "classes per episode", type=_positive(int))
    add("--hidden", "conv channels", type=_positive(int))
    add("--classes", "procedural glyph classes", type=_positive(int))
    add("--data-path", "Omniglot folder (nothing is downloaded)")
    add("--data-seed", "class split and glyph seed", type=int)
    add("--eval-every", "validate every this many steps", 500, type=_positive(int))
    add("--val-tasks", "validation tasks", 100, type=_positive(int))
    add("--eval-tasks", "held-out test tasks before and after meta-training", 600,
        type=_positive(int))  # fmt: skip
    add("--checkpoint-every", "save a checkpoint every this many steps", 500, type=_positive(int))
    add("--seed", "training seed", 0, type=int)
    add("--device", "cpu, cuda, cuda:1, ... (under torchrun: cuda:LOCAL_RANK)", "cpu")
    add("--strategy", "how tasks are batched; auto times both on the CPU", "auto",
        choices=("auto", "vmap", "loop"))  # fmt: skip
    add(
        "--compile",
        "run the meta-step through torch.compile (backend inductor unless named, e.g. "
        "aot_eager); with --strategy auto the tasks are vmapped",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
    )
    add(
        "--on-nonfinite",
        f"a non-finite meta-loss or meta-gradient stops the run (the last checkpoint is kept), "
        f"or the step is skipped (the run stops after {_MAX_SKIPS} in a row)",
        "stop",
        choices=("stop", "skip"),
    )
    add("--out", "output folder; without it, a folder that holds a run is never reused: the "
        "next free ...-2, -3, ... is taken")  # fmt: skip
    add("--resume", "continue from checkpoint.pt in --out (without --out: in "
        "runs/<algorithm>-<task>-seed<seed>)", action="store_true")  # fmt: skip
    add("--overwrite", "delete the run in --out (its checkpoint, results and plot) and start "
        "anew", action="store_true")  # fmt: skip
    add("--no-plot", "do not write training.png", action="store_true")
    add("--quiet", "print nothing but errors and warnings", action="store_true")
    return p


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    for name, (default, scope, kind) in _SCOPED.items():
        value = getattr(args, name)
        if value is None:
            setattr(args, name, default)
        elif getattr(args, kind) not in scope:
            flag = "--" + name.replace("_", "-")
            p.error(
                f"{flag} applies to --{kind} {' / '.join(scope)}, not {getattr(args, kind)}; "
                "drop it"
            )
    family = 0 if args.task == "sinusoid" else 1
    for name, values in _TASK_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[family])
    if args.inner_steps is None:
        args.inner_steps = _INNER_STEPS[args.algorithm]
    if args.resume and args.overwrite:
        p.error(
            "--resume and --overwrite contradict each other: --resume continues the run in "
            "--out, --overwrite deletes it; pass one"
        )
    try:
        torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a device torch knows; use cpu, cuda or cuda:1, ...")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.eval_tasks < 2:
        p.error("--eval-tasks must be at least 2, for a 95 % confidence interval")
    processes = _launched_processes()
    if args.meta_batch < processes:
        p.error(
            f"--meta-batch {args.meta_batch} is smaller than the {processes} torchrun processes "
            f"(each takes at least one task); pass --meta-batch {processes} or more"
        )
    if args.compile is not None:
        from torch._dynamo import list_backends

        if args.compile not in list_backends(exclude_tags=()):
            p.error(
                f"--compile {args.compile}: not a torch.compile backend; use one of "
                f"{', '.join(list_backends())} or aot_eager"
            )
    if args.task != "sinusoid" and args.ways < 2:
        p.error("--ways must be at least 2 for classification")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m metafunc train``: a :class:`RunError` is printed on stderr as
    ``python -m metafunc train: <message>`` and exits with its code (no traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    joins = _launched_processes() > 1 and not distributed.is_initialized()
    try:
        return run(args, argv)
    except RunError as error:
        if distributed.rank() == 0:  # under torchrun every process stops; one says why
            sys.stderr.write(f"{PROG}: {error}\n")
        raise _Exit(error) from None
    finally:
        if joins and distributed.is_initialized():  # the group run() made; nccl wants it closed
            torch.distributed.destroy_process_group()
