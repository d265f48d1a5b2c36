"""``inner_loop(allow_unused=...)``: the params that no inner step's gradient reaches."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import optree
import torch

from . import _tree
from ._typing import Params

_CALL = "inner_loop(loss_fn, params, opt, batches, ...)"


class Unused:
    """The leaves of ``params`` that no inner step has yet differentiated; the check behind
    ``inner_loop(allow_unused=...)``.

    A leaf the inner loss has no gradient path to is left unchanged by the loop: an identity
    adaptation that hides a ``.detach()``, ``.item()`` or ``no_grad`` in ``loss_fn``. Where the
    gradient is taken by ``torch.autograd.grad`` (checkpointed segments) such a leaf's gradient is
    ``None``; ``torch.func.grad`` turns that ``None`` into zeros, so there a hook on each watched
    leaf records that the backward pass reached it. Leaves are watched only until some step
    reaches them (usually all at the first step), so later steps cost nothing.
    """

    def __init__(self, params: Params, allow_unused: bool | Collection[str]) -> None:
        paths, _, _ = optree.tree_flatten_with_path(params)  # type: ignore[arg-type]
        allowed = set(params) if allow_unused is True else set(allow_unused or ())
        self.paths = paths
        self.pending = {i for i, path in enumerate(paths) if path[0] not in allowed}

    def watch(self, leaves: list[torch.Tensor]) -> None:
        """Hooks the leaves being differentiated (inside ``torch.func.grad``)."""
        for i in list(self.pending):
            if leaves[i].requires_grad:
                leaves[i].register_hook(lambda g, i=i: self.pending.discard(i))

    def reached(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Notes the leaves with a gradient (``torch.autograd.grad(..., allow_unused=True)``)."""
        self.pending.difference_update(i for i, g in enumerate(grads) if g is not None)

    def check(self, steps: int) -> None:
        if not self.pending:
            return
        names = [
            path[0] if len(path) == 1 else _tree.format_path(path)
            for i, path in enumerate(self.paths)
            if i in self.pending
        ]
        keys = sorted({path[0] for i, path in enumerate(self.paths) if i in self.pending})
        when = "its one step" if steps == 1 else f"any of its {steps} steps"
        raise ValueError(
            f"{_CALL}: loss_fn has no gradient path to params {names} at {when}, so the "
            f"inner loop leaves them unchanged (an identity adaptation). Look for "
            f".detach(), .item(), .data or torch.no_grad() on them in loss_fn. If they are "
            f"unused on purpose (e.g. a head that is only meta-learned), pass "
            f"allow_unused={keys!r} (or allow_unused=True), or leave them out of params."
        )


def check_allow_unused(params: Params, allow_unused: Any) -> None:
    if isinstance(allow_unused, bool):
        return
    if (
        isinstance(allow_unused, (str, bytes))
        or not isinstance(allow_unused, Collection)
        or not all(isinstance(k, str) for k in allow_unused)
    ):
        raise TypeError(
            f"{_CALL}: expected allow_unused to be a bool or a collection of param keys (e.g. "
            f"allow_unused=['head.weight']), got {allow_unused!r}."
        )
    for k in allow_unused:
        if k not in params:
            raise ValueError(
                f"{_CALL}: allow_unused names {k!r}, not a key of params"
                f"{_tree.close_matches(k, params)}. Keys: {sorted(params)}."
            )
