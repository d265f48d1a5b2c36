"""higher's differentiable optimizers, as wrappers of :mod:`metafunc.optim`.

A ``DifferentiableOptimizer`` reads a ``torch.optim`` optimizer's parameter groups (their
hyperparameters) and its state, and steps a list of fast weights with the matching pure
:mod:`metafunc.optim` optimizer, which follows ``torch.optim`` to float64 round-off.

**State.** As higher documents, the differentiable optimizer starts from the state of the
``torch.optim`` optimizer it is given: after warm-up steps with ``torch.optim``, the unrolled steps
continue from its momentum buffers, moments and step counts, per parameter and per group, exactly
as ``torch.optim`` would continue. The state is copied: stepping either optimizer afterwards leaves
the other's state as it was.

Where higher 0.2.1 departs from ``torch.optim`` (its Adam drifts, 4e-2 after 5 steps at
``eps=1e-3``; its RMSprop warns that its gradients may be wrong), this layer follows
``torch.optim``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ... import optim as mo
from . import _state
from ._base import DifferentiableOptimizer, _check_optimizer
from ._trainable import apply_trainable_opt_params, get_trainable_opt_params
from .patch import FunctionalModule

__all__ = [
    "DifferentiableASGD",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableNAdam",
    "DifferentiableOptimizer",
    "DifferentiableRAdam",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableSGD",
    "apply_trainable_opt_params",
    "create_diff_optim",
    "get_diff_optim",
    "get_trainable_opt_params",
    "register_optim",
]


def _make(
    name: str,
    fn: Callable[..., mo.GradientTransformation],
    doc: str,
    implied: dict[str, Any] | None = None,
    check_copied: Callable[..., None] | None = None,
):
    attrs = {
        "metafunc_optimizer": staticmethod(fn),
        "implied": implied or {},
        "check_copied": None if check_copied is None else staticmethod(check_copied),
    }
    cls = type(name, (DifferentiableOptimizer,), attrs)
    cls.__doc__ = (
        f"{doc}, differentiable (higher's ``{name}``), via ``metafunc.optim.{fn.__name__}``."
    )
    return cls


DifferentiableSGD = _make("DifferentiableSGD", mo.sgd, "torch.optim.SGD")
DifferentiableAdam = _make("DifferentiableAdam", mo.adam, "torch.optim.Adam")
DifferentiableAdamW = _make(
    "DifferentiableAdamW", mo.adamw, "torch.optim.AdamW", {"decoupled_weight_decay": True}
)
DifferentiableAdamax = _make("DifferentiableAdamax", mo.adamax, "torch.optim.Adamax")
DifferentiableNAdam = _make("DifferentiableNAdam", mo.nadam, "torch.optim.NAdam")
DifferentiableRAdam = _make("DifferentiableRAdam", mo.radam, "torch.optim.RAdam")
DifferentiableRMSprop = _make("DifferentiableRMSprop", mo.rmsprop, "torch.optim.RMSprop")
DifferentiableAdagrad = _make("DifferentiableAdagrad", mo.adagrad, "torch.optim.Adagrad")
DifferentiableAdadelta = _make("DifferentiableAdadelta", mo.adadelta, "torch.optim.Adadelta")
DifferentiableRprop = _make("DifferentiableRprop", mo.rprop, "torch.optim.Rprop")
DifferentiableASGD = _make(
    "DifferentiableASGD", mo.asgd, "torch.optim.ASGD", check_copied=_state.check_asgd
)

_REGISTRY: dict[type, type[DifferentiableOptimizer]] = {
    torch.optim.SGD: DifferentiableSGD,
    torch.optim.Adam: DifferentiableAdam,
    torch.optim.AdamW: DifferentiableAdamW,
    torch.optim.Adamax: DifferentiableAdamax,
    torch.optim.NAdam: DifferentiableNAdam,
    torch.optim.RAdam: DifferentiableRAdam,
    torch.optim.RMSprop: DifferentiableRMSprop,
    torch.optim.Adagrad: DifferentiableAdagrad,
    torch.optim.Adadelta: DifferentiableAdadelta,
    torch.optim.Rprop: DifferentiableRprop,
    torch.optim.ASGD: DifferentiableASGD,
}


def register_optim(optim_type: type, diff_optim_type: type) -> None:
    """Registers the differentiable class used by :func:`get_diff_optim` for ``optim_type``."""
    if not (isinstance(optim_type, type) and issubclass(optim_type, torch.optim.Optimizer)):
        raise TypeError(
            f"register_optim: expected a torch.optim.Optimizer subclass, got {optim_type!r}."
        )
    if not (
        isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)
    ):
        raise TypeError(
            f"register_optim: expected a DifferentiableOptimizer subclass, got {diff_optim_type!r}."
        )
    _REGISTRY[optim_type] = diff_optim_type


def _registered(call: str, optim_type: type) -> type:
    cls = _REGISTRY.get(optim_type)
    if cls is None:
        known = sorted(t.__name__ for t in _REGISTRY)
        raise ValueError(
            f"{call}: no differentiable version of {optim_type.__name__} is registered "
            f"(known: {known}); register one with register_optim(optim_type, diff_optim_type)."
        )
    return cls


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[torch.Tensor],
    fmodel: FunctionalModule | None = None,
    device: Any = None,
    override: dict[str, Any] | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """The differentiable version of ``opt`` (higher's ``get_diff_optim``), from ``opt``'s state.

    Each call copies ``opt``'s state anew: several differentiable optimizers made from one
    ``torch.optim`` optimizer (one per task, say) start from the same state and do not share it.
    """
    _check_optimizer("get_diff_optim(opt, ...)", opt)
    cls = _registered("get_diff_optim", type(opt))
    return cls(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def create_diff_optim(
    opt_type: type,
    opt_kwargs: dict[str, Any] | None = None,
    params: Iterable[Any] | None = None,
    fmodel: FunctionalModule | None = None,
    device: Any = None,
    override: dict[str, Any] | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """A differentiable optimizer of a *new* ``opt_type(params, **opt_kwargs)`` (higher's
    ``create_diff_optim``): no ``torch.optim`` optimizer of your own, so no state to start from.

    ``params`` (tensors, or parameter groups: dicts with ``"params"`` and per-group settings) give
    the shapes and the groups; without them, ``fmodel``'s fast weights do. With both, the groups'
    tensors must be ``fmodel``'s current fast weights, and the optimizer steps those. Without
    ``fmodel``, :meth:`~DifferentiableOptimizer.step` takes ``params=`` in the order given here
    (group by group).

    Example:
        >>> import torch
        >>> import metafunc.compat.higher as higher
        >>> fmodel = higher.monkeypatch(torch.nn.Linear(2, 1))
        >>> diffopt = higher.optim.create_diff_optim(
        ...     torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, fmodel=fmodel)
        >>> type(diffopt).__name__
        'DifferentiableSGD'
    """
    call = "create_diff_optim(opt_type, ...)"
    if not (isinstance(opt_type, type) and issubclass(opt_type, torch.optim.Optimizer)):
        if isinstance(opt_type, torch.optim.Optimizer):
            seen = (
                f"an instance of {type(opt_type).__name__}. For an optimizer you built, use "
                "get_diff_optim(opt, model.parameters())"
            )
        else:
            seen = repr(opt_type)
        raise TypeError(
            f"{call}: expected a torch.optim.Optimizer class, e.g. torch.optim.SGD, got {seen}."
        )
    cls = _registered(call, opt_type)
    if opt_kwargs is not None and not isinstance(opt_kwargs, dict):
        raise TypeError(f"{call}: expected opt_kwargs to be a dict or None, got {opt_kwargs!r}.")
    fast = None if fmodel is None or fmodel.fast_params is None else list(fmodel.fast_params)
    if params is None and fast is None:
        raise ValueError(
            f"{call}: give params= (the fast weights, or parameter groups) or an fmodel with "
            "fast weights (monkeypatch(model)); there is nothing to optimize."
        )
    given: list[Any] = list(params) if params is not None else list(fast or [])
    if not given:
        raise ValueError(f"{call}: params is empty; give the fast weights to optimize.")
    grouped = isinstance(given[0], dict)
    if grouped != all(isinstance(g, dict) and "params" in g for g in given):
        raise TypeError(
            f"{call}: expected params to be tensors or parameter groups (dicts with a 'params' "
            "key), not a mix."
        )
    if not grouped:  # tensors: their shapes; with an fmodel, one per fast weight, in order
        if fast is not None and [t.shape for t in given] != [t.shape for t in fast]:
            raise ValueError(
                f"{call}: params has shapes {[tuple(t.shape) for t in given]}, fmodel's fast "
                f"weights {[tuple(t.shape) for t in fast]}; give one tensor per fast weight, in "
                "order, or leave out params."
            )
        stand_in = [torch.zeros_like(t, requires_grad=True) for t in given]
        groups: list[dict[str, Any]] = [{"params": stand_in}]
    else:  # groups: the stepped tensors are fmodel's fast weights, or the groups' in order
        groups = [dict(g, params=list(g["params"])) for g in given]
        order = fast if fast is not None else [t for g in groups for t in g["params"]]
        stand_in = [torch.zeros_like(t, requires_grad=True) for t in order]
        position = {id(t): i for i, t in enumerate(order)}
        for gi, g in enumerate(groups):
            if any(id(t) not in position for t in g["params"]):
                raise ValueError(
                    f"{call}: a tensor of parameter group {gi} is not one of fmodel's current "
                    "fast weights; give groups of fmodel.parameters(), or leave out fmodel."
                )
            g["params"] = [stand_in[position[id(t)]] for t in g["params"]]
    opt = opt_type(groups, **(opt_kwargs or {}))
    return cls(
        opt,
        stand_in,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )
