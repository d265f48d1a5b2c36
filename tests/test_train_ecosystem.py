"""The runner in the ecosystem: ``metrics.csv``, ``--config run.toml``, TensorBoard and tqdm.

The oracle for the CSV and the event files is ``results.json``'s history, written by the
runner's other path; the config file's oracle is the same flags on the command line. Runs are a
few sinusoid meta-steps (``FAST``) written to ``tmp_path``.
"""

from __future__ import annotations

import csv
import io
import math
import re
import subprocess
import sys

import pytest
from _train_helpers import FAST, QUIET, _run, _same

from metafunc import _train
from metafunc._train import _metrics


def _read_csv(path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _cell(value) -> float | None:
    return None if value == "" else float(value)


def _check_csv_matches(out, results: dict) -> None:
    """metrics.csv holds exactly results.json's history, one row per step, in order."""
    history = results["history"]
    columns, rows = _read_csv(out / "metrics.csv")
    assert columns == ["step", "meta_loss", "val_loss"]
    assert [int(r["step"]) for r in rows] == history["step"]
    assert [_cell(r["meta_loss"]) for r in rows] == history["meta_loss"]  # exact: repr round-trips
    val = dict(zip(history["val_step"], history["val_loss"]))
    assert [_cell(r["val_loss"]) for r in rows] == [val.get(s) for s in history["step"]]


# ================================================================================== metrics.csv
def test_metrics_csv_holds_the_history_of_results_json(tmp_path):
    results = _run(tmp_path, "--steps", "5", *FAST, *QUIET, "--checkpoint-every", "2")
    _check_csv_matches(tmp_path, results)
    assert len(results["history"]["val_step"]) == 3  # steps 2, 4, 5: empty cells elsewhere


def test_metrics_csv_is_read_by_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    results = _run(tmp_path, "--steps", "3", *FAST, *QUIET)
    frame = pd.read_csv(tmp_path / "metrics.csv")
    assert list(frame.columns) == ["step", "meta_loss", "val_loss"]
    assert frame["meta_loss"].tolist() == results["history"]["meta_loss"]
    assert (
        math.isnan(frame["val_loss"][0])
        and frame["val_loss"][1] == results["history"]["val_loss"][0]
    )


def test_csv_rows_of_an_image_task_have_accuracy_and_empty_cells_for_null():
    history = {
        "step": [1, 2, 3],
        "meta_loss": [None, 0.5, 0.25],  # a skipped first step: no smoothed loss yet
        "val_step": [2, 3],
        "val_loss": [1.5, None],  # not finite at step 3
        "val_accuracy": [0.75, None],
    }
    assert _metrics.csv_rows(history) == [
        ["1", "", "", ""],
        ["2", "0.5", "1.5", "0.75"],
        ["3", "0.25", "", ""],
    ]
    assert _metrics.csv_rows(history, after=2) == [["3", "0.25", "", ""]]


def test_resume_appends_to_metrics_csv_without_repeating_a_step(tmp_path):
    _run(tmp_path, "--steps", "4", *FAST, *QUIET, "--checkpoint-every", "2")
    # a run killed after its checkpoint at step 4 may have written rows past it: they go
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("5,123.0,\n")
    results = _run(tmp_path, "--steps", "7", *FAST, *QUIET, "--checkpoint-every", "2", "--resume")
    assert results["history"]["step"] == list(range(1, 8))
    _check_csv_matches(tmp_path, results)


def test_overwrite_deletes_the_metrics_config_and_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    _run(tmp_path, "--steps", "2", *FAST, *QUIET, "--tensorboard")
    assert {"metrics.csv", "config.toml", "tensorboard"} <= {p.name for p in tmp_path.iterdir()}
    _run(tmp_path, "--steps", "1", *FAST, *QUIET, "--overwrite")
    assert not (tmp_path / "tensorboard").exists()
    assert "tensorboard = false\n" in (tmp_path / "config.toml").read_text()
    assert _read_csv(tmp_path / "metrics.csv")[1][-1]["step"] == "1"


# ================================================================================ --config FILE
def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        _train.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m metafunc train") and "Traceback" not in err
    return err


def test_config_file_flags_with_dashes_or_underscores_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        'algorithm = "fomaml"\nsteps = 5\nmeta_batch = 3\neval-tasks = 4\nval_tasks = 2\n'
        'strategy = "loop"\nquiet = true\nno-plot = true\ninner-lr = 0.02\n'
    )
    results = _run(tmp_path / "out", "--config", str(config), "--steps", "2", "--meta-batch", "2")
    recorded = results["config"]
    assert results["meta_steps"] == 2 and recorded["meta_batch"] == 2  # the command line's
    assert recorded["algorithm"] == "fomaml" and recorded["eval_tasks"] == 4  # the file's
    assert recorded["inner_lr"] == 0.02 and results["strategy"] == "loop"
    assert recorded["quiet"] is True and not (tmp_path / "out" / "training.png").exists()


# a value for every flag (and the flags it needs to apply); the test below fails for a new flag
# that is missing here, so every flag stays expressible in a config file
_EVERY_FLAG: dict[str, tuple[object, list[str]]] = {
    "algorithm": ("reptile", []),
    "task": ("glyphs", []),
    "steps": (7, []),
    "meta_batch": (3, []),
    "inner_steps": (2, []),
    "inner_lr": (0.25, []),
    "outer_lr": (3e-4, []),
    "first_order": (True, []),
    "lam": (0.5, ["--algorithm", "imaml"]),
    "cg_steps": (3, ["--algorithm", "imaml"]),
    "shots": (2, []),
    "queries": (4, []),
    "ways": (3, ["--task", "glyphs"]),
    "backbone": ("resnet12", ["--task", "glyphs"]),
    "hidden": (8, ["--task", "glyphs"]),
    "image_size": (24, ["--task", "cifarfs"]),
    "augment": (True, ["--task", "fc100"]),
    "classes": (40, ["--task", "glyphs"]),
    "data_path": ("some/folder", ["--task", "omniglot"]),
    "data_seed": (-3, ["--task", "glyphs"]),
    "eval_every": (9, []),
    "val_tasks": (11, []),
    "eval_tasks": (12, []),
    "checkpoint_every": (13, []),
    "seed": (-1, []),
    "device": ("cpu", []),
    "threads": (1, []),
    "strategy": ("loop", []),
    "compile": ("aot_eager", []),
    "on_nonfinite": ("skip", []),
    "out": ("runs/elsewhere", []),
    "resume": (True, []),
    "overwrite": (True, []),
    "no_plot": (True, []),
    "quiet": (True, []),
    "tensorboard": (True, []),
}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def test_every_flag_is_expressible_in_a_config_file(tmp_path):
    dests = {a.dest for a in _train.parser()._actions if a.option_strings}
    assert dests - {"help", "config"} == _EVERY_FLAG.keys()
    for i, (dest, (value, context)) in enumerate(_EVERY_FLAG.items()):
        if dest == "tensorboard" and not _has_tensorboard():
            continue
        flag = "--" + dest.replace("_", "-")
        command = [flag] if value is True else [flag, str(value)]
        key = dest if i % 2 else dest.replace("_", "-")  # both spellings
        path = tmp_path / f"{dest}.toml"
        path.write_text(f"{key} = {_toml_value(value)}\n")
        from_file = vars(_train.parse([*context, "--config", str(path)]))
        from_flags = vars(_train.parse([*context, *command]))
        assert from_file.pop("config") == str(path) and from_flags.pop("config") is None
        assert from_file == from_flags, dest
        if value is not True:  # and a flag on the command line overrides the file's value
            assert (
                vars(_train.parse([*context, "--config", str(path), *command]))[dest]
                == (from_flags[dest])
            )


def test_compile_true_in_a_config_file_is_the_default_backend(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("compile = true\n")
    assert _train.parse(["--config", str(path)]).compile == "inductor"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stepz = 3\n", "unknown key 'stepz' (not a flag); did you mean steps (--steps)?"),
        ("meta-bacth = 3\n", "unknown key 'meta-bacth' (not a flag); did you mean meta-batch ("),
        ("zzz = 1\n", "unknown key 'zzz' (not a flag); see --help."),
        ('config = "other.toml"\n', "unknown key 'config' (a config file cannot name another)"),
        ("meta-batch = 3\nmeta_batch = 4\n", "'meta-batch' and 'meta_batch' are the same flag"),
        ('steps = "many"\n', "steps = \"many\": expected a positive integer, got 'many'"),
        ("steps = 2.5\n", "steps = 2.5: expected a positive integer, got '2.5'"),
        ("steps = true\n", "steps = true: --steps takes a value, not true or false"),
        ('algorithm = "mamll"\n', 'algorithm = "mamll": expected one of maml, fomaml, metasgd'),
        ("quiet = 1\n", "quiet = 1: expected true or false, got int"),
        ("steps = [1, 2]\n", "steps = [1, 2]: expected a number or a string, got list"),
        (
            "steps = 3\nsteps 4\n",
            "not valid TOML (Expected '=' after a key in a key/value pair (at line 2, column 7))",
        ),
    ],
)
def test_bad_config_files_are_usage_errors(text, message, tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text(text)
    err = _usage_error(["--config", str(path), "--out", str(tmp_path / "out")], capsys)
    assert f"python -m metafunc train: error: --config {path}: {message}" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_a_usage_error(tmp_path, capsys):
    err = _usage_error(["--config", str(tmp_path / "nope.toml")], capsys)
    assert f"--config {tmp_path / 'nope.toml'}: cannot read it (No such file or directory)" in err


def test_bad_toml_prints_line_and_column_and_no_traceback(tmp_path):
    """In a real process: one usage line on stderr, exit status 2."""
    path = tmp_path / "run.toml"
    path.write_text('algorithm = "maml"\nsteps = = 3\n')
    done = subprocess.run(
        [sys.executable, "-m", "metafunc", "train", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"python -m metafunc train: error: --config {path}: not valid TOML (")
    assert "(at line 2, column 9)" in last


def test_the_written_config_toml_reproduces_the_run(tmp_path):
    first = tmp_path / "first"
    flags = ["--steps", "3", *FAST, *QUIET, "--inner-lr", "0.03", "--seed", "7"]
    results = _run(first, *flags)
    written = (first / "config.toml").read_text()
    assert "out = " not in written and "resume" not in written  # how to run, not what
    assert "inner-lr = 0.03\n" in written and "seed = 7\n" in written
    again = _run(tmp_path / "again", "--config", str(first / "config.toml"))
    assert (tmp_path / "again" / "config.toml").read_text() == written
    for key in ("history", "test_before", "test_after", "strategy", "meta_steps"):
        assert _same(again[key], results[key]), key
    assert {k: v for k, v in again["config"].items() if k not in ("out", "config")} == {
        k: v for k, v in results["config"].items() if k not in ("out", "config")
    }


# ================================================================================ --tensorboard
def _has_tensorboard() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_tensorboard_event_files_hold_the_curves_of_results_json(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator

    results = _run(tmp_path, "--steps", "4", *FAST, *QUIET, "--tensorboard")
    events = event_accumulator.EventAccumulator(
        str(tmp_path / "tensorboard"), size_guidance={event_accumulator.TENSORS: 0}
    )
    events.Reload()

    def scalars(tag: str) -> tuple[list[int], list[float]]:
        got = events.Scalars(tag)
        return [e.step for e in got], [e.value for e in got]

    history = results["history"]
    steps, values = scalars("train/meta_loss")
    assert steps == history["step"]
    assert values == pytest.approx(history["meta_loss"], rel=1e-6)  # stored as float32
    steps, values = scalars("val/loss")
    assert steps == history["val_step"] and values == pytest.approx(history["val_loss"], rel=1e-6)
    assert scalars("lr/outer") == (history["val_step"], pytest.approx([1e-3] * 2, rel=1e-6))
    assert scalars("lr/inner") == (history["val_step"], pytest.approx([0.01] * 2, rel=1e-6))
    assert scalars("test/loss") == (
        [0, 4],
        pytest.approx([results[w]["loss"]["mean"] for w in ("test_before", "test_after")]),
    )
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in (
        "run/strategy/text_summary", "run/config/text_summary")}  # fmt: skip
    assert texts["run/strategy/text_summary"] == results["strategy"]
    assert "outer-lr = 0.001" in texts["run/config/text_summary"]


def test_tensorboard_logs_the_mean_learned_inner_rate_of_meta_sgd(tmp_path):
    pytest.importorskip("tensorboard")
    import torch
    from tensorboard.backend.event_processing import event_accumulator

    _run(tmp_path, "--algorithm", "metasgd", "--steps", "2", *FAST, *QUIET, "--tensorboard")
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = events.Scalars("lr/inner")[-1].value
    # the oracle: the checkpoint's learned rates, the leaves of meta["lr"], which come first (optree
    # sorts the keys: "lr" before "params"); they started at 0.01 and moved
    leaves = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["meta"]
    assert len(leaves) == 12
    mean = torch.cat([t.double().flatten() for t in leaves[:6]]).mean().item()
    assert logged == pytest.approx(mean, rel=1e-6) and mean != pytest.approx(0.01, rel=1e-9)


def test_tensorboard_missing_is_a_usage_error_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    err = _usage_error(["--tensorboard"], capsys)
    assert "--tensorboard needs the tensorboard package, which is not installed" in err
    assert "pip install 'metafunc[tensorboard]'" in err


def test_a_resumed_run_purges_the_events_past_its_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator

    update = _train.Progress.update

    def interrupted(self, at, text):  # a crash after step 3 was logged, past the checkpoint at 2
        update(self, at, text)
        if at == 3 and self.label is None:
            raise KeyboardInterrupt

    flags = [*FAST, *QUIET, "--tensorboard", "--checkpoint-every", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(_train.Progress, "update", interrupted)
        with pytest.raises(SystemExit) as info:
            _run(tmp_path, "--steps", "4", *flags)
    assert info.value.code == 130

    def logged() -> list[int]:
        events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        return [e.step for e in events.Scalars("train/meta_loss")]

    assert logged() == [1, 2, 3]
    results = _run(tmp_path, "--steps", "4", *flags, "--resume")
    assert logged() == results["history"]["step"] == [1, 2, 3, 4]  # step 3 once


# ========================================================================= progress with tqdm
def test_the_terminal_bar_is_tqdm_with_time_left_and_rate(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _run(tmp_path, "--steps", "3", *FAST, "--no-plot")
    training = terminal.getvalue().split("\n")[1].split("\r")[-1]
    assert re.fullmatch(
        r"\[#{30}\] 3/3 meta-loss [\d.]+ val loss [\d.]+ \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ it/s\]",
        training.rstrip(),
    ), training


def test_log_lines_of_training_show_elapsed_time_left_and_rate(tmp_path, capsys):
    _run(tmp_path, "--steps", "4", *FAST, "--no-plot")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert len(lines) == 4
    for line in lines:
        assert re.search(r" \[\d\d:\d\d<\d\d:\d\d, [\d.]+ it/s\]$", line), line
