"""The command line: the flags, their per-task and per-algorithm defaults and help, ``parse``,
the flags a run records (:func:`_config`) and the command that resumes a run."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ._config import with_file
from ._errors import PROG

ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "mamlpp", "reptile", "imaml", "leap", "warpgrad")
TASKS = ("sinusoid", "glyphs", "omniglot")
_MAX_SKIPS = 10  # --on-nonfinite skip: this many skipped steps in a row stop the run


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


# defaults that are not a value
_SHOWN = {
    "out": "runs/<algorithm>-<task>-seed<seed>",
    "config": "none",
    "threads": "chosen from the cores this process may use and the size of a meta-step: 1 for "
    "small models such as the sinusoid MLP, whose kernels are too small to share and stall on a "
    "busy machine",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Meta-train an algorithm on a task family, evaluate it on held-out tasks, "
        "and write a checkpoint, results.json, metrics.csv, config.toml and a plot. Exit "
        "status: 0 done, 1 failed (the "
        "files, the data or the training), 2 a usage error, 130 interrupted (Ctrl-C saves the "
        "last step and prints the command that resumes it).",
    )

    def add(flag: str, text: str, default: Any = None, **kwargs: Any) -> None:
        dest = flag[2:].replace("-", "_")
        if kwargs.get("action") == "store_true" and dest not in _SCOPED:
            default = False
        shown = _SHOWN.get(dest, default)
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
    add("--threads", "CPU threads for torch", type=_positive(int))
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
    add(
        "--tensorboard",
        "also write TensorBoard event files into <out>/tensorboard (needs the tensorboard "
        "package: pip install 'metafunc[tensorboard]')",
        action="store_true",
    )
    add(
        "--config",
        "a TOML file of flags (keys: the flags' names, with - or _); flags given here override "
        "it. A run writes its resolved flags to <out>/config.toml, which --config repeats",
        metavar="FILE",
    )
    return p


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser()
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(with_file(argv, p))  # the command line's flags override the file's
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
    largest = torch.finfo(torch.float32).max  # the runner's models are float32
    for name in ("inner_lr", "outer_lr", "lam"):
        value = getattr(args, name)
        if value is not None and value > largest:
            flag = "--" + name.replace("_", "-")
            p.error(f"{flag} {value:g} overflows float32 (the models' dtype); pass a smaller value")
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
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")  # imports the tensorboard package
        except ImportError:
            p.error(
                "--tensorboard needs the tensorboard package, which is not installed; install it "
                "with pip install 'metafunc[tensorboard]' (or pip install tensorboard), or drop "
                "--tensorboard"
            )
    return args


def _launched_processes() -> int:
    """How many processes ``torchrun`` started (its WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's flags that apply to its algorithm and task (results.json, the checkpoint)."""
    return {
        key: value
        for key, value in vars(args).items()
        if key not in _SCOPED or getattr(args, _SCOPED[key][2]) in _SCOPED[key][1]
    }


def _resume_command(argv: Sequence[str], args: argparse.Namespace, out: Path) -> str:
    """The command that continues this run: its own flags, with --resume and its folder."""
    words = [w for w in argv if not (len(w) > 4 and "--overwrite".startswith(w))]
    if not args.resume:
        words.append("--resume")
    if args.out is None and out != Path("runs", f"{args.algorithm}-{args.task}-seed{args.seed}"):
        words += ["--out", str(out)]
    return f"{PROG} {shlex.join(words)}"
