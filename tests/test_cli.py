"""The README's main job and quickstart snippet, and the command line's errors."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import torch

from metafunc import _quickstart
from metafunc.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_meta_learns():
    """A short run of the main job already beats the un-meta-trained initialisation."""
    result = _quickstart.run(steps=300, meta_batch=10, k=10, seed=0)
    assert result["after"] < 0.75 * result["before"]
    assert result["after_10_steps"] < result["after"]


def test_readme_quickstart_snippet_runs_and_uses_public_names_only():
    text = (ROOT / "README.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", quickstart, flags=re.S)
    assert len(blocks) == 1
    code = blocks[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 30  # lines of code
    assert "metafunc._" not in code and "from metafunc." not in code
    code = code.replace("range(100)", "range(3)")
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), namespace)
    grads = [p.grad for p in namespace["model"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_cli_rejects_missing_or_unknown_command(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "expected a command, got nothing. Try: python -m metafunc train" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["trian"])
    assert "expected a command, got 'trian'" in capsys.readouterr().err


def test_cli_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as info:
        main(["quickstart", "--steps", "0"])
    assert info.value.code == 2
    assert "--steps must be a positive integer" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "metafunc", "quickstart", "--steps", "5", "--meta-batch", "2"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert "post-adaptation MSE after meta-training" in out.stdout


def test_help_lists_the_commands(capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as info:
            main([flag])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: python -m metafunc {train,quickstart} [options]\n")
        assert re.search(r"\n  train +meta-train an algorithm", out)
        assert re.search(r"\n  quickstart +MAML on sinusoid", out)
        assert "python -m metafunc train --help" in out


def test_train_help_runs_and_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m metafunc train")
    assert "tasks per step (default: 25 for sinusoid; 16 for glyphs and omniglot; 4 for" in text


@pytest.mark.parametrize("flag", ["--inner-lr", "--outer-lr"])
def test_a_learning_rate_that_overflows_float32_is_a_usage_error(flag, capsys):
    """Before: a HyperparameterOverflowError traceback from the first inner update."""
    with pytest.raises(SystemExit) as info:
        main(["train", flag, "1e300", "--steps", "1"])
    assert info.value.code == 2
    assert f"{flag} 1e+300 overflows float32 (the models' dtype)" in capsys.readouterr().err
