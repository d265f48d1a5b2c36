"""The run folder (``--out``): made, checked writable, locked against a second live run, never
overwritten without ``--overwrite``; the next free ``-N`` folder by default; files replaced
atomically."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import filelock
import torch

from .. import distributed
from ._errors import PROG, RunError, _Taken, _why

# the files of a run in --out (what --overwrite deletes), and the lock held while a run lives
RUN_FILES = ("checkpoint.pt", "results.json", "training.png", "metrics.csv", "config.toml")
TENSORBOARD_DIR = "tensorboard"  # --tensorboard's event files: a run's too
_LOCK, _OWNER = ".run.lock", ".run.lock.json"


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
        present = [name for name in (*RUN_FILES, TENSORBOARD_DIR) if (path / name).exists()]
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
                if stale.is_dir():  # the tensorboard folder
                    shutil.rmtree(stale)
                else:
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
