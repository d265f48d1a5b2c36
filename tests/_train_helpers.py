"""Flags and helpers shared by the ``test_train*.py`` files.

A short sinusoid run as a list of flags, the runner called in process, its results and
checkpoint loaded back, bitwise comparison of nested results, and the checks every run's
``results.json`` must pass.
"""

from __future__ import annotations

import json
import math
import pathlib

import optree
import torch

from metafunc import _train

PNG = b"\x89PNG\r\n\x1a\n"
KEYS = {
    "algorithm", "task", "config", "strategy", "device", "threads", "versions", "meta_steps",
    "train_seconds", "skipped_steps", "test_before", "test_after", "history",
}  # fmt: skip
# a short sinusoid run: 4 tasks a step, vmapped, 6 test tasks, 2 val tasks every 2 steps (a later
# --strategy or --eval-every overrides these)
FAST = ["--meta-batch", "4", "--eval-tasks", "6", "--val-tasks", "2", "--eval-every", "2"]
FAST += ["--strategy", "vmap"]
QUIET = ["--quiet", "--no-plot"]


# leaves of the meta-parameters for the sinusoid MLP (3 Linear layers; WarpGrad's has 5)
LEAVES = {"maml": 6, "fomaml": 6, "metasgd": 12, "anil": 6, "mamlpp": 12, "reptile": 6}
LEAVES |= {"imaml": 6, "leap": 6, "warpgrad": 10}


def _run(out: pathlib.Path, *flags: str) -> dict:
    return _train.main([*flags, "--out", str(out)])


def _load(out: pathlib.Path) -> tuple[dict, dict]:
    results = json.loads((out / "results.json").read_text())
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)  # no code in a checkpoint
    return results, checkpoint


def _finite(tree) -> bool:
    return all(math.isfinite(x) for x in optree.tree_leaves(tree) if isinstance(x, float))


def _same(a, b) -> bool:
    """Bitwise equality of nested dicts/lists/tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _check_results(results: dict, out: pathlib.Path, steps: int, n: int, metrics: set[str]):
    assert json.loads((out / "results.json").read_text()) == results
    assert KEYS <= results.keys()
    assert results["meta_steps"] == steps and results["strategy"] in ("vmap", "loop")
    assert results["device"] == "cpu" and results["versions"]["torch"] == torch.__version__
    for when in ("test_before", "test_after"):
        assert results[when].keys() == metrics
        for summary in results[when].values():
            assert summary.keys() == {"mean", "ci95", "n"} and summary["n"] == n
            assert summary["ci95"] >= 0  # a few tasks' accuracies can all be equal
        assert results[when]["loss"]["ci95"] > 0
    assert _finite(results)
    history = results["history"]
    assert history["step"] == list(range(1, steps + 1)) and len(history["meta_loss"]) == steps
    assert history["val_step"] and history["val_step"][-1] == steps
    if "accuracy" in metrics:
        assert len(history["val_accuracy"]) == len(history["val_step"])
        for when in ("test_before", "test_after"):
            assert 0 <= results[when]["accuracy"]["mean"] <= 1
        assert all(0 <= a <= 1 for a in history["val_accuracy"])
