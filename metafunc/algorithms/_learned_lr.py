"""Learned inner learning rates for :class:`~metafunc.algorithms.MAML`: Meta-SGD's and MAML++'s.

Each is a small immutable value passed as ``MAML(..., learn_lr=...)``. It says what shape the
learned rates have (they live in ``meta["lr"]``, one tensor per adapted param) and turns them
into the inner SGD steps.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import optim
from .._typing import Params
from ..optim import GradientTransformation

__all__ = ["PerParamLR", "PerStepLR"]


@dataclasses.dataclass(frozen=True)
class PerParamLR:
    """Meta-SGD (Li et al. 2017, https://arxiv.org/abs/1707.09835): a learned learning rate for
    every entry of every adapted param, shared by all inner steps.

    ``meta["lr"][name]`` has the param's shape and starts at ``inner_lr``; an inner step is
    ``theta - lr * grad`` (entrywise).

    Example:
        >>> import torch, metafunc
        >>> from metafunc.algorithms import MAML, PerParamLR
        >>> fm = metafunc.functionalize(torch.nn.Linear(2, 1))
        >>> meta = MAML(fm, inner_lr=0.1, learn_lr=PerParamLR()).init()
        >>> meta["lr"]["weight"].shape
        torch.Size([1, 2])
    """

    def shape(self, param: torch.Tensor, steps: int) -> tuple[int, ...]:
        """The shape of one adapted param's learned rates."""
        return tuple(param.shape)

    def init(self, params: Params, names: Sequence[str], lr: float, steps: int) -> Params:
        """The initial rates, ``lr`` everywhere, for the params ``names`` (leaves that require
        grad: they are meta-parameters)."""
        return {k: torch.full_like(params[k].detach(), lr).requires_grad_() for k in names}

    def optimizers(
        self, rates: Mapping[str, torch.Tensor], names: Sequence[str], steps: int
    ) -> GradientTransformation | list[GradientTransformation]:
        """The inner optimizer: SGD with the rates as a per-entry learning rate."""
        return optim.sgd(lr=dict(rates))


@dataclasses.dataclass(frozen=True)
class PerStepLR:
    """MAML++'s LSLR (Antoniou et al. 2019, https://arxiv.org/abs/1810.09502): one learned
    learning rate per adapted param tensor and inner step.

    ``meta["lr"][name]`` has shape ``(steps,)`` and starts at ``inner_lr``; inner step ``t`` is
    ``theta - lr[t] * grad``.

    Example:
        >>> import torch, metafunc
        >>> from metafunc.algorithms import MAML, PerStepLR
        >>> fm = metafunc.functionalize(torch.nn.Linear(2, 1))
        >>> meta = MAML(fm, inner_lr=0.1, steps=3, learn_lr=PerStepLR()).init()
        >>> meta["lr"]["weight"].shape
        torch.Size([3])
    """

    def shape(self, param: torch.Tensor, steps: int) -> tuple[int, ...]:
        """The shape of one adapted param's learned rates."""
        return (steps,)

    def init(self, params: Params, names: Sequence[str], lr: float, steps: int) -> Params:
        """The initial rates, ``lr`` for every step, for the params ``names``."""
        return {
            k: torch.full(
                (steps,), lr, dtype=params[k].dtype, device=params[k].device, requires_grad=True
            )
            for k in names
        }

    def optimizers(
        self, rates: Mapping[str, torch.Tensor], names: Sequence[str], steps: int
    ) -> GradientTransformation | list[GradientTransformation]:
        """One SGD per inner step, each with that step's rates."""
        return [optim.sgd(lr={k: rates[k][t] for k in names}) for t in range(steps)]


LearnedLR = PerParamLR | PerStepLR
_OLD: dict[str, LearnedLR] = {"per_param": PerParamLR(), "per_layer_per_step": PerStepLR()}


def learned_lr(call: str, learn_lr: Any) -> LearnedLR | None:
    """``learn_lr`` as one of the objects above (or ``None``); the old string modes still work
    for one release, with a ``DeprecationWarning`` naming the object that replaces them."""
    if learn_lr is None or isinstance(learn_lr, (PerParamLR, PerStepLR)):
        return learn_lr
    if isinstance(learn_lr, str) and learn_lr in _OLD:
        new: LearnedLR = _OLD[learn_lr]
        warnings.warn(
            f"{call}: learn_lr={learn_lr!r} is deprecated and will be removed in the next "
            f"release; pass learn_lr=metafunc.algorithms.{new!r} (same numbers).",
            DeprecationWarning,
            stacklevel=3,
        )
        return new
    error = ValueError if isinstance(learn_lr, str) else TypeError
    raise error(
        f"{call}: expected learn_lr to be None, metafunc.algorithms.PerParamLR() (Meta-SGD) or "
        f"metafunc.algorithms.PerStepLR() (MAML++), got {learn_lr!r}."
    )
