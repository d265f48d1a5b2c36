"""The MAML family: MAML, first-order MAML, Meta-SGD, ANIL and MAML++'s pieces, one class."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from .. import optim
from .._inner import inner_loop, stop_gradient
from .._typing import Params, PyTree
from ._base import (
    Batch,
    LossFn,
    MetaLearner,
    _check_param_names,
    _check_positive_int,
    descend,
    inner_optimizer,
)

__all__ = ["MAML"]

_LEARN_LR = (None, "per_param", "per_layer_per_step")


def _check_step_weights(call: str, weights: Sequence[float] | None, steps: int):
    """``steps`` non-negative floats, at least one positive (else there is no meta-loss)."""
    if weights is None:
        return None
    weights = [float(w) for w in weights]
    if (
        len(weights) != steps
        or not all(0 <= w < math.inf for w in weights)  # also rejects nan
        or not any(w > 0 for w in weights)
    ):
        raise ValueError(
            f"{call}: expected step_weights to be {steps} finite non-negative numbers (one per "
            f"inner step), at least one positive; got {weights!r}."
        )
    return weights


class MAML(MetaLearner):
    """Model-agnostic meta-learning (Finn et al. 2017) and its variants.

    Per task: ``steps`` SGD steps (or ``inner_opt`` steps) on the support set from the
    meta-parameters, then the query loss at the adapted params; the meta-gradient is taken
    through the steps (second order) or passed straight through (``first_order=True``, FOMAML).

    Args:
        model: the :class:`~metafunc.FunctionalModel`; ``init()`` uses its own parameters.
        loss: ``"mse"``, ``"cross_entropy"`` or ``loss(outputs, targets)``.
        inner_lr: the inner SGD learning rate (the initial value when it is learned); default
            0.01.
        inner_opt: another inner optimizer, a :mod:`metafunc.optim` one such as
            ``optim.adam(lr=1e-2)`` (its state starts afresh for every task); its own learning
            rate replaces ``inner_lr``. Not with ``learn_lr``, which learns SGD's rates.
        steps: inner steps per task.
        first_order: first-order MAML.
        adapt: names of the params adapted in the inner loop (default all). ANIL (Raghu et al.
            2020) adapts the head only: ``adapt=["head.weight", "head.bias"]``.
        learn_lr: ``"per_param"``: Meta-SGD (Li et al. 2017), a learned learning rate for every
            entry of every adapted param, in ``meta["lr"]``; ``"per_layer_per_step"``: MAML++
            (Antoniou et al. 2019), one learned rate per adapted tensor and step.
        step_weights: MAML++'s multi-step loss: the query loss is ``sum_t w_t L(params_t)`` over
            the steps ``t = 1..steps`` (MAML++ anneals them towards the last step; build a new
            learner with new weights, :meth:`with_step_weights`).
        strategy: how tasks are batched, as in :func:`~metafunc.vmap_tasks`.
    """

    name = "maml"

    def __init__(
        self,
        model,
        loss: str | LossFn = "mse",
        *,
        inner_lr: float | None = None,
        inner_opt: optim.GradientTransformation | None = None,
        steps: int = 1,
        first_order: bool = False,
        adapt: Collection[str] | None = None,
        learn_lr: str | None = None,
        step_weights: Sequence[float] | None = None,
        strategy: str = "auto",
    ) -> None:
        super().__init__(model, loss, strategy=strategy)
        call = f"{type(self).__name__}(model, ...)"
        inner_lr, inner_opt = inner_optimizer(call, inner_lr, inner_opt, learn_lr)
        _check_positive_int(call, "steps", steps)
        if not isinstance(first_order, bool):
            raise TypeError(f"{call}: expected first_order to be a bool, got {first_order!r}.")
        if learn_lr not in _LEARN_LR:
            raise ValueError(f"{call}: expected learn_lr in {_LEARN_LR}, got {learn_lr!r}.")
        names = list(model.params)
        adapt = names if adapt is None else _check_param_names(call, "adapt", adapt, model)
        if not adapt:
            raise ValueError(f"{call}: adapt is empty; name at least one param to adapt.")
        self.inner_lr, self.steps, self.first_order = inner_lr, steps, bool(first_order)
        self.inner_opt = inner_opt  # SGD at inner_lr unless given; learned rates build their own
        self.adapted = [n for n in names if n in set(adapt)]
        self.learn_lr = learn_lr
        self._set_step_weights(call, step_weights)

    @property
    def step_weights(self) -> list[float] | None:
        """MAML++'s multi-step-loss weights, one per inner step (``None``: the last step only).

        Assigning new weights (MAML++'s annealing) checks them. They are kept as a tensor, so a
        ``torch.compile``-d meta-step reads them as an input and does not recompile when they
        change.
        """
        return None if self._step_weights is None else self._step_weights.tolist()

    @step_weights.setter
    def step_weights(self, weights: Sequence[float] | None) -> None:
        self._set_step_weights(f"{type(self).__name__}.step_weights", weights)

    def _set_step_weights(self, call: str, weights: Sequence[float] | None) -> None:
        checked = _check_step_weights(call, weights, self.steps)
        self._step_weights = None if checked is None else torch.tensor(checked, dtype=torch.float64)

    def with_step_weights(self, step_weights: Sequence[float] | None) -> MAML:
        """A copy with other multi-step-loss weights (MAML++'s annealing)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._maps = {}
        new._map("task_loss", new.task_loss)
        new._set_step_weights("MAML.with_step_weights", step_weights)
        return new

    def _meta_keys(self) -> set[str]:
        return {"params", "lr"} if self.learn_lr is not None else {"params"}

    def _check_meta_batch(self, method: str, meta: Any, support: Any, query: Any) -> str:
        call = super()._check_meta_batch(method, meta, support, query)
        if self.learn_lr is None:
            return call
        lr = meta["lr"]
        for k in self.adapted:
            want = tuple(meta["params"][k].shape) if self.learn_lr == "per_param" else (self.steps,)
            got = tuple(lr[k].shape) if isinstance(lr, Mapping) and k in lr else None
            if got != want:
                raise ValueError(
                    f"{call}: learn_lr={self.learn_lr!r} expects meta['lr'][{k!r}] of shape "
                    f"{want}, got {'no entry' if got is None else got}. Start from this "
                    "learner's init() (meta-parameters of another learn_lr do not fit)."
                )
        return call

    def init(self) -> dict[str, PyTree]:
        """``{"params": model.params}``, plus ``{"lr": ...}`` when learning rates are learned."""
        params = dict(self.model.params)
        meta: dict[str, PyTree] = {"params": params}
        if self.learn_lr == "per_param":
            meta["lr"] = {
                k: torch.full_like(params[k].detach(), self.inner_lr).requires_grad_()
                for k in self.adapted
            }
        elif self.learn_lr == "per_layer_per_step":
            meta["lr"] = {
                k: torch.full(
                    (self.steps,),
                    self.inner_lr,
                    dtype=params[k].dtype,
                    device=params[k].device,
                    requires_grad=True,
                )
                for k in self.adapted
            }
        return meta

    def _opts(self, meta: Mapping[str, Any]):
        if self.learn_lr is None:
            return self.inner_opt
        lr = meta["lr"]
        if self.learn_lr == "per_param":
            return optim.sgd(lr=dict(lr))
        return [optim.sgd(lr={k: lr[k][t] for k in self.adapted}) for t in range(self.steps)]

    def _split(self, params: Params) -> tuple[Params, Params]:
        fast = {k: params[k] for k in self.adapted}
        rest = {k: v for k, v in params.items() if k not in fast}
        return fast, rest

    def _run(self, meta, support: Batch, first_order: bool, record: str):
        fast, rest = self._split(meta["params"])

        def inner(p, batch):
            return self.data_loss({**rest, **p}, batch)

        result = inner_loop(
            inner,
            fast,
            self._opts(meta),
            support,
            steps=self.steps,
            first_order=first_order,
            record=record,
        )
        return result, rest

    def task_loss(self, meta, support: Batch, query: Batch):
        record = "all" if self._step_weights is not None else "endpoints"
        result, rest = self._run(meta, support, self.first_order, record)
        final = {**rest, **result.params}
        loss, metrics = self.loss_and_metrics(final, query)
        if self._step_weights is not None:
            tape = result.tape
            step_losses = torch.stack(
                [self.data_loss({**rest, **tape[t]}, query) for t in range(1, self.steps + 1)]
            )
            loss = (self._step_weights.to(step_losses) * step_losses).sum()
        metrics["support_loss_before"] = result.losses[0].detach()
        return loss, metrics

    def adapt(self, meta, support: Batch) -> Params:
        meta = stop_gradient(dict(meta))
        fast, rest = self._split(meta["params"])

        def inner(p, batch):
            return self.data_loss({**rest, **p}, batch)

        return {**rest, **descend(inner, fast, self._opts(meta), support, self.steps)}
