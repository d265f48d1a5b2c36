"""Writes into the caller's tensors during a :class:`FunctionalModel` call, detected and named.

Every in-place write bumps a tensor's version counter (views share their base's counter), so
comparing the counters of the caller's tensors before and after the call detects a write at the
cost of reading them. Under ``torch.func`` transforms a write into a wrapper (a vmap
``BatchedTensor``) bumps the counter of the tensor it wraps only, so the wrappers are unwrapped
first. Naming the submodule that wrote is left to the error path (:func:`find_writer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor, peek_interpreter_stack

from . import _norms

__all__ = ["bases", "find_writer", "input_names", "inputs", "versions"]


def inputs(args: tuple, kwargs: dict) -> list[Any]:
    """The inputs and, one level down, the items of tuples and lists among them, in the order of
    :func:`input_names`. (No optree: dynamo breaks the graph on a flatten here.)"""
    found = [*args, *kwargs.values()]
    found += [y for x in found if isinstance(x, (tuple, list)) for y in x]
    return found


def input_names(args: tuple, kwargs: dict) -> list[str]:
    """``args[0]``, ``kwargs['mask']``, ``args[0][1]``, ...: one per entry of :func:`inputs`."""
    names = [f"args[{i}]" for i in range(len(args))] + [f"kwargs[{k!r}]" for k in kwargs]
    items = [*args, *kwargs.values()]
    names += [
        f"{n}[{j}]"
        for n, x in zip(names, items)
        if isinstance(x, (tuple, list))
        for j in range(len(x))
    ]
    return names


def versions(tensors: list[torch.Tensor]) -> list[int]:
    """The version counters of ``tensors`` (of the tensors they wrap, under transforms)."""
    try:
        return [t._version for t in bases(tensors)]
    except RuntimeError:  # inference tensors have no version counter: they are not checked
        return [-1 if t.is_inference() else _unwrapped(t)._version for t in tensors]


def bases(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors that ``tensors`` wrap under transforms (themselves outside any): unwrapped
    once before a call, their version counters are read before and after it."""
    if peek_interpreter_stack() is None:
        return tensors
    return [_unwrapped(t) for t in tensors]


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t


def _copy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_copy(y) for y in x)
    return x


def find_writer(
    skeleton: nn.Module,
    run: Callable[[dict[str, torch.Tensor], tuple, dict], Any],
    tensors: dict[str, torch.Tensor],
    args: tuple,
    kwargs: dict,
) -> str | None:
    """Names the submodule that writes into its inputs or params, or ``None`` if none is found.

    For the error path only: reruns ``run`` (a forward pass of ``skeleton``, a copy that nothing
    else uses) on copies of ``tensors`` and of the inputs, with hooks on every submodule, and
    names the innermost one whose inputs or params changed during its own forward pass (forward
    hooks run innermost first).
    """

    def own(module: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        found = [x for x in inputs(args, kwargs) if isinstance(x, torch.Tensor)]
        return found + list(module.parameters())

    found: list[str] = []
    stack: list[list[int]] = []

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        stack.append(versions(own(module, args, kwargs)))

    def after_hook(name: str) -> Callable[..., None]:
        def after(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            seen = stack.pop()
            if not found and versions(own(module, args, kwargs)) != seen:
                kind = type(module).__name__
                found.append(f"submodule {name!r} ({kind})" if name else f"{kind}.forward itself")

        return after

    handles = []
    for name, module in skeleton.named_modules():
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after_hook(name), with_kwargs=True))
    try:
        with torch.no_grad(), _norms.buffer_updates():
            copies = {k: _copy(v) for k, v in tensors.items()}
            run(copies, _copy(args), {k: _copy(v) for k, v in kwargs.items()})
    except Exception:  # a diagnosis only: the error to raise is the write, not this one
        return None
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None
