"""``inner_loop``: differentiable inner optimisation with explicit control of the meta-gradient."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, NamedTuple

import optree
import torch
from torch.func import grad_and_value

from . import _checks, _norms, _tree
from ._remat import checkpointed as _checkpointed
from ._tape import Tape, keep_steps
from ._tree_math import detach, grad_or_zeros, stop_gradient
from ._typing import OptState, Params
from ._unused import Unused, check_allow_unused
from .optim._base import GradientTransformation, update_and_apply

__all__ = ["InnerLoopResult", "inner_loop", "stop_gradient"]


class InnerLoopResult(NamedTuple):
    """What :func:`inner_loop` returns.

    Attributes:
        params: the adapted params after the last step.
        opt_state: the optimizer state after the last step.
        losses: the inner loss before each step, shape ``(steps,)``.
        tape: the :class:`Tape` of recorded params.
        aux: the per-step auxiliary outputs of ``loss_fn`` (``has_aux=True``), else ``()``.
    """

    params: Params
    opt_state: OptState
    losses: torch.Tensor
    tape: Tape
    aux: tuple


_CALL = "inner_loop(loss_fn, params, opt, batches, ...)"


def _check_args(loss_fn, params, opt, batches, steps, first_order, truncate, checkpoint):
    call = _CALL
    _checks.is_callable(call, "loss_fn", loss_fn)
    _checks.tensor_dict(
        call, "params", params, source="(as returned by metafunc.functionalize(...).params)"
    )
    _tree.check_floating(call, params)
    opts = _optimizers(call, opt)
    _checks.positive_int(call, "steps", steps, or_none=True)
    _check_batches(call, batches, steps)
    _checks.boolean(call, "first_order", first_order)
    if truncate is not None:
        _checks.nonnegative_int(call, "truncate", truncate)
    if first_order and truncate is not None:
        raise ValueError(
            f"{call}: first_order=True already differentiates no step; truncate={truncate} "
            f"contradicts it. Use one of them (truncate=0 is first_order=True)."
        )
    if checkpoint not in (None, "sqrt") and not _checks.is_count(checkpoint):
        raise ValueError(
            f"{call}: expected checkpoint to be None, 'sqrt' or a positive segment length, got "
            f"{checkpoint!r}."
        )
    return opts


def _optimizers(call: str, opt: Any) -> list[GradientTransformation]:
    """``opt`` as a list: one optimizer, or one per step."""
    if isinstance(opt, GradientTransformation):  # a NamedTuple: test it before sequences
        opts = [opt]
    else:
        opts = list(opt) if isinstance(opt, (list, tuple)) else [opt]
    if not opts or not all(isinstance(o, GradientTransformation) for o in opts):
        raise TypeError(
            f"{call}: expected opt to be a metafunc.optim optimizer (e.g. metafunc.optim.sgd("
            f"lr=0.1)) or a sequence of them, one per step; got {type(opt).__name__}."
        )
    return opts


def _check_batches(call: str, batches: Any, steps: int | None) -> None:
    """Catches the batch layouts that would run, but not as meant."""
    if steps is None and (batches is None or isinstance(batches, (torch.Tensor, dict))):
        raise TypeError(
            f"{call}: expected batches to be an iterable of batches, or one batch with steps=N "
            f"(the batch is then reused for N steps); got {type(batches).__name__} and steps=None."
        )
    if (
        steps is None
        and isinstance(batches, tuple)
        and batches
        and all(isinstance(b, torch.Tensor) for b in batches)
    ):
        raise TypeError(
            f"{call}: batches is a tuple of {len(batches)} tensors and steps=None, so it would "
            f"run {len(batches)} steps with one tensor each (x, then y). Pass steps=N to reuse "
            "one (x, y) batch for N steps, or a list of batches, one per step."
        )
    if (
        steps is not None
        and isinstance(batches, list)
        and batches
        and all(isinstance(b, (tuple, list)) for b in batches)
    ):
        raise TypeError(
            f"{call}: with steps={steps} batches is one batch, reused at every step, but got a "
            f"list of {len(batches)} {type(batches[0]).__name__}s (one batch per step?). Drop "
            "steps to take one batch per step, or pass a single (x, y) batch."
        )


def _split(out: Any, has_aux: bool) -> tuple[torch.Tensor, Any]:
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                "inner_loop(..., has_aux=True): expected loss_fn to return (loss, aux), got "
                f"{type(out).__name__}."
            )
        return out
    if isinstance(out, tuple):
        raise TypeError(
            "inner_loop(...): loss_fn returned a tuple; pass has_aux=True if it returns "
            "(loss, aux)."
        )
    return out, None


def _functional_grads(loss_fn, params, batch, has_aux, unused=None):
    """Gradients by torch.func (composes with vmap and with an outer backward)."""

    def wrapped(p):
        if unused is not None and unused.pending:
            unused.watch(optree.tree_leaves(p))
        loss, aux = _split(loss_fn(p, batch), has_aux)
        _check_scalar(loss)
        return loss, (() if aux is None else aux)  # torch.func: aux holds tensors only

    grads, (loss, aux) = grad_and_value(wrapped, has_aux=True)(params)
    return grads, loss, aux


def _autograd_grads(loss_fn, params, batch, has_aux, unused=None):
    """Gradients by torch.autograd.grad, for checkpointed segments: with a graph when grad mode is
    on (the recomputation in the backward pass), values only under no_grad (the forward pass). A
    loss of no param gives zeros, and :class:`Unused` names the params, if not allowed."""
    create_graph = torch.is_grad_enabled()

    def fn(p):
        loss, aux = _split(loss_fn(p, batch), has_aux)
        _check_scalar(loss)
        return loss, aux

    reached = None if unused is None else unused.reached
    grads, (loss, aux) = grad_or_zeros(
        fn, params, has_aux=True, create_graph=create_graph, on_grads=reached
    )
    if not create_graph:
        loss, aux = detach((loss, aux))
    return grads, loss, aux


def _check_scalar(loss):
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"inner_loop(...): expected loss_fn to return a scalar tensor, got {shape}. Reduce "
            f"the loss, e.g. with .mean()."
        )


def _step(opt, loss_fn, params, state, batch, has_aux, exact, unused, grads_fn=_functional_grads):
    """One inner step. ``exact=False`` is a first-order step: its gradient is a constant and the
    params enter the update only through ``params + update`` (straight-through)."""
    if exact:
        grads, loss, aux = grads_fn(loss_fn, params, batch, has_aux, unused)
        params, state = update_and_apply(opt, grads, state, params)
    else:
        constant = detach(params)
        grads, loss, aux = _functional_grads(loss_fn, constant, batch, has_aux, unused)
        grads, loss, aux = detach((grads, loss, aux))
        params, state = update_and_apply(opt, grads, state, constant, params)
    return params, state, loss, aux


def inner_loop(
    loss_fn: Callable[..., Any],
    params: Params,
    opt: GradientTransformation | Sequence[GradientTransformation],
    batches: Iterable[Any] | Any,
    *,
    steps: int | None = None,
    has_aux: bool = False,
    first_order: bool = False,
    truncate: int | None = None,
    checkpoint: int | str | None = None,
    record: str | int = "all",
    record_state: bool = False,
    opt_state: OptState | None = None,
    allow_unused: bool | Collection[str] = False,
) -> InnerLoopResult:
    """Runs an inner optimisation loop that the meta-gradient can flow through.

    At step ``t`` (from 1), with ``b_t`` the t-th batch:
    ``g_t = grad(loss_fn)(params_{t-1}, b_t)``,
    ``u_t, s_t = opt.update(g_t, s_{t-1}, params_{t-1})``, ``params_t = params_{t-1} + u_t``.
    The named optimizers (all ending in ``scale_by_learning_rate``) compute the last two as one
    op per leaf, ``torch.add(p, u, alpha=-lr)`` as ``torch.optim.SGD`` steps: half the ops of the
    update and of its backward, the same values up to the last bit.

    **Where the meta-gradient goes.** It goes to whatever tensors you pass as ``params``: pass
    ``fm.params`` (the module's own parameters) and ``meta_loss.backward()`` fills the module's
    ``.grad`` with exactly the meta-gradient, nothing else (inner gradients are functional and
    never accumulate into ``.grad``). Pass ``metafunc.stop_gradient(fm.params)`` (detached
    copies) and the initial weights get no meta-gradient; learnable hyperparameters still do.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
        params: the initial params, a dict of floating-point tensors.
        opt: a :mod:`metafunc.optim` optimizer, or a sequence with one per step (per-step
            learnable learning rates; all must share one state structure).
        batches: an iterable of batches, one per step; or a single batch with ``steps=N``.
        steps: reuse the single batch ``batches`` for this many steps.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; the per-step aux is in ``result.aux``.
        first_order: first-order MAML: no step is differentiated; the meta-gradient w.r.t. the
            initial params is the outer gradient at the adapted params (straight-through), and
            learnable hyperparameters get the first-order gradient (inner gradients as constants).
        truncate: differentiate only the last ``truncate`` steps exactly; earlier steps are
            first-order as above. ``truncate=0`` is ``first_order=True``.
        checkpoint: recompute segments of this many exact steps in the backward pass instead of
            storing them (``"sqrt"``: ``round(sqrt(steps))``). Peak memory grows like
            ``sqrt(steps)`` instead of ``steps`` and the meta-gradient is the same, bit for
            bit. Each segment is an ``autograd.Function`` whose backward reruns the segment
            with ``torch.autograd.grad(create_graph=True)``, so it applies outside ``torch.func``
            transforms (run tasks with ``vmap_tasks(strategy="loop")``) and raises inside one.
        record: which params the tape keeps: ``"all"``, ``"endpoints"``, ``"none"``, or an int
            ``k`` (every k-th step and the last). A recorded weight is mostly a tensor the
            backward pass keeps anyway (the matmul that uses it saves it); what it does not keep
            (biases, first-order steps) costs its size per recorded step: ``"all"`` over
            ``"endpoints"`` adds those tensors to the peak memory of a long unroll.
        record_state: also record the optimizer state at the recorded steps.
        opt_state: the optimizer state to start from (default ``opt.init(params)``).
        allow_unused: params that ``loss_fn`` may have no gradient path to: ``True`` (all) or a
            collection of keys of ``params``. Any other param that no step's gradient reaches
            (a ``.detach()`` in ``loss_fn``) is a ``ValueError`` naming it, raised after the
            last step; a param used at some steps only is fine. Like ``torch.autograd.grad``'s
            ``allow_unused``, this is about the graph, not the values: a param whose gradient
            is zero through a path (a dead ReLU) is used. Not checked while ``torch.compile``
            traces the loop (the traced graph holds no bookkeeping): run it eagerly once.

    Returns:
        :class:`InnerLoopResult` ``(params, opt_state, losses, tape, aux)``.

    Example:
        >>> import torch, metafunc
        >>> w0 = torch.tensor([1.0], requires_grad=True)
        >>> loss = lambda p, x: ((p["w"] - x) ** 2).sum()
        >>> result = metafunc.inner_loop(
        ...     loss, {"w": w0}, metafunc.optim.sgd(lr=0.25), torch.tensor([3.0]), steps=2)
        >>> result.params["w"].detach(), result.losses.detach()
        (tensor([2.5000]), tensor([4., 1.]))
        >>> result.params["w"].backward()   # d w_2 / d w_0 = (1 - 2 * 0.25) ** 2
        >>> w0.grad
        tensor([0.2500])
    """
    opts = _check_args(loss_fn, params, opt, batches, steps, first_order, truncate, checkpoint)
    check_allow_unused(params, allow_unused)
    unused = (
        None
        if allow_unused is True or torch.compiler.is_compiling()
        else Unused(params, allow_unused)
    )
    batch_list = list(itertools.repeat(batches, steps)) if steps is not None else list(batches)
    n = len(batch_list)
    if n == 0:
        raise ValueError("inner_loop(...): got no batches; pass at least one (or steps=N).")
    if len(opts) == 1:
        opts = opts * n
    elif len(opts) != n:
        raise ValueError(
            f"{_CALL}: got {len(opts)} per-step optimizers for {n} steps; pass one per step."
        )
    keep = keep_steps(record, n)
    n_exact = 0 if first_order else (n if truncate is None else min(truncate, n))
    state = opts[0].init(params) if opt_state is None else opt_state

    recorded: dict[int, Params] = {0: dict(params)} if keep(0, False) else {}
    states: dict[int, OptState] = {0: state} if record_state and 0 in recorded else {}
    losses: list[torch.Tensor] = []
    auxes: list[Any] = []

    def note(t, p, s):
        if keep(t, t == n):
            recorded[t] = p
            if record_state:
                states[t] = s

    # first-order steps (all of them with first_order=True; the leading ones with truncate)
    for t in range(1, n - n_exact + 1):
        params, state, loss, aux = _step(
            opts[t - 1], loss_fn, params, state, batch_list[t - 1], has_aux, False, unused
        )
        losses.append(loss)
        auxes.append(aux)
        note(t, params, state)

    start = n - n_exact + 1
    if checkpoint is None or n_exact == 0:
        for t in range(start, n + 1):
            params, state, loss, aux = _step(
                opts[t - 1], loss_fn, params, state, batch_list[t - 1], has_aux, True, unused
            )
            losses.append(loss)
            auxes.append(aux)
            note(t, params, state)
    else:
        if _norms.under_vmap() or torch._C._functorch.get_interpreter_stack():
            raise RuntimeError(
                "inner_loop(..., checkpoint=...): checkpointed unrolls recompute segments with "
                "torch.autograd and cannot run inside torch.func transforms (vmap/grad). Run the "
                "tasks with vmap_tasks(..., strategy='loop'), or drop checkpoint=."
            )
        seg = max(1, round(n_exact**0.5)) if checkpoint == "sqrt" else int(checkpoint)
        for seg_start in range(start, n + 1, seg):
            seg_steps = list(range(seg_start, min(seg_start + seg, n + 1)))

            def segment(p, s, seg_steps=seg_steps):
                out = []
                for t in seg_steps:
                    p, s, loss, aux = _step(
                        opts[t - 1],
                        loss_fn,
                        p,
                        s,
                        batch_list[t - 1],
                        has_aux,
                        True,
                        unused,
                        grads_fn=_autograd_grads,
                    )
                    kept = (p, s) if keep(t, t == n) else None
                    out.append((loss, () if aux is None else aux, kept))
                return p, s, out

            params, state, outs = _checkpointed(segment, params, state)
            for t, (loss, aux, kept) in zip(seg_steps, outs):
                losses.append(loss)
                auxes.append(aux)
                if kept is not None:
                    recorded[t] = kept[0]
                    if record_state:
                        states[t] = kept[1]

    if unused is not None:
        unused.check(n)
    tape = Tape(recorded, torch.stack(losses), states)
    return InnerLoopResult(params, state, tape.losses, tape, tuple(auxes) if has_aux else ())
