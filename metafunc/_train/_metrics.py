"""The per-step metrics of a run: ``metrics.csv`` (always) and TensorBoard event files
(``--tensorboard``), kept in step with the checkpoint.

``metrics.csv`` has one row per meta-step, ``step,meta_loss,val_loss`` (and ``val_accuracy`` on
the image tasks), the values of ``results.json``'s history, with an empty cell where the
history holds null (a value that was not finite, or a step without validation): ``pandas.read_csv``
reads those as NaN. Rows are written when a checkpoint is, so the file never holds a step the
checkpoint does not; a resumed run rewrites it from the checkpoint's history first (dropping any
row past the checkpoint) and then appends, so no step is written twice.

The event files (``<out>/tensorboard/``) hold the scalars ``train/meta_loss`` (each step),
``val/loss`` and ``val/accuracy`` (each validation), ``lr/outer`` and ``lr/inner`` (the mean of
the learned rates for Meta-SGD and MAML++), ``test/<metric>`` before (step 0) and after
(the last step) meta-training, and the run's strategy and config as text. A resumed run purges
the events past its checkpoint.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import torch

from ._errors import RunError, _why
from ._folder import TENSORBOARD_DIR, RunFolder, _replacing

METRICS_FILE = "metrics.csv"


def _cell(value: float | None) -> str:
    return "" if value is None else repr(value)


def csv_rows(history: dict[str, list], after: int = 0) -> list[list[str]]:
    """The CSV rows (as text) of the steps in ``history`` past step ``after``."""
    val = dict(zip(history["val_step"], history["val_loss"]))
    accuracy = dict(zip(history["val_step"], history.get("val_accuracy", [])))
    rows = []
    for step, loss in zip(history["step"], history["meta_loss"]):
        if step > after:
            row = [str(step), _cell(loss), _cell(val.get(step))]
            if "val_accuracy" in history:
                row.append(_cell(accuracy.get(step)))
            rows.append(row)
    return rows


def _header(history: dict[str, list]) -> list[str]:
    return ["step", "meta_loss", "val_loss"] + (
        ["val_accuracy"] if "val_accuracy" in history else []
    )


class MetricsLog:
    """``metrics.csv`` and, with ``tensorboard``, a ``SummaryWriter``, for the main process.

    :meth:`step` after every meta-step (TensorBoard only), :meth:`save` with every checkpoint
    (the CSV rows since the last one; the events flushed), :meth:`test` with the test metrics,
    :meth:`close` at the end, also of a failed run.
    """

    def __init__(self, folder: RunFolder, tensorboard: bool, start: int, texts: dict[str, str]):
        self.folder = folder
        self.path = folder.path / METRICS_FILE
        self.written: int | None = None  # the last step in the file, once this run wrote it
        self.writer: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = folder.path / TENSORBOARD_DIR
            # a resumed run drops the events past its checkpoint, which it trains again
            self.writer = SummaryWriter(str(log_dir), purge_step=start + 1 if start else None)
            for tag, text in texts.items():
                self.writer.add_text(tag, text, start)

    def step(self, step: int, history: dict[str, list], lrs: dict[str, float] | None) -> None:
        """The meta-loss of ``step`` and, when it was validated, its validation metrics and the
        learning rates (``lrs``), into the event files."""
        if self.writer is None:
            return
        if history["meta_loss"] and history["meta_loss"][-1] is not None:
            self.writer.add_scalar("train/meta_loss", history["meta_loss"][-1], step)
        if history["val_step"] and history["val_step"][-1] == step:
            for key in ("val_loss", "val_accuracy"):
                if key in history and history[key][-1] is not None:
                    self.writer.add_scalar(f"val/{key[4:]}", history[key][-1], step)
            for name, value in (lrs or {}).items():
                self.writer.add_scalar(f"lr/{name}", value, step)

    def test(self, summaries: dict[str, dict[str, Any]], step: int) -> None:
        """The test metrics' means (before meta-training: step 0; after: the last step)."""
        if self.writer is None:
            return
        for key, summary in summaries.items():
            if summary["mean"] is not None:
                self.writer.add_scalar(f"test/{key}", summary["mean"], step)

    def save(self, history: dict[str, list]) -> None:
        """Writes the CSV up to the last step of ``history`` (the checkpoint's step): the whole
        file the first time (a resumed run's file may hold steps past its checkpoint), then
        appended; flushes the event files."""
        try:
            if self.written is None:
                text = io.StringIO()
                writer = csv.writer(text, lineterminator="\n")
                writer.writerow(_header(history))
                writer.writerows(csv_rows(history))
                with _replacing(self.path) as tmp:
                    tmp.write_text(text.getvalue(), encoding="utf-8")
            else:
                with self.path.open("a", encoding="utf-8", newline="") as f:
                    csv.writer(f, lineterminator="\n").writerows(csv_rows(history, self.written))
        except OSError as e:
            raise RunError(
                f"cannot write {self.path}: {_why(e)}. Is the disk full? {self.folder.kept()} "
                "Once there is room, run again with --resume: it writes the file again."
            ) from None
        self.written = history["step"][-1] if history["step"] else 0
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def inner_lrs(meta: dict[str, Any], inner_lr: float | None) -> float | None:
    """The inner learning rate to log: the mean of the learned rates (``meta["lr"]``, Meta-SGD
    and MAML++), else the flag's."""
    learned = meta.get("lr")
    if not learned:
        return inner_lr
    with torch.no_grad():
        leaves = [t.detach().double().flatten() for t in learned.values()]
        return torch.cat(leaves).mean().item()
