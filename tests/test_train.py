"""The ``python -m metafunc train`` runner: every algorithm and task, exact resume, the 95 % CIs,
meta-learning on sinusoid, progress and table output, plots, errors, Omniglot from disk.

Runs are tiny (a few meta-steps, a handful of tasks, 8 conv channels) and write to ``tmp_path``.
"""

from __future__ import annotations

import collections
import io
import json
import math
import pathlib
import re
import statistics
import subprocess
import sys

import numpy as np
import optree
import pytest
import torch
from torch import nn

import metafunc
from metafunc import _train, algorithms

ROOT = pathlib.Path(__file__).resolve().parents[1]
Z95 = 1.959963984540054
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
# a tiny image run: 2-way 1-shot, 2 queries, 8 conv channels, 2 tasks a step (a loop is faster
# than vmap for convolutions this small)
IMAGE = [
    "--ways", "2", "--shots", "1", "--queries", "2", "--hidden", "8", "--meta-batch", "2",
    "--eval-tasks", "4", "--val-tasks", "2", "--eval-every", "2", "--strategy", "loop",
]  # fmt: skip
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


# ============================================================== every algorithm, every task
@pytest.mark.parametrize("algorithm", _train.ALGORITHMS)
def test_every_algorithm_runs_on_sinusoid(algorithm, tmp_path):
    extra = ["--lam", "100", "--inner-steps", "2"] if algorithm == "imaml" else []  # fast CG
    results = _run(tmp_path, "--algorithm", algorithm, "--steps", "2", *FAST, *QUIET, *extra)
    _check_results(results, tmp_path, steps=2, n=6, metrics={"loss"})
    assert results["algorithm"] == algorithm and results["config"]["algorithm"] == algorithm
    # and the run's lock, which stays so that runs after it lock the same file
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".run.lock",
        "checkpoint.pt",
        "results.json",
    ]
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and len(checkpoint["meta"]) == LEAVES[algorithm]
    assert all(torch.isfinite(leaf).all() for leaf in checkpoint["meta"])
    if algorithm == "warpgrad":  # the replay buffer travels with the checkpoint, one per process
        (state,) = checkpoint["learner"]
        assert len(state["buffer"]) == 2 * 4 * 5  # steps x tasks x inner steps
    else:
        assert checkpoint["learner"] is None


# ANIL adapts only the conv net's head; WarpGrad holds its warp convs fixed in the inner loop
@pytest.mark.parametrize("algorithm", ["maml", "anil", "warpgrad"])
def test_glyphs_reports_accuracy_table_and_plot(algorithm, tmp_path, capsys):
    results = _run(
        tmp_path, "--algorithm", algorithm, "--task", "glyphs", "--classes", "20", "--steps", "2",
        *IMAGE,
    )  # fmt: skip
    _check_results(results, tmp_path, steps=2, n=4, metrics={"loss", "accuracy"})
    assert (tmp_path / "training.png").read_bytes()[:8] == PNG
    out = capsys.readouterr().out
    assert f"{algorithm} on glyphs: 2 meta-steps" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [r[0] for r in rows] == ["metric", "loss", "accuracy"]
    assert rows[2][1:] == [
        f"{results['test_before']['accuracy']['mean']:.4f}", "+-",
        f"{results['test_before']['accuracy']['ci95']:.4f}",
        f"{results['test_after']['accuracy']['mean']:.4f}", "+-",
        f"{results['test_after']['accuracy']['ci95']:.4f}",
    ]  # fmt: skip


def _omniglot(root: pathlib.Path, alphabets: int, characters: int, drawings: int) -> None:
    """A tiny Omniglot folder: black strokes on white 105 x 105 PNGs, a few lines a character."""
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(0)
    for a in range(alphabets):
        for c in range(characters):
            folder = root / "images_background" / f"Alphabet_{a}" / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            strokes = torch.randint(10, 95, (3, 4), generator=g).tolist()
            for d in range(drawings):
                image = Image.new("L", (105, 105), 255)
                draw = ImageDraw.Draw(image)
                for stroke in strokes:
                    jitter = torch.randint(-3, 4, (4,), generator=g).tolist()
                    draw.line([s + j for s, j in zip(stroke, jitter)], fill=0, width=4)
                image.save(folder / f"{a}{c}_{d:02d}.png")


def test_omniglot_from_a_folder(tmp_path):
    # 12 characters x 4 rotations; the runner splits characters 0.6 / 0.1 / 0.3: 7 / 1 / 4, so
    # the meta-val split has one character's 4 rotations, enough for 2-way episodes
    _omniglot(tmp_path / "omniglot", alphabets=2, characters=6, drawings=3)
    flags = ["--data-path", str(tmp_path / "omniglot"), "--ways", "2", "--queries", "1"]
    results = _run(tmp_path / "run", "--task", "omniglot", "--steps", "2", *IMAGE, *flags, *QUIET)
    _check_results(results, tmp_path / "run", steps=2, n=4, metrics={"loss", "accuracy"})
    assert results["config"]["data_path"] == str(tmp_path / "omniglot")


# ======================================================================== exact resume
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


@pytest.mark.parametrize("algorithm", ["maml", "mamlpp"])
def test_compiled_meta_step_trains_like_eager(algorithm, tmp_path):
    """--compile runs learner.meta_grad through torch.compile (aot_eager here: the graph inductor
    would get, compiled in seconds): same training to float32 round-off, with one graph for the
    whole run even while MAML++ anneals its step weights."""
    flags = [*FAST, *QUIET, "--algorithm", algorithm, "--steps", "4", "--inner-steps", "2"]
    flags[flags.index("--strategy") : flags.index("--strategy") + 2] = []  # auto: vmap compiled
    stats = torch._dynamo.utils.counters["stats"]
    torch._dynamo.reset()
    before = stats["unique_graphs"]
    compiled = _run(tmp_path / "compiled", *flags, "--compile", "aot_eager")
    assert stats["unique_graphs"] - before == 1
    torch._dynamo.reset()
    eager = _run(tmp_path / "eager", *flags)
    assert compiled["strategy"] == "vmap" and compiled["config"]["compile"] == "aot_eager"
    a, b = _load(tmp_path / "compiled")[1], _load(tmp_path / "eager")[1]
    for x, y in zip(a["meta"], b["meta"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        compiled["history"]["meta_loss"], eager["history"]["meta_loss"], rtol=1e-5, atol=0
    )


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


# ============================================================ learning, CIs and the plot
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


# ================================================================== progress and the table
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


# ============================================================================ bad flags
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--algorithm", "protonet"], "argument --algorithm: invalid choice: 'protonet'"),
        (["--task", "mnist"], "argument --task: invalid choice: 'mnist' (choose from"),
        (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
        (["--steps", "abc"], "argument --steps: expected a positive integer, got 'abc'"),
        (["--meta-batch", "2.5"], "argument --meta-batch: expected a positive integer, got '2.5'"),
        (["--inner-lr", "-1"], "argument --inner-lr: expected a positive finite number, got -1"),
        (["--outer-lr", "nan"], "argument --outer-lr: expected a positive finite number, got nan"),
        (["--inner-lr", "inf"], "argument --inner-lr: expected a positive finite number, got inf"),
        (["--outer-lr", "1e400"], "argument --outer-lr: expected a positive finite number"),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: CUDA is not available here; use --device cpu",
            marks=NO_CUDA,
        ),
        (["--device", "gpu0"], "--device gpu0: not a device torch knows; use cpu, cuda"),
        (["--eval-tasks", "1"], "--eval-tasks must be at least 2, for a 95 % confidence interval"),
        (["--task", "glyphs", "--ways", "1"], "--ways must be at least 2 for classification"),
        (["--compile", "tensorrt9"], "--compile tensorrt9: not a torch.compile backend; use one"),
        # flags that do not apply to the algorithm or task would be ignored silently
        (["--lam", "1"], "--lam applies to --algorithm imaml, not maml; drop it"),
        (["--algorithm", "reptile", "--first-order"], "--first-order applies to --algorithm maml"),
        (["--ways", "3"], "--ways applies to --task glyphs / omniglot, not sinusoid; drop it"),
        (["--task", "omniglot", "--classes", "9"], "--classes applies to --task glyphs, not omn"),
    ],
)
def test_bad_flags_exit_with_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        _train.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m metafunc train") and message in err


def test_help_states_every_default_including_the_task_and_algorithm_dependent_ones():
    p = _train.parser()
    p.format_help()  # every help string formats
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in (action.help or ""), action.option_strings
    helps = {action.dest: " ".join((action.help or "").split()) for action in p._actions}
    assert helps["meta_batch"].endswith("(default: 25 for sinusoid, 16 for glyphs and omniglot)")
    assert helps["inner_lr"].endswith("(default: 0.01 for sinusoid, 0.4 for glyphs and omniglot)")
    assert helps["inner_steps"].endswith(
        "(default: 1 for maml, fomaml, metasgd, anil and mamlpp; 5 for reptile, leap and "
        "warpgrad; 10 for imaml)"
    )
    assert helps["lam"].endswith("(imaml only; default: 2.0)")
    assert helps["classes"].endswith("(glyphs only; default: 300)")
    assert helps["data_path"].endswith("(omniglot only; no default: required there)")
    assert helps["outer_lr"].endswith("(default: 0.001)")
    assert helps["no_plot"].endswith("(default: off)")


def test_results_record_only_the_flags_that_apply(tmp_path):
    config = _run(tmp_path / "maml", "--steps", "1", *FAST, *QUIET)["config"]
    assert {"lam", "cg_steps", "ways", "hidden", "classes", "data_path", "data_seed"}.isdisjoint(
        config
    )
    assert config["first_order"] is False and config["inner_lr"] == 0.01
    flags = ["--algorithm", "imaml", "--inner-steps", "2", "--lam", "100", "--steps", "1"]
    config = _run(tmp_path / "imaml", *flags, *FAST, *QUIET)["config"]
    assert config["lam"] == 100.0 and config["cg_steps"] == 5 and "first_order" not in config


def test_unusable_data_exits_with_a_message(tmp_path):
    with pytest.raises(SystemExit) as info:
        _run(tmp_path, "--task", "omniglot")
    message = str(info.value)
    assert "--task omniglot needs --data-path" in message and "--task glyphs" in message

    with pytest.raises(SystemExit) as info:
        _run(tmp_path, "--task", "omniglot", "--data-path", str(tmp_path / "nowhere"))
    message = str(info.value)
    assert f"--data-path {tmp_path / 'nowhere'}: " in message and "does not exist" in message

    with pytest.raises(SystemExit) as info:  # 10 glyph classes: 2 for meta-val, 5-way episodes
        _run(tmp_path, "--task", "glyphs", "--classes", "10")
    message = str(info.value)
    assert "the meta-val split has 2 of the 10 classes and cannot give --ways 5 --shots 1 " in (
        message
    )
    assert "--queries 15 episodes (" in message and "Lower --ways, --shots or --queries, or " in (
        message
    )
    assert message.endswith("raise --classes.")

    with pytest.raises(SystemExit) as info:  # glyphs have 20 drawings a class
        _run(tmp_path, "--task", "glyphs", "--classes", "50", "--shots", "10", "--queries", "15")
    message = str(info.value)
    assert "the meta-train split has 32 of the 50 classes and cannot give" in message
    assert "--shots 10 --queries 15 episodes" in message and "at least shots + queries" in message


# ================================================================= python -m metafunc train
def test_module_entry_point_trains(tmp_path):
    """``strategy auto`` times vmap against a loop, then trains; a run with -W error."""
    out = subprocess.run(
        [
            sys.executable, "-W", "error", "-m", "metafunc", "train", "--steps", "3",
            *FAST, "--strategy", "auto", "--no-plot", "--out", str(tmp_path),
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "step 3/3 meta-loss" in out.stderr
    assert "post-adaptation on 6 held-out test tasks (mean +- 95 % CI):" in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta_steps"] == 3 and results["strategy"] in ("vmap", "loop")
    assert results["config"]["strategy"] == "auto"
