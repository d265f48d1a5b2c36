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
from typing import Any, NamedTuple

import torch

from ._config import with_file
from ._errors import PROG

GRADIENT_ALGORITHMS = (
    "maml", "fomaml", "metasgd", "anil", "mamlpp", "reptile", "imaml", "leap", "warpgrad",
)  # fmt: skip
HEAD_ALGORITHMS = ("protonet", "r2d2", "metaoptnet")  # a head fitted per task, no inner loop
ALGORITHMS = GRADIENT_ALGORITHMS + HEAD_ALGORITHMS
FILE_TASKS = ("miniimagenet", "tieredimagenet", "cifarfs", "fc100")  # read from --data-path
IMAGE_TASKS = ("glyphs", "omniglot", *FILE_TASKS)
TASKS = ("sinusoid", *IMAGE_TASKS)
BACKBONES = ("conv4", "resnet12", "wrn28_10")
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


# defaults that depend on the task, by group: sinusoid, characters (glyphs and omniglot) and
# natural images (FILE_TASKS; MAML's miniImageNet settings)
_GROUPS = (("sinusoid",), ("glyphs", "omniglot"), FILE_TASKS)
_TASK_DEFAULTS: dict[str, tuple[Any, Any, Any]] = {
    "meta_batch": (25, 16, 4),
    "shots": (10, 1, 1),
    "queries": (10, 15, 15),
    "inner_lr": (0.01, 0.4, 0.01),
}
_INNER_STEPS = {a: 1 for a in GRADIENT_ALGORITHMS} | {
    "reptile": 5, "leap": 5, "warpgrad": 5, "imaml": 10,
}  # fmt: skip
_MAML_FAMILY = ("maml", "fomaml", "metasgd", "anil", "mamlpp")


class _Per(NamedTuple):
    """A default that depends on a flag resolved before (``dest``): ``table[<its value>]``."""

    dest: str
    table: dict[str, Any]


_HIDDEN = {"conv4": 32, "resnet12": 64, "wrn28_10": 10}  # MAML's, MetaOptNet's, WRN-28-10's
_IMAGE_SIZE = {"miniimagenet": 84, "tieredimagenet": 84, "cifarfs": 32, "fc100": 32}  # stored
# flags that apply to some algorithms or tasks only: (default, the algorithms or tasks it applies
# to, "algorithm" or "task"); they default to None in the parser (a given flag that does not
# apply is an error), get these defaults in parse() (None: from _TASK_DEFAULTS or _INNER_STEPS
# or none; a _Per: from a flag above it), and only those that apply are recorded
_SCOPED: dict[str, tuple[Any, tuple[str, ...], str]] = {
    "inner_steps": (None, GRADIENT_ALGORITHMS, "algorithm"),
    "inner_lr": (None, GRADIENT_ALGORITHMS, "algorithm"),
    "first_order": (False, _MAML_FAMILY, "algorithm"),
    "lam": (2.0, ("imaml",), "algorithm"),
    "cg_steps": (5, ("imaml",), "algorithm"),
    "ways": (5, IMAGE_TASKS, "task"),
    "backbone": ("conv4", IMAGE_TASKS, "task"),
    "hidden": (_Per("backbone", _HIDDEN), IMAGE_TASKS, "task"),
    "image_size": (_Per("task", _IMAGE_SIZE), FILE_TASKS, "task"),
    "augment": (False, FILE_TASKS, "task"),
    "classes": (300, ("glyphs",), "task"),
    "data_path": (None, ("omniglot", *FILE_TASKS), "task"),
    "data_seed": (0, ("glyphs", "omniglot"), "task"),
}
# the smallest --image-size of the backbones that halve the image four times
_MIN_IMAGE_SIZE = 16


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _shown(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "on" if value else "off"
    return str(value)


def _scope(dest: str) -> str:
    """Where a scoped flag applies: ``imaml only``, ``not protonet, r2d2 or metaoptnet``."""
    _, scope, kind = _SCOPED[dest]
    every = ALGORITHMS if kind == "algorithm" else TASKS
    others = [name for name in every if name not in scope]
    if len(others) < len(scope) - 1:
        return f"not {_and(others).replace(' and ', ' or ')}"
    return f"{_and(scope)} only"


def _grouped(table: dict[str, Any]) -> str:
    """``{name: value}`` as ``v1 for a, b and c; v2 for d``: names grouped by value."""
    groups: dict[Any, list[str]] = {}
    for name, value in table.items():
        groups.setdefault(value, []).append(name)
    return "; ".join(f"{_shown(value)} for {_and(names)}" for value, names in groups.items())


def _default_help(dest: str, default: Any) -> str:
    """``(default: ...)`` for ``dest``, spelled out per task or algorithm where it depends."""
    where = f"{_scope(dest)}; " if dest in _SCOPED else ""
    if dest in _TASK_DEFAULTS:
        table = {t: v for v, group in zip(_TASK_DEFAULTS[dest], _GROUPS) for t in group}
        return f"({where}default: {_grouped(table)})"
    if dest == "inner_steps":
        return f"({where}default: {_grouped(_INNER_STEPS)})"
    if dest in _SCOPED:
        value = _SCOPED[dest][0]
        if dest == "data_path":
            return f"({where}no default: required there)"
        if isinstance(value, _Per):
            return f"({where}default: {_grouped(value.table)})"
        return f"({where}default: {_shown(value)})"
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
    add("--backbone", "the image model (metafunc.models): conv4 (WarpConv4, with warp layers for "
        "warpgrad), resnet12 or wrn28_10", choices=BACKBONES)  # fmt: skip
    add("--hidden", "the backbone's width: conv4's filters per block, resnet12's first block's "
        "channels (the others 2.5, 5 and 10 times as many), wrn28_10's widening factor",
        type=_positive(int))  # fmt: skip
    add("--image-size", "the side images are resized to (with antialiasing, per episode) "
        f"before the backbone; at least {_MIN_IMAGE_SIZE} for conv4 and resnet12",
        type=_positive(int))  # fmt: skip
    add("--augment", "augment the meta-training episodes as MetaOptNet does: a random crop of "
        "every image zero-padded by 8 pixels at 84x84 or 4 at 32x32 (in proportion at other "
        "sizes), and a random left-right flip",
        action="store_true")  # fmt: skip
    add("--classes", "procedural glyph classes", type=_positive(int))
    add("--data-path", "the dataset's folder (nothing is downloaded): Omniglot's "
        "images_background/ and images_evaluation/; miniImageNet's "
        "mini-imagenet-cache-<split>.pkl or images/ and <split>.csv; tieredImageNet's "
        "<split>_labels.pkl and <split>_images.npz; the cifar-100-python folder for cifarfs and "
        "fc100")  # fmt: skip
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
    for name, (default, scope, kind) in _SCOPED.items():  # in order: a _Per reads one above
        value = getattr(args, name)
        applies = getattr(args, kind) in scope
        if value is None:
            if isinstance(default, _Per):
                default = default.table[getattr(args, default.dest)] if applies else None
            setattr(args, name, default if applies else None)
        elif not applies:
            flag = "--" + name.replace("_", "-")
            p.error(
                f"{flag} applies to --{kind} {' / '.join(scope)}, not {getattr(args, kind)}; "
                "drop it"
            )
    group = next(i for i, tasks in enumerate(_GROUPS) if args.task in tasks)
    for name, values in _TASK_DEFAULTS.items():
        applies = name not in _SCOPED or getattr(args, _SCOPED[name][2]) in _SCOPED[name][1]
        if getattr(args, name) is None and applies:
            setattr(args, name, values[group])
    if args.inner_steps is None and args.algorithm in _INNER_STEPS:
        args.inner_steps = _INNER_STEPS[args.algorithm]
    _check_models(p, args)
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


def _check_models(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for an algorithm, a task and a backbone that do not go together."""
    if args.algorithm in HEAD_ALGORITHMS and args.task == "sinusoid":
        p.error(
            f"--algorithm {args.algorithm} fits a classifier head per task; use an image task "
            f"(--task {' / '.join(IMAGE_TASKS)}), not sinusoid regression"
        )
    if args.algorithm == "warpgrad" and args.backbone not in (None, "conv4"):
        p.error(
            f"--algorithm warpgrad needs --backbone conv4 (its warp layers are WarpConv4's), not "
            f"{args.backbone}; drop --backbone or pick another algorithm"
        )
    if args.image_size is not None and args.image_size < _MIN_IMAGE_SIZE:
        if args.backbone != "wrn28_10":  # conv4 and resnet12 halve the image four times
            p.error(
                f"--image-size {args.image_size}: --backbone {args.backbone} halves the image "
                f"four times; pass --image-size {_MIN_IMAGE_SIZE} or more"
            )


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
