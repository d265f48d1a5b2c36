"""Reptile (Nichol et al. 2018): move the initialisation towards each task's adapted params."""

from __future__ import annotations

import optree

from .._inner import stop_gradient
from .._typing import Params
from ..optim._base import GradientTransformation
from ._base import (
    Batch,
    LossFn,
    MetaLearner,
    _check_positive_int,
    descend,
    inner_optimizer,
    params_only,
)

__all__ = ["Reptile"]


class Reptile(MetaLearner):
    """Reptile: the meta-gradient of a task is ``theta - phi``, ``phi`` after ``steps`` inner steps.

    With an outer SGD step of size ``epsilon`` this is Reptile's update ``theta += epsilon (phi -
    theta)`` averaged over the meta-batch (the batched version of Nichol et al. 2018, Alg. 2). No
    second derivatives and no graph through the inner loop. Tasks adapt on their support set.

    Args:
        inner_lr: the inner SGD learning rate (default 0.01).
        inner_opt: another inner optimizer (the paper uses Adam); it carries its own learning
            rate, so not with ``inner_lr``.
    """

    name = "reptile"

    def __init__(
        self,
        model,
        loss: str | LossFn = "mse",
        *,
        inner_lr: float | None = None,
        steps: int = 5,
        inner_opt: GradientTransformation | None = None,
        strategy: str = "auto",
    ) -> None:
        super().__init__(model, loss, strategy=strategy)
        _check_positive_int("Reptile(model, ...)", "steps", steps)
        self.steps = steps
        _, self.inner_opt = inner_optimizer("Reptile(model, ...)", inner_lr, inner_opt)

    def adapt(self, meta, support: Batch) -> Params:
        return descend(self.data_loss, meta["params"], self.inner_opt, support, self.steps)

    def meta_grad(self, meta, support: Batch, query: Batch):
        self._check_meta_batch("meta_grad", meta, support, query)

        def one(meta, support, query):
            phi = self.adapt(meta, support)
            theta = stop_gradient(dict(meta["params"]))
            delta = {k: theta[k] - phi[k] for k in theta}
            return delta, self.metrics(phi, query)

        deltas, metrics = self._map("reptile", one)(meta, support, query)
        return params_only(meta, optree.tree_map(lambda d: d.mean(0), deltas)), metrics
