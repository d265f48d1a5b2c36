"""The ``python -m metafunc train`` runner: every algorithm, every task, ``--compile``.

Every algorithm trains on sinusoid and leaves its results, checkpoint and lock; glyphs report the
accuracy table and a plot; Omniglot loads from a folder; a compiled meta-step trains like eager;
``python -m metafunc train`` runs as a module. (``test_threads.py`` and ``test_train_faults.py``
import ``FAST``, ``QUIET``, ``IMAGE`` and ``_omniglot`` from here.)

Runs are tiny (a few meta-steps, a handful of tasks, 8 conv channels) and write to ``tmp_path``.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from _train_helpers import FAST, LEAVES, PNG, QUIET, _check_results, _load, _run

from metafunc import _train

ROOT = pathlib.Path(__file__).resolve().parents[1]


# a tiny image run: 2-way 1-shot, 2 queries, 8 conv channels, 2 tasks a step (a loop is faster
# than vmap for convolutions this small)
IMAGE = [
    "--ways", "2", "--shots", "1", "--queries", "2", "--hidden", "8", "--meta-batch", "2",
    "--eval-tasks", "4", "--val-tasks", "2", "--eval-every", "2", "--strategy", "loop",
]  # fmt: skip


# the heads (ProtoNet, R2-D2, MetaOptNet) classify: they run on images (test_train_fewshot.py)
@pytest.mark.parametrize(
    "algorithm", [a for a in _train.ALGORITHMS if a not in _train.HEAD_ALGORITHMS]
)
def test_every_algorithm_runs_on_sinusoid(algorithm, tmp_path):
    extra = ["--lam", "100", "--inner-steps", "2"] if algorithm == "imaml" else []  # fast CG
    results = _run(tmp_path, "--algorithm", algorithm, "--steps", "2", *FAST, *QUIET, *extra)
    _check_results(results, tmp_path, steps=2, n=6, metrics={"loss"})
    assert results["algorithm"] == algorithm and results["config"]["algorithm"] == algorithm
    # and the run's lock, which stays so that runs after it lock the same file
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".run.lock",
        "checkpoint.pt",
        "config.toml",
        "metrics.csv",
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
