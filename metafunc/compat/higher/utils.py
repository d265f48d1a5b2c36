"""higher's ``higher.utils``: small helpers over tensors, nested containers and modules.

User code written for higher imports these (``higher.utils.get_func_params`` most often), so the
compat layer keeps higher 0.2.1's names and meanings, the underscored ones included. Where
higher's version fails on a container it does not expect (a named tuple, a ``defaultdict``), these
rebuild it; everything higher handles comes out the same.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["flatten", "get_func_params"]


def _copy_tensor(
    t: torch.Tensor, safe_copy: bool, device: torch.device | str | None = None
) -> torch.Tensor:
    """``t`` detached from its graph, keeping ``requires_grad``; on ``device`` if given.

    ``safe_copy=True`` copies the values (new storage); ``False`` shares them with ``t``, so an
    in-place change to one shows in the other.
    """
    out = t.detach().clone() if safe_copy else t.detach()
    out.requires_grad_(t.requires_grad)
    return out if device is None else out.to(device)


def _is_container(target: Any) -> bool:
    """Whether ``target`` is a list, tuple, dict or set (what :func:`_recursive_map` enters)."""
    return isinstance(target, (list, tuple, dict, set))


def _rebuild(target: Any, items: list) -> Any:
    """A container of ``target``'s type holding ``items`` (values, for a dict)."""
    if isinstance(target, dict):
        new = copy.copy(target)  # keeps a defaultdict's factory, an OrderedDict's type
        new.clear()
        new.update(zip(target.keys(), items))
        return new
    if isinstance(target, tuple) and hasattr(type(target), "_fields"):  # a named tuple
        return type(target)(*items)
    return type(target)(items)


def _recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """Applies ``map_fn`` to every non-container leaf of ``target`` and rebuilds the containers.

    Lists, tuples, dicts and sets are entered, and come back with their own type (a dict keeps its
    keys); anything else, a tensor included, is a leaf and is passed to ``map_fn``.

    Example:
        >>> from metafunc.compat.higher import utils
        >>> utils._recursive_map({"betas": (0.9, 0.99), "lr": 1}, lambda x: 2 * x)
        {'betas': (1.8, 1.98), 'lr': 2}
    """
    if isinstance(target, dict):
        return _rebuild(target, [_recursive_map(v, map_fn) for v in target.values()])
    if isinstance(target, (list, tuple, set)):
        return _rebuild(target, [_recursive_map(x, map_fn) for x in target])
    return map_fn(target)


def _recursive_copy_and_cast(target: Any, device: torch.device | str | None) -> Any:
    """``target`` with every tensor replaced by a detached copy (on ``device`` if given).

    What higher's differentiable optimizers use to copy a ``torch.optim`` state: the copy shares
    no storage with the original, so changing one leaves the other as it was.
    """

    def copy_leaf(x: Any) -> Any:
        return _copy_tensor(x, True, device) if isinstance(x, torch.Tensor) else x

    return _recursive_map(target, copy_leaf)


def _find_param_in_list(param: torch.Tensor, tensors: Iterable[torch.Tensor]) -> int | None:
    """The position of ``param`` in ``tensors`` by identity (``is``, not value), or ``None``."""
    for i, t in enumerate(tensors):
        if t is param:
            return i
    return None


def _get_param_mapping(
    module: nn.Module, seen: list[torch.Tensor], mapping: list[int]
) -> list[int]:
    """For every parameter slot of ``module`` (depth first, a shared parameter once per place it
    is registered), its index among the distinct parameters, in ``module.parameters()`` order.

    ``seen`` collects the distinct parameters and ``mapping`` the indices; both are extended in
    place and ``mapping`` is returned. A model whose two layers share one weight maps both slots
    to the same index: that is how a list of fast weights (one per distinct parameter) is
    expanded to every place that uses it.

    Example:
        >>> import torch
        >>> from metafunc.compat.higher import utils
        >>> shared = torch.nn.Linear(2, 2)
        >>> utils._get_param_mapping(torch.nn.Sequential(shared, shared), [], [])
        [0, 1, 0, 1]
    """
    for param in module._parameters.values():
        if param is None:
            continue
        found = _find_param_in_list(param, seen)
        if found is None:
            mapping.append(len(seen))
            seen.append(param)
        else:
            mapping.append(found)
    for child in module._modules.values():
        if child is not None:
            _get_param_mapping(child, seen, mapping)
    return mapping


def flatten(x: Any) -> list[Any]:
    """The leaves of a nested structure of lists, tuples, sets and dicts (values), in order.

    A tensor is a leaf (it is not iterated).

    Example:
        >>> from metafunc.compat.higher import utils
        >>> utils.flatten({"betas": (0.9, 0.999), "lr": [1e-3]})
        [0.9, 0.999, 0.001]
    """
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in flatten(v)]
    if isinstance(x, (list, tuple, set)):
        return [leaf for v in x for leaf in flatten(v)]
    return [x]


def get_func_params(
    module: nn.Module, device: torch.device | str | None = None, safe_copy: bool = True
) -> list[torch.Tensor]:
    """Detached copies of ``module.parameters()`` that keep their ``requires_grad``.

    These are the initial fast weights of ``monkeypatch(module, copy_initial_weights=True)``: no
    meta-gradient flows from them into the module. ``safe_copy=False`` shares the values instead
    of copying them; ``device`` moves the copies there.

    Example:
        >>> import torch
        >>> from metafunc.compat.higher import utils
        >>> model = torch.nn.Linear(2, 1)
        >>> params = utils.get_func_params(model)
        >>> [p.requires_grad and p.grad_fn is None and p is not q
        ...  for p, q in zip(params, model.parameters())]
        [True, True]
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"get_func_params(module, ...): expected a torch.nn.Module, got "
            f"{type(module).__name__}."
        )
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]
