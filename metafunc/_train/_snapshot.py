"""Checkpoint files (``checkpoint.pt``): what they hold, saving, loading with ``weights_only``,
the checks that a resume continues the same run on the same data, and restoring the run's state.

Not to be confused with :mod:`metafunc._remat`, which is gradient rematerialisation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from ._cli import FILE_TASKS, _config
from ._errors import PROG, RunError, _why
from ._folder import RunFolder, _replacing

# flags that a resumed run must share with its checkpoint (they decide the run or its test tasks;
# --data-path is checked by the data's fingerprint instead, so that moved data still resumes)
_RESUME_KEYS = (
    "algorithm", "task", "seed", "meta_batch", "inner_steps", "inner_lr", "outer_lr",
    "first_order", "lam", "cg_steps", "shots", "queries", "ways", "backbone", "hidden",
    "image_size", "augment", "classes", "data_seed", "eval_tasks",
)  # fmt: skip
# flags added since checkpoints were first written: the value an older checkpoint's run had
_BEFORE_THE_FLAG = {"backbone": "conv4"}
_FORMAT = "metafunc train checkpoint 1"


# what a checkpoint holds, by type: torch.load(weights_only=True) reads it (plain containers,
# tensors, numbers and strings), so that loading a checkpoint, which is user input, runs no code
_PAYLOAD: dict[str, Any] = {
    "args": dict, "step": int, "strategy": str, "meta": list, "outer": dict,
    "generator": torch.Tensor, "torch_rng": torch.Tensor, "learner": (list, type(None)),
    "history": dict, "seconds": float, "smooth": (float, type(None)),
    "before": (dict, type(None)), "data": (dict, type(None)), "skipped": list,
}  # fmt: skip
_DAMAGED = "Restore it from a copy, or start again with --overwrite (which deletes it)."


def _fingerprint(args: argparse.Namespace) -> dict[str, Any] | None:
    """The data files by relative path and size (no file is read): what a resume checks.
    Omniglot's PNG files; every file in the folder of the benchmarks."""
    if args.task != "omniglot" and args.task not in FILE_TASKS:
        return None
    root = Path(args.data_path)
    png = args.task == "omniglot"
    try:
        files = sorted(
            (p.relative_to(root).as_posix(), p.stat().st_size)
            for p in root.rglob("*")
            if (not png or p.suffix.lower() == ".png") and p.is_file()
        )
    except OSError as e:
        what = "PNG files" if png else "files"
        raise RunError(f"--data-path {root}: cannot list the {what}: {_why(e)}.") from None
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    count = "png_files" if png else "files"
    return {count: len(files), "bytes": sum(size for _, size in files), "sha256": digest}


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
        before = saved.get(key)
        if key not in saved and key in _BEFORE_THE_FLAG and config.get(key) is not None:
            before = _BEFORE_THE_FLAG[key]
        if before != config.get(key):
            raise RunError(
                f"--resume: the checkpoint was made with {_flag(key, before)}, this run "
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
        if "png_files" in fingerprint:
            return f"{fingerprint['png_files']} PNG files, {fingerprint['bytes']} bytes"
        return f"{fingerprint['files']} files, {fingerprint['bytes']} bytes"

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


def _flag(key: str, value: Any) -> str:
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return name if value else f"no {name}"
    return f"{name} {value}"


def _save(folder: RunFolder, step: int, payload: dict[str, Any]) -> None:
    """Saves ``payload`` (what :data:`_PAYLOAD` lists), tagged with the format, as ``folder``'s
    checkpoint, atomically; a RunError that says what is kept when it cannot."""
    try:
        with _replacing(folder.checkpoint) as tmp:
            torch.save({"format": _FORMAT, **payload}, tmp)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch's zip writer, disk full
        raise RunError(
            f"step {step}: cannot save {folder.checkpoint}: {_why(e)}. Is the disk full? "
            f"{folder.kept()}"
        ) from None
