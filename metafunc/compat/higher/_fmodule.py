"""higher's functional model class: a module's structure over metafunc's :class:`FunctionalModel`
and its fast weights (submodules, parameters, methods, all with the current fast weights)."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..._functional import FunctionalModel, functionalize
from ._views import SubmoduleView, _Method

__all__ = ["FunctionalModule"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


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


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


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

    As in higher, the model's structure shows through: ``fmodel.f`` is submodule ``f``
    (a :class:`~metafunc.compat.higher._views.SubmoduleView`, run with the fast weights),
    ``fmodel.weight`` and ``fmodel.f.weight`` are current fast weights, ``fmodel[0]`` indexes a
    ``Sequential``, and assigning ``fmodel.f.weight = w`` makes ``w`` current. A name of this
    class's own (``module``, ``names``, ``parameters``, ``training``...) takes precedence over a
    submodule or attribute of the same name.
    """

    def __init__(
        self, module: nn.Module, fast: list[torch.Tensor] | None, track_higher_grads: bool
    ):
        self.module = module
        self._fm: FunctionalModel = functionalize(module)
        self._fm.buffers = {k: b.detach().clone() for k, b in self._fm.buffers.items()}
        self.names = [name for name, _ in module.named_parameters()]
        self._index = {id(p): i for i, p in enumerate(module.parameters())}
        self._buffer_name = {id(b): name for name, b in module.named_buffers()}
        self._runners: dict[tuple[str, str], tuple[FunctionalModel, list, list]] = {}
        self._track = bool(track_higher_grads)
        self._history: list[list[torch.Tensor]] = [] if fast is None else [fast]

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
    def fast_params(self) -> list[torch.Tensor] | None:
        """The current fast weights (a list, in ``module.parameters()`` order); ``None`` before
        a ``make_functional`` model is first given some, as in higher."""
        return self._history[-1] if self._history else None

    @fast_params.setter
    def fast_params(self, value: Iterable[torch.Tensor]) -> None:
        self.update_params(value)

    @property
    def init_fast_params(self) -> list[torch.Tensor] | None:
        """The fast weights at time 0 (the first kept ones when not tracking)."""
        return self._history[0] if self._history else None

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

    def parameters(self, recurse: bool = True, time: int | None = None) -> Iterator[torch.Tensor]:
        """The fast weights after step ``time`` (``None``: the current ones; 0: the initial).

        ``recurse`` is there for ``nn.Module.parameters``' signature, as in higher: all the
        fast weights are returned either way (with higher's warning when it is false).
        """
        if not recurse:
            warnings.warn(
                "fmodel.parameters(recurse=False) still returns the fast weights of every "
                "submodule (as in higher): a functional model has one list of fast weights.",
                stacklevel=2,
            )
        if not self._history:
            raise ValueError(
                f"fmodel.parameters(time={time}): this functional model has no fast weights yet "
                "(make_functional keeps none until it is called with params=...)."
            )
        if time is None:
            return iter(self._history[-1])
        if not -len(self._history) <= time < len(self._history):
            why = "" if self._track else " (track_higher_grads=False keeps only the latest)"
            raise IndexError(
                f"fmodel.parameters(time={time}): {len(self._history)} time step(s) are kept "
                f"(0..{len(self._history) - 1}){why}."
            )
        return iter(self._history[time])

    def named_parameters(
        self, recurse: bool = True, time: int | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, fast weight)`` pairs, as :meth:`parameters`."""
        return zip(self.names, self.parameters(recurse, time=time))

    # running ---------------------------------------------------------------------------------
    def forward(self, *args: Any, params: Iterable[torch.Tensor] | None = None, **kwargs: Any):
        return self._run("", "forward", args, kwargs, params)

    def __call__(self, *args: Any, params: Iterable[torch.Tensor] | None = None, **kwargs: Any):
        return self._run("", "forward", args, kwargs, params)

    def _run(self, path: str, method: str, args: tuple, kwargs: dict, params: Any) -> Any:
        """Runs ``method`` of submodule ``path`` with the current fast weights and buffers."""
        where = "fmodel" + (f".{path}" if path else "")
        if params is not None:  # as in higher, they become the current fast weights
            params = list(params)
            if len(params) != len(self.names):
                raise ValueError(
                    f"{where}(..., params=...): expected {len(self.names)} tensors in "
                    f"module.parameters() order (all of the model's, as in higher), got "
                    f"{len(params)}."
                )
            self.update_params(params)
        values = self.fast_params
        if values is None:
            raise ValueError(
                f"{where}(...): this functional model has no fast weights yet; pass params= "
                f"(a list of {len(self.names)} tensors in module.parameters() order)."
            )
        fm, keys, buffer_keys = self._runner(path, method)
        named = {k: values[i] for k, i in keys}
        if not buffer_keys:
            return fm(named, *args, **kwargs)
        buffers = {k: self._fm.buffers[name] for k, name in buffer_keys}
        out, new_buffers = fm.apply(named, buffers, *args, **kwargs)
        with torch.no_grad():  # the functional model's own copies, as in higher
            for key, value in new_buffers.items():
                if value is not buffers[key]:
                    buffers[key].copy_(value)
        return out

    def _runner(self, path: str, method: str) -> tuple[FunctionalModel, list, list]:
        """A FunctionalModel running ``method`` of submodule ``path``, with ``(its param name,
        index in the fast weights)`` and ``(its buffer name, name in self._fm.buffers)`` pairs."""
        cached = self._runners.get((path, method))
        if cached is not None:
            return cached
        skeleton, real = self._skeleton(path), self._real(path)
        prefix = ""
        if not path and method == "forward":
            fm = self._fm
        elif method == "forward":
            fm = functionalize(skeleton)
        else:
            fm, prefix = functionalize(_Method(skeleton, method)), "m."
        keys = [(prefix + name, self._index[id(p)]) for name, p in real.named_parameters()]
        buffer_keys = [
            (prefix + name, self._buffer_name[id(b)]) for name, b in real.named_buffers()
        ]
        self._runners[(path, method)] = (fm, keys, buffer_keys)
        return fm, keys, buffer_keys

    def _real(self, path: str) -> nn.Module:
        return self.module.get_submodule(path) if path else self.module

    def _skeleton(self, path: str) -> nn.Module:
        """The submodule in the functional model's own copy (data-free; its training modes)."""
        return self._fm._skeleton.get_submodule(path) if path else self._fm._skeleton

    # the module's structure ------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or "_history" not in self.__dict__:  # not built yet (copy)
            raise AttributeError(name)
        return self._attr("", name)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_history" in self.__dict__ and name in self.module._parameters:
            self._set_param("", name, value)
        else:
            object.__setattr__(self, name, value)

    def __getitem__(self, index: int | str) -> Any:
        return self._item("", index)

    def __len__(self) -> int:
        return len(self._container("")._modules)

    def __iter__(self) -> Iterator[Any]:
        return self._iter("")

    def _attr(self, path: str, name: str) -> Any:
        """``fmodel.<path>.<name>``: a submodule view, a fast weight, a buffer copy, a method
        run with the fast weights, or the module's attribute."""
        real = self._real(path)
        where = "fmodel" + (f".{path}" if path else "")
        if name in real._modules:
            return None if real._modules[name] is None else SubmoduleView(self, _join(path, name))
        if name in real._parameters:
            p = real._parameters[name]
            if p is None:
                return None
            if self.fast_params is None:
                raise ValueError(
                    f"{where}.{name}: this functional model has no fast weights yet (call it "
                    "with params=... first)."
                )
            return self.fast_params[self._index[id(p)]]
        if name in real._buffers:
            b = real._buffers[name]
            return None if b is None else self._fm.buffers[self._buffer_name[id(b)]]
        try:
            value = getattr(real, name)
        except AttributeError:
            raise AttributeError(
                f"{where}.{name}: {type(real).__name__} has no attribute {name!r} (its "
                f"submodules: {list(real._modules)}; parameters: {list(real._parameters)})."
            ) from None
        if inspect.ismethod(value) and value.__self__ is real:
            owner = next((c for c in type(real).__mro__ if name in vars(c)), None)
            if owner is not None and owner.__module__.startswith("torch."):
                raise AttributeError(
                    f"{where}.{name}: {owner.__qualname__}.{name} is torch's own method, which "
                    "would see the module's weights, not the fast weights. The functional model "
                    "runs forward (call it) and the methods your module class defines; for the "
                    "weights, use fmodel.parameters() or named_parameters()."
                )
            return functools.partial(self._run_method, path, name)
        return value

    def _run_method(self, path: str, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._run(path, name, args, kwargs, None)

    def _set_param(self, path: str, name: str, value: Any) -> None:
        """``fmodel.<path>.<name> = value``: as in higher, ``value`` becomes the current fast
        weight of that parameter (a new time step when tracking)."""
        real = self._real(path)
        where = "fmodel" + (f".{path}" if path else "")
        p = real._parameters.get(name)
        if p is None:
            raise AttributeError(
                f"{where}.{name} = ...: only the fast weights of the parameters can be set on the "
                f"functional model ({type(real).__name__}'s: {list(real._parameters)})."
            )
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}.{name} = ...: expected a tensor, got {type(value).__name__}.")
        if value.shape != p.shape:
            raise ValueError(
                f"{where}.{name} = ...: expected shape {tuple(p.shape)}, got {tuple(value.shape)}."
            )
        if self.fast_params is None:
            raise ValueError(f"{where}.{name} = ...: there are no fast weights to update yet.")
        fast = list(self.fast_params)
        fast[self._index[id(p)]] = value
        self.update_params(fast)

    def _container(self, path: str) -> nn.Module:
        real = self._real(path)
        if not isinstance(real, _CONTAINERS):
            raise TypeError(
                f"{'fmodel' + (f'.{path}' if path else '')}: a {type(real).__name__} is not "
                "indexable; only Sequential, ModuleList and ModuleDict submodules are."
            )
        return real

    def _item(self, path: str, index: int | str) -> SubmoduleView:
        real = self._container(path)
        names = list(real._modules)
        if isinstance(index, str) and index in real._modules:
            return SubmoduleView(self, _join(path, index))
        if isinstance(index, int) and not isinstance(real, nn.ModuleDict):
            if -len(names) <= index < len(names):
                return SubmoduleView(self, _join(path, names[index]))
            raise IndexError(f"index {index} is out of range for {len(names)} submodules.")
        raise TypeError(
            f"{'fmodel' + (f'.{path}' if path else '')}[{index!r}]: expected an int position "
            f"(Sequential, ModuleList) or a key (ModuleDict: {names}); slices are not supported."
        )

    def _iter(self, path: str) -> Iterator[Any]:
        real = self._container(path)
        if isinstance(real, nn.ModuleDict):
            return iter(list(real._modules))
        return iter([SubmoduleView(self, _join(path, name)) for name in real._modules])

    def _named_fast(self, path: str, prefix: str, recurse: bool):
        real = self._real(path)
        fast = self.fast_params
        if fast is None:
            raise ValueError("fmodel: there are no fast weights yet.")
        return iter(
            [
                (_join(prefix, name), fast[self._index[id(p)]])
                for name, p in real.named_parameters(recurse=recurse)
            ]
        )

    # modes -----------------------------------------------------------------------------------
    @property
    def training(self) -> bool:
        return self._fm.training

    def train(self, mode: bool = True) -> FunctionalModule:
        """Sets every submodule's training mode here (the module itself is not changed)."""
        self._fm = self._fm.train(mode)
        self._runners = {}
        return self

    def eval(self) -> FunctionalModule:
        return self.train(False)

    def __repr__(self) -> str:
        return f"FunctionalModule({self.module!r}, time={len(self._history) - 1})"


# higher's name for the class of a patched module (user code checks isinstance against it)
