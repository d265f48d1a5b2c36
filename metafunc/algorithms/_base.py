"""What every meta-learning algorithm shares: task losses, meta-batches and evaluation."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import optree
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

from .._functional import FunctionalModel
from .._norms import under_vmap
from .._rnn import exact_rnns, has_rnns
from .._tree_math import grad_or_zeros
from .._typing import Params, PyTree
from .._vmap import vmap_tasks

__all__ = ["MetaLearner", "explain_frozen", "resolve_loss"]

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_LOSSES: dict[str, LossFn] = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}
_T = TypeVar("_T")


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


def explain_frozen(cls: type[_T]) -> type[_T]:
    """``cls``, a frozen dataclass, whose refused assignments say how to make the changed copy.

    Learners are plain values: the fields are the configuration, and a variant is
    ``dataclasses.replace(learner, field=...)``, checked like a new learner."""
    refuse = cls.__setattr__

    def __setattr__(self: Any, name: str, value: Any) -> None:
        try:
            refuse(self, name, value)
        except dataclasses.FrozenInstanceError:
            raise dataclasses.FrozenInstanceError(
                f"{type(self).__name__}.{name} = ...: learners are immutable (frozen "
                f"dataclasses). Make a changed copy instead: learner = "
                f"dataclasses.replace(learner, {name}=...)."
            ) from None

    setattr(cls, "__setattr__", __setattr__)  # noqa: B010 (a dataclass refuses it in the body)
    return cls


def _with_exact_rnns(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its recurrent layers computed by :func:`exact_rnns` when it runs under vmap
    (torch's fused kernels have no batching rule); unchanged in the per-task loop. Where CUDA is
    present, cuDNN is off inside ``fn``: its recurrent kernels have no double backward (MAML's
    second order), and its weight flattening reads data pointers that vmapped tensors lack."""

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        with contextlib.ExitStack() as stack:
            if torch.cuda.is_available():
                stack.enter_context(torch.backends.cudnn.flags(enabled=False))
            if under_vmap():
                stack.enter_context(exact_rnns())
            return fn(*args)

    return run


def _unbatched_input(module: nn.Module) -> tuple[str, int, int, int] | None:
    """``(layer, rank, axis, size)``: the model's first layer (its first submodule with
    parameters, in registration order) reads an input of ``rank`` dims with ``size`` features at
    ``axis`` as one example without an example dimension; None for other first layers."""
    first = next((m for m in module.modules() if any(True for _ in m.parameters(False))), None)
    if isinstance(first, nn.Linear):
        return repr(first), 1, -1, first.in_features
    if isinstance(first, nn.modules.conv._ConvNd):
        rank = len(first.kernel_size) + 1  # (channels, *spatial)
        return repr(first), rank, 0, first.in_channels
    if isinstance(first, nn.RNNBase):
        return repr(first), 2, -1, first.input_size  # (time, features)
    return None


@explain_frozen
@dataclasses.dataclass(frozen=True)
class MetaLearner:
    """Base class: a model, a task loss, and a meta-objective over a batch of tasks.

    Meta-parameters are a dict of tensors (``{"params": {...}, ...}``) created by :meth:`init`;
    an outer optimizer (``torch.optim`` over ``optree.tree_leaves(meta)``, or
    :mod:`metafunc.optim`) updates them from :meth:`meta_grad`. A task is a pair
    ``(support, query)`` of ``(inputs, targets)``; a meta-batch stacks tasks along dim 0, so
    inputs are ``(tasks, examples, ...)``. One task passed without that dimension would run as
    one-example tasks: where the model's first layer (its first submodule with parameters) is a
    ``Linear``, ``ConvNd`` or recurrent layer and each task's inputs have exactly the shape of
    one example for it (``(in_features,)``, ``(in_channels, *spatial)``, ``(time,
    input_size)``), the meta-batch is refused with a ``ValueError``. Models with recurrent
    layers run exactly under vmap (see ``metafunc._rnn``).

    Learners are immutable (frozen dataclasses): the fields are the constructor's arguments,
    and a variant is a copy, ``dataclasses.replace(learner, steps=3)``, checked like a new one.

    Args:
        model: the :class:`~metafunc.FunctionalModel`; ``init()`` uses its own parameters.
        loss: ``"mse"``, ``"cross_entropy"`` or ``loss(outputs, targets) -> scalar``.
        strategy: how tasks are batched, as in :func:`~metafunc.vmap_tasks`.
    """

    name: ClassVar[str] = "meta-learner"

    model: FunctionalModel
    loss: str | LossFn = "mse"
    _: dataclasses.KW_ONLY
    strategy: str = "auto"
    # derived from the fields in __post_init__: not arguments, not compared
    classification: bool = dataclasses.field(init=False, repr=False, compare=False)
    _loss_fn: LossFn = dataclasses.field(init=False, repr=False, compare=False)
    _rnns: bool = dataclasses.field(init=False, repr=False, compare=False)
    _unbatched: tuple[str, int, int, int] | None = dataclasses.field(
        init=False, repr=False, compare=False
    )
    _maps: dict[str, Any] = dataclasses.field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        call = f"{type(self).__name__}(model, ...)"
        if not isinstance(self.model, FunctionalModel):
            raise TypeError(
                f"{call}: expected a metafunc.FunctionalModel, got {type(self.model).__name__}. "
                "Wrap a module with metafunc.functionalize(module)."
            )
        loss_fn = resolve_loss(call, self.loss)
        self._derive(
            _loss_fn=loss_fn,
            classification=loss_fn is F.cross_entropy,
            _rnns=has_rnns(self.model._skeleton),
            _unbatched=_unbatched_input(self.model._skeleton),
        )
        # made now, not on first use: a compiled meta_grad would see the dict change and compile
        # a second time
        self._map("task_loss", self.task_loss)

    def _derive(self, **values: Any) -> None:
        """Sets fields derived from the arguments (or normalised arguments), in
        ``__post_init__`` only: the one place a frozen learner is written."""
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def init(self) -> dict[str, PyTree]:
        """The initial meta-parameters: ``{"params": model.params}`` (the module's own)."""
        return {"params": dict(self.model.params)}

    def task_loss(self, meta: Any, support: Batch, query: Batch):
        """``(meta_loss, metrics)`` for one task; differentiable in ``meta``."""
        raise NotImplementedError

    def adapt(self, meta: Any, support: Batch) -> Params:
        """The task-adapted params for evaluation (no meta-gradient)."""
        raise NotImplementedError

    def data_loss(self, params: Params, batch: Batch) -> torch.Tensor:
        x, y = batch
        return self._loss(self.model(params, x), y)

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._loss_fn is F.mse_loss and out.shape != y.shape:  # it would broadcast, silently
            raise ValueError(
                f"{type(self).__name__}: the model's outputs have shape {tuple(out.shape)} per "
                f"task and the targets {tuple(y.shape)}; mse would broadcast them. Give the "
                "targets the outputs' shape (e.g. y.unsqueeze(-1))."
            )
        return self._loss_fn(out, y)

    def _meta_keys(self) -> set[str]:
        """The top-level keys of :meth:`init`'s meta-parameters."""
        return {"params"}

    def _check_meta_batch(self, method: str, meta: Any, support: Any, query: Any) -> str:
        """Meta-parameters from :meth:`init` and two ``(inputs, targets)`` pairs stacked over the
        same tasks; checked before any work, so mistakes are named here, not deep in torch.
        Returns the call's name for ``method`` (``"meta_grad"``, ``"evaluate"``)."""
        call = f"{type(self).__name__}.{method}(meta, support, query)"
        keys = self._meta_keys()
        if not isinstance(meta, Mapping) or set(meta) != keys:
            seen = sorted(meta) if isinstance(meta, Mapping) else type(meta).__name__
            hint = ""
            if isinstance(meta, Mapping) and set(meta) == set(self.model.params):
                hint = " (these are the model's params; meta-parameters wrap them)"
            raise TypeError(
                f"{call}: expected meta to be the dict of learner.init(), with keys "
                f"{sorted(keys)}; got {seen}{hint}. Start from meta = learner.init()."
            )
        tasks = None
        for name, batch in (("support", support), ("query", query)):
            if not (
                isinstance(batch, (tuple, list))
                and len(batch) == 2
                and all(isinstance(t, torch.Tensor) for t in batch)
            ):
                seen = (
                    f"a {type(batch).__name__} of {len(batch)}"
                    if isinstance(batch, (tuple, list))
                    else f"a {type(batch).__name__}"
                )
                raise TypeError(
                    f"{call}: expected {name} to be a pair (inputs, targets) of tensors stacked "
                    f"over tasks, got {seen}. An Episode's .support and .query are such pairs."
                )
            x, y = batch
            if x.dim() < 2 or y.dim() < 2 or x.shape[:2] != y.shape[:2]:
                raise ValueError(
                    f"{call}: expected {name} inputs and targets of shape (tasks, examples, ...) "
                    f"with the same two leading sizes, got {tuple(x.shape)} and {tuple(y.shape)}. "
                    "Stack the tasks of a meta-batch along dim 0 (metafunc.stack_tasks)."
                )
            if x.shape[1] == 0 or x.shape[0] == 0:
                raise ValueError(
                    f"{call}: {name} has shape {tuple(x.shape)}: no "
                    f"{'tasks' if x.shape[0] == 0 else 'examples per task'}; a mean loss over "
                    "nothing is nan. Sample at least one task and one example (shots, queries)."
                )
            self._check_example_dim(call, name, x)
            if tasks is not None and x.shape[0] != tasks:
                raise ValueError(
                    f"{call}: support has {tasks} tasks but query has {x.shape[0]}; pass the "
                    "same tasks' support and query sets."
                )
            tasks = x.shape[0]
            if self.classification and y.dtype != torch.long:
                fix = "y.argmax(-1) for one-hot targets" if y.is_floating_point() else "y.long()"
                raise TypeError(
                    f"{call}: cross_entropy expects {name} targets as int64 class indices, got "
                    f"{y.dtype}; use {fix}."
                )
        return call

    def _check_example_dim(self, call: str, name: str, x: torch.Tensor) -> None:
        """Refuses a meta-batch without its task dimension (one task's ``(examples, features)``
        passed as is), which would run as one-example tasks: each task's inputs have the shape
        of one example for the model's first layer (see the class docstring)."""
        if self._unbatched is None:
            return
        layer, rank, axis, size = self._unbatched
        per_task = x.shape[1:]
        if len(per_task) == rank and per_task[axis] == size:
            raise ValueError(
                f"{call}: {name} inputs of shape {tuple(x.shape)} give each of {x.shape[0]} "
                f"tasks an input of shape {tuple(per_task)}, which the model's first layer "
                f"({layer}) reads as one example: the tasks have no example dimension. Is the "
                "task dimension missing? Stack tasks along a new dim 0 (metafunc.stack_tasks; "
                "one task: x.unsqueeze(0), y.unsqueeze(0))."
            )

    def metrics(self, params: Params, batch: Batch) -> dict[str, torch.Tensor]:
        return self.loss_and_metrics(params, batch)[1]

    def loss_and_metrics(
        self, params: Params, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss on ``batch`` (differentiable) and its metrics, from one forward pass (a task
        loss that also reports metrics would otherwise run the query forward twice)."""
        x, y = batch
        out = self.model(params, x)
        loss = self._loss(out, y)
        result = {"loss": loss.detach()}
        if self.classification:
            result["accuracy"] = (out.argmax(-1) == y).to(out.dtype).mean().detach()
        return loss, result

    def _map(
        self, key: str, fn: Callable[..., Any], in_dims: tuple[int | None, ...] = (None, 0, 0)
    ) -> Callable[..., Any]:
        """``fn`` mapped over tasks by :func:`vmap_tasks`, made once per ``key`` (so that
        ``strategy="auto"`` can time it over calls); recurrent layers run exactly under vmap."""
        if key not in self._maps:
            if self._rnns:
                fn = _with_exact_rnns(fn)
            self._maps[key] = vmap_tasks(fn, in_dims=in_dims, strategy=self.strategy)
        return self._maps[key]

    def meta_grad(
        self, meta: Any, support: Batch, query: Batch
    ) -> tuple[dict[str, PyTree], dict[str, torch.Tensor]]:
        """The meta-gradient of the mean task loss over a meta-batch, and per-task metrics.

        The gradient is taken at a detached copy of ``meta`` (no graph back to it). Entries of
        ``meta`` the loss does not use get zero gradients. Under ``torch.compile`` it is taken by
        ``torch.func.grad``, which dynamo traces (``torch.autograd.grad`` would be a graph
        break), so ``torch.compile(learner.meta_grad)`` is one graph for the MAML family with a
        fixed ``strategy``; eagerly by ``torch.autograd.grad``, which is faster there (no
        functorch level around the whole inner loop). Both give the same numbers (tested).
        """
        self._check_meta_batch("meta_grad", meta, support, query)
        run = self._map("task_loss", self.task_loss)

        def mean_loss(meta):
            losses, metrics = run(meta, support, query)
            return losses.mean(), metrics

        if torch.compiler.is_compiling():
            with torch.no_grad():
                grads, metrics = grad(mean_loss, has_aux=True)(meta)
        else:
            grads, (_, metrics) = grad_or_zeros(mean_loss, meta, has_aux=True)
        return grads, {k: v.detach() for k, v in metrics.items()}

    def evaluate(self, meta: Any, support: Batch, query: Batch) -> dict[str, torch.Tensor]:
        """Per-task query metrics after adaptation on the support set (shape ``(tasks,)``).

        No meta-gradient, so no graph: the adaptation keeps none (:func:`descend`) and the query
        forward runs under ``torch.no_grad()``.
        """
        self._check_meta_batch("evaluate", meta, support, query)
        detached = optree.tree_map(lambda x: x.detach(), meta)

        def one(meta, support, query):
            params = self.adapt(meta, support)
            with torch.no_grad():
                return self.metrics(params, query)

        return self._map("evaluate", one)(detached, support, query)
