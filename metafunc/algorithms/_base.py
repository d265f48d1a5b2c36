"""What every meta-learning algorithm shares: task losses, meta-batches and evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.nn.functional as F

from .._functional import FunctionalModel
from .._tree import close_matches
from .._typing import Params, PyTree
from .._vmap import vmap_tasks

__all__ = ["MetaLearner", "resolve_loss"]

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_LOSSES: dict[str, LossFn] = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


def resolve_loss(call: str, loss: str | LossFn) -> LossFn:
    """``"mse"``, ``"cross_entropy"`` or a callable ``loss(outputs, targets) -> scalar``."""
    if callable(loss):
        return loss
    if isinstance(loss, str) and loss in _LOSSES:
        return _LOSSES[loss]
    raise ValueError(
        f"{call}: expected loss to be one of {sorted(_LOSSES)} or a callable "
        f"loss(outputs, targets) -> scalar, got {loss!r}."
    )


def _check_positive_int(call: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{call}: expected {name} to be a positive int, got {value!r}.")


def _check_param_names(call: str, what: str, names: Any, model: FunctionalModel) -> list[str]:
    """``names`` (a list of the model's trainable param names), in the model's order."""
    known = list(model.params)
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{call}: expected {what} to be a list of param names, got {names!r}.")
    for n in names:
        if n not in model.params:
            raise ValueError(
                f"{call}: {what} names {n!r}, which is not a trainable param of the model"
                f"{close_matches(n, known)}. Params: {known}."
            )
    return [n for n in known if n in set(names)]


def params_only(meta: Any, param_grads: Any) -> dict[str, Any]:
    """A meta-gradient with ``param_grads`` under ``"params"`` and zeros for every other entry
    of ``meta`` (for algorithms whose meta-gradient reaches the params only)."""
    grads = {key: optree.tree_map(torch.zeros_like, value) for key, value in meta.items()}
    grads["params"] = param_grads
    return grads


def _check_positive(call: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{call}: expected {name} to be a positive number, got {value!r}.")


class MetaLearner:
    """Base class: a model, a task loss, and a meta-objective over a batch of tasks.

    Meta-parameters are a dict of tensors (``{"params": {...}, ...}``) created by :meth:`init`;
    an outer optimizer (``torch.optim`` over ``optree.tree_leaves(meta)``, or
    :mod:`metafunc.optim`) updates them from :meth:`meta_grad`. A task is a pair
    ``(support, query)`` of ``(inputs, targets)``; a meta-batch stacks tasks along dim 0.
    """

    name = "meta-learner"

    def __init__(
        self,
        model: FunctionalModel,
        loss: str | LossFn = "mse",
        *,
        strategy: str = "auto",
    ) -> None:
        call = f"{type(self).__name__}(model, ...)"
        if not isinstance(model, FunctionalModel):
            raise TypeError(
                f"{call}: expected a metafunc.FunctionalModel, got {type(model).__name__}. Wrap "
                "a module with metafunc.functionalize(module)."
            )
        self.model = model
        self.loss = resolve_loss(call, loss)
        self.classification = self.loss is F.cross_entropy
        self.strategy = strategy
        self._maps: dict[str, Any] = {}

    # ------------------------------------------------------------------ to be provided
    def init(self) -> dict[str, PyTree]:
        """The initial meta-parameters: ``{"params": model.params}`` (the module's own)."""
        return {"params": dict(self.model.params)}

    def task_loss(self, meta: Any, support: Batch, query: Batch):
        """``(meta_loss, metrics)`` for one task; differentiable in ``meta``."""
        raise NotImplementedError

    def adapt(self, meta: Any, support: Batch) -> Params:
        """The task-adapted params for evaluation (no meta-gradient)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def data_loss(self, params: Params, batch: Batch) -> torch.Tensor:
        x, y = batch
        return self.loss(self.model(params, x), y)

    def metrics(self, params: Params, batch: Batch) -> dict[str, torch.Tensor]:
        x, y = batch
        out = self.model(params, x)
        result = {"loss": self.loss(out, y).detach()}
        if self.classification:
            result["accuracy"] = (out.argmax(-1) == y).to(out.dtype).mean().detach()
        return result

    def _map(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if key not in self._maps:
            self._maps[key] = vmap_tasks(fn, in_dims=(None, 0, 0), strategy=self.strategy)
        return self._maps[key]

    def meta_grad(
        self, meta: Any, support: Batch, query: Batch
    ) -> tuple[dict[str, PyTree], dict[str, torch.Tensor]]:
        """The meta-gradient of the mean task loss over a meta-batch, and per-task metrics."""
        run = self._map("task_loss", self.task_loss)
        losses, metrics = run(meta, support, query)
        leaves, spec = optree.tree_flatten(meta)
        grads = torch.autograd.grad(losses.mean(), leaves, allow_unused=True)
        grads = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads))
        detached = {k: v.detach() for k, v in metrics.items()}
        return optree.tree_unflatten(spec, list(grads)), detached  # type: ignore[return-value]

    def evaluate(self, meta: Any, support: Batch, query: Batch) -> dict[str, torch.Tensor]:
        """Per-task query metrics after adaptation on the support set (shape ``(tasks,)``)."""
        detached = optree.tree_map(lambda x: x.detach(), meta)

        def one(meta, support, query):
            return self.metrics(self.adapt(meta, support), query)

        return self._map("evaluate", one)(detached, support, query)
