"""Tensors under ``torch.func`` transforms, as the implicit-gradient checks need them: whether a
gradient can reach a (possibly vmap-batched) tensor, and which tasks of a vmapped batch failed."""

from __future__ import annotations

import torch
from torch._C._functorch import get_unwrapped, is_batchedtensor, is_functorch_wrapped_tensor

from ._linear import plain

__all__ = ["failing_tasks", "may_need_grad"]


def may_need_grad(x: torch.Tensor) -> bool:
    """Whether a gradient can reach ``x``: ``requires_grad`` at any ``torch.func`` level.

    A tensor batched by ``vmap`` reports ``requires_grad=False`` even when the tensor it batches
    requires grad (a leaf of the autograd graph around ``vmap``, or the input of an outer
    ``torch.func.grad``): the question is asked of each tensor under the wrappers.
    """
    with torch._C._DisableFuncTorch():  # read the wrappers' own flags, not the current level's
        while not x.requires_grad:
            if not (is_batchedtensor(x) or is_functorch_wrapped_tensor(x)):
                return False
            x = get_unwrapped(x)
        return True


def failing_tasks(ok: torch.Tensor, worst: int | None = None) -> str:
    """Names the tasks whose flag in ``ok`` is false, by their index in the batch, when ``ok``
    holds one flag per task of a ``vmap``: `` (1 of 3 tasks: task 2)``; ``""`` for one flag.
    ``worst``, when given, is the task whose numbers the message shows."""
    flags = plain(ok)
    if flags.numel() <= 1:
        return ""
    failing = (~flags).reshape(-1).nonzero().reshape(-1).tolist()
    count = f"{len(failing)} of {flags.numel()} tasks"
    if flags.dim() != 1:  # nested vmaps: the order of the batch dimensions is not known here
        return f" ({count})"
    if len(failing) == 1:
        return f" ({count}: task {failing[0]})"
    shown = ", ".join(str(i) for i in failing[:10]) + (", ..." if len(failing) > 10 else "")
    whose = "" if worst is None else f"; the numbers are task {worst}'s, the worst"
    return f" ({count}: tasks {shown}{whose})"
