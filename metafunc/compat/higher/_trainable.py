"""Learnable hyperparameters: from a ``torch.optim`` optimizer's groups, and back into them.

higher's pattern for learning an inner optimizer's hyperparameters::

    override = higher.optim.get_trainable_opt_params(inner_opt)   # {"lr": [tensor], ...}
    meta_opt = torch.optim.Adam([t for ts in override.values() for t in flatten(ts)])
    ...  innerloop_ctx(model, inner_opt, override=override) ...; meta_opt.step()
    higher.optim.apply_trainable_opt_params(inner_opt, override)  # the learned values, back

The tensors are float64, so that writing them back is exact: the round trip
``apply_trainable_opt_params(opt, get_trainable_opt_params(opt))`` leaves every group as it was.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from . import utils

__all__ = ["apply_trainable_opt_params", "get_trainable_opt_params"]

# numbers in the groups that metafunc does not differentiate: ASGD's t0 is a step index, and
# Adagrad's initial_accumulator_value only sets the state before the first step
_NOT_LEARNABLE = {"t0", "initial_accumulator_value"}


def _learnable(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point() and x.numel() == 1
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def get_trainable_opt_params(
    opt: torch.optim.Optimizer, device: torch.device | str | None = None
) -> dict[str, list[Any]]:
    """An ``override`` dict of learnable tensors holding ``opt``'s numeric hyperparameters.

    As higher's: ``{name: [value of group 0, value of group 1, ...]}``, each value a 0-d tensor
    that requires grad (a tuple of them for ``betas``, ``etas``, ``step_sizes``), ready for
    ``innerloop_ctx(..., override=...)`` and for an outer optimizer.

    Unlike higher 0.2.1, switches are left out (``nesterov``, ``amsgrad``, ``maximize``,
    ``foreach``...: a bool is not learnable; higher turns them into float tensors), and so are
    the numbers the optimizer's differentiable version does not take as hyperparameters (a
    scheduler's ``initial_lr``) or does not differentiate (ASGD's ``t0``, Adagrad's
    ``initial_accumulator_value``), and SGD's ``dampening`` in a Nesterov group (it must be 0).
    The tensors are float64 (higher: the default dtype), so the round trip through
    :func:`apply_trainable_opt_params` is exact.

    Example:
        >>> import torch
        >>> import metafunc.compat.higher as higher
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1, momentum=0.9)
        >>> override = higher.optim.get_trainable_opt_params(opt)
        >>> sorted(override)
        ['dampening', 'lr', 'momentum', 'weight_decay']
        >>> override["lr"]
        [tensor(0.1000, dtype=torch.float64, requires_grad=True)]
    """
    from ._base import DifferentiableOptimizer, _check_optimizer
    from .optim import _REGISTRY

    _check_optimizer("get_trainable_opt_params(opt, ...)", opt)
    cls = _REGISTRY.get(type(opt))
    accepted = None  # the hyperparameters of its metafunc optimizer; any for higher's protocol
    if cls is not None and cls._update is DifferentiableOptimizer._update:
        accepted = set(inspect.signature(cls.metafunc_optimizer).parameters)

    def to_tensor(x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            t = x.detach().clone() if device is None else x.detach().to(device, copy=True)
        else:
            t = torch.tensor(float(x), dtype=torch.float64, device=device)
        return t.requires_grad_()

    override: dict[str, list[Any]] = {}
    for group in opt.param_groups:
        for key, value in group.items():
            if key == "params" or key in _NOT_LEARNABLE:
                continue
            if accepted is not None and key not in accepted:
                continue
            if key == "dampening" and group.get("nesterov"):
                continue
            leaves = utils.flatten(value)
            if leaves and all(_learnable(x) for x in leaves):
                override.setdefault(key, []).append(utils._recursive_map(value, to_tensor))
    return override


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: Mapping[str, Any]) -> None:
    """Writes learned hyperparameters (an ``override`` dict) into ``opt``'s parameter groups.

    As higher's: each value is a list with one entry for every group or one per group; numbers
    in the groups get the tensors' values, tuples element by element, and a tensor in a group is
    overwritten in place. Everything is checked before anything is written.

    An integer in a group (``momentum=0`` is an ``int`` by default) becomes a float when the
    learned value is not a whole number (higher 0.2.1 truncates it to an int).

    Example:
        >>> import torch
        >>> import metafunc.compat.higher as higher
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> override = {"lr": [torch.tensor(0.25)], "momentum": [torch.tensor(0.5)]}
        >>> higher.optim.apply_trainable_opt_params(opt, override)
        >>> opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]
        (0.25, 0.5)
    """
    from ._base import _check_optimizer

    call = "apply_trainable_opt_params(opt, override)"
    _check_optimizer(call, opt)
    if not isinstance(override, Mapping):
        raise TypeError(
            f"{call}: expected override to be a dict (as get_trainable_opt_params returns), got "
            f"{type(override).__name__}."
        )
    groups = opt.param_groups
    writes = []
    for key, values in override.items():
        if not isinstance(values, (list, tuple)) or len(values) not in (1, len(groups)):
            seen = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(values)
            raise ValueError(
                f"{call}: override[{key!r}] must be a list with one value for all "
                f"{len(groups)} parameter group(s) or one per group, got {seen}."
            )
        for gi, group in enumerate(groups):
            if key not in group:
                raise ValueError(
                    f"{call}: parameter group {gi} has no hyperparameter {key!r} (it has "
                    f"{sorted(k for k in group if k != 'params')})."
                )
            value = values[0] if len(values) == 1 else values[gi]
            where = f"override[{key!r}] for parameter group {gi}"
            writes.append((group, key, _converted(call, where, value, group[key])))
    for group, key, value in writes:
        if isinstance(group[key], torch.Tensor) and isinstance(value, torch.Tensor):
            with torch.no_grad():
                group[key].copy_(value)
        else:
            group[key] = value


def _converted(call: str, where: str, value: Any, target: Any) -> Any:
    """``value`` in the form of the group's current ``target`` (a number, tuple or tensor)."""
    if isinstance(target, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(target):
            raise ValueError(
                f"{call}: {where} must have {len(target)} entries, like the group's {target!r}; "
                f"got {value!r}."
            )
        items = [_converted(call, where, v, t) for v, t in zip(value, target)]
        return utils._rebuild(target, items)
    if (
        isinstance(value, torch.Tensor)
        and value.numel() != 1
        and not isinstance(target, torch.Tensor)
    ):
        raise ValueError(
            f"{call}: {where} is a tensor of shape {tuple(value.shape)}; the group holds the "
            f"number {target!r}, so give one value."
        )
    if isinstance(target, torch.Tensor):
        value = torch.as_tensor(value)
        if value.numel() != target.numel():
            raise ValueError(
                f"{call}: {where} has {value.numel()} values; the group's tensor has "
                f"{target.numel()}."
            )
        return value.detach().reshape(target.shape).to(target.dtype)
    number = float(value.item() if isinstance(value, torch.Tensor) else value)
    if isinstance(target, bool):
        if number not in (0.0, 1.0):
            raise ValueError(f"{call}: {where} is {number}, but the group holds a bool.")
        return bool(number)
    if isinstance(target, int):
        return int(number) if number.is_integer() else number
    if isinstance(target, float):
        return number
    raise ValueError(
        f"{call}: {where}: the group holds {target!r} ({type(target).__name__}), which is not a "
        "number, tuple of numbers or tensor; it cannot take a learned value."
    )
