"""The command line of ``python -m metafunc train``: bad flags, help, recorded flags, bad data.

Bad flags exit with a usage error naming the problem; ``--help`` states every default, including
those that depend on the task and the algorithm; results record only the flags that apply; unusable
data exits with a message.

Runs are tiny (a few meta-steps, a handful of tasks, 8 conv channels) and write to ``tmp_path``.
"""

from __future__ import annotations

import pytest
import torch
from _train_helpers import FAST, QUIET, _run

from metafunc import _train

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--algorithm", "matchingnet"], "argument --algorithm: invalid choice: 'matchingnet'"),
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
        (
            ["--ways", "3"],
            "--ways applies to --task glyphs / omniglot / miniimagenet / "
            "tieredimagenet / cifarfs / fc100, not sinusoid; drop it",
        ),
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
    assert helps["meta_batch"].endswith(
        "(default: 25 for sinusoid; 16 for glyphs and omniglot; 4 for miniimagenet, "
        "tieredimagenet, cifarfs and fc100)"
    )
    assert helps["inner_lr"].endswith(
        "(not protonet, r2d2 or metaoptnet; default: 0.01 for sinusoid, miniimagenet, "
        "tieredimagenet, cifarfs and fc100; 0.4 for glyphs and omniglot)"
    )
    assert helps["inner_steps"].endswith(
        "(not protonet, r2d2 or metaoptnet; default: 1 for maml, fomaml, metasgd, anil and "
        "mamlpp; 5 for reptile, leap and "
        "warpgrad; 10 for imaml)"
    )
    assert helps["lam"].endswith("(imaml only; default: 2.0)")
    assert helps["classes"].endswith("(glyphs only; default: 300)")
    assert helps["data_path"].endswith("(not sinusoid or glyphs; no default: required there)")
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
