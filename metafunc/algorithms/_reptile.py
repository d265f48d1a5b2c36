"""Reptile (Nichol et al. 2018): move the initialisation towards each task's adapted params."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import optree

from .. import _checks
from .._inner import stop_gradient
from .._typing import Params
from ..optim._base import GradientTransformation
from ._base import Batch, MetaLearner, explain_frozen
from ._descend import descend, inner_optimizer, params_only

__all__ = ["Reptile"]


@explain_frozen
@dataclasses.dataclass(frozen=True)
class Reptile(MetaLearner):
    """Reptile: the meta-gradient of a task is ``theta - phi``, ``phi`` after ``steps`` inner steps.

    With an outer SGD step of size ``epsilon`` this is Reptile's update ``theta += epsilon (phi -
    theta)`` averaged over the meta-batch (the batched version of Nichol et al. 2018, Alg. 2). No
    second derivatives and no graph through the inner loop. Tasks adapt on their support set.

    Args:
        inner_lr: the inner SGD learning rate (default 0.01; ``None`` with ``inner_opt``).
        inner_opt: another inner optimizer (the paper uses Adam); it carries its own learning
            rate, so not with ``inner_lr``.
    """

    name: ClassVar[str] = "reptile"

    _: dataclasses.KW_ONLY
    inner_lr: float | None = None
    steps: int = 5
    inner_opt: GradientTransformation | None = None
    _opt: GradientTransformation = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        call = "Reptile(model, ...)"
        _checks.positive_int(call, "steps", self.steps)
        inner_lr, opt = inner_optimizer(call, self.inner_lr, self.inner_opt)
        self._derive(inner_lr=inner_lr, _opt=opt)

    def adapt(self, meta, support: Batch) -> Params:
        return descend(self.data_loss, meta["params"], self._opt, support, self.steps)

    def meta_grad(self, meta, support: Batch, query: Batch):
        self._check_meta_batch("meta_grad", meta, support, query)

        def one(meta, support, query):
            phi = self.adapt(meta, support)
            theta = stop_gradient(dict(meta["params"]))
            delta = {k: theta[k] - phi[k] for k in theta}
            return delta, self.metrics(phi, query)

        deltas, metrics = self._map("reptile", one)(meta, support, query)
        return params_only(meta, optree.tree_map(lambda d: d.mean(0), deltas)), metrics
