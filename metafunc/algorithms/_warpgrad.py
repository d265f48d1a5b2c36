"""WarpGrad (Flennerhag et al. 2020): warp layers, fixed while tasks adapt, precondition them."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Collection
from typing import Any, ClassVar

import optree
import torch
from torch.func import grad, grad_and_value

from .. import _checks, optim
from .._inner import stop_gradient
from .._typing import Params
from .._vmap import stack_tasks
from . import _learner_checks
from ._base import Batch, MetaLearner, explain_frozen
from ._descend import descend, params_only
from ._leap import path_gradient

__all__ = ["WarpGrad"]


@explain_frozen
@dataclasses.dataclass(frozen=True)
class WarpGrad(MetaLearner):
    """Warped gradient descent: meta-learned warp layers precondition the task layers' updates.

    The model's params split into task params (adapted by SGD in the inner loop) and ``warp``
    params (never adapted; a forward pass through them warps every task gradient). Following the
    paper's Algorithm 2, each :meth:`meta_grad` call

    1. adapts every task of the meta-batch for ``steps`` SGD steps on its support set from the
       current initialisation, warp fixed, and adds the visited task params ``theta_k``
       (``k < steps``), with the task's data, to a replay buffer of the last ``buffer_size``
       points;
    2. draws ``replay`` points from the buffer and returns the gradient, in the warp params, of
       the WarpGrad objective ``mean L_query(theta_k - lr grad L_support(theta_k; w); w)``: one
       warped step from each stored point, never backpropagating through a trajectory;
    3. with ``leap_init=True`` (warp-Leap) also meta-learns the task params' initialisation by
       :class:`Leap`'s gradient on the same trajectories; otherwise their gradient is zero.

    The replay buffer is state (the one piece of state in metafunc's algorithms): ``buffer``
    holds it and :meth:`state_dict` / :meth:`load_state_dict` save and restore it with a
    training checkpoint. Sampling uses its own seeded generator. The learner is otherwise a
    frozen value; ``dataclasses.replace`` makes a copy with an empty buffer and a fresh
    generator.
    """

    name: ClassVar[str] = "warpgrad"

    _: dataclasses.KW_ONLY
    warp: Collection[str]
    inner_lr: float = 0.01
    steps: int = 5
    buffer_size: int = 1000
    replay: int = 32
    leap_init: bool = True
    seed: int = 0
    # the task params (those not in warp), and the state: the replay buffer and its sampler
    task: tuple[str, ...] = dataclasses.field(init=False, compare=False)
    buffer: deque[tuple[Params, Batch, Batch]] = dataclasses.field(
        init=False, repr=False, compare=False
    )
    _generator: torch.Generator = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        call = "WarpGrad(model, ..., warp=...)"
        _checks.positive_finite(call, "inner_lr", self.inner_lr)
        _checks.positive_int(call, "steps", self.steps)
        _checks.positive_int(call, "buffer_size", self.buffer_size)
        _checks.positive_int(call, "replay", self.replay)
        warp = _learner_checks.param_names(call, "warp", self.warp, self.model)
        task = tuple(n for n in self.model.params if n not in set(warp))
        if not warp or not task:
            raise ValueError(
                f"{call}: WarpGrad needs both warp params and task params; got warp={list(warp)} "
                f"and task={list(task)}."
            )
        self._derive(
            warp=warp,
            task=task,
            inner_lr=float(self.inner_lr),
            leap_init=bool(self.leap_init),
            buffer=deque(maxlen=self.buffer_size),
            _generator=torch.Generator().manual_seed(self.seed),
        )

    def _task_loss(self, task_params: Params, warp: Params, batch: Batch) -> torch.Tensor:
        return self.data_loss({**warp, **task_params}, batch)

    def _step(self, task_params: Params, warp: Params, batch: Batch) -> Params:
        g = grad(self._task_loss)(task_params, warp, batch)
        return {k: task_params[k] - self.inner_lr * g[k] for k in task_params}

    def _trajectory(self, meta: Any, support: Batch) -> list[Params]:
        params = stop_gradient(dict(meta["params"]))
        warp = {k: params[k] for k in self.warp}
        theta = {k: params[k] for k in self.task}
        points = [theta]
        for _ in range(self.steps):
            theta = stop_gradient(self._step(theta, warp, support))
            points.append(theta)
        return points

    def adapt(self, meta: Any, support: Batch) -> Params:
        params = stop_gradient(dict(meta["params"]))
        warp = {k: params[k] for k in self.warp}
        theta = {k: params[k] for k in self.task}

        def inner(theta, batch):
            return self._task_loss(theta, warp, batch)

        sgd = optim.sgd(lr=self.inner_lr)
        return {**warp, **descend(inner, theta, sgd, support, self.steps)}

    def _collect(self, meta: Any, support: Batch, query: Batch):
        def one(meta, support, query):
            points = self._trajectory(meta, support)
            warp = {k: meta["params"][k].detach() for k in self.warp}
            final = {**warp, **points[-1]}
            if self.leap_init:  # Leap on this warped trajectory: task params, warp fixed
                path = []
                for theta in points:
                    g, f = grad_and_value(self._task_loss)(theta, warp, support)
                    path.append((theta, f.detach(), g))
                init = path_gradient(path, "length")
            else:
                init = {k: torch.zeros_like(v) for k, v in points[0].items()}
            return points, init, self.metrics(final, query)

        return self._map("warpgrad-collect", one)(meta, support, query)

    def meta_grad(self, meta: Any, support: Batch, query: Batch):
        self._check_meta_batch("meta_grad", meta, support, query)
        points, init, metrics = self._collect(meta, support, query)
        n_tasks = support[0].shape[0]
        for i in range(n_tasks):
            for k in range(self.steps):  # theta_0 .. theta_{K-1}: a warped step from each
                # copies: the buffer must not keep whole meta-batches alive, nor see them change
                theta = {name: points[k][name][i].detach().clone() for name in self.task}
                task_s = (support[0][i].clone(), support[1][i].clone())
                task_q = (query[0][i].clone(), query[1][i].clone())
                self.buffer.append((theta, task_s, task_q))
        picks = torch.randint(len(self.buffer), (self.replay,), generator=self._generator)
        chosen = [self.buffer[int(j)] for j in picks]
        thetas = stack_tasks([c[0] for c in chosen])
        s_batch = stack_tasks([c[1] for c in chosen])
        q_batch = stack_tasks([c[2] for c in chosen])
        warp = {k: meta["params"][k] for k in self.warp}

        def objective(warp, theta, support, query):
            return self._task_loss(self._step(theta, warp, support), warp, query)

        run = self._map("warpgrad-objective", objective, in_dims=(None, 0, 0, 0))
        losses = run(warp, thetas, s_batch, q_batch)
        warp_grads = torch.autograd.grad(losses.mean(), list(warp.values()))
        init_grads = {k: init[k].mean(0) for k in self.task}
        wg = dict(zip(warp, warp_grads))
        grads = params_only(meta, {k: wg[k] if k in wg else init_grads[k] for k in meta["params"]})
        metrics["warp_objective"] = losses.detach().mean().expand(n_tasks)
        return grads, metrics

    def state_dict(self) -> dict[str, Any]:
        """The replay buffer and the sampling generator's state."""
        return {"buffer": list(self.buffer), "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(iter(self.model.params.values())).device  # a checkpoint loaded on the CPU
        self.buffer.clear()
        for entry in state["buffer"]:
            self.buffer.append(optree.tree_map(lambda t: t.to(device), entry))  # type: ignore[arg-type]
        self._generator.set_state(state["generator"].cpu())
