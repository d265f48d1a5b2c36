"""Prototypical Networks, and what the few-shot heads share: a learner whose task model is a
linear classifier fitted in closed form (or by a solver) on the support set's embeddings."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import _checks
from .._typing import Params, PyTree
from ._base import Batch, LossFn, MetaLearner, explain_frozen

__all__ = ["ProtoNet"]


@explain_frozen
@dataclasses.dataclass(frozen=True)
class HeadLearner(MetaLearner):
    """Base of the few-shot heads: the model embeds, a head fitted on the support set classifies.

    Per task, the model (a backbone without classifier, ``metafunc.models.*(ways=None)``) embeds
    the support and the query inputs in two forward passes (BatchNorm uses each set's own
    statistics, as in MetaOptNet's code), features flattened to ``(examples, dim)``; the
    subclass fits a linear classifier ``(weight, bias)`` of ``ways`` classes on the support
    embeddings, differentiably; the task loss is the cross-entropy of the query logits
    ``f(x) @ weight.T + bias``. :meth:`adapt` returns ``{"params": ..., "head": {"weight":
    ..., "bias": ...}}``, the backbone's params and the fitted classifier.

    Targets are class indices in ``[0, ways)`` (an Episode's remapped labels); ``ways`` is a
    constructor argument because the classifier's shape must not depend on the data (tasks
    are mapped by ``vmap``).
    """

    name: ClassVar[str] = "head-learner"

    # the heads produce logits: the loss is cross-entropy, not an argument
    loss: str | LossFn = dataclasses.field(default="cross_entropy", init=False)
    _: dataclasses.KW_ONLY
    ways: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        call = f"{type(self).__name__}(model, ...)"
        _checks.int_at_least(call, "ways", self.ways, minimum=2)

    def _head_init(self) -> dict[str, torch.Tensor]:
        """The learned head hyperparameters, ``{}`` for none."""
        return {}

    def _dtype(self) -> torch.dtype:
        return next(iter(self.model.params.values())).dtype

    def _meta_keys(self) -> set[str]:
        return {"params", "head"} if self._head_init() else {"params"}

    def init(self) -> dict[str, PyTree]:
        """``{"params": model.params}``, plus ``{"head": {...}}`` for learned head settings."""
        meta: dict[str, PyTree] = {"params": dict(self.model.params)}
        head = self._head_init()
        if head:
            meta["head"] = head
        return meta

    def _check_meta_batch(self, method: str, meta: Any, support: Any, query: Any) -> str:
        call = super()._check_meta_batch(method, meta, support, query)
        for name, (_, y) in (("support", support), ("query", query)):
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.ways:
                raise ValueError(
                    f"{call}: {name} targets range over [{low}, {high}], but ways={self.ways} "
                    f"needs class indices in [0, {self.ways - 1}]. Remap each task's labels to "
                    "0..ways-1 (EpisodeSampler does) or construct the learner with the "
                    "episodes' number of ways."
                )
        return call

    def _embed(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return self.model(params, x).flatten(1)

    def _one_hot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # a comparison, not F.one_hot: no data-dependent check, so it runs under vmap
        classes = torch.arange(self.ways, device=y.device)
        return (y[:, None] == classes).to(like.dtype)

    def fit_head(
        self, meta: Any, features: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, bias)`` of shapes ``(ways, dim)`` and ``(ways,)`` fitted to one task's
        support ``features`` ``(examples, dim)`` and class indices ``targets``."""
        raise NotImplementedError

    def _logits(self, adapted: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        head = adapted["head"]
        return self._embed(adapted["params"], x) @ head["weight"].T + head["bias"]

    def _fit(self, meta: Any, support: Batch) -> dict[str, Any]:
        x, y = support
        weight, bias = self.fit_head(meta, self._embed(meta["params"], x), y)
        return {"params": meta["params"], "head": {"weight": weight, "bias": bias}}

    def task_loss(self, meta: Any, support: Batch, query: Batch):
        return self.loss_and_metrics(self._fit(meta, support), query)

    def adapt(self, meta: Any, support: Batch) -> dict[str, Any]:
        """The backbone's params and the classifier fitted on ``support`` (detached)."""
        with torch.no_grad():
            fitted = self._fit(meta, support)
        return {part: {k: v.detach() for k, v in fitted[part].items()} for part in fitted}

    def loss_and_metrics(
        self, adapted: dict[str, Any], batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The query loss and metrics of an adapted task, ``{"params": ..., "head": ...}``."""
        x, y = batch
        out = self._logits(adapted, x)
        loss = F.cross_entropy(out, y)
        accuracy = (out.argmax(-1) == y).to(out.dtype).mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy.detach()}


@explain_frozen
@dataclasses.dataclass(frozen=True)
class ProtoNet(HeadLearner):
    """Prototypical Networks (Snell et al. 2017): the nearest class mean in embedding space.

    Per task, the prototype of class ``k`` is the mean support embedding ``c_k`` of its
    examples, and a query ``f(x)`` gets the logits ``-||f(x) - c_k||^2`` (squared Euclidean
    distances); the meta-parameters are the backbone's, trained through the query
    cross-entropy. There is no inner loop.

    The logits are computed as the equivalent linear classifier (Snell et al., section 2.4):
    ``-||f - c_k||^2 = 2 c_k . f - ||c_k||^2 - ||f||^2``, whose last term is the same for every
    class and cancels in the softmax; so ``weight = 2 c``, ``bias = -||c||^2``, and the loss,
    its gradient and the predictions are those of the distances. A class absent from a task's
    support set gets the prototype 0.

    Args:
        model: the backbone, a :class:`~metafunc.FunctionalModel` of a features-only module
            (``metafunc.models.conv4_miniimagenet()``, ...).
        ways: the classes per task; targets are in ``[0, ways)``.
        strategy: how tasks are batched, as in :func:`~metafunc.vmap_tasks`.

    Example:
        >>> import torch, metafunc
        >>> from metafunc.algorithms import ProtoNet
        >>> fm = metafunc.functionalize(torch.nn.Linear(4, 3))
        >>> learner = ProtoNet(fm, ways=2)
        >>> x, y = torch.randn(1, 6, 4), torch.tensor([[0, 1, 0, 1, 0, 1]])
        >>> grads, metrics = learner.meta_grad(learner.init(), (x, y), (x, y))
        >>> sorted(grads["params"]), sorted(metrics)
        (['bias', 'weight'], ['accuracy', 'loss'])

    References: Snell, Swersky, Zemel, "Prototypical networks for few-shot learning", NeurIPS
    2017, https://arxiv.org/abs/1703.05175.
    """

    name: ClassVar[str] = "protonet"

    def fit_head(self, meta, features, targets):
        one_hot = self._one_hot(targets, features)
        counts = one_hot.sum(0).clamp(min=1)
        prototypes = (one_hot.T @ features) / counts[:, None]
        return 2 * prototypes, -(prototypes * prototypes).sum(-1)
