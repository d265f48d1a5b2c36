"""``fmodel.f``: a submodule of higher's functional model, run with the current fast weights.

In higher the functional model mirrors the module's structure (it is a patched copy of it), so
``fmodel.f(x)`` runs submodule ``f`` with the fast weights and ``fmodel.f.weight`` is the current
fast weight. Here the model is one :class:`~metafunc.FunctionalModel`; a :class:`SubmoduleView`
is a name (a path) into it, and everything it answers is looked up in the functional model at the
time of the call, so after ``diffopt.step`` it sees the new fast weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .patch import FunctionalModule


class SubmoduleView:
    """Submodule ``path`` of a functional model (``fmodel.f``, ``fmodel.f.g``, ``fmodel[0]``).

    Calling it runs the submodule with the current fast weights (``params=``, a full list for the
    whole model as in higher, first makes those the current fast weights); its parameters are the
    current fast weights, its buffers the functional model's copies, its submodules views too, and
    its other attributes the module's. Methods that your module class defines run with the fast
    weights as well; ``torch.nn.Module``'s own methods (``state_dict``, ``to``...) are not offered,
    since they would see the module's weights.
    """

    def __init__(self, root: FunctionalModule, path: str) -> None:
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_path", path)

    def __call__(self, *args: Any, params: Any = None, **kwargs: Any) -> Any:
        return self._root._run(self._path, "forward", args, kwargs, params)

    forward = __call__

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._root._attr(self._path, name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._root._set_param(self._path, name, value)

    def __getitem__(self, index: int | str) -> Any:
        return self._root._item(self._path, index)

    def __len__(self) -> int:
        return len(self._root._container(self._path)._modules)

    def __iter__(self) -> Iterator[Any]:
        return self._root._iter(self._path)

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        """The current fast weights of this submodule, in its ``parameters()`` order."""
        return (p for _, p in self.named_parameters(recurse=recurse))

    def named_parameters(self, prefix: str = "", recurse: bool = True):
        """``(name within the submodule, current fast weight)`` pairs."""
        return self._root._named_fast(self._path, prefix, recurse)

    @property
    def training(self) -> bool:
        return self._root._skeleton(self._path).training

    def __repr__(self) -> str:
        real = self._root._real(self._path)
        return f"<fmodel.{self._path}: {type(real).__name__}, run with the fast weights>"


class _Method(nn.Module):
    """Runs the method ``method`` of ``module`` as its forward: ``functional_call`` only runs
    forward, and a method of the user's module class should see the fast weights too."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.m = module
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.m, self.method)(*args, **kwargs)
