"""``vmap_tasks``: run a per-task function over a meta-batch by vmap, a Python loop, or chunks."""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import optree
import torch

from . import _checks
from ._tasks import run_loop as _loop
from ._tasks import stack_tasks, unstack_tasks

__all__ = ["stack_tasks", "unstack_tasks", "vmap_tasks"]

_log = logging.getLogger("metafunc")

_STRATEGIES = ("auto", "vmap", "loop")
_RANDOMNESS = ("error", "different", "same")
_AUTO_CALLS = 3  # calls per strategy that "auto" times on the CPU before it decides, at most
_CLEAR_WIN = 2.0  # a timed ratio that decides after one timed call of each strategy
_CACHE_SIZE = 1024  # "auto" decisions kept per process
_RNN_FILE = os.path.join("torch", "nn", "modules", "rnn.py")
# torch's messages for an in-place op whose target lacks the vmapped dimension
_IN_PLACE = ("doesn't match the broadcast shape", "vmap: inplace arithmetic")


def _recurrent_layer(error: BaseException) -> str | None:
    """The class name of the ``torch.nn`` recurrent layer in whose forward ``error`` was raised."""
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if frame.f_code.co_filename.endswith(_RNN_FILE) and isinstance(owner, torch.nn.Module):
            return type(owner).__name__
    return None


def _explain(call: str, error: RuntimeError) -> str | None:
    """A message for the vmap failures a per-task loop does not have, or None."""
    seen = str(error).splitlines()[0] if str(error) else type(error).__name__
    layer = _recurrent_layer(error)
    if layer is not None:
        return (
            f"{call}: nn.{layer} cannot run under torch.func.vmap: torch has no batching rule "
            f"for its fused kernel with per-task weights ({seen}). Use strategy='loop', or a "
            "metafunc.algorithms learner, which computes recurrent layers exactly under vmap."
        )
    if any(p in seen for p in _IN_PLACE):
        return (
            f"{call}: func writes per-task values in place into a tensor without the task "
            f"dimension ({seen}). Under vmap a tensor created inside func (acc = torch.zeros(3)) "
            "is one tensor shared by all tasks, so acc += f(x), acc.add_(...) or acc[i] = ... "
            "cannot hold per-task values. Write it out of place: acc = acc + f(x) (or "
            "torch.stack the pieces), or use strategy='loop'."
        )
    return None


@dataclasses.dataclass
class _Trial:
    """One trial call of ``"auto"``: the time of the call itself (the forward pass) and, once
    its backward pass has run, the time from the gradient of its first output to that of its
    last input (the backward pass through the call, nothing else)."""

    strategy: str
    forward: float
    started: float | None = None
    backward: float | None = None
    handles: list[Any] = dataclasses.field(default_factory=list)

    def watch(self, args: tuple, kwargs: dict, out: Any) -> None:
        """Hooks the outputs and inputs that the backward pass will go through, if any."""
        if not torch.is_grad_enabled():
            return
        outs = _tensors_needing_grad(out)
        ins = _tensors_needing_grad((args, kwargs))
        if not outs or not ins:
            return
        try:
            self.handles = [t.register_hook(self._start) for t in outs]
            self.handles += [t.register_hook(self._end) for t in ins]
        except (RuntimeError, TypeError):  # a tensor that takes no hooks: the forward alone counts
            self.close()

    def _start(self, grad: torch.Tensor) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def _end(self, grad: torch.Tensor) -> None:
        if self.started is not None:  # each input's gradient: the last one ends the backward
            self.backward = time.perf_counter() - self.started

    def close(self) -> float:
        """Removes the hooks; the trial's time: forward, plus backward if it has run."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return self.forward + (self.backward or 0.0)


def _tensors_needing_grad(tree: Any) -> list[torch.Tensor]:
    leaves = optree.tree_leaves(tree)
    return [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]


@dataclasses.dataclass
class _Decision:
    """What ``"auto"`` knows about one (function, arguments' signature) in this process."""

    timings: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: {"loop": [], "vmap": []}
    )
    calls: int = 0
    pending: _Trial | None = None  # the last trial call, timed until the next call
    strategy: str | None = None
    reason: str | None = None
    fallback: str | None = None


# process-wide: a vmap_tasks(...) made inline in a step function, a new one each step, finds the
# decision its predecessors made (least recently used entries dropped past _CACHE_SIZE)
_DECISIONS: collections.OrderedDict[Any, _Decision] = collections.OrderedDict()


def _code_of(func: Any) -> Any:
    """What identifies a per-task function across fresh objects: its code (a closure made anew each
    step has the same code), through partials; a bound method by its code and its object (two
    learners with other settings must not share a decision; an equal learner made anew each
    step does: frozen dataclasses compare by value), an unhashable object by identity; a
    callable object by its class."""
    while isinstance(func, functools.partial):
        func = func.func
    owner = getattr(func, "__self__", None)
    func = getattr(func, "__func__", func)
    code = getattr(func, "__code__", None)
    if code is None:
        return type(func)
    if owner is None:
        return code
    try:
        hash(owner)
    except TypeError:
        return code, id(owner)
    return code, owner


def _signature(args: tuple, kwargs: dict) -> tuple:
    leaves: list[Any]
    leaves, spec = optree.tree_flatten((args, kwargs), none_is_leaf=True)  # type: ignore[arg-type]
    shapes = tuple(
        (tuple(x.shape), x.dtype, x.device, x.requires_grad)
        if isinstance(x, torch.Tensor)
        else type(x)
        for x in leaves
    )
    return spec, shapes, torch.is_grad_enabled()


def _ms(seconds: list[float]) -> str:
    return f"{1000 * min(seconds):.1f} ms"


class _TaskMap:
    """The function returned by :func:`vmap_tasks`; ``.strategy`` tells how it runs (None while
    ``"auto"`` is still timing), ``.reason`` why, ``.fallback`` why ``"auto"`` chose the loop after
    vmap failed (None if it did not)."""

    def __init__(self, func, in_dims, out_dims, randomness, chunk_size, strategy):
        functools.update_wrapper(self, func)
        self._func = func
        self._name = getattr(func, "__name__", type(func).__name__)
        self._in_dims, self._out_dims = in_dims, out_dims
        self._randomness, self._chunk_size = randomness, chunk_size
        self._requested = strategy
        self._decision: _Decision | None = None
        fixed = strategy if strategy != "auto" else None
        self._fixed = fixed
        self._key = (_code_of(func), repr(in_dims), repr(out_dims), randomness, chunk_size)

    @property
    def strategy(self) -> str | None:
        return self._fixed or (self._decision.strategy if self._decision else None)

    @property
    def reason(self) -> str | None:
        if self._fixed:
            return f"strategy={self._fixed!r} was asked for"
        return self._decision.reason if self._decision else None

    @property
    def fallback(self) -> str | None:
        return self._decision.fallback if self._decision else None

    def _vmap(self, args, kwargs):
        func = self._func
        found: list[Any] = []  # the outputs' tree spec, when they leave vmap flattened
        if isinstance(self._out_dims, int):
            # the outputs leave vmap as one flat tuple of tensors and are rebuilt with optree:
            # torch.func's own pytree handling of nested outputs (a learner's loss and metrics
            # dict) cost ~1 % of a small meta-step

            @functools.wraps(self._func)
            def func(*args, **kwargs):
                out = self._func(*args, **kwargs)
                leaves, treespec = optree.tree_flatten(out)
                if not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
                    return out  # left to torch.func (its pytrees and its error messages)
                found.append(treespec)
                return tuple(leaves)

        mapped = torch.func.vmap(
            func,
            in_dims=self._in_dims,
            out_dims=self._out_dims,
            randomness=self._randomness,
            chunk_size=self._chunk_size,
        )
        try:
            out = mapped(*args, **kwargs)
        except RuntimeError as error:
            message = _explain("vmap_tasks(func, strategy='vmap')", error)
            if message is None:
                raise
            raise RuntimeError(message) from error
        return optree.tree_unflatten(found[-1], list(out)) if found else out

    def _run(self, strategy, args, kwargs):
        if strategy == "vmap":
            return self._vmap(args, kwargs)
        return _loop(self._func, self._in_dims, self._out_dims, self._randomness, args, kwargs)

    def _try_vmap(self, decision: _Decision, args, kwargs):
        """The vmap trial of ``"auto"``: if vmap fails, the loop runs instead and is kept (an
        error of the loop's own, a user's mistake, is raised as it is)."""
        try:
            return self._vmap(args, kwargs)
        except Exception as error:
            out = self._run("loop", args, kwargs)
            decision.strategy, decision.fallback = "loop", f"{type(error).__name__}: {error}"
            decision.reason = f"vmap failed ({type(error).__name__}), the loop ran: see .fallback"
            _log.info("vmap_tasks(%s): %s", self._name, decision.reason)
            return out

    def _decide(self, decision: _Decision, strategy: str, reason: str) -> None:
        if decision.pending is not None:
            decision.pending.close()
        decision.strategy, decision.reason, decision.pending = strategy, reason, None
        _log.info("vmap_tasks(%s): auto chose %r: %s", self._name, strategy, reason)

    def _lookup(self, args, kwargs) -> _Decision:
        key = (self._key, _signature(args, kwargs))
        decision = _DECISIONS.get(key)
        if decision is None:
            decision = _DECISIONS[key] = _Decision()
            if len(_DECISIONS) > _CACHE_SIZE:
                _DECISIONS.popitem(last=False)
        else:
            _DECISIONS.move_to_end(key)
        self._decision = decision
        return decision

    def __call__(self, *args, **kwargs):
        if self._fixed is not None:
            return self._run(self._fixed, args, kwargs)
        if torch.compiler.is_compiling():  # one batched graph; timing a trace would mean nothing
            return self._run("vmap", args, kwargs)
        decision = self._lookup(args, kwargs)
        if decision.strategy is not None:
            return self._run(decision.strategy, args, kwargs)
        leaves: list[Any] = optree.tree_leaves(args)  # type: ignore[arg-type]
        if any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in leaves):
            out = self._try_vmap(decision, args, kwargs)  # one batched kernel beats many
            if decision.strategy is None:
                self._decide(decision, "vmap", "inputs on an accelerator: one batched kernel")
            return out
        if torch.are_deterministic_algorithms_enabled():
            out = self._try_vmap(decision, args, kwargs)
            if decision.strategy is None:
                self._decide(
                    decision, "vmap", "torch.use_deterministic_algorithms(True): no timing"
                )
            return out
        return self._trial(decision, args, kwargs)

    def _trial(self, decision: _Decision, args, kwargs):
        """CPU: which is faster depends on the model (vmap wins for small dense layers and can
        lose for convolutions, whose batched kernels are slower on few cores). The calls
        alternate loop, vmap, loop, ...; a call's time is its own (the forward pass) plus its
        backward pass, timed by hooks from the gradient of its first output to that of its last
        input, if the backward has run by the next call (so the rest of a training step, the
        data loading, other work between calls, and other call sites of the same function do
        not count). The first call of each strategy is a warm-up; one timed call each decides
        when one strategy is twice as fast, else the best of two each."""
        if decision.pending is not None:
            decision.timings[decision.pending.strategy].append(decision.pending.close())
            decision.pending = None
        t = decision.timings
        timed = {s: v[1:] for s, v in t.items()}  # the warm-ups dropped
        if all(timed.values()):
            fast, slow = sorted(("loop", "vmap"), key=lambda s: min(timed[s]))
            ratio = min(timed[slow]) / max(min(timed[fast]), 1e-9)
            if ratio >= _CLEAR_WIN or all(len(v) >= _AUTO_CALLS - 1 for v in timed.values()):
                self._decide(
                    decision,
                    fast,
                    f"{fast} {_ms(timed[fast])} per step, {slow} {_ms(timed[slow])} (the call "
                    "and its backward pass)",
                )
                return self._run(fast, args, kwargs)
        candidate = ("loop", "vmap")[decision.calls % 2]
        decision.calls += 1
        start = time.perf_counter()
        if candidate == "loop":
            out = self._run("loop", args, kwargs)
        else:
            out = self._try_vmap(decision, args, kwargs)
            if decision.strategy is not None:  # vmap failed: the loop is kept, no more trials
                return out
        trial = _Trial(candidate, time.perf_counter() - start)
        trial.watch(args, kwargs, out)
        decision.pending = trial
        return out


def vmap_tasks(
    func: Callable[..., Any],
    in_dims: Any = 0,
    out_dims: Any = 0,
    randomness: str = "error",
    *,
    chunk_size: int | None = None,
    strategy: str = "auto",
) -> Callable[..., Any]:
    """Maps a per-task function over a stacked meta-batch; ``torch.func.vmap``'s arguments.

    ``in_dims`` marks which inputs carry the task dimension (``None`` for shared ones such as the
    meta-parameters); outputs gain the task dimension at ``out_dims``. Everything else follows
    ``torch.func.vmap``: ``randomness="different"`` gives each task its own dropout masks,
    ``chunk_size`` runs the vmap in chunks of that many tasks (less memory).

    Strategies: ``"vmap"`` (one batched computation), ``"loop"`` (a Python loop over tasks, outputs
    stacked; needed for ``inner_loop(checkpoint=...)``), or ``"auto"``: ``vmap`` when the inputs are
    on an accelerator or ``torch.use_deterministic_algorithms(True)`` is on (no timing, so the
    choice is reproducible); on the CPU the first calls alternate loop and vmap, each timed over the
    call and its backward pass (by hooks on its outputs and inputs: what runs between calls does not
    count), and the faster is kept: after 4 calls when one is twice as fast, else after 6. The
    decision is kept per process for the function's code (and, for a bound method, its object: equal
    learners share it) and the arguments' shapes, dtypes and devices, so a ``vmap_tasks(...)`` made
    anew inside every step (the inline idiom) pays the trials once, and a new meta-batch size or
    model is timed anew. ``.strategy`` on the returned function says which strategy runs (None while
    timing), ``.reason`` why (with the timings); the ``"metafunc"`` logger says it at INFO level.
    Inside ``torch.compile``, ``vmap`` (the eager timing is unaffected). If the vmap trial fails (an
    op without a batching rule, an in-place write into a tensor shared by all tasks), "auto" runs
    and keeps the loop and says why in ``.fallback``; an error the loop raises too is raised. Both
    give the same numbers: models with BatchNorm/LayerNorm are computed exactly under vmap (see
    :func:`exact_norms`), and so are recurrent layers (``nn.GRU``, ``nn.LSTM``, ``nn.RNN``, cells)
    in the :mod:`metafunc.algorithms` learners. ``torch.compile`` traces ``"loop"`` with
    ``randomness="different"`` only: the other settings read the RNG state (a graph break).

    Example:
        >>> import torch, metafunc
        >>> w = torch.tensor(2.0, requires_grad=True)
        >>> per_task = lambda w, x: (w * x).sum()
        >>> losses = metafunc.vmap_tasks(per_task, in_dims=(None, 0), strategy="vmap")(
        ...     w, torch.ones(4, 3))
        >>> losses
        tensor([6., 6., 6., 6.], grad_fn=<...>)
    """
    call = "vmap_tasks(func, ...)"
    _checks.is_callable(call, "func", func)
    _checks.one_of(call, "strategy", strategy, _STRATEGIES)
    _checks.one_of(call, "randomness", randomness, _RANDOMNESS)
    if chunk_size is not None:
        _checks.positive_int(call, "chunk_size", chunk_size)
    if chunk_size is not None and strategy == "loop":
        raise ValueError(f"{call}: chunk_size applies to strategy='vmap', not 'loop'.")
    return _TaskMap(func, in_dims, out_dims, randomness, chunk_size, strategy)
