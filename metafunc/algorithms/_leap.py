"""Leap (Flennerhag et al. 2019): an initialisation that shortens the tasks' learning paths."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, ClassVar

import optree
import torch
from torch.func import grad_and_value

from .. import _checks
from .._inner import stop_gradient
from .._typing import Params
from ..optim._base import GradientTransformation, apply_updates
from ._base import Batch, MetaLearner, explain_frozen
from ._descend import descend, inner_optimizer, params_only

__all__ = ["Leap"]

_METRICS = ("length", "energy")


def _sq(tree) -> torch.Tensor:
    return torch.stack([(x * x).sum() for x in optree.tree_leaves(tree)]).sum()


def path_gradient(points, metric: str) -> Params:
    """Leap's gradient for one task from its trajectory ``[(params_i, f_i, grad_i), ...]``."""
    total: Any = optree.tree_map(torch.zeros_like, points[0][0])
    for (p, f, g), (p_next, f_next, _) in itertools.pairwise(points):
        dp = {k: p_next[k] - p[k] for k in p}
        df = f_next - f
        step = {k: -(dp[k] + df * g[k]) for k in p}
        if metric == "length":
            scale = 1 / torch.sqrt(_sq(dp) + df * df).clamp_min(1e-12)
        else:
            scale = torch.full_like(df, 2.0)
        total = {k: total[k] + scale * step[k] for k in total}
    return total


@explain_frozen
@dataclasses.dataclass(frozen=True)
class Leap(MetaLearner):
    """Leap: the meta-objective is the length of each task's path on the loss surface.

    A task's inner loop from ``theta_0 = meta["params"]`` visits ``theta_0 .. theta_K``; with
    ``z_i = (theta_i, f(theta_i))`` (params and support loss) the objective is the path length
    ``sum_i ||z_{i+1} - z_i||`` (``metric="length"``) or its energy ``sum_i ||z_{i+1} - z_i||^2``
    (``"energy"``). As in the paper (Flennerhag et al. 2019, eq. 8), ``z_{i+1}`` is held fixed
    and the Jacobian of ``theta_i`` in ``theta_0`` is taken as the identity, so a step's
    gradient is ``-(dtheta_i + df_i grad f(theta_i))``, divided by ``||z_{i+1} - z_i||`` for the
    length and times 2 for the energy, with ``dtheta_i = theta_{i+1} - theta_i`` and ``df_i =
    f(theta_{i+1}) - f(theta_i)``. Needs first derivatives only.
    """

    name: ClassVar[str] = "leap"

    _: dataclasses.KW_ONLY
    inner_lr: float | None = None
    steps: int = 5
    inner_opt: GradientTransformation | None = None
    metric: str = "length"
    _opt: GradientTransformation = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        call = "Leap(model, ...)"
        _checks.positive_int(call, "steps", self.steps)
        _checks.one_of(call, "metric", self.metric, _METRICS)
        inner_lr, opt = inner_optimizer(call, self.inner_lr, self.inner_opt)
        self._derive(inner_lr=inner_lr, _opt=opt)

    def trajectory(self, params: Params, support: Batch):
        """``(params_i, f_i, grad_i)`` for ``i = 0..steps`` (no grad at the last point)."""
        p = stop_gradient(dict(params))
        state = self._opt.init(p)
        points = []
        for _ in range(self.steps):
            g, f = grad_and_value(self.data_loss)(p, support)
            points.append((p, f.detach(), g))
            updates, state = self._opt.update(g, state, p)
            p = apply_updates(p, updates)
        points.append((p, self.data_loss(p, support).detach(), None))
        return points

    def adapt(self, meta, support: Batch) -> Params:
        return descend(self.data_loss, meta["params"], self._opt, support, self.steps)

    def meta_grad(self, meta, support: Batch, query: Batch):
        self._check_meta_batch("meta_grad", meta, support, query)

        def one(meta, support, query):
            points = self.trajectory(meta["params"], support)
            return path_gradient(points, self.metric), self.metrics(points[-1][0], query)

        grads, metrics = self._map("leap", one)(meta, support, query)
        return params_only(meta, optree.tree_map(lambda d: d.mean(0), grads)), metrics
