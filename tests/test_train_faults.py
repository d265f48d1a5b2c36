"""The ``python -m metafunc train`` runner under faults: non-finite training, runs sharing a
folder (overwrites, two live runs, a run killed with -9), unwritable or odd ``--out`` folders,
resumes on other data, damaged checkpoints and a full disk, Ctrl-C.

Faults are injected as an outsider would: NaN in the data (``Tasks.sample`` patched in an
in-process run), a second process, ``kill -9``, SIGINT, damaged files, a read-only or full tmpfs
(mounted when the machine allows it, else skipped; a patched ``os.open`` / ``torch.save`` stand in
everywhere). Runs are tiny sinusoid runs in ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import pathlib
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from metafunc import _train

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--meta-batch", "4", "--eval-tasks", "6", "--val-tasks", "2", "--eval-every", "2"]
FAST += ["--strategy", "vmap"]
QUIET = ["--quiet", "--no-plot"]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def _run(out: pathlib.Path, *flags: str) -> dict:
    return _train.main([*flags, "--out", str(out)])


def _fails(code: int, *argv: str) -> str:
    """``main(argv)`` exits with ``code``; returns the message."""
    with pytest.raises(SystemExit) as info:
        _train.main(list(argv))
    assert info.value.code == code, info.value
    return str(info.value)


def _strict_json(path: pathlib.Path) -> dict:
    """results.json parsed as strict JSON: NaN and Infinity are not JSON."""

    def reject(constant: str):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def _checkpoint(out: pathlib.Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _files(out: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _poison(monkeypatch, split: str, calls: set[int] | None) -> None:
    """NaN in the support inputs of the ``calls``-th meta-batches of ``split`` (1-based; None:
    every one), counted from the start of this process's run."""
    sample = _train.Tasks.sample
    seen = {"n": 0}

    def poisoned(self, which, n, generator, device):
        episode = sample(self, which, n, generator, device)
        if which != split:
            return episode
        seen["n"] += 1
        if calls is not None and seen["n"] not in calls:
            return episode
        x, y = episode.support
        return episode._replace(support=(torch.full_like(x, float("nan")), y))

    monkeypatch.setattr(_train.Tasks, "sample", poisoned)


# ======================================================================= non-finite training
def test_nan_data_stops_at_its_step_and_keeps_the_good_checkpoint(tmp_path, monkeypatch, capsys):
    flags = [*FAST, *QUIET, "--checkpoint-every", "1"]
    _run(tmp_path, *flags, "--steps", "2")
    good = _files(tmp_path)
    _poison(monkeypatch, "train", {2})  # the resumed run's second step: step 4
    message = _fails(1, *flags, "--steps", "6", "--resume", "--out", str(tmp_path))
    assert "step 4: the meta-loss is nan" in message
    assert "the meta-batch's data holds NaN or infinity" in message
    assert f"{tmp_path / 'checkpoint.pt'} (step 3) is kept" in message
    assert _checkpoint(tmp_path)["step"] == 3
    assert all(torch.isfinite(leaf).all() for leaf in _checkpoint(tmp_path)["meta"])
    assert _files(tmp_path)["results.json"] == good["results.json"]  # the last complete run's
    assert capsys.readouterr().err.startswith("python -m metafunc train: step 4: ")


def test_a_huge_outer_learning_rate_stops_with_the_cause_and_writes_no_nan(tmp_path):
    message = _fails(1, *FAST, *QUIET, "--outer-lr", "1e6", "--steps", "20", "--out", str(tmp_path))
    assert re.search(r"step \d+: the meta-(loss|gradient)", message)
    assert "--outer-lr 1000000.0" in message and "Lower --outer-lr or --inner-lr" in message
    assert "--on-nonfinite skip" in message
    assert "Nothing was saved." in message
    assert [p.name for p in tmp_path.iterdir()] == [".run.lock"]  # only the lock stays


def test_a_huge_inner_learning_rate_reports_the_non_finite_evaluation(tmp_path, capsys):
    """--inner-lr 1e6 diverges in adaptation: the 'before' evaluation warns, step 1 stops."""
    out = tmp_path / "run"
    message = _fails(1, *FAST, "--no-plot", "--inner-lr", "1e6", "--steps", "5", "--out", str(out))
    assert "step 1: the meta-loss is inf" in message and "--inner-lr 1000000.0" in message
    err = capsys.readouterr().err
    assert re.search(r"warning: the test loss before meta-training is not finite on \d of 6 ", err)
    assert not out.exists()  # nothing saved: the folder it made is gone


def test_skip_leaves_the_parameters_and_adam_untouched_and_counts(tmp_path, monkeypatch):
    one = _run(tmp_path / "one", *FAST, *QUIET, "--steps", "1")
    _poison(monkeypatch, "train", {2})
    two = _run(tmp_path / "two", *FAST, *QUIET, "--steps", "2", "--on-nonfinite", "skip")
    assert one["skipped_steps"] == [] and two["skipped_steps"] == [2]
    assert _strict_json(tmp_path / "two" / "results.json")["skipped_steps"] == [2]
    a, b = _checkpoint(tmp_path / "one"), _checkpoint(tmp_path / "two")
    assert all(map(torch.equal, a["meta"], b["meta"]))  # step 2 was not applied
    for i, state in a["outer"]["state"].items():  # nor did it move Adam's moments or step
        assert all(torch.equal(v, b["outer"]["state"][i][k]) for k, v in state.items())
    assert two["history"]["meta_loss"] == [one["history"]["meta_loss"][0]] * 2


def test_skip_stops_after_ten_skipped_steps_in_a_row(tmp_path, monkeypatch):
    _poison(monkeypatch, "train", None)
    message = _fails(
        1, *FAST, *QUIET, "--steps", "30", "--on-nonfinite", "skip", "--out", str(tmp_path)
    )
    assert "step 10: 10 meta-steps in a row had a non-finite meta-loss or gradient" in message
    assert "the meta-batch's data holds NaN or infinity" in message


def test_non_finite_evaluations_are_null_in_strict_json_with_a_warning(tmp_path, monkeypatch):
    _poison(monkeypatch, "val", {2})
    _poison(monkeypatch, "test", {2})  # the evaluation after meta-training
    results = _run(tmp_path, *FAST, "--no-plot", "--steps", "4")
    saved = _strict_json(tmp_path / "results.json")
    assert saved == results
    assert saved["history"]["val_loss"][1] is None and saved["history"]["val_loss"][0] > 0
    after = saved["test_after"]["loss"]
    assert after == {"mean": None, "ci95": None, "n": 6, "non_finite": 6}
    assert saved["test_before"]["loss"]["mean"] > 0


def test_non_finite_evaluations_print_warnings(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, "val", {1})
    _poison(monkeypatch, "test", {2})
    _run(tmp_path, *FAST, "--no-plot", "--steps", "2")
    captured = capsys.readouterr()
    assert "warning: step 2: the validation loss is not finite on 2 of 2 tasks" in captured.err
    assert "warning: the test loss after meta-training is not finite on 6 of 6 tasks" in (
        captured.err
    )
    assert re.search(r"\n  loss +\d+\.\d+ \+- \d+\.\d+ +not finite\n", captured.out)


# ============================================================== runs never overwrite each other
def test_a_second_run_into_a_runs_folder_is_refused(tmp_path):
    _run(tmp_path, *FAST, *QUIET, "--steps", "2")
    first = _files(tmp_path)
    message = _fails(2, *FAST, *QUIET, "--steps", "3", "--seed", "1", "--out", str(tmp_path))
    assert f"--out {tmp_path} holds another run (checkpoint.pt, results.json" in message
    assert "Pass --resume to continue it, --overwrite to replace it" in message
    assert _files(tmp_path) == first


def test_overwrite_removes_the_old_runs_files_and_only_those(tmp_path, capsys):
    _run(tmp_path, *FAST, "--quiet", "--steps", "2")  # with its plot
    assert (tmp_path / "training.png").exists()
    (tmp_path / "notes.txt").write_text("mine")
    results = _run(tmp_path, *FAST, *QUIET, "--steps", "1", "--overwrite")
    assert results["meta_steps"] == 1 and _checkpoint(tmp_path)["step"] == 1
    assert not (tmp_path / "training.png").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    _fails(2, *FAST, "--resume", "--overwrite", "--out", str(tmp_path))
    assert "--resume and --overwrite contradict each other" in capsys.readouterr().err


def test_the_default_folder_is_never_overwritten(tmp_path, monkeypatch, capsys):
    """The README's main job run twice: the second run takes runs/...-seed0-2, and says so;
    --resume without --out continues runs/<algorithm>-<task>-seed<seed>."""
    monkeypatch.chdir(tmp_path)
    flags = [*FAST, "--no-plot", "--steps", "1"]
    _train.main(flags)
    first = _files(tmp_path / "runs" / "maml-sinusoid-seed0")
    capsys.readouterr()
    _train.main(flags)
    err = capsys.readouterr().err
    assert "runs/maml-sinusoid-seed0 holds an earlier run; this run writes to " in err
    assert "runs/maml-sinusoid-seed0-2" in err
    _train.main([*flags, "--quiet"])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "maml-sinusoid-seed0", "maml-sinusoid-seed0-2", "maml-sinusoid-seed0-3",
    ]  # fmt: skip
    assert _files(tmp_path / "runs" / "maml-sinusoid-seed0") == first
    resumed = _train.main([*FAST, *QUIET, "--steps", "2", "--resume"])
    assert resumed["history"]["step"] == [1, 2]
    assert _checkpoint(tmp_path / "runs" / "maml-sinusoid-seed0")["step"] == 2
    message = _fails(2, *FAST, *QUIET, "--seed", "5", "--resume")
    assert "--resume: no checkpoint at runs/maml-sinusoid-seed5/checkpoint.pt" in message
    assert not (tmp_path / "runs" / "maml-sinusoid-seed5").exists()


class _Lines:
    """The stderr lines of a process, read by a thread (no pipe ever fills up)."""

    def __init__(self, process: subprocess.Popen):
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.queue.put(line)

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                line = self.queue.get(timeout=0.5)
                self.seen.append(line)
                if line.startswith(prefix):
                    return line
        raise AssertionError(f"no line starting {prefix!r} in {timeout} s: {self.seen}")

    def rest(self) -> str:
        while True:
            try:
                self.seen.append(self.queue.get(timeout=2))
            except queue.Empty:
                return "".join(self.seen)


@contextlib.contextmanager
def _background(*flags: str, cwd: pathlib.Path):
    """``python -m metafunc train FLAGS`` in the background, killed when the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-m", "metafunc", "train", *flags],
        cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # Ctrl-C reaches it even when these tests run where SIGINT is ignored (a background job)
        preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    lines = _Lines(process)
    try:
        yield process, lines
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
        lines.thread.join(timeout=60)
        process.stderr.close()


LONG = [*FAST, "--no-plot", "--steps", "1000000", "--eval-every", "1000000"]


def test_two_live_runs_cannot_share_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with _background(*LONG, cwd=tmp_path) as (other, lines):
        lines.wait_for("step 1/")
        base = pathlib.Path("runs", "maml-sinusoid-seed0")
        message = _fails(1, *FAST, *QUIET, "--steps", "1", "--out", str(base))
        assert f"--out {base} is in use by another run: pid {other.pid} on " in message
        assert socket.gethostname() in message and "python -m metafunc train" in message
        assert "started 20" in message  # an ISO date
        assert "Wait for it to finish, or choose another --out" in message
        _train.main([*FAST, *QUIET, "--steps", "1"])  # no --out: the next free folder
        assert _checkpoint(tmp_path / "runs" / "maml-sinusoid-seed0-2")["step"] == 1
        assert other.poll() is None  # the first run is still going


def test_a_run_killed_with_sigkill_leaves_a_resumable_folder(tmp_path):
    flags = [*LONG, "--checkpoint-every", "1"]
    with _background(*flags, "--out", str(tmp_path), cwd=ROOT) as (other, lines):
        lines.wait_for("step 1/")
        other.kill()  # SIGKILL: no clean-up at all
        other.wait(timeout=60)
    step = _checkpoint(tmp_path)["step"]
    assert step >= 1
    message = _fails(2, *FAST, *QUIET, "--steps", str(step + 1), "--out", str(tmp_path))
    assert "holds another run" in message
    resumed = _run(tmp_path, *FAST, *QUIET, "--steps", str(step + 1), "--resume")
    assert resumed["history"]["step"][-1] == step + 1  # the dead run's lock is gone
    assert not list(tmp_path.glob("*.tmp"))


# ======================================================================== fail early
def test_out_naming_a_file_is_a_usage_error_without_a_traceback(tmp_path):
    (tmp_path / "a-file").write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "metafunc", "train", "--steps", "1", "--out",
         str(tmp_path / "a-file")],
        capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"python -m metafunc train: --out {tmp_path / 'a-file'} is a ")
    assert "Traceback" not in out.stderr
    assert (tmp_path / "a-file").read_text() == ""


def _spy_training(monkeypatch) -> list[str]:
    splits: list[str] = []
    sample = _train.Tasks.sample

    def spy(self, split, *rest):
        splits.append(split)
        return sample(self, split, *rest)

    monkeypatch.setattr(_train.Tasks, "sample", spy)
    return splits


def test_out_under_a_file_fails_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    splits = _spy_training(monkeypatch)
    message = _fails(1, *FAST, *QUIET, "--steps", "1", "--out", str(tmp_path / "a-file" / "run"))
    assert f"cannot create --out {tmp_path / 'a-file' / 'run'}: " in message
    assert "Choose a folder you can write to" in message and splits == []


def test_an_unwritable_out_fails_before_any_work(tmp_path, monkeypatch):
    """What a read-only file system answers to any file created under --out (root ignores
    chmod, so the system call is patched; a real read-only mount is tested below)."""
    open_ = os.open
    out = tmp_path / "run"
    out.mkdir()

    def read_only(path, flags, *rest, **kwargs):
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return open_(path, flags, *rest, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    splits = _spy_training(monkeypatch)
    message = _fails(1, *FAST, *QUIET, "--steps", "2", "--out", str(out))
    assert f"cannot write to --out {out}: " in message and "Read-only file system" in message
    assert splits == [] and not any(out.iterdir())


@contextlib.contextmanager
def _tmpfs(where: pathlib.Path, options: str):
    """A tmpfs mounted at ``where`` (root on Linux), or the test is skipped."""
    where.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_read_only_mount_fails_before_any_work(tmp_path, monkeypatch):
    splits = _spy_training(monkeypatch)
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        message = _fails(1, *FAST, *QUIET, "--steps", "1", "--out", str(ro))
        assert f"cannot write to --out {ro}: " in message and "Read-only file system" in message
        message = _fails(1, *FAST, *QUIET, "--steps", "1", "--out", str(ro / "run"))
        assert f"cannot create --out {ro / 'run'}: " in message
    assert splits == []


def test_refused_starts_leave_no_new_folders(tmp_path):
    out = tmp_path / "new" / "run"
    message = _fails(2, *FAST, *QUIET, "--steps", "1", "--resume", "--out", str(out))
    assert f"--resume: no checkpoint at {out / 'checkpoint.pt'}" in message
    # refused after the folder was made: a task that cannot give its episodes
    _fails(2, *QUIET, "--task", "glyphs", "--classes", "10", "--steps", "1", "--out", str(out))
    assert not (tmp_path / "new").exists()


# ======================================================================= resume checks data
def test_resume_refuses_other_omniglot_data_and_accepts_a_moved_copy(tmp_path):
    from tests.test_train import IMAGE, _omniglot

    _omniglot(tmp_path / "a", alphabets=2, characters=6, drawings=3)
    _omniglot(tmp_path / "b", alphabets=2, characters=6, drawings=3)
    (tmp_path / "b" / "images_background" / "Alphabet_0" / "character01" / "00_00.png").unlink()
    flags = [*IMAGE, *QUIET, "--task", "omniglot", "--ways", "2", "--queries", "1"]
    out = tmp_path / "run"
    _run(out, *flags, "--steps", "1", "--data-path", str(tmp_path / "a"))
    message = _fails(
        2, *flags, "--steps", "2", "--resume", "--data-path", str(tmp_path / "b"), "--out", str(out)
    )
    assert f"--resume: --data-path {tmp_path / 'b'} holds other data than the checkpoint's" in (
        message
    )
    assert "36 PNG files" in message and "35 PNG files" in message
    assert _checkpoint(out)["step"] == 1
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    resumed = _run(out, *flags, "--steps", "2", "--resume", "--data-path", str(tmp_path / "moved"))
    assert resumed["history"]["step"] == [1, 2]


# =============================================================== damaged files, a full disk
class _Exploit:
    """A pickle that runs code when loaded without weights_only."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("damage", ["empty", "truncated", "random", "foreign", "code", "folder"])
def test_a_damaged_checkpoint_is_named_with_what_to_do(damage, tmp_path):
    out = tmp_path / "run"
    _run(out, *FAST, *QUIET, "--steps", "1")
    path = out / "checkpoint.pt"
    whole = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(whole[: len(whole) // 2])
    elif damage == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif damage == "foreign":
        torch.save({"model": torch.zeros(3)}, path)
    elif damage == "code":
        torch.save(_Exploit(tmp_path / "pwned"), path)
    else:
        path.unlink()
        path.mkdir()
    damaged = path.read_bytes() if path.is_file() else None
    message = _fails(1, *FAST, *QUIET, "--steps", "2", "--resume", "--out", str(out))
    assert f"--resume: {path} " in message
    assert "is not a checkpoint of python -m metafunc train" in message
    assert "--overwrite" in message
    assert not (tmp_path / "pwned").exists()  # weights_only: loading runs no code
    assert (path.read_bytes() if path.is_file() else None) == damaged


def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    save = torch.save
    saves = {"n": 0}

    def full(obj, f, *rest, **kwargs):  # what torch.save raises on a full disk
        saves["n"] += 1
        if saves["n"] < 2:
            return save(obj, f, *rest, **kwargs)
        pathlib.Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
            "file data/3: file write failed"
        )

    monkeypatch.setattr(torch, "save", full)
    message = _fails(
        1, *FAST, *QUIET, "--steps", "3", "--checkpoint-every", "1", "--out", str(tmp_path)
    )
    assert f"step 2: cannot save {tmp_path / 'checkpoint.pt'}: " in message
    assert "PytorchStreamWriter failed writing" in message and "Is the disk full?" in message
    assert f"{tmp_path / 'checkpoint.pt'} (step 1) is kept" in message
    assert _checkpoint(tmp_path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "checkpoint.pt",
        "config.toml",
        "metrics.csv",
    ]


def test_a_full_tmpfs_fails_with_a_message(tmp_path):
    with _tmpfs(tmp_path / "full", "size=16k") as full:
        message = _fails(1, *FAST, *QUIET, "--steps", "2", "--out", str(full))
        assert f"cannot save {full / 'checkpoint.pt'}: " in message and "disk full" in message
        assert not [p for p in full.iterdir() if p.suffix in (".pt", ".tmp", ".json")]


def test_corrupt_results_and_lock_files_do_not_crash(tmp_path):
    import filelock

    (tmp_path / "results.json").write_text("{not json")
    message = _fails(2, *FAST, *QUIET, "--steps", "1", "--out", str(tmp_path))
    assert "holds another run (results.json" in message
    _run(tmp_path, *FAST, *QUIET, "--steps", "1", "--overwrite")
    assert _strict_json(tmp_path / "results.json")["meta_steps"] == 1
    (tmp_path / ".run.lock.json").write_text("\x00garbage")
    with filelock.FileLock(tmp_path / ".run.lock", timeout=0):
        message = _fails(1, *FAST, *QUIET, "--resume", "--steps", "2", "--out", str(tmp_path))
    assert "is in use by another run (its owner file" in message


# ============================================================================== Ctrl-C
def test_ctrl_c_saves_the_last_step_prints_the_resume_command_and_exits_130(tmp_path):
    with _background(*LONG, "--out", str(tmp_path), cwd=ROOT) as (run, lines):
        lines.wait_for("step 1/")
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=120) == 130
        err = lines.rest()
    assert "Traceback" not in err
    match = re.search(r"interrupted after step (\d+); saved (\S+) \(step \d+\)", err)
    assert match and pathlib.Path(match[2]) == tmp_path / "checkpoint.pt"
    step = int(match[1])
    assert _checkpoint(tmp_path)["step"] == step
    command = re.search(r"Resume with: (.*)\n", err)[1]
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "metafunc", "train"] and "--resume" in argv
    argv[argv.index("--steps") + 1] = str(step + 1)
    resumed = _train.main([*argv[4:], "--quiet"])
    assert resumed["history"]["step"][-1] == step + 1
