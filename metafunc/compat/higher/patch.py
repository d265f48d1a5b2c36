"""higher's functional model (``monkeypatch``), on :class:`metafunc.FunctionalModel`."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..._functional import FunctionalModel, functionalize

__all__ = ["FunctionalModule", "monkeypatch"]


def _resolve_initial(call: str, copy_initial_weights: bool, meta_grad_to_model: bool | None):
    """``True`` when the initial fast weights are detached copies (no meta-gradient to them)."""
    if meta_grad_to_model is None:
        return bool(copy_initial_weights)
    if not isinstance(meta_grad_to_model, bool):
        raise TypeError(
            f"{call}: expected meta_grad_to_model to be a bool, got {meta_grad_to_model!r}."
        )
    if copy_initial_weights is not True and copy_initial_weights == meta_grad_to_model:
        raise ValueError(
            f"{call}: copy_initial_weights={copy_initial_weights} and meta_grad_to_model="
            f"{meta_grad_to_model} contradict each other (meta_grad_to_model=True means "
            "copy_initial_weights=False). Pass only meta_grad_to_model."
        )
    return not meta_grad_to_model


class FunctionalModule:
    """What ``monkeypatch`` returns: the module run with a list of fast weights.

    ``fmodel(x, params=None)`` runs the module with ``params`` (default :attr:`fast_params`);
    as in higher, ``params`` given there become the current fast weights. The buffers are
    copies of the module's, made once, as in higher: BatchNorm running statistics updated in
    the inner loop never reach the module. The training modes are those of the module's
    submodules when patched; ``fmodel.train()``/``eval()`` change them here, not in the module.
    Differentiable optimizers append new fast weights with :meth:`update_params`;
    :meth:`parameters` with ``time=t`` returns those after step ``t`` (kept only while
    ``track_higher_grads`` is true, as in higher).
    """

    def __init__(self, module: nn.Module, fast: list[torch.Tensor], track_higher_grads: bool):
        self.module = module
        self._fm: FunctionalModel = functionalize(module)
        self._fm.buffers = {k: b.detach().clone() for k, b in self._fm.buffers.items()}
        self.names = [name for name, _ in module.named_parameters()]
        self._history: list[list[torch.Tensor]] = [fast]
        self._track = bool(track_higher_grads)

    # higher's attributes --------------------------------------------------------------------
    @property
    def track_higher_grads(self) -> bool:
        return self._track

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"fmodel.track_higher_grads: expected a bool, got {value!r}.")
        self._track = value

    @property
    def fast_params(self) -> list[torch.Tensor]:
        """The current fast weights (a list, in ``module.parameters()`` order)."""
        return self._history[-1]

    @fast_params.setter
    def fast_params(self, value: Iterable[torch.Tensor]) -> None:
        self.update_params(value)

    @property
    def init_fast_params(self) -> list[torch.Tensor]:
        """The fast weights at time 0 (the first kept ones when not tracking)."""
        return self._history[0]

    def update_params(self, params: Iterable[torch.Tensor]) -> None:
        """Makes ``params`` the current fast weights (appended to the history when tracking)."""
        params = list(params)
        if len(params) != len(self.names):
            raise ValueError(
                f"fmodel.update_params(params): expected {len(self.names)} tensors (one per "
                f"module parameter), got {len(params)}."
            )
        if self._track:
            self._history.append(params)
        else:
            self._history = [params]

    def parameters(self, time: int | None = None) -> Iterator[torch.Tensor]:
        """The fast weights after step ``time`` (``None``: the current ones; 0: the initial)."""
        if time is None:
            return iter(self._history[-1])
        if not -len(self._history) <= time < len(self._history):
            why = "" if self._track else " (track_higher_grads=False keeps only the latest)"
            raise IndexError(
                f"fmodel.parameters(time={time}): {len(self._history)} time step(s) are kept "
                f"(0..{len(self._history) - 1}){why}."
            )
        return iter(self._history[time])

    def named_parameters(self, time: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        return zip(self.names, self.parameters(time))

    # running ---------------------------------------------------------------------------------
    def forward(self, *args: Any, params: Iterable[torch.Tensor] | None = None, **kwargs: Any):
        if params is not None:  # as in higher, they become the current fast weights
            params = list(params)
            if len(params) != len(self.names):
                raise ValueError(
                    f"fmodel(..., params=...): expected {len(self.names)} tensors in "
                    f"module.parameters() order, got {len(params)}."
                )
            self.update_params(params)
        values = self.fast_params
        fm = self._fm
        named = dict(zip(self.names, values))
        if not fm.buffers:
            return fm(named, *args, **kwargs)
        out, new_buffers = fm.apply(named, fm.buffers, *args, **kwargs)
        with torch.no_grad():
            for key, value in new_buffers.items():
                if value is not fm.buffers[key]:
                    fm.buffers[key].copy_(value)
        return out

    __call__ = forward

    @property
    def training(self) -> bool:
        return self._fm.training

    def train(self, mode: bool = True) -> FunctionalModule:
        """Sets every submodule's training mode here (the module itself is not changed)."""
        self._fm = self._fm.train(mode)
        return self

    def eval(self) -> FunctionalModule:
        return self.train(False)

    def __repr__(self) -> str:
        return f"FunctionalModule({self.module!r}, time={len(self._history) - 1})"


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
