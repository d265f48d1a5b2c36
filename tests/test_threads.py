"""The runner's thread count: the cores this process may use (its CPU affinity, not the machine's
core count) and the size of the work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import FAST, QUIET

from metafunc._threads import SMALL_WORK, available_cores, choose_threads
from metafunc._train import main


def run(flags: list[str]) -> dict:
    return main(flags)


def test_available_cores_is_the_affinity_not_the_machine():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    assert available_cores() == len(os.sched_getaffinity(0))
    # a process restricted to one core (as taskset or a container does) sees one
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " + (
        "from metafunc._threads import available_cores, choose_threads; "
        "print(available_cores(), choose_threads(None, work=1e12)[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]


def test_small_work_takes_one_thread_large_work_the_cores_shared_by_local_processes():
    assert choose_threads(None, work=SMALL_WORK / 2, cores=16) == (
        1,
        "small meta-step (5e+06 FLOPs < 1e+07): one thread",
    )
    assert choose_threads(None, work=SMALL_WORK, cores=16)[0] == 16
    assert choose_threads(None, work=SMALL_WORK, cores=16, local_processes=3)[0] == 5
    assert choose_threads(None, work=SMALL_WORK, cores=2, local_processes=4)[0] == 1
    assert choose_threads(4, work=0, cores=1) == (4, "asked for (--threads 4)")


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_a_bad_request_is_named(bad):
    with pytest.raises(ValueError, match=r"choose_threads\(requested=...\): expected a positive"):
        choose_threads(bad, work=0)


def test_the_runner_records_its_choice_and_takes_threads(tmp_path, before):
    results = run([*FAST, *QUIET, "--steps", "2", "--out", str(tmp_path / "a")])
    # 4 tasks x 10 points through the 1-40-40-1 MLP: 1.3e5 FLOPs
    assert results["threads"] == {
        "count": 1,
        "reason": "small meta-step (1e+05 FLOPs < 1e+07): one thread",
    }
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["threads"]["count"] == 1
    asked = run([*FAST, *QUIET, "--steps", "2", "--threads", "2", "--out", str(tmp_path / "b")])
    assert asked["threads"] == {"count": 2, "reason": "asked for (--threads 2)"}
    assert asked["config"]["threads"] == 2
    assert torch.get_num_threads() == before  # the caller's count is given back


@pytest.fixture
def before():
    return torch.get_num_threads()
