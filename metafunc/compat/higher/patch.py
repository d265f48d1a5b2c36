"""higher's functional model (``monkeypatch``, ``make_functional``, ``buffer_sync``), on
:class:`metafunc.FunctionalModel`."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ._fmodule import FunctionalModule, _resolve_initial

__all__ = ["FunctionalModule", "buffer_sync", "make_functional", "monkeypatch"]


_MonkeyPatchBase = FunctionalModule


def monkeypatch(
    module: nn.Module,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
    *,
    meta_grad_to_model: bool | None = None,
) -> FunctionalModule:
    """higher's ``monkeypatch``: a functional version of ``module`` with fast weights.

    **Where the meta-gradient goes.** ``copy_initial_weights=True`` (higher's default) starts
    from *detached copies* of the module's parameters: the module's own parameters then get
    **no meta-gradient** (``.grad`` stays ``None`` after ``meta_loss.backward()``), and only
    ``fmodel.parameters(time=0)`` carries it. That is what you want when the weights are not
    meta-learned (e.g. only a learning rate is); for MAML, pass ``copy_initial_weights=False``,
    or, clearer, ``meta_grad_to_model=True`` (its alias with the opposite sign), and the
    meta-gradient lands in ``module.parameters()``' ``.grad``.
    """
    call = "monkeypatch(module, ...)"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{call}: expected a torch.nn.Module, got {type(module).__name__}.")
    detach = _resolve_initial(call, copy_initial_weights, meta_grad_to_model)
    fast = []
    for p in module.parameters():
        q = p if device is None else p.to(device)
        if detach:
            q = q.detach().clone().requires_grad_(p.requires_grad)
        fast.append(q)
    if device is not None:  # buffers on the device; the module itself is not moved
        module = copy.deepcopy(module).to(device)
    return FunctionalModule(module, fast, track_higher_grads)


def make_functional(
    module: nn.Module, encapsulator: Callable[[FunctionalModule, nn.Module], None] | None = None
) -> FunctionalModule:
    """higher's ``make_functional``: ``module`` as a functional model *without* fast weights.

    Call it with ``params=`` (a list with one tensor per parameter, in ``module.parameters()``
    order); as in higher, those become its fast weights, so later calls without ``params`` use
    them. ``encapsulator(fmodule, module)``, if given, runs once on the new model (higher's hook,
    e.g. to give it initial fast weights with ``fmodule.update_params``). Its buffers are copies
    of the module's (higher's has none until :func:`buffer_sync`).

    Example:
        >>> import torch
        >>> from metafunc.compat.higher import patch
        >>> model = torch.nn.Linear(2, 1)
        >>> fmodule = patch.make_functional(model)
        >>> x = torch.ones(3, 2)
        >>> torch.equal(fmodule(x, params=list(model.parameters())), model(x))
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"make_functional(module, ...): expected a torch.nn.Module, got "
            f"{type(module).__name__}."
        )
    fmodule = FunctionalModule(module, None, track_higher_grads=True)
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule


def buffer_sync(
    module: nn.Module, fmodule: FunctionalModule, device: torch.device | str | None = None
) -> None:
    """higher's ``buffer_sync``: copies ``module``'s buffers into ``fmodule``, once.

    The direction is higher's, from the module *to* the functional model: ``fmodule``'s buffers
    become detached copies (on ``device`` if given), which its forward passes may then update
    (BatchNorm statistics) without touching the module. Later changes to the module's buffers do
    not reach ``fmodule`` until the next ``buffer_sync``.

    Example:
        >>> import torch
        >>> from metafunc.compat.higher import patch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> fmodel = patch.monkeypatch(bn)
        >>> _ = bn(torch.randn(4, 2))  # the module's statistics move on
        >>> patch.buffer_sync(bn, fmodel)
        >>> torch.equal(fmodel.running_mean, bn.running_mean)
        True
    """
    call = "buffer_sync(module, fmodule, ...)"
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{call}: expected module to be a torch.nn.Module, got {type(module).__name__}."
        )
    if not isinstance(fmodule, FunctionalModule):
        raise TypeError(
            f"{call}: expected fmodule to be a functional model (from monkeypatch or "
            f"make_functional), got {type(fmodule).__name__}."
        )
    ours = fmodule._fm.buffers
    theirs = dict(module.named_buffers())
    if set(theirs) != set(ours):
        raise ValueError(
            f"{call}: the module's buffers {sorted(theirs)} are not the functional model's "
            f"{sorted(ours)}; pass the module it was made from."
        )
    for name, value in theirs.items():
        copied = value.detach().clone()
        ours[name] = copied if device is None else copied.to(device)
