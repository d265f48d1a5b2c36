"""The gradient tape: the params (and optionally optimizer states) recorded along an inner loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ._checks import is_count
from ._typing import OptState, Params

__all__ = ["Tape"]


class Tape(NamedTuple):
    """The params after each recorded inner step; ``tape[t]`` is what higher called ``time=t``.

    ``tape[0]`` is the initial params (the very tensors passed to :func:`inner_loop`, so
    ``torch.autograd.grad(meta_loss, list(tape[0].values()))`` is the meta-gradient), and
    ``tape[t]`` the params after step ``t``. Every entry is a snapshot: the tensors of different
    steps never alias, and ``tape[t]`` returns a fresh dict each time. Entries are differentiable,
    so a meta-loss may combine several of them (MAML++'s multi-step loss, Leap's path length).

    Being a NamedTuple of dicts and tensors, a tape passes through ``torch.func.vmap`` (each entry
    gains the task dimension) and optree.

    Attributes:
        params: ``{step: params}`` for the recorded steps.
        losses: the inner loss before each step, shape ``(num_steps,)``.
        states: ``{step: optimizer state}`` if states were recorded, else ``{}``.
    """

    params: dict[int, Params]
    losses: torch.Tensor
    states: dict[int, OptState]

    def __getitem__(self, step):
        if not isinstance(step, int) or isinstance(step, bool):
            return tuple.__getitem__(self, step)
        if step < 0:
            step += self.num_steps + 1
        if step not in self.params:
            raise KeyError(
                f"Tape[{step}]: step {step} was not recorded; recorded steps are "
                f"{sorted(self.params)}. Choose record='all' (or a step interval that includes "
                f"it) in inner_loop(...)."
            )
        return dict(self.params[step])

    @property
    def steps(self) -> list[int]:
        """The recorded step indices, ascending."""
        return sorted(self.params)

    @property
    def num_steps(self) -> int:
        """How many inner steps were taken."""
        return int(self.losses.shape[-1])

    def state(self, step: int) -> OptState:
        """The optimizer state after ``step`` (recorded with ``record_state=True``)."""
        if step < 0:
            step += self.num_steps + 1
        if step not in self.states:
            raise KeyError(
                f"Tape.state({step}): no optimizer state recorded for step {step}. Pass "
                f"record_state=True to inner_loop(...) (recorded steps: {sorted(self.params)})."
            )
        return self.states[step]


def keep_steps(record: str | int, num_steps: int | None) -> Callable[[int, bool], bool]:
    """A predicate ``step -> bool`` for a recording policy (validated here, not per step)."""
    if record == "all":
        return lambda t, last: True
    if record == "endpoints":
        return lambda t, last: t == 0 or last
    if record == "none":
        return lambda t, last: False
    if is_count(record):
        return lambda t, last: t % record == 0 or last
    raise ValueError(
        f"inner_loop(record=...): expected 'all', 'endpoints', 'none' or a positive int k (every "
        f"k-th step and the last), got {record!r}."
    )
