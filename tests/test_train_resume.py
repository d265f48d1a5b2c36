"""Exact resume of ``python -m metafunc train``: ``--resume`` continues bitwise as if uninterrupted.

A run interrupted at a step and resumed ends with the same parameters, optimizer state, history and
results as the same run made whole, for each algorithm and strategy; a resume with other settings
or without a checkpoint is refused.

Runs are tiny (a few meta-steps, a handful of tasks, 8 conv channels) and write to ``tmp_path``.
"""

from __future__ import annotations

import pytest
import torch
from _train_helpers import FAST, LEAVES, QUIET, _load, _run, _same

from metafunc import _train


def _interrupt_at(monkeypatch, step: int) -> None:
    """Make the run stop right after step ``step``'s checkpoint, as Ctrl-C would."""
    update = _train.Progress.update

    def interrupted(self, at, text):
        update(self, at, text)
        if at == step and self.label is None:  # the training's progress, not an evaluation's
            raise KeyboardInterrupt

    monkeypatch.setattr(_train.Progress, "update", interrupted)


@pytest.mark.parametrize(
    ("algorithm", "strategy", "how", "extra"),
    [
        ("maml", "vmap", "extend", []),
        ("maml", "loop", "extend", []),
        ("warpgrad", "vmap", "extend", []),  # the replay buffer and its generator resume too
        ("mamlpp", "vmap", "interrupt", ["--inner-steps", "2"]),  # a two-step multi-step loss
    ],
)
def test_resume_is_bitwise_exact(algorithm, strategy, how, extra, tmp_path, monkeypatch):
    n, m = (2, 1) if how == "extend" else (4, 2)
    flags = [*FAST, *QUIET, "--algorithm", algorithm, "--strategy", strategy, *extra]
    flags += ["--eval-every", "1"]
    whole = _run(tmp_path / "whole", *flags, "--steps", str(n))
    if how == "extend":  # M steps, then --resume to N
        _run(tmp_path / "parts", *flags, "--steps", str(m))
    else:  # N steps asked for, interrupted after step M's checkpoint
        flags += ["--checkpoint-every", str(m)]
        with monkeypatch.context() as patch:
            _interrupt_at(patch, m)
            with pytest.raises(SystemExit) as info:
                _run(tmp_path / "parts", *flags, "--steps", str(n))
        assert info.value.code == 130
        assert f"interrupted. {tmp_path / 'parts' / 'checkpoint.pt'} (step {m}) is kept." in str(
            info.value
        )
    assert torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)["step"] == m
    resumed = _run(tmp_path / "parts", *flags, "--steps", str(n), "--resume")

    a, b = _load(tmp_path / "whole")[1], _load(tmp_path / "parts")[1]
    assert b["step"] == n and len(a["meta"]) == len(b["meta"]) == LEAVES[algorithm]
    assert _same(a["meta"], b["meta"])
    assert _same(a["outer"], b["outer"]) and _same(a["generator"], b["generator"])
    assert _same(a["learner"], b["learner"])
    assert resumed["history"] == whole["history"]
    assert resumed["test_before"] == whole["test_before"]
    assert resumed["test_after"] == whole["test_after"]
    assert resumed["strategy"] == whole["strategy"] == strategy


def test_resume_refuses_other_settings_and_a_missing_checkpoint(tmp_path):
    flags = [*FAST, *QUIET]
    with pytest.raises(SystemExit) as info:
        _run(tmp_path, *flags, "--steps", "3", "--resume")
    message = str(info.value)
    assert f"--resume: no checkpoint at {tmp_path / 'checkpoint.pt'}" in message
    assert "Run without --resume first" in message

    _run(tmp_path, *flags, "--steps", "2")
    for other, made, asked in [
        (["--seed", "1"], "--seed 0", "--seed 1"),
        (["--outer-lr", "0.01"], "--outer-lr 0.001", "--outer-lr 0.01"),
        (["--inner-lr", "0.02"], "--inner-lr 0.01", "--inner-lr 0.02"),
        (["--first-order"], "no --first-order", "--first-order"),
        (["--algorithm", "fomaml"], "--algorithm maml", "--algorithm fomaml"),
        (["--eval-tasks", "8"], "--eval-tasks 6", "--eval-tasks 8"),
        (["--inner-steps", "2"], "--inner-steps 1", "--inner-steps 2"),
    ]:
        with pytest.raises(SystemExit) as info:
            _run(tmp_path, *flags, "--steps", "3", "--resume", *other)
        message = str(info.value)
        assert f"the checkpoint was made with {made}, this run asks for {asked}." in message
        assert "Resume with the same settings" in message
    with pytest.raises(SystemExit) as info:
        _run(tmp_path, *flags, "--strategy", "loop", "--steps", "3", "--resume")
    assert "--strategy vmap, this run asks for --strategy loop" in str(info.value)
    with pytest.raises(SystemExit) as info:
        _run(tmp_path, *flags, "--steps", "1", "--resume")
    assert "the checkpoint is at step 2, past --steps 1. Pass --steps 2 or more" in str(info.value)
    # refused resumes leave the checkpoint alone: the matching one still goes on
    resumed = _run(tmp_path, *flags, "--strategy", "auto", "--steps", "3", "--resume")
    assert resumed["history"]["step"] == [1, 2, 3] and resumed["strategy"] == "vmap"
