"""Rematerialisation: exact recomputation of inner-loop segments in the backward pass.

``inner_loop(checkpoint=k)`` keeps only segment boundaries and recomputes each segment of ``k``
steps when the backward pass reaches it (sqrt(T) memory). Not to be confused with the runner's
checkpoints, which are files (:mod:`metafunc._train._snapshot`).

``torch.utils.checkpoint`` does not fit a *second-order* unroll: the inner ``autograd.grad`` call
inside a checkpointed region unpacks saved tensors during the forward pass, which makes the
non-reentrant variant recompute (and keep) them; the reentrant variant accumulates gradients of
closed-over tensors into ``.grad`` instead of returning them. Here a segment is one
``autograd.Function``:

- forward: the segment runs values-only under ``no_grad`` (the inner gradients are computed and
  dropped step by step), while a ``TorchFunctionMode`` records every tensor that requires grad and
  that the segment reads without producing it: learnable hyperparameters closed over by the
  optimizer, meta-parameters closed over by the loss. They become explicit inputs of the Function,
  so their meta-gradients are returned like any other (``torch.autograd.grad`` works).
- backward: the segment is recomputed with its full second-order graph from its saved inputs (same
  RNG state) and differentiated with ``torch.autograd.grad``.

Only the segment boundaries are kept between the two passes, so peak memory grows like
``T / k + k`` for segments of ``k`` steps, ``2 sqrt(T)`` at ``k = sqrt(T)``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import optree
import torch
from torch.overrides import TorchFunctionMode


class _Externals(TorchFunctionMode):
    """Records tensors requiring grad that a computation reads but did not produce."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.produced: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary(
            {id(t): t for t in known}
        )
        self.external: dict[int, torch.Tensor] = {}

    def _is_produced(self, t: torch.Tensor) -> bool:
        return self.produced.get(id(t)) is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen: list[Any] = optree.tree_leaves((args, kwargs))  # type: ignore[arg-type]
        for t in seen:
            if (
                isinstance(t, torch.Tensor)
                and t.requires_grad
                and id(t) not in self.external
                and not self._is_produced(t)
            ):
                self.external[id(t)] = t
        out = func(*args, **kwargs)
        for t in optree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.produced[id(t)] = t
        return out


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class _Segment(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, replay, n_explicit, rng, *inputs):
        ctx.replay, ctx.n_explicit, ctx.rng = replay, n_explicit, rng
        ctx.save_for_backward(*inputs)
        ctx.mark_non_differentiable(*[v for v in values if not v.is_floating_point()])
        return tuple(values)

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = ctx.saved_tensors
        explicit, externals = inputs[: ctx.n_explicit], inputs[ctx.n_explicit :]
        fresh = [
            x.detach().requires_grad_(x.requires_grad) if x.is_floating_point() else x
            for x in explicit
        ]
        devices = list(range(torch.cuda.device_count())) if ctx.rng[1] is not None else []
        with torch.enable_grad(), torch.random.fork_rng(devices=devices):
            _set_rng_state(ctx.rng)
            outs = ctx.replay(fresh)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if o.requires_grad and g is not None]
        targets = [x for x in fresh if x.requires_grad] + list(externals)
        grads = iter(
            torch.autograd.grad(
                [o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True
            )
            if pairs and targets
            else [None] * len(targets)
        )
        explicit_grads = [next(grads) if x.requires_grad else None for x in fresh]
        return (None, None, None, None, *explicit_grads, *grads)


def checkpointed(segment: Callable[..., Any], params: Any, state: Any) -> Any:
    """Runs ``segment(params, state)`` with its graph recomputed in the backward pass."""
    leaves: list[torch.Tensor]
    leaves, in_spec = optree.tree_flatten((params, state))  # type: ignore[arg-type]
    rng = _rng_state()
    mode = _Externals(list(leaves))
    with torch.no_grad(), mode:
        values = segment(*optree.tree_unflatten(in_spec, leaves))
    out_leaves, out_spec = optree.tree_flatten(values)
    externals = list(mode.external.values())

    def replay(fresh):
        p, s = optree.tree_unflatten(in_spec, fresh)
        return optree.tree_leaves(segment(p, s))

    outs = _Segment.apply(out_leaves, replay, len(leaves), rng, *leaves, *externals)
    return optree.tree_unflatten(out_spec, list(outs))
