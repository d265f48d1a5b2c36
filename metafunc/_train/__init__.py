"""``python -m metafunc train``: meta-train, evaluate, checkpoint and report an algorithm on a task.

Every run writes to ``--out`` (default ``runs/<algorithm>-<task>-seed<seed>``, or the next free
``...-2``, ``-3``, ... when that holds an earlier run): ``checkpoint.pt`` (resumable exactly with
``--resume``), ``results.json``, ``metrics.csv`` (a row per step), ``config.toml`` (the resolved
flags, which ``--config`` repeats), ``training.png`` (with matplotlib) and, with
``--tensorboard``, event files in ``tensorboard/``. A run holds its folder for its life (a lock
that the OS releases when the process dies), never overwrites another run unless told to
(``--overwrite``), stops at the first non-finite meta-loss or meta-gradient without saving it,
and on Ctrl-C saves the last completed step and prints how to resume. A failure is a
:class:`RunError`: ``main`` prints it as ``python -m metafunc train: <message>`` and exits with
its code (2: the command line asks for what cannot be done; 1: the files, the data or the
training failed; 130: interrupted).

The files, one job each: ``_cli`` (flags, defaults, help, ``parse``), ``_config`` (``--config``
files and ``config.toml``), ``_models`` (the model, from :mod:`metafunc.models`), ``_tasks`` (the
task splits and their episode transforms),
``_learners`` (the learner and ``--strategy auto``), ``_folder`` (the run folder and its lock),
``_snapshot`` (checkpoint files), ``_loop`` (``run``: the training loop and evaluation),
``_metrics`` (``metrics.csv``, TensorBoard), ``_report`` (tqdm progress, summaries,
results.json, plot, table) and ``_errors`` (:class:`RunError`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from .. import distributed
from ._cli import (
    ALGORITHMS,
    BACKBONES,
    HEAD_ALGORITHMS,
    TASKS,
    _launched_processes,
    parse,
    parser,
)
from ._errors import PROG, RunError, _Exit
from ._loop import run
from ._report import Progress, _summary
from ._tasks import Tasks

__all__ = [
    "ALGORITHMS",
    "BACKBONES",
    "HEAD_ALGORITHMS",
    "PROG",
    "TASKS",
    "Progress",
    "RunError",
    "Tasks",
    "_summary",
    "main",
    "parse",
    "parser",
    "run",
]


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
