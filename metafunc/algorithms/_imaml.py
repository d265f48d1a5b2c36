"""iMAML as a meta-learner over :func:`metafunc.implicit.imaml`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from .. import _checks, optim
from .._typing import Params
from ..implicit import imaml, solve_cg
from ..implicit._root import _check_common
from ..optim import GradientTransformation
from ._base import Batch, MetaLearner, explain_frozen

__all__ = ["IMAML"]


@explain_frozen
@dataclasses.dataclass(frozen=True)
class IMAML(MetaLearner):
    """Implicit MAML (Rajeswaran et al. 2019): proximal inner problem, implicit meta-gradient.

    Per task: ``phi* = argmin L_support(phi) + lam/2 ||phi - theta||^2`` (``steps`` inner SGD
    steps); the meta-gradient of ``L_query(phi*)`` is ``(I + H/lam)^{-1} grad L_query(phi*)``,
    by conjugate gradient (``solve``). Memory does not grow with ``steps``. ``if_not_converged``,
    ``tol`` and ``atol`` are those of :func:`metafunc.implicit.imaml`: by default a meta-gradient
    whose inner problem ``steps`` did not solve (or whose CG did not converge) warns.
    """

    name: ClassVar[str] = "imaml"

    _: dataclasses.KW_ONLY
    inner_lr: float = 0.01
    steps: int = 10
    lam: float = 1.0
    solve: Callable[..., Any] | None = None
    if_not_converged: str = "warn"
    tol: float = 1e-3
    atol: float = 0.0
    _opt: GradientTransformation = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        call = "IMAML(model, ...)"
        _checks.positive_finite(call, "inner_lr", self.inner_lr)
        _checks.positive_finite(call, "lam", self.lam)
        _checks.positive_int(call, "steps", self.steps)
        # the solver and policy are checked now, not at the first meta_grad
        _check_common(
            call, self.data_loss, self.solve or solve_cg, self.if_not_converged, None,
            self.tol, self.atol,
        )  # fmt: skip
        self._derive(lam=float(self.lam), _opt=optim.sgd(lr=self.inner_lr))

    def _solve(self, params, support: Batch):
        return imaml(
            self.data_loss,
            params,
            self._opt,
            support,
            lam=self.lam,
            steps=self.steps,
            solve=self.solve,
            if_not_converged=self.if_not_converged,
            tol=self.tol,
            atol=self.atol,
        )

    def task_loss(self, meta, support: Batch, query: Batch):
        result = self._solve(meta["params"], support)
        loss, metrics = self.loss_and_metrics(result.params, query)
        metrics["inner_grad_norm"] = result.grad_norm
        return loss, metrics

    def adapt(self, meta, support: Batch) -> Params:
        return {k: v.detach() for k, v in self._solve(meta["params"], support).params.items()}
