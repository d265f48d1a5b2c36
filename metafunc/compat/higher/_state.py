"""A differentiable optimizer starts from the state of the ``torch.optim`` optimizer it wraps.

higher documents ``DifferentiableOptimizer(other, ...)`` as "initialize the optimizer with the
state of an existing optimizer": code that warms a model up with ``torch.optim`` and then unrolls
the same optimizer differentiably continues from its momentum buffers, moments and step counts.
metafunc's pure optimizers keep the same quantities under their own names, in one ``NamedTuple``
per chained transform; :func:`from_torch` fills a fresh ``opt.init`` state with *copies* of the
``torch.optim`` values (no storage is shared, so stepping either optimizer afterwards leaves the
other as it was). The copies take the dtype and device of the fresh state, which are those of the
fast weight: ``torch.optim``'s own for float32 and float64 parameters.

Two quantities ``torch.optim`` stores, metafunc recomputes: ASGD's ``eta`` and ``mu`` come from
the step count and the hyperparameters. :func:`check_asgd` makes sure the stored values are those
the first differentiable step will use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch

from ..._typing import OptState

# metafunc state type (by name: metafunc.optim.<name>) -> {field: the torch.optim key holding the
# same quantity}
_FIELDS: dict[str, dict[str, str]] = {
    "TraceState": {"step": "step", "trace": "momentum_buffer"},
    "ScaleByAdamState": {
        "step": "step",
        "mu": "exp_avg",
        "nu": "exp_avg_sq",
        "nu_max": "max_exp_avg_sq",
    },
    "ScaleByAdamaxState": {"step": "step", "mu": "exp_avg", "u_inf": "exp_inf"},
    "ScaleByNadamState": {
        "step": "step",
        "mu_product": "mu_product",
        "mu": "exp_avg",
        "nu": "exp_avg_sq",
    },
    "ScaleByRadamState": {"step": "step", "mu": "exp_avg", "nu": "exp_avg_sq"},
    "ScaleByRmsState": {"nu": "square_avg", "mu": "grad_avg"},
    "ScaleByAdagradState": {"step": "step", "sum": "sum"},
    "ScaleByAdadeltaState": {"nu": "square_avg", "acc_delta": "acc_delta"},
    "ScaleByRpropState": {"prev": "prev", "step_size": "step_size"},
    "ScaleByAsgdState": {"step": "step", "ax": "ax"},
}
# torch.optim keys that the optimizer's present configuration may leave unused (the step count of
# RMSprop without momentum; Adam's max_exp_avg_sq after amsgrad was switched off), as torch.optim
# itself would; ASGD's eta and mu are checked by check_asgd
_KNOWN = {key for fields in _FIELDS.values() for key in fields.values()} | {"eta", "mu"}


def from_torch(
    call: str, where: str, fresh: OptState, torch_state: Mapping[str, Any], optimizer: str
) -> OptState:
    """``fresh`` (``opt.init({"p": weight})``) with the values of one parameter's torch state.

    Args:
        call: the user's call, for errors.
        where: the parameter, for errors (``"parameter '0.weight'"``).
        fresh: the state of the named metafunc optimizer (a chain: a tuple of transform states).
        torch_state: ``torch_optimizer.state[param]``.
        optimizer: the metafunc optimizer's name, for errors.
    """
    used: set[str] = set()
    states = fresh if isinstance(fresh, tuple) and not hasattr(fresh, "_fields") else (fresh,)
    filled = tuple(_fill(call, where, s, torch_state, used, optimizer) for s in states)
    unknown = sorted(set(torch_state) - used - _KNOWN)
    if unknown:
        raise ValueError(
            f"{call}: the torch.optim state of {where} has {unknown}, which "
            f"metafunc.optim.{optimizer} does not keep; copying the rest would silently drop "
            "them. Register a differentiable optimizer whose metafunc_optimizer keeps that state "
            "(register_optim), or start from an optimizer that has not stepped."
        )
    return filled if states is fresh else filled[0]


def _fill(
    call: str, where: str, state: Any, torch_state: Mapping[str, Any], used: set[str], opt: str
) -> Any:
    kind = type(state).__name__
    fields = _FIELDS.get(kind)
    if fields is None:
        if not optree.tree_leaves(state):  # a stateless transform (scale, weight decay)
            return state
        raise ValueError(
            f"{call}: cannot start metafunc.optim.{opt} from the torch.optim state of {where}: "
            f"its state {type(state).__name__} has no known torch.optim counterpart. Start from "
            "an optimizer that has not stepped."
        )
    if kind == "TraceState" and torch_state.get("momentum_buffer") is None:
        return state  # no buffer yet: torch.optim's next step is its first (b_1 = g_1), as here
    values = state._asdict()
    for field, key in fields.items():
        like = values[field]
        if isinstance(like, tuple) and not like:  # an unused slot (amsgrad, centered off)
            continue
        if key not in torch_state:
            if field == "step" and kind == "TraceState":  # SGD keeps no step count
                values[field] = torch.ones_like(like)
                continue
            raise ValueError(
                f"{call}: the torch.optim state of {where} has no {key!r} (it has "
                f"{sorted(torch_state)}), which metafunc.optim.{opt} needs with the present "
                "hyperparameters. Was a setting changed after the optimizer stepped (e.g. "
                "amsgrad or centered switched on)? torch.optim would fail too; start from an "
                "optimizer that has not stepped with these settings."
            )
        used.add(key)
        if isinstance(like, dict):  # a per-parameter tree {"p": tensor}
            values[field] = {
                k: _copy(call, where, key, torch_state[key], t) for k, t in like.items()
            }
        else:
            values[field] = _copy(call, where, key, torch_state[key], like)
    return type(state)(**values)


def _copy(call: str, where: str, key: str, value: Any, like: torch.Tensor) -> torch.Tensor:
    """A copy of ``value`` with ``like``'s dtype, device and shape; never ``value``'s storage."""
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(value)
    if value.numel() != like.numel():
        raise ValueError(
            f"{call}: the torch.optim state of {where} has {key!r} of shape "
            f"{tuple(value.shape)}, where a tensor of shape {tuple(like.shape)} was expected. "
            "Is it the state of another model's parameter?"
        )
    if not like.is_floating_point() and not bool((value == value.round()).all()):
        raise ValueError(
            f"{call}: the torch.optim state of {where} has a step count {key!r} of "
            f"{value.tolist()}, not a whole number."
        )
    value = value.detach().reshape(like.shape)
    if not like.is_floating_point():
        value = value.round()
    return value.to(dtype=like.dtype, device=like.device, copy=True)


def check_asgd(
    call: str, where: str, torch_state: Mapping[str, Any], value: Callable[[str], Any]
) -> None:
    """Raises unless torch.optim.ASGD's stored ``eta`` and ``mu`` are what the first step uses.

    ``torch.optim.ASGD`` computes ``eta`` and ``mu`` for the next step at the end of each step and
    stores them; metafunc's ASGD computes them from the step count and the hyperparameters in
    effect (``value(name)`` for ``lr``, ``lambd``, ``alpha``, ``t0``). They agree unless a
    hyperparameter changed after torch.optim's last step, or is a learnable tensor (torch.optim's
    first step then does not depend on it); both are errors rather than a silently different step.
    """
    numbers = {}
    for name in ("lr", "lambd", "alpha", "t0"):
        v = value(name)
        if isinstance(v, torch.Tensor):
            if v.requires_grad:
                raise ValueError(
                    f"{call}: {where} continues the state of a torch.optim.ASGD that has "
                    f"stepped, whose next step size eta torch.optim computed and stored with "
                    f"the {name} of that time; a learnable {name} (a tensor that requires grad) "
                    "cannot change that step as it would here, where eta is computed from it. "
                    f"Learn {name} with an optimizer that has not stepped, or pass a number."
                )
            if v.numel() != 1:
                raise ValueError(
                    f"{call}: {where} continues a torch.optim.ASGD state, which holds one eta "
                    f"per parameter; {name} must be one number, got a tensor of shape "
                    f"{tuple(v.shape)}."
                )
            v = v.item()
        numbers[name] = float(v)
    step = float(torch_state["step"])
    lr, lambd, alpha, t0 = numbers.values()
    want = {"eta": lr / (1 + lambd * lr * step) ** alpha, "mu": 1 / max(1.0, step - t0)}
    for key, expected in want.items():
        stored = torch_state[key]
        tensor = stored if isinstance(stored, torch.Tensor) else torch.tensor(float(stored))
        eps = torch.finfo(tensor.dtype).eps if tensor.is_floating_point() else 0.0
        if not math.isclose(float(tensor), expected, rel_tol=4 * eps, abs_tol=1e-300):
            raise ValueError(
                f"{call}: {where}: torch.optim.ASGD stored {key}={float(tensor)!r} for its next "
                f"step, but the hyperparameters now in effect ({numbers}) give "
                f"{key}={expected!r}: they were changed after the optimizer's last step, and "
                "metafunc's ASGD computes eta and mu from them and the step count. Step the "
                "torch.optim optimizer once with the new values first, or set the old ones back."
            )
