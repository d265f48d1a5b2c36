"""R2-D2: a ridge-regression head solved in closed form on each task's support set."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from .. import _checks
from ._base import explain_frozen
from ._protonet import HeadLearner

__all__ = ["R2D2"]


@explain_frozen
@dataclasses.dataclass(frozen=True)
class R2D2(HeadLearner):
    """R2-D2 (Bertinetto et al. 2019): ridge regression onto one-hot targets, in closed form.

    Per task, with ``X`` the ``(n, d)`` support embeddings and ``Y`` the ``(n, ways)`` one-hot
    targets, the head is ``W = argmin ||X W - Y||^2 + lam ||W||^2``, computed in whichever form
    solves the smaller system:

    - ``n < d`` (few shots; the usual case): ``W = X^T (X X^T + lam I_n)^{-1} Y``, the Woodbury
      form (Bertinetto et al., eq. 7), an ``n x n`` solve;
    - otherwise ``W = (X^T X + lam I_d)^{-1} X^T Y``, a ``d x d`` solve.

    The two are the same matrix. A query ``f`` gets the logits ``alpha f W + beta``; the
    meta-gradient flows through the solve (``torch.linalg.solve``, differentiated by
    autograd) into the backbone and into the learned ``meta["head"]``: ``log_lam`` (``lam =
    exp(log_lam)`` stays positive), ``scale`` (``alpha``) and ``bias`` (``beta``). ``beta`` is
    the paper's scalar bias: under the softmax cross-entropy a bias shared by every class
    cancels, so its meta-gradient is exactly zero (kept for fidelity, harmless).

    Args:
        model: the backbone, a :class:`~metafunc.FunctionalModel` of a features-only module.
        ways: the classes per task; targets are in ``[0, ways)``.
        lam: the initial ridge penalty (MetaOptNet's R2-D2 head uses 50 with ResNet-12
            features).
        scale, bias: the initial ``alpha`` and ``beta``.
        strategy: how tasks are batched, as in :func:`~metafunc.vmap_tasks`.

    Example:
        >>> import torch, metafunc
        >>> from metafunc.algorithms import R2D2
        >>> fm = metafunc.functionalize(torch.nn.Linear(4, 8))
        >>> learner = R2D2(fm, ways=2, lam=1.0)
        >>> sorted(learner.init()["head"])
        ['bias', 'log_lam', 'scale']
        >>> x, y = torch.randn(1, 6, 4), torch.tensor([[0, 1, 0, 1, 0, 1]])
        >>> grads, metrics = learner.meta_grad(learner.init(), (x, y), (x, y))
        >>> abs(grads["head"]["bias"].item()) < 1e-6  # the softmax ignores a shared bias
        True

    References: Bertinetto, Henriques, Torr, Vedaldi, "Meta-learning with differentiable
    closed-form solvers", ICLR 2019, https://arxiv.org/abs/1805.08136.
    """

    name: ClassVar[str] = "r2d2"

    _: dataclasses.KW_ONLY
    lam: float = 50.0
    scale: float = 1.0
    bias: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        call = "R2D2(model, ...)"
        _checks.positive_finite(call, "lam", self.lam, meaning="the ridge penalty")
        _checks.finite_number(call, "scale", self.scale, minimum=-math.inf)
        _checks.finite_number(call, "bias", self.bias, minimum=-math.inf)

    def _head_init(self) -> dict[str, torch.Tensor]:
        def value(v: float) -> torch.Tensor:
            return torch.tensor(v, dtype=self._dtype())

        return {
            "log_lam": value(math.log(self.lam)),
            "scale": value(self.scale),
            "bias": value(self.bias),
        }

    def fit_head(self, meta, features, targets):
        head = meta["head"]
        X, Y = features, self._one_hot(targets, features)
        n, d = X.shape
        lam = head["log_lam"].exp()
        if n < d:  # Woodbury: an n x n system
            eye = torch.eye(n, dtype=X.dtype, device=X.device)
            W = X.T @ torch.linalg.solve(X @ X.T + lam * eye, Y)
        else:
            eye = torch.eye(d, dtype=X.dtype, device=X.device)
            W = torch.linalg.solve(X.T @ X + lam * eye, X.T @ Y)
        weight = head["scale"] * W.T
        return weight, head["bias"].expand(self.ways)
