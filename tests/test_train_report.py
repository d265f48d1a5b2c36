"""What ``python -m metafunc train`` reports: learning, the 95 % CIs, plots, progress and table.

MAML meta-learns sinusoid; each CI is the normal interval of the per-task values; held-out tasks
are fixed and never trained on; the plot is a PNG (none with ``--no-plot``); progress lines, a bar
redrawn in place on a terminal, evaluation progress in chunks, the strategy trial and its decision,
the final table, and ``--quiet``.

Runs are tiny (a few meta-steps, a handful of tasks, 8 conv channels) and write to ``tmp_path``.
"""

from __future__ import annotations

import collections
import io
import json
import math
import re
import statistics
import sys

import numpy as np
import optree
import pytest
import torch
from _train_helpers import FAST, PNG, QUIET, _check_results, _load, _run, _same
from torch import nn

import metafunc
from metafunc import _train, algorithms

Z95 = 1.959963984540054


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """MAML on sinusoid, 300 steps of 10 tasks, recording what the runner evaluated."""
    out = tmp_path_factory.mktemp("maml-sinusoid")
    evaluated, episodes = [], []
    evaluate, sample = _train._loop._evaluate, _train.Tasks.sample

    def spy_evaluate(learner, meta, tasks, split, n, *rest, **options):
        values = evaluate(learner, meta, tasks, split, n, *rest, **options)
        evaluated.append((split, n, values))
        return values

    def spy_sample(self, split, n, *rest):
        episode = sample(self, split, n, *rest)
        episodes.append((split, episode))
        return episode

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_train._loop, "_evaluate", spy_evaluate)
        patch.setattr(_train.Tasks, "sample", spy_sample)
        results = _run(
            out, "--steps", "300", "--meta-batch", "10", "--eval-tasks", "50",
            "--val-tasks", "10", "--eval-every", "100", "--strategy", "vmap", "--quiet",
        )  # fmt: skip
    return out, results, evaluated, episodes


def test_maml_meta_learns_sinusoid(learned):
    """The README's main job: meta-training lowers the post-adaptation test loss."""
    out, results, _, _ = learned
    _check_results(results, out, steps=300, n=50, metrics={"loss"})
    before, after = results["test_before"]["loss"], results["test_after"]["loss"]
    assert after["mean"] < 0.8 * before["mean"]
    assert results["history"]["val_step"] == [100, 200, 300]
    assert results["history"]["meta_loss"][-1] < results["history"]["meta_loss"][0]


def test_ci95_is_the_normal_interval_of_the_per_task_values(learned):
    out, results, evaluated, episodes = learned
    finals = [values for split, n, values in evaluated if split == "test"]
    assert len(finals) == 2  # before and after meta-training
    for when, values in zip(("test_before", "test_after"), finals):
        loss = values["loss"].double().numpy()
        assert loss.shape == (50,) and loss.std() > 0
        summary = results[when]["loss"]
        assert summary["n"] == 50
        assert summary["mean"] == pytest.approx(loss.mean(), rel=1e-12)
        assert summary["ci95"] == pytest.approx(Z95 * loss.std(ddof=1) / math.sqrt(50), rel=1e-12)

    # independently: the final params from the checkpoint, a MAML of their own, the same tasks
    test = [e for split, e in episodes if split == "test" and e.support[0].shape[0] == 50]
    assert len(test) == 2 and _same(test[0].support, test[1].support)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU())
    learner = algorithms.MAML(
        metafunc.functionalize(nn.Sequential(*model, nn.Linear(40, 1))), "mse", inner_lr=0.01,
        steps=1, strategy="loop",
    )  # fmt: skip
    leaves = _load(out)[1]["meta"]
    meta = optree.tree_unflatten(optree.tree_structure(learner.init()), leaves)
    loss = learner.evaluate(meta, test[1].support, test[1].query)["loss"].double().numpy()
    after = results["test_after"]["loss"]
    assert after["mean"] == pytest.approx(loss.mean(), rel=1e-5)
    assert after["ci95"] == pytest.approx(Z95 * np.std(loss, ddof=1) / math.sqrt(50), rel=1e-5)


def test_summary_matches_statistics():
    values = torch.tensor([0.3, 1.25, 2.0, 0.5, 7.0])
    summary = _train._summary(values)
    exact = [float(v) for v in values.double()]
    assert summary["n"] == 5
    assert summary["mean"] == pytest.approx(statistics.fmean(exact), rel=1e-15)
    assert summary["ci95"] == pytest.approx(Z95 * statistics.stdev(exact) / math.sqrt(5), rel=1e-14)
    two = _train._summary(torch.tensor([1.0, 3.0]))
    assert two == {"mean": 2.0, "ci95": pytest.approx(Z95), "n": 2}  # std sqrt(2), n 2


def test_held_out_sinusoid_tasks_are_fixed_and_never_trained_on(tmp_path, monkeypatch):
    """Every seed meta-trains on its own tasks and is tested on the same held-out ones."""
    seen: dict[tuple[str, str], torch.Tensor] = {}
    sample = _train.Tasks.sample

    def spy(self, split, n, generator, device):
        episode = sample(self, split, n, generator, device)
        seen[seed, split] = episode.info["amplitude"]
        return episode

    monkeypatch.setattr(_train.Tasks, "sample", spy)
    flags = [*FAST, *QUIET, "--meta-batch", "6", "--val-tasks", "6"]
    for seed in ("0", "1", "2"):  # the same number of tasks everywhere: the same random draws
        _run(tmp_path / seed, *flags, "--seed", seed, "--steps", "1")
        train = seen[seed, "train"]
        for split in ("val", "test"):
            assert not torch.isin(train, seen[seed, split]).any()
        assert not torch.isin(seen[seed, "val"], seen[seed, "test"]).any()
    assert torch.equal(seen["0", "test"], seen["2", "test"])
    assert not torch.equal(seen["0", "train"], seen["2", "train"])


def test_plot_is_a_png_for_sinusoid_and_absent_with_no_plot(learned, tmp_path):
    out = learned[0]
    assert (out / "training.png").read_bytes()[:8] == PNG
    assert (out / "training.png").stat().st_size > 10_000  # two panels, not an empty figure
    _run(tmp_path, "--steps", "1", *FAST, *QUIET)
    assert not (tmp_path / "training.png").exists()


def test_progress_lines_and_final_table(tmp_path, capsys):
    _run(tmp_path, "--steps", "20", *FAST, "--no-plot", "--eval-every", "10")
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    before, lines, after = lines[:2], lines[2:-2], lines[-2:]
    assert before == [f"evaluating 6 test tasks (before meta-training): {k}/6" for k in (0, 6)]
    assert after == [f"evaluating 6 test tasks (after meta-training): {k}/6" for k in (0, 6)]
    assert 10 <= len(lines) <= 11 and all("meta-loss" in line for line in lines)  # one per 10 %
    assert lines[0].startswith("step 1/20 meta-loss ") and lines[-1].startswith("step 20/20 ")
    assert "val loss" in lines[-1]
    results = json.loads((tmp_path / "results.json").read_text())
    out = captured.out
    assert (
        "maml on sinusoid: 20 meta-steps in " in out and "(vmap over tasks, cpu, 1 thread)" in out
    )
    assert "post-adaptation on 6 held-out test tasks (mean +- 95 % CI):" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert rows[0] == ["metric", "before", "meta-training", "after"]
    before, after = results["test_before"]["loss"], results["test_after"]["loss"]
    expected = [f"{before['mean']:.4f}", "+-", f"{before['ci95']:.4f}"]
    assert rows[1] == ["loss", *expected, f"{after['mean']:.4f}", "+-", f"{after['ci95']:.4f}"]
    assert f"results: {tmp_path / 'results.json'}; checkpoint: " in out and "plot:" not in out


def test_progress_bar_redraws_in_place_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _run(tmp_path, "--steps", "3", *FAST, "--no-plot")
    before, text, after, end = terminal.getvalue().split("\n")
    assert text.startswith("\r[") and end == ""
    assert "] 3/3 meta-loss " in text and " it/s" in text
    assert "#" * 30 in text
    for bar, when in ((before, "before"), (after, "after")):
        assert bar.startswith(f"\revaluating 6 test tasks ({when} meta-training): [")
        assert "] 6/6 " in bar and "#" * 30 in bar


def test_evaluations_show_progress_in_chunks_of_100_tasks(tmp_path, capsys):
    _run(tmp_path, "--steps", "1", *FAST, "--no-plot", "--eval-tasks", "250")
    lines = capsys.readouterr().err.splitlines()
    shown = [f"evaluating 250 test tasks ({{}} meta-training): {k}/250" for k in (0, 100, 200, 250)]
    assert lines[:4] == [line.format("before") for line in shown]  # before the first step
    assert lines[4].startswith("step 1/1 meta-loss ")
    assert lines[5:] == [line.format("after") for line in shown]


def test_the_strategy_choice_shows_its_trial_steps(tmp_path, capsys):
    _run(tmp_path, "--steps", "1", *FAST, "--no-plot", "--strategy", "auto")
    lines = capsys.readouterr().err.splitlines()
    label = "choosing how to batch tasks (vmap or loop):"
    assert lines[0] == f"{label} 0/7 trial meta-steps"
    trials = [line for line in lines if line.startswith(label)]
    assert 2 <= len(trials) <= 8 and trials == lines[: len(trials)]  # before anything else
    assert re.search(r": (vmap|loop) \((vmap|loop) [\d.]+ ms per step, ", trials[-1])
    assert lines[len(trials)].startswith("evaluating 6 test tasks (before meta-training): 0/6")


class _Clock:
    """A fake ``time`` for ``metafunc._vmap``: a loop over tasks costs 1, a vmap ``vmap_cost``."""

    def __init__(self, monkeypatch, vmap_cost: float):
        self.now = 0.0
        loop, vmap = metafunc._vmap._loop, metafunc._vmap._TaskMap._vmap

        def timed_loop(*args):
            self.now += 1.0
            return loop(*args)

        def timed_vmap(task_map, *args):
            self.now += vmap_cost
            return vmap(task_map, *args)

        monkeypatch.setattr(metafunc._vmap, "time", self)
        monkeypatch.setattr(metafunc._vmap, "_DECISIONS", collections.OrderedDict())
        monkeypatch.setattr(metafunc._vmap, "_loop", timed_loop)
        monkeypatch.setattr(metafunc._vmap._TaskMap, "_vmap", timed_vmap)

    def perf_counter(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("vmap_cost", "chosen", "trials"),
    [(3.0, "loop", 5), (0.5, "vmap", 5), (1.5, "loop", 7), (0.8, "vmap", 7)],
)
def test_auto_strategy_times_until_it_decides(tmp_path, monkeypatch, capsys, vmap_cost, chosen,
                                              trials):  # fmt: skip
    """A clear win (2x) decides after one timed call of each; a closer one after two each, and
    the faster still wins (not vmap by default)."""
    _Clock(monkeypatch, vmap_cost)
    results = _run(tmp_path, "--steps", "1", *FAST, *QUIET, "--strategy", "auto")
    assert results["strategy"] == chosen
    assert capsys.readouterr() == ("", "")  # --quiet: no trial lines either
    _Clock(monkeypatch, vmap_cost)
    _run(tmp_path, "--steps", "1", *FAST, "--no-plot", "--strategy", "auto", "--overwrite")
    last = [line for line in capsys.readouterr().err.splitlines() if "trial meta-steps" in line]
    assert last[-1].startswith(f"choosing how to batch tasks (vmap or loop): {trials}/7 ")


def test_quiet_prints_nothing(tmp_path, capsys):
    _run(tmp_path, "--steps", "2", *FAST, *QUIET)
    assert capsys.readouterr() == ("", "")
