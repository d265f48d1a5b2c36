"""``functionalize``: a ``torch.nn.Module`` turned once into a pure function of its params."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call

from . import _checks, _norms, _purity
from ._typing import Buffers, Params

__all__ = ["FunctionalModel", "functionalize"]


def _unwrap(module: nn.Module) -> nn.Module:
    while True:
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = cast(nn.Module, module.module)
        elif type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
            module = cast(nn.Module, module._orig_mod)
        else:
            return module


def _meta_skeleton(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose params and buffers live on the meta device (no data)."""
    memo: dict[int, Any] = {}
    tensors: list[tuple[str, torch.Tensor]] = list(module.named_parameters(remove_duplicate=False))
    tensors += list(module.named_buffers(remove_duplicate=False))
    for _, t in tensors:
        if id(t) in memo:
            continue
        meta = torch.empty_like(t, device="meta")
        if isinstance(t, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=t.requires_grad)
        memo[id(t)] = meta
    return copy.deepcopy(module, memo)


def _slots(skeleton: nn.Module, names: list[str]) -> list[tuple[str, dict, str]] | None:
    """``(name, the owning module's _parameters or _buffers, key)`` for each dotted name, or
    ``None`` if one is not a registered parameter or buffer of ``skeleton`` (or it is scripted):
    then :meth:`FunctionalModel._forward` leaves the placing to ``functional_call``."""
    if isinstance(skeleton, torch.jit.ScriptModule):
        return None
    found: list[tuple[str, dict, str]] = []
    for name in names:
        prefix, _, key = name.rpartition(".")
        try:
            module = skeleton.get_submodule(prefix)
        except AttributeError:
            return None
        if key in module._parameters:
            found.append((name, module._parameters, key))
        elif key in module._buffers:
            found.append((name, module._buffers, key))
        else:
            return None
    return found


def _aliases(named) -> dict[str, str]:
    """Maps every secondary name of a shared tensor to its first (canonical) name."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, t in named:
        if id(t) in first:
            alias[name] = first[id(t)]
        else:
            first[id(t)] = name
    return alias


class FunctionalModel:
    """A module as a pure function of ``(params, buffers, inputs)``; see :func:`functionalize`.

    Attributes:
        params: the trainable parameters (``requires_grad=True`` in the module), keyed by the
            module's own names. These are the module's own tensors, not copies: a meta-gradient
            computed from them lands in ``module.parameters()``' ``.grad``, where a ``torch.optim``
            outer optimizer finds it.
        frozen: parameters with ``requires_grad=False``. Every call uses them; they are not
            trained and get no gradient. Passing one in ``params`` overrides it for that call.
        buffers: all buffers (running statistics, non-persistent buffers included).
        trainable: ``{name: bool}`` for every parameter, trainable or frozen.
        tied: ``{alias: name}`` for weights shared between modules; only ``name`` is a key of
            ``params``, and the value passed there is used in both places.
        training: whether the model runs in training mode (see :meth:`train`).
    """

    def __init__(self, module: nn.Module) -> None:
        named_params = list(module.named_parameters(remove_duplicate=False))
        named_buffers = list(module.named_buffers(remove_duplicate=False))
        self.tied: dict[str, str] = _aliases(named_params + named_buffers)
        self.params: Params = {
            k: p for k, p in named_params if k not in self.tied and p.requires_grad
        }
        self.frozen: Params = {
            k: p for k, p in named_params if k not in self.tied and not p.requires_grad
        }
        self.buffers: Buffers = {k: b for k, b in named_buffers if k not in self.tied}
        self.trainable: dict[str, bool] = {
            k: p.requires_grad for k, p in named_params if k not in self.tied
        }
        self._param_keys = self.params.keys()  # a view: a fast match for params dicts
        self._shapes = {k: t.shape for k, t in [*self.params.items(), *self.frozen.items()]}
        self._shapes.update({k: b.shape for k, b in self.buffers.items()})
        self._skeleton = _meta_skeleton(module)
        self.training = module.training
        self._has_norms = any(isinstance(m, _NORMS) for m in self._skeleton.modules())
        # A tensor shared by two modules must be passed under both names. A module registered
        # under two names (``self.a = self.b = lin``) needs nothing: setting one name sets both.
        # Tying explicitly (and calling functional_call with tie_weights=False) also avoids
        # torch's restore bug for shared submodules, which left transform wrappers in the skeleton.
        self._alias_pairs = [
            (alias, name)
            for alias, name in self.tied.items()
            if _owner(self._skeleton, alias) != _owner(self._skeleton, name)
        ]
        self._slots = (self._skeleton, _slots(self._skeleton, self._slot_names()))

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params.values())
        return (
            f"FunctionalModel({type(self._skeleton).__name__}, params={len(self.params)} tensors "
            f"({n} values), frozen={len(self.frozen)}, buffers={len(self.buffers)}, "
            f"training={self.training})"
        )

    def _check_params(self, call: str, params: Any) -> None:
        if type(params) is dict and params.keys() == self._param_keys:  # the common case
            self._check_values(call, "params", params)
            return
        _checks.tensor_dict(
            call, "params", params, source="keyed by parameter name (as in fm.params)", kind=Mapping
        )
        _checks.keys_match(
            call,
            "params",
            params,
            self.params,
            optional=self.frozen,
            tied=self.tied,
            source="fm.params",
        )
        self._check_values(call, "params", params)

    def _check_values(self, call: str, what: str, tensors: Mapping[str, Any]) -> None:
        for k, v in tensors.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(
                    f"{call}: expected {what}[{k!r}] to be a torch.Tensor, got {type(v).__name__}."
                )
            if v.shape != self._shapes[k]:
                raise ValueError(
                    f"{call}: expected {what}[{k!r}] to have shape {tuple(self._shapes[k])}, got "
                    f"{tuple(v.shape)}. Under torch.func.vmap, give the per-task shape "
                    f"(in_dims maps the batch dimension away)."
                )

    def _check_buffers(self, call: str, buffers: Any) -> None:
        _checks.tensor_dict(
            call, "buffers", buffers, source="keyed by buffer name (as in fm.buffers)", kind=Mapping
        )
        _checks.keys_match(call, "buffers", buffers, self.buffers, source="fm.buffers")
        self._check_values(call, "buffers", buffers)

    def _check_inputs(self, call: str, params: Mapping[str, Any], inputs: list[Any]) -> None:
        """Input tensors on another device than the params, or of another floating dtype (a
        float64 numpy batch into a float32 model), fail deep in torch with a message that names
        neither; say so here. Autocast regions mix dtypes on purpose and are not checked."""
        ref = next((p for p in params.values() if p.is_floating_point()), None)
        if ref is None:
            return
        for x in inputs:
            if not isinstance(x, torch.Tensor):
                continue
            if x.device == ref.device and (x.dtype == ref.dtype or not x.is_floating_point()):
                continue  # the common case, decided without the params' other dtypes
            dtypes = {p.dtype for p in params.values() if p.is_floating_point()}
            if x.device != ref.device and x.dim() > 0:
                raise ValueError(
                    f"{call}: an input is on {x.device} but the params are on {ref.device}; move "
                    f"the data (x.to({str(ref.device)!r})) or the model."
                )
            if (
                x.is_floating_point()
                and x.dtype not in dtypes
                and not torch.is_autocast_enabled(x.device.type)
            ):
                raise TypeError(
                    f"{call}: an input is {x.dtype} but the params are {ref.dtype}; convert the "
                    f"data (x.to({ref.dtype})) or the model (model.to({x.dtype}) before "
                    "functionalize)."
                )

    def apply(
        self, params: Params, buffers: Buffers, /, *args: Any, **kwargs: Any
    ) -> tuple[Any, Buffers]:
        """Runs the model and returns ``(output, new_buffers)``; nothing passed in is modified.

        Buffers that the forward pass updates (BatchNorm running statistics in training mode) are
        returned as new tensors; the tensors in ``buffers`` keep their values and versions. A
        forward pass that writes in place into what the caller passed (``x.mul_(2)`` on an input,
        a parameter clamped in ``forward``) raises ``ValueError`` naming the tensor and the
        submodule; see :meth:`__call__`.

        Example:
            >>> import torch, metafunc
            >>> fm = metafunc.functionalize(torch.nn.BatchNorm1d(2))
            >>> out, new = fm.apply(fm.params, fm.buffers, torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
            >>> new["running_mean"], fm.buffers["running_mean"]
            (tensor([0.1000, 0.2000]), tensor([0., 0.]))
        """
        call = "FunctionalModel.apply(params, buffers, ...)"
        self._check_params(call, params)
        self._check_buffers(call, buffers)
        return self._apply(call, params, buffers, args, kwargs)

    def _apply(
        self, call: str, params: Params, buffers: Buffers, args: tuple, kwargs: dict
    ) -> tuple[Any, Buffers]:
        inputs = _purity.inputs(args, kwargs)
        self._check_inputs(call, params, inputs)
        new_buffers = {k: b.clone() for k, b in buffers.items()}
        watched = _purity.bases(self._watched(params, buffers, inputs))
        before = _purity.versions(watched) if watched else []
        with _norms.buffer_updates() as updates:
            out = self._call({**self.frozen, **params, **new_buffers}, args, kwargs)
        if watched and _purity.versions(watched) != before:
            self._raise_written(call, params, buffers, args, kwargs, before)
        if updates:  # running statistics computed by the exact norms (see _norms.py)
            new_buffers = {k: updates.get(id(b), b) for k, b in new_buffers.items()}
        return out, new_buffers

    def _call(self, tensors: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        for alias, name in self._alias_pairs:
            tensors[alias] = tensors[name]
        if self._has_norms and _norms.under_vmap():
            with _norms.exact_norms():
                return self._forward(tensors, args, kwargs)
        return self._forward(tensors, args, kwargs)

    def _slot_names(self) -> list[str]:
        return [*self._shapes, *(alias for alias, _ in self._alias_pairs)]

    def _forward(self, tensors: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        """The skeleton's forward pass with ``tensors`` in place of its meta params and buffers.

        What ``functional_call(skeleton, tensors, args, kwargs, tie_weights=False)`` does (the
        same assignments into the owning modules' ``_parameters``/``_buffers``, undone after the
        call), with the owners found once per skeleton instead of on every call: torch's generic
        path (a member accessor, name splitting, per-tensor checks, a context manager) cost
        ~60-120 us a call on a 3-layer MLP, more than the layers, and an inner step calls the
        model at least once. Under ``torch.compile`` (which traces ``functional_call``) and for
        a skeleton whose tensors could not all be placed, ``functional_call`` itself. Like it, not
        for two threads at once on one FunctionalModel (both swap tensors into the skeleton).
        """
        owner, slots = self._slots
        if owner is not self._skeleton:  # a copy with its own skeleton (train(), eval(), probes)
            self._slots = (self._skeleton, _slots(self._skeleton, self._slot_names()))
            owner, slots = self._slots
        if slots is None or torch.compiler.is_compiling():
            return functional_call(self._skeleton, tensors, args, kwargs, tie_weights=False)
        saved = []
        try:
            for name, container, key in slots:
                tensor = tensors.get(name)
                if tensor is not None:
                    saved.append((container, key, container[key]))
                    container[key] = tensor
            return self._skeleton(*args, **kwargs)
        finally:
            for container, key, original in reversed(saved):
                container[key] = original

    def __call__(self, params: Params, /, *args: Any, **kwargs: Any) -> Any:
        """Runs the model with ``params`` and the stored buffers; returns the output only.

        Buffer updates made by the forward pass (BatchNorm statistics) are discarded; use
        :meth:`apply` to keep them.

        **Purity.** A FunctionalModel is a pure function: a forward pass that writes in place
        into a tensor the caller passed (an input, one level into tuples and lists; a param;
        a frozen param; a buffer given to :meth:`apply`) raises ``ValueError`` naming the tensor
        and the submodule that wrote it. The check compares version counters before and after
        the call (free; under ``torch.func`` transforms too); it detects the write, it does not
        undo it. In-place ops on intermediates (``nn.ReLU(inplace=True)`` after a layer) are
        fine. Not checked: writes through ``.data``, inference tensors (no version counter), and
        calls traced by ``torch.compile`` (dynamo writes such mutations back to the inputs; run
        the model eagerly once to catch them).
        """
        call = "FunctionalModel(params, ...)"
        self._check_params(call, params)
        if self.buffers:
            return self._apply(call, params, self.buffers, args, kwargs)[0]
        inputs = _purity.inputs(args, kwargs)
        self._check_inputs(call, params, inputs)
        watched = _purity.bases(self._watched(params, {}, inputs))
        before = _purity.versions(watched) if watched else []
        out = self._call({**self.frozen, **params}, args, kwargs)
        if watched and _purity.versions(watched) != before:
            self._raise_written(call, params, {}, args, kwargs, before)
        return out

    def _watched(
        self, params: Mapping[str, torch.Tensor], buffers: Buffers, inputs: list[Any]
    ) -> list[torch.Tensor]:
        """The caller's tensors that the forward pass must not write into, in
        :meth:`_raise_written`'s order; none while dynamo traces (no check, see __call__)."""
        if torch.compiler.is_compiling():
            return []
        tensors = [*params.values(), *self.frozen.values(), *buffers.values()]
        return tensors + [x for x in inputs if isinstance(x, torch.Tensor)]

    def _raise_written(
        self,
        call: str,
        params: Mapping[str, torch.Tensor],
        buffers: Buffers,
        args: tuple,
        kwargs: dict,
        before: list[int],
    ) -> None:
        inputs = _purity.inputs(args, kwargs)
        names = [f"params[{k!r}]" for k in params] + [f"fm.frozen[{k!r}]" for k in self.frozen]
        names += [f"buffers[{k!r}]" for k in buffers]
        names += [
            n
            for n, x in zip(_purity.input_names(args, kwargs), inputs)
            if isinstance(x, torch.Tensor)
        ]
        after = _purity.versions(self._watched(params, buffers, inputs))
        written = [n for n, v, w in zip(names, before, after) if v != w]
        probe = copy.copy(self)  # its own skeleton, so that the hooks see no other call
        probe._skeleton = copy.deepcopy(self._skeleton)
        tensors = {**self.frozen, **params, **buffers}
        writer = _purity.find_writer(probe._skeleton, probe._call, tensors, args, kwargs)
        by = f" ({writer} wrote it)" if writer else ""
        raise ValueError(
            f"{call}: the forward pass wrote in place into {' and '.join(written)}{by}; the "
            f"caller's tensor now holds the new values. A FunctionalModel is a pure function: "
            f"it must not modify its inputs, params or buffers. Write out of place "
            f"(x = x * 2, not x.mul_(2)), copy first (x = x.clone()), or use inplace=False on a "
            f"layer that receives an input directly."
        )

    def train(self, mode: bool = True) -> FunctionalModel:
        """A new FunctionalModel (sharing params and buffers) whose every submodule is in
        training mode ``mode``; this one is unchanged."""
        _checks.boolean("FunctionalModel.train(mode)", None, mode)
        new = copy.copy(self)
        new._skeleton = copy.deepcopy(self._skeleton).train(mode)
        new.training = mode
        return new

    def eval(self) -> FunctionalModel:
        """``self.train(False)``."""
        return self.train(False)

    def _all_tensors(self, params: Params | None, buffers: Buffers | None, call: str):
        params = self.params if params is None else params
        buffers = self.buffers if buffers is None else buffers
        self._check_params(call, params)
        self._check_buffers(call, buffers)
        return {**self.frozen, **params}, buffers

    def to_module(self, params: Params | None = None, buffers: Buffers | None = None) -> nn.Module:
        """A new ``nn.Module`` holding detached copies of ``params`` (default ``self.params``),
        the frozen params and ``buffers`` (default ``self.buffers``).

        The round trip is exact: tied weights are one Parameter again, frozen params keep
        ``requires_grad=False``, non-persistent buffers stay non-persistent, and values, dtypes and
        devices are those of the tensors given.
        """
        all_params, buffers = self._all_tensors(params, buffers, "FunctionalModel.to_module")
        module = copy.deepcopy(self._skeleton)
        made: dict[str, Any] = {}
        for name, value in all_params.items():
            made[name] = nn.Parameter(value.detach().clone(), requires_grad=self.trainable[name])
            owner, leaf = _owner(module, name)
            owner._parameters[leaf] = made[name]
        for name, value in buffers.items():
            made[name] = value.detach().clone()
            owner, leaf = _owner(module, name)
            owner._buffers[leaf] = made[name]
        for alias, name in self.tied.items():
            owner, leaf = _owner(module, alias)
            if leaf in owner._parameters:
                owner._parameters[leaf] = made[name]
            else:
                owner._buffers[leaf] = made[name]
        return module

    def load_into(
        self, module: nn.Module, params: Params | None = None, buffers: Buffers | None = None
    ) -> None:
        """Copies ``params``/``buffers`` (default: this model's) into ``module``'s own tensors, in
        place and without recording gradients. ``module`` must have this model's names and shapes.
        """
        call = "FunctionalModel.load_into(module, ...)"
        if not isinstance(module, nn.Module):
            raise TypeError(f"{call}: expected an nn.Module, got {type(module).__name__}.")
        all_params, buffers = self._all_tensors(params, buffers, call)
        module = _unwrap(module)
        own: dict[str, torch.Tensor] = dict(module.named_parameters())
        own.update(dict(module.named_buffers()))
        names = set(all_params) | set(buffers)
        if set(own) != names:
            raise ValueError(
                f"{call}: the module's parameter and buffer names differ from this model's: "
                f"missing {sorted(names - set(own))}, unknown {sorted(set(own) - names)}. Load "
                f"into a module of the same architecture."
            )
        pairs = [*all_params.items(), *buffers.items()]
        for name, value in pairs:  # check everything before writing anything
            if own[name].shape != value.shape:
                raise ValueError(
                    f"{call}: {name!r} has shape {tuple(own[name].shape)} in the module and "
                    f"{tuple(value.shape)} here. Nothing was loaded."
                )
        with torch.no_grad():
            for name, value in pairs:
                own[name].copy_(value)


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm)


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def functionalize(module: nn.Module) -> FunctionalModel:
    """Converts ``module`` once into a pure :class:`FunctionalModel`.

    The returned model's ``params`` are the module's own trainable parameters (no copy), so the
    meta-gradient of an outer loss reaches ``module.parameters()``. The module itself is not
    modified, and the FunctionalModel keeps only a data-free skeleton of it (on the meta device).
    ``DataParallel``, ``DistributedDataParallel`` and ``torch.compile`` wrappers are unwrapped.

    Example:
        >>> import torch, metafunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> fm = metafunc.functionalize(net)
        >>> sorted(fm.params)
        ['0.bias', '0.weight', '2.bias', '2.weight']
        >>> x = torch.randn(5, 3)
        >>> torch.equal(fm(fm.params, x), net(x))
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"functionalize(module): expected a torch.nn.Module, got {type(module).__name__}. "
            f"Pass the model instance, e.g. functionalize(MyNet())."
        )
    module = _unwrap(module)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if nn.parameter.is_lazy(t):
            raise ValueError(
                f"functionalize(module): {name!r} is an uninitialized lazy tensor. Run one "
                f"forward pass of the module on example inputs first, then functionalize it."
            )
    return FunctionalModel(module)
