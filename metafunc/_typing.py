"""Type aliases shared across metafunc.

Params, buffers, gradients and optimizer states are plain pytrees (optree): nested dicts, lists,
tuples and NamedTuples whose leaves are tensors.
"""

from __future__ import annotations

from typing import Any, Union

import torch

PyTree = Any
"""Any optree pytree: nested ``dict``/``list``/``tuple``/``NamedTuple`` with tensor leaves."""

Params = dict[str, torch.Tensor]
"""Parameters of a functional model, keyed by the module's own names (``"0.weight"``)."""

Buffers = dict[str, torch.Tensor]
"""Buffers of a functional model (running statistics, masks), keyed like :data:`Params`."""

Updates = PyTree
"""A pytree with the structure of the params, holding additive updates."""

OptState = Any
"""An optimizer state: a NamedTuple (or tuple of them) of tensors and pytrees of tensors."""

Scalar = Union[float, int, torch.Tensor]
"""A hyperparameter value: a Python number or a 0-d (possibly learnable) tensor."""

Hyper = Union[float, int, torch.Tensor, PyTree]
"""A hyperparameter: a number, a (learnable) tensor, or a pytree of tensors matching the params."""

__all__ = ["Buffers", "Hyper", "OptState", "Params", "PyTree", "Scalar", "Updates"]
