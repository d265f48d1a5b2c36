"""What every meta-learning algorithm shares: task losses, meta-batches and evaluation."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import get_interpreter_stack
from torch.func import grad

from .. import optim
from .._functional import FunctionalModel
from .._norms import under_vmap
from .._rnn import exact_rnns, has_rnns
from .._tree import close_matches
from .._typing import Params, PyTree
from .._vmap import vmap_tasks
from ..optim import GradientTransformation
from ..optim._base import apply_updates

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
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value < math.inf  # also rejects nan
    ):
        raise ValueError(f"{call}: expected {name} to be a positive finite number, got {value!r}.")


def inner_optimizer(
    call: str, inner_lr: float | None, inner_opt: Any, learn_lr: str | None = None
) -> tuple[float, GradientTransformation]:
    """``(inner_lr, optimizer)``: ``inner_opt``, or SGD at ``inner_lr`` (default 0.01).

    Both at once is an error: the optimizer carries its own learning rate, and a silently
    ignored ``inner_lr`` is a wrong experiment.
    """
    if inner_opt is None:
        lr = 0.01 if inner_lr is None else inner_lr
        _check_positive(call, "inner_lr", lr)
        return float(lr), optim.sgd(lr=float(lr))
    if not isinstance(inner_opt, GradientTransformation):
        raise TypeError(
            f"{call}: expected inner_opt to be a metafunc.optim optimizer (e.g. "
            f"metafunc.optim.adam(lr=1e-2)), got {type(inner_opt).__name__}."
        )
    if inner_lr is not None or learn_lr is not None:
        given = "inner_lr" if inner_lr is not None else f"learn_lr={learn_lr!r}"
        raise ValueError(
            f"{call}: inner_opt carries its own learning rate; drop {given} (learned rates "
            "are SGD's: use learn_lr without inner_opt)."
        )
    return float("nan"), inner_opt


def descend(
    loss_fn: Callable[[Params, Any], torch.Tensor],
    params: Params,
    opt: GradientTransformation | list[GradientTransformation],
    batch: Any,
    steps: int,
) -> Params:
    """``params`` after ``steps`` steps of ``opt`` (or a list with one optimizer per step) on
    ``loss_fn(params, batch)``, detached: adaptation for evaluation, with no graph to keep.

    The values of :func:`~metafunc.inner_loop`'s steps, without its graph: in a per-task loop the
    gradients are taken by ``torch.autograd.grad`` without ``create_graph``, so nothing of the
    backward pass is recorded (``torch.func.grad`` always records it, for a second order); under
    ``vmap``, where ``torch.autograd.grad`` cannot run, and under ``torch.compile``, by
    ``torch.func.grad``, whose graph stays inside the transform. A param with no gradient path
    gets a zero gradient (as under ``torch.func.grad``; ``inner_loop`` would raise).
    """
    opts = opt if isinstance(opt, list) else [opt] * steps
    params = {k: v.detach() for k, v in params.items()}
    state = opts[0].init(params)
    for t in range(steps):
        # under vmap (or another transform), and for dynamo, which traces torch.func.grad
        if torch.compiler.is_compiling() or get_interpreter_stack():
            grads = grad(loss_fn)(params, batch)
        else:
            free = {k: v.detach().requires_grad_() for k, v in params.items()}
            with torch.enable_grad():
                loss = loss_fn(free, batch)
                found = (
                    torch.autograd.grad(loss, list(free.values()), allow_unused=True)
                    if loss.requires_grad
                    else (None,) * len(free)
                )
            grads = {
                k: torch.zeros_like(v) if g is None else g
                for (k, v), g in zip(params.items(), found)
            }
        updates, state = opts[t].update(grads, state, params)
        params = {k: v.detach() for k, v in apply_updates(params, updates).items()}
    return params


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
        self._rnns = has_rnns(model._skeleton)
        self._unbatched = _unbatched_input(model._skeleton)
        self._maps: dict[str, Any] = {}
        # made now, not on first use: a compiled meta_grad would see the dict change and compile
        # a second time
        self._map("task_loss", self.task_loss)

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
        return self._loss(self.model(params, x), y)

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss is F.mse_loss and out.shape != y.shape:  # it would broadcast, silently
            raise ValueError(
                f"{type(self).__name__}: the model's outputs have shape {tuple(out.shape)} per "
                f"task and the targets {tuple(y.shape)}; mse would broadcast them. Give the "
                "targets the outputs' shape (e.g. y.unsqueeze(-1))."
            )
        return self.loss(out, y)

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
        fixed ``strategy``; eagerly by ``torch.autograd.grad``, about 20 % faster there (no
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
            leaves, spec = optree.tree_flatten(meta)
            free = [x.detach().requires_grad_() for x in leaves]
            with torch.enable_grad():
                loss, metrics = mean_loss(optree.tree_unflatten(spec, free))
                found = torch.autograd.grad(loss, free, allow_unused=True)
            zeros = [torch.zeros_like(x) if g is None else g for x, g in zip(free, found)]
            grads = optree.tree_unflatten(spec, zeros)
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
