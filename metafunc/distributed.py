"""Meta-batches sharded over ``torch.distributed`` processes, with the single-process meta-gradient.

Every process draws the same whole meta-batch (same seed), keeps its share of the tasks
(:func:`shard`), computes the meta-gradient of its tasks' mean loss with vmap inside the
process, and :func:`all_reduce_mean` combines the shares weighted by their task counts:
``sum_r n_r g_r / sum_r n_r`` is the mean over the whole meta-batch whatever the split, so
uneven shares are exact too. The reduction is one ``all_reduce`` (SUM) of the flattened
gradients, over gloo on CPU or nccl on GPU; the summation order differs from one process's,
so results agree to floating-point round-off, not bitwise.
:func:`meta_grad` does all of this for a :class:`~metafunc.algorithms.MetaLearner`, and
:func:`evaluate` shares held-out tasks out the same way (per-task metrics gathered in task
order). A meta-batch needs at least one task per process.
"""

from __future__ import annotations

import functools
from typing import Any

import optree
import torch
import torch.distributed as dist

from ._typing import PyTree

__all__ = [
    "all_reduce_mean",
    "evaluate",
    "is_initialized",
    "meta_grad",
    "rank",
    "shard",
    "world_size",
]


def is_initialized() -> bool:
    """Whether a default process group exists (``torchrun`` + ``init_process_group``)."""
    return dist.is_available() and dist.is_initialized()


def rank(group: Any = None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group: Any = None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def _bounds(n: int, r: int, w: int) -> tuple[int, int]:
    """Contiguous shares whose sizes differ by at most one (the first ``n % w`` get one more)."""
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(tree: PyTree, *, group: Any = None) -> PyTree:
    """This process's share of a stacked meta-batch: a contiguous slice of the task dimension.

    With ``n`` tasks over ``w`` processes the shares have ``n // w`` or ``n // w + 1`` tasks.
    Fewer tasks than processes (``n < w``) is an error: a process without a task has no
    meta-gradient to contribute.
    """
    return _shard("shard(tree)", tree, group)


def _shard(call: str, tree: PyTree, group: Any) -> PyTree:
    leaves, spec = optree.tree_flatten(tree)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if not tensors:
        raise TypeError(f"{call}: expected a pytree holding stacked task tensors, got none.")
    n = tensors[0].shape[0]
    if any(x.shape[0] != n for x in tensors):
        sizes = sorted({x.shape[0] for x in tensors})
        raise ValueError(f"{call}: the tensors disagree on the task dimension: {sizes}.")
    w, r = world_size(group), rank(group)
    if n < w:
        raise ValueError(
            f"{call}: a meta-batch of {n} tasks cannot be shared by {w} processes (each needs at "
            f"least one); use a meta-batch of at least {w} tasks, or fewer processes."
        )
    start, stop = _bounds(n, r, w)
    return optree.tree_unflatten(
        spec, [x[start:stop] if isinstance(x, torch.Tensor) else x for x in leaves]
    )


def all_reduce_mean(grads: PyTree, count: int, *, group: Any = None) -> PyTree:
    """The task-weighted mean of every process's ``grads`` (each the mean over its ``count``).

    Returns ``sum_r count_r grads_r / sum_r count_r`` on every process; a single process gets
    ``grads`` back unchanged.
    """
    if not is_initialized() or world_size(group) == 1:
        return grads
    leaves, spec = optree.tree_flatten(grads)
    if not leaves:
        return grads
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in leaves))  # no downcast
    flat = torch.cat([x.detach().reshape(-1).to(dtype) for x in leaves])
    buffer = torch.cat([flat * count, flat.new_tensor([float(count)])])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    total = buffer[-1]
    mean = buffer[:-1] / total
    out, offset = [], 0
    for x in leaves:
        out.append(mean[offset : offset + x.numel()].reshape(x.shape).to(x.dtype))
        offset += x.numel()
    return optree.tree_unflatten(spec, out)


def _gather(values: torch.Tensor, group: Any) -> torch.Tensor:
    """All processes' per-task values, concatenated in rank order (uneven shares allowed)."""
    w = world_size(group)
    count = torch.tensor([values.shape[0]], device=values.device)
    counts = [torch.zeros_like(count) for _ in range(w)]
    dist.all_gather(counts, count, group=group)
    largest = int(max(c.item() for c in counts))
    padded = torch.zeros((largest, *values.shape[1:]), dtype=values.dtype, device=values.device)
    padded[: values.shape[0]] = values
    parts = [torch.zeros_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])


def meta_grad(learner: Any, meta: Any, support: Any, query: Any, *, group: Any = None):
    """``learner.meta_grad`` over the whole meta-batch, computed in shares across processes.

    Every process passes the same whole meta-batch; each computes its share and the results are
    combined with :func:`all_reduce_mean`. Per-task metrics are gathered, in task order, on
    every process. Algorithms whose meta-gradient is a mean over tasks (the MAML family,
    Reptile, iMAML, Leap) give the single-process result; WarpGrad's replay buffer stays per
    process, so its replay draws differ from a single process's.
    """
    if not is_initialized() or world_size(group) == 1:
        return learner.meta_grad(meta, support, query)
    s, q = _shard("metafunc.distributed.meta_grad", (support, query), group)
    count = s[0].shape[0]
    grads, metrics = learner.meta_grad(meta, s, q)
    grads = all_reduce_mean(grads, count, group=group)
    metrics = {k: _gather(v, group) for k, v in metrics.items()}
    return grads, metrics


def evaluate(learner: Any, meta: Any, support: Any, query: Any, *, group: Any = None):
    """``learner.evaluate`` over the whole meta-batch, each process adapting to its share.

    Returns every task's metrics, in task order, on every process. A meta-batch with fewer tasks
    than processes is evaluated whole by every process (the result is the same).
    """
    n = optree.tree_leaves(support)[0].shape[0]
    if not is_initialized() or world_size(group) == 1 or n < world_size(group):
        return learner.evaluate(meta, support, query)
    s, q = _shard("metafunc.distributed.evaluate", (support, query), group)
    return {k: _gather(v, group) for k, v in learner.evaluate(meta, s, q).items()}
