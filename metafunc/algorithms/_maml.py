"""The MAML family: MAML, first-order MAML, Meta-SGD, ANIL and MAML++'s pieces, one class."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar, cast

import torch

from .. import _checks
from .._inner import inner_loop, stop_gradient
from .._typing import Params, PyTree
from ..optim import GradientTransformation
from . import _learner_checks
from ._base import Batch, MetaLearner, explain_frozen
from ._descend import descend, inner_optimizer
from ._learned_lr import LearnedLR, learned_lr

__all__ = ["MAML"]


@explain_frozen
@dataclasses.dataclass(frozen=True)
class MAML(MetaLearner):
    """Model-agnostic meta-learning (Finn et al. 2017) and its variants.

    Per task: ``steps`` SGD steps (or ``inner_opt`` steps) on the support set from the
    meta-parameters, then the query loss at the adapted params; the meta-gradient is taken
    through the steps (second order) or passed straight through (``first_order=True``, FOMAML).

    Args:
        model: the :class:`~metafunc.FunctionalModel`; ``init()`` uses its own parameters.
        loss: ``"mse"``, ``"cross_entropy"`` or ``loss(outputs, targets)``.
        inner_lr: the inner SGD learning rate (the initial value when it is learned); default
            0.01. ``None`` on a learner with ``inner_opt``.
        inner_opt: another inner optimizer, a :mod:`metafunc.optim` one such as
            ``optim.adam(lr=1e-2)`` (its state starts afresh for every task); it carries its
            own learning rate, so not with ``inner_lr``, nor with ``learn_lr``, which learns
            SGD's rates.
        steps: inner steps per task.
        first_order: first-order MAML.
        adapted: names of the params adapted in the inner loop (default all; kept in the
            model's order). ANIL (Raghu et al. 2020) adapts the head only:
            ``adapted=["head.weight", "head.bias"]``. (Formerly ``adapt``, which still works
            for one release with a ``DeprecationWarning``.)
        learn_lr: learned inner learning rates, in ``meta["lr"]``: :class:`PerParamLR` for
            Meta-SGD (Li et al. 2017), a rate for every entry of every adapted param;
            :class:`PerStepLR` for MAML++ (Antoniou et al. 2019), one rate per adapted tensor
            and step. (The strings ``"per_param"`` and ``"per_layer_per_step"`` still work for
            one release with a ``DeprecationWarning``.)
        step_weights: MAML++'s multi-step loss: the query loss is ``sum_t w_t L(params_t)`` over
            the steps ``t = 1..steps`` (MAML++ anneals them towards the last step: a learner
            with new weights is :meth:`with_step_weights`).
        strategy: how tasks are batched, as in :func:`~metafunc.vmap_tasks`.

    Example:
        >>> import torch, metafunc
        >>> from metafunc.algorithms import MAML, PerStepLR
        >>> fm = metafunc.functionalize(torch.nn.Linear(2, 1))
        >>> mamlpp = MAML(fm, steps=2, learn_lr=PerStepLR(), step_weights=[0.5, 0.5])
        >>> mamlpp.with_step_weights([0.0, 1.0]).step_weights
        (0.0, 1.0)
    """

    name: ClassVar[str] = "maml"

    _: dataclasses.KW_ONLY
    inner_lr: float | None = None
    inner_opt: GradientTransformation | None = None
    steps: int = 1
    first_order: bool = False
    adapted: Collection[str] | None = None
    learn_lr: LearnedLR | None = None
    step_weights: Sequence[float] | None = None
    # the inner optimizer (inner_opt, or SGD at inner_lr) and the step weights as a tensor, so
    # a torch.compile-d meta-step reads them as an input
    _opt: GradientTransformation = dataclasses.field(init=False, repr=False, compare=False)
    _step_weights: torch.Tensor | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        call = f"{type(self).__name__}(model, ...)"
        learn_lr = learned_lr(call, self.learn_lr)
        inner_lr, opt = inner_optimizer(call, self.inner_lr, self.inner_opt, learn_lr)
        _checks.positive_int(call, "steps", self.steps)
        _checks.boolean(call, "first_order", self.first_order)
        adapted = (
            tuple(self.model.params)
            if self.adapted is None
            else _learner_checks.param_names(call, "adapted", self.adapted, self.model)
        )
        if not adapted:
            raise ValueError(f"{call}: adapted is empty; name at least one param to adapt.")
        weights = _learner_checks.step_weights(call, self.step_weights, self.steps)
        self._derive(
            inner_lr=inner_lr,
            learn_lr=learn_lr,
            adapted=adapted,
            step_weights=weights,
            _opt=opt,
            _step_weights=None if weights is None else torch.tensor(weights, dtype=torch.float64),
        )

    def with_step_weights(self, step_weights: Sequence[float] | None) -> MAML:
        """A copy with other multi-step-loss weights (MAML++'s annealing), checked as in the
        constructor: ``dataclasses.replace(self, step_weights=step_weights)``."""
        return dataclasses.replace(self, step_weights=step_weights)

    @property
    def _names(self) -> tuple[str, ...]:
        """``adapted``, which ``__post_init__`` has made a tuple of names."""
        return cast(tuple[str, ...], self.adapted)

    def _meta_keys(self) -> set[str]:
        return {"params", "lr"} if self.learn_lr is not None else {"params"}

    def _check_meta_batch(self, method: str, meta: Any, support: Any, query: Any) -> str:
        call = super()._check_meta_batch(method, meta, support, query)
        if self.learn_lr is None:
            return call
        lr = meta["lr"]
        for k in self._names:
            want = self.learn_lr.shape(meta["params"][k], self.steps)
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
        if self.learn_lr is not None:
            assert self.inner_lr is not None  # learned rates exclude inner_opt
            meta["lr"] = self.learn_lr.init(params, self._names, self.inner_lr, self.steps)
        return meta

    def _opts(self, meta: Mapping[str, Any]):
        if self.learn_lr is None:
            return self._opt
        return self.learn_lr.optimizers(meta["lr"], self._names, self.steps)

    def _split(self, params: Params) -> tuple[Params, Params]:
        fast = {k: params[k] for k in self._names}
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


def _accept_old_spellings(init: Any) -> Any:
    """MAML's constructor, also taking for one release the old ``adapt=`` keyword and the old
    ``learn_lr`` strings, each with a ``DeprecationWarning`` naming the new spelling."""

    @functools.wraps(init)
    def __init__(self: MAML, *args: Any, **kwargs: Any) -> None:
        call = f"{type(self).__name__}(model, ...)"
        if "adapt" in kwargs:
            if "adapted" in kwargs:
                raise TypeError(
                    f"{call}: got adapt= and adapted=; adapt is the old name of adapted. Pass "
                    "adapted only."
                )
            warnings.warn(
                f"{call}: the adapt= argument is renamed adapted= (adapt() is the method that "
                "adapts to a task); pass adapted=[...], same meaning. adapt= will be removed "
                "in the next release.",
                DeprecationWarning,
                stacklevel=2,
            )
            kwargs["adapted"] = kwargs.pop("adapt")
        if isinstance(kwargs.get("learn_lr"), str):
            kwargs["learn_lr"] = learned_lr(call, kwargs["learn_lr"])
        init(self, *args, **kwargs)

    return __init__


setattr(MAML, "__init__", _accept_old_spellings(MAML.__init__))  # noqa: B010
