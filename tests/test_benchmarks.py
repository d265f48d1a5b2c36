"""The benchmark scripts run: each parses ``--help`` in a fresh interpreter (a broken import between
them fails fast: compile.py and imaml.py import maml.py and _harness.py), and each runs its
``--quick`` smoke mode to the end, so a benchmark that errors or whose meta-gradient check fails
(it exits non-zero) cannot land. The timings are printed, never asserted."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def run(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def test_every_script_is_listed():
    assert {
        "compile.py",
        "conv_cpu.py",
        "distributed.py",
        "imaml.py",
        "maml.py",
        "peer_facts.py",
        "reproduce_sinusoid.py",
    } <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_starts(script):
    done = run(script, "--help", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")
    assert "--quick" in done.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_runs(script):
    """The smoke run ends with exit 0 (benchmark scripts exit non-zero when metafunc's
    meta-gradient disagrees with the hand-written one) and prints its table."""
    done = run(script, "--quick", timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert done.stdout.strip(), done.stderr[-2000:]
