"""``DifferentiableOptimizer``: higher's differentiable optimizer, on a :mod:`metafunc.optim` one.

The class reads a ``torch.optim`` optimizer's parameter groups and state and steps a list of fast
weights; :mod:`.optim` makes one subclass per ``torch.optim`` optimizer and keeps the registry.
"""

from __future__ import annotations

import collections
import copy
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from ... import optim as mo
from . import _state, utils
from .patch import FunctionalModule

# group keys of torch.optim that metafunc has no use for (implementation switches)
_IGNORED = {"params", "foreach", "fused", "capturable", "differentiable", "initial_lr", "name"}
_PAIRS = ("betas", "etas", "step_sizes")  # hyperparameters that are pairs in one group


class DifferentiableOptimizer:
    """Steps fast weights differentiably with the hyperparameters of a ``torch.optim`` optimizer.

    It starts from a copy of ``other``'s state (see :mod:`metafunc.compat.higher.optim`): a
    ``torch.optim`` optimizer that has already stepped is continued, not restarted.

    Args (as higher's):
        other: the ``torch.optim`` optimizer whose parameter groups give the hyperparameters and
            whose state is the starting state.
        reference_params: the parameters ``other`` was built on, in the order of the fast weights
            (``module.parameters()``).
        fmodel: the ``monkeypatch``'d model whose fast weights :meth:`step` updates.
        device: where the copied state goes (default: where each reference parameter is).
        override: ``{hyperparameter: value}`` replacing the groups' values: a number or tensor
            for every group, or (as higher requires) a list with one value for all groups or one
            per group. Tensors that require grad are
            learnable: the meta-gradient flows into them.
        grad_callback: ``f(list of grads) -> list of grads`` applied before every step.
        track_higher_grads: differentiate through the steps (``False``: every step's new
            weights are detached, as in higher, so no meta-gradient crosses a step).

    Subclasses set ``metafunc_optimizer`` (a :mod:`metafunc.optim` factory taking the groups'
    hyperparameters). A subclass written for higher, which implements ``_update(grouped_grads)``
    instead, runs with higher's protocol: ``param_groups`` then hold the fast weights under
    ``"params"`` during ``_update``, and ``state[group][index]`` is a dict, copied from ``other``.
    """

    metafunc_optimizer: Callable[..., mo.GradientTransformation] = staticmethod(mo.sgd)
    # group settings the metafunc optimizer implies (torch's AdamW sets decoupled_weight_decay)
    implied: ClassVar[dict[str, Any]] = {}
    # checks a copied torch.optim state before the parameter's first step (ASGD's eta and mu)
    check_copied: ClassVar[Callable[..., None] | None] = None

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[torch.Tensor],
        fmodel: FunctionalModule | None = None,
        device: Any = None,
        override: dict[str, Any] | None = None,
        grad_callback: Callable[[list], list] | None = None,
        track_higher_grads: bool = True,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        call = f"{name}(other, ...)"
        _check_optimizer(call, other)
        self.reference = list(reference_params)
        self.fmodel, self.grad_callback = fmodel, grad_callback
        self.track_higher_grads = bool(track_higher_grads)
        group_of = {id(p): i for i, g in enumerate(other.param_groups) for p in g["params"]}
        self.group = [group_of.get(id(p)) for p in self.reference]
        self._higher_style = type(self)._update is not DifferentiableOptimizer._update
        if self._higher_style:
            self._init_higher_style(call, other, device, override)
            return
        self.param_groups = [
            {k: v for k, v in g.items() if k != "params"} for g in other.param_groups
        ]
        self._accepted = set(inspect.signature(self.metafunc_optimizer).parameters)
        for i, g in enumerate(self.param_groups):
            unknown = set(g) - self._accepted - _IGNORED
            unsupported = [
                k
                for k in unknown
                if g[k] not in (None, False) and not (k in self.implied and g[k] == self.implied[k])
            ]
            if unsupported:
                raise ValueError(
                    f"{name}: parameter group {i} sets {sorted(unsupported)}, which "
                    f"metafunc.optim.{self.metafunc_optimizer.__name__} does not support."
                )
        self._override = self._check_override(name, override)
        self._other = other
        # one metafunc optimizer state per parameter (index), as torch.optim's per-parameter
        # state: copied from other's where it has one, else made at the parameter's first step
        self.state: dict[int, Any] = {}
        self._copied: dict[int, dict[str, Any]] = {}  # for check_copied, until the first step
        for i, p in enumerate(self.reference):
            gi = self.group[i]
            if gi is None or not other.state.get(p):
                continue
            like = p.detach() if device is None else p.detach().to(device)
            fresh = self._build(gi, self._override).init({"p": like})
            where = self._where(i)
            optimizer = self.metafunc_optimizer.__name__
            self.state[i] = _state.from_torch(call, where, fresh, other.state[p], optimizer)
            if self.check_copied is not None:
                self._copied[i] = utils._recursive_copy_and_cast(dict(other.state[p]), "cpu")
        self._check_copied(call, self._override)

    # hyperparameters -------------------------------------------------------------------------
    def _where(self, i: int) -> str:
        """Parameter ``i``, named for errors (its module name where the fmodel gives it)."""
        names = self.fmodel.names if self.fmodel is not None else []
        return f"parameter {names[i]!r}" if len(names) == len(self.reference) else f"parameter {i}"

    def _check_override(self, call: str, override: dict[str, Any] | None) -> dict[str, Any]:
        if override is None:
            return {}
        if not isinstance(override, dict):
            raise TypeError(f"{call}: expected override to be a dict, got {override!r}.")
        for key, value in override.items():
            if key not in self._accepted:
                raise ValueError(
                    f"{call}: override names {key!r}, not a hyperparameter of "
                    f"{self.metafunc_optimizer.__name__} ({sorted(self._accepted)})."
                )
            if isinstance(value, (list, tuple)) and key not in _PAIRS:
                _check_per_group(call, key, value, len(self.param_groups))
            self._check_override_shapes(call, key, value)
        return dict(override)

    def _check_override_shapes(self, call: str, key: str, value: Any) -> None:
        """Every tensor in ``override[key]`` broadcasts to each parameter of its group, unchanged.

        Checked here, where the override is set, rather than deep in the step's update."""
        for gi in range(len(self.param_groups)):
            resolved = self._group_value(key, gi, {key: value})
            parts = resolved if isinstance(resolved, (list, tuple)) else [resolved]
            for t in parts:
                if not isinstance(t, torch.Tensor):
                    continue
                for i, (p, g) in enumerate(zip(self.reference, self.group)):
                    if g != gi:
                        continue
                    try:
                        fits = torch.broadcast_shapes(t.shape, p.shape) == p.shape
                    except RuntimeError:
                        fits = False
                    if not fits:
                        raise ValueError(
                            f"{call}: override[{key!r}] has a tensor of shape {tuple(t.shape)}, "
                            f"which does not broadcast to {self._where(i)} of parameter group "
                            f"{gi} (shape {tuple(p.shape)}); a hyperparameter tensor applies to "
                            "every parameter of its group, so it must broadcast to each shape "
                            f"unchanged. Give a 0-dim tensor, e.g. override={{{key!r}: "
                            "torch.tensor(0.1, requires_grad=True)}, or a list with one per "
                            "parameter group."
                        )

    def _group_value(self, key: str, gi: int, override: dict[str, Any]) -> Any:
        if key in override:
            value = override[key]
            per_group = isinstance(value, (list, tuple)) and (
                key not in _PAIRS or isinstance(value[0], (list, tuple))
            )
            if not per_group:
                return value
            return value[0] if len(value) == 1 else value[gi]
        return self.param_groups[gi][key]

    def _build(self, gi: int, override: dict[str, Any]) -> mo.GradientTransformation:
        """The metafunc optimizer with parameter group ``gi``'s hyperparameters."""
        keys = (set(self.param_groups[gi]) | set(override)) & self._accepted
        return self.metafunc_optimizer(
            **{key: self._group_value(key, gi, override) for key in sorted(keys)}
        )

    def _check_copied(self, call: str, override: dict[str, Any]) -> None:
        """``check_copied`` on every copied state not yet stepped, with ``override`` in effect."""
        check = type(self).check_copied
        if check is None:
            return
        for i, torch_state in self._copied.items():
            gi = self.group[i]
            if gi is None:  # never: only a parameter of a group gets a copied state
                continue
            value = functools.partial(self._group_value, gi=gi, override=override)
            check(call, self._where(i), torch_state, value)

    # stepping -------------------------------------------------------------------------------
    def step(
        self,
        loss: torch.Tensor,
        params: Iterable[torch.Tensor] | None = None,
        override: dict[str, Any] | None = None,
        grad_callback: Callable[[list], list] | None = None,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        """One differentiable step on ``loss``; returns (and gives ``fmodel``) the new weights.

        ``override`` here takes precedence over the one given at construction and, as in
        higher, stays in effect for the later steps. Parameters without a gradient (unused by
        ``loss``, or outside every parameter group) are left unchanged, with their optimizer
        state, as ``torch.optim`` leaves them; but a loss that reaches *no* fast weight (computed
        with ``model(x)`` instead of ``fmodel(x)``) is an error, where higher steps nothing.
        """
        call = f"{type(self).__name__}.step(loss, ...)"
        if params is None:
            if self.fmodel is None or self.fmodel.fast_params is None:
                raise ValueError(
                    f"{call}: no params given and no fmodel with fast weights to take them from; "
                    "pass params= or build the optimizer with fmodel=."
                )
            params = self.fmodel.fast_params
        params = list(params)
        if len(params) != len(self.reference):
            raise ValueError(
                f"{call}: expected {len(self.reference)} params (one per reference parameter), "
                f"got {len(params)}."
            )
        _check_loss(call, loss)
        if self._higher_style:
            merged = self._check_override_higher_style(call, override)
        else:
            merged = {**self._override, **self._check_override(call, override)}
            self._check_copied(call, merged)
        active = [i for i, p in enumerate(params) if self.group[i] is not None and p.requires_grad]
        raw: tuple[torch.Tensor | None, ...] = ()
        if active:  # none: no fast weight is trainable, and (as torch.optim) nothing steps
            raw = torch.autograd.grad(
                loss,
                [params[i] for i in active],
                create_graph=self.track_higher_grads,
                allow_unused=True,
            )
        # Some parameters may legitimately get no gradient (an unused head), but none at all
        # means the loss does not depend on the fast weights: usually it was computed with the
        # original module, model(x), instead of fmodel(x). higher 0.2.1 then silently steps
        # nothing (every gradient is None, so every parameter is skipped); we raise instead.
        if active and all(g is None for g in raw):
            raise ValueError(
                f"{call}: no fast weight received a gradient from the loss; compute the loss "
                "with the patched model (fmodel(x)), not the original module (model(x)), and "
                "with the current fast weights (those given as params=, if any)."
            )
        grads: list[torch.Tensor | None] = [None] * len(params)
        for i, g in zip(active, raw):
            grads[i] = g
        callback = grad_callback or self.grad_callback
        if callback is not None:
            grads = list(callback(grads))
        if self._higher_style:
            self._apply_override_higher_style(merged)
            result = self._step_higher_style(params, grads, **kwargs)
        else:
            self._override = merged
            result = self._step_metafunc(params, grads)
        if not self.track_higher_grads:
            result = [r.detach().requires_grad_(p.requires_grad) for r, p in zip(result, params)]
        if self.fmodel is not None:
            self.fmodel.update_params(result)
        return result

    def _step_metafunc(self, params: list[torch.Tensor], grads: list) -> list[torch.Tensor]:
        opts: dict[int, mo.GradientTransformation] = {}
        result = list(params)
        for i, (param, grad) in enumerate(zip(params, grads)):
            gi = self.group[i]
            if gi is None or grad is None:  # torch.optim skips them: weights and state stay
                continue
            if gi not in opts:
                opts[gi] = self._build(gi, self._override)
            if i not in self.state:
                self.state[i] = opts[gi].init({"p": param})
            updates, self.state[i] = opts[gi].update({"p": grad}, self.state[i], {"p": param})
            result[i] = mo.apply_updates({"p": param}, updates)["p"]
            self._copied.pop(i, None)
        return result

    # higher's own protocol, for subclasses written for higher --------------------------------
    def _update(self, grouped_grads: list[list[torch.Tensor | None]], **kwargs: Any) -> None:
        """higher's extension point: replace ``param_groups[g]["params"][j]`` by the new weight
        given ``grouped_grads[g][j]``. The built-in classes use ``metafunc_optimizer`` instead."""
        raise NotImplementedError

    def _init_higher_style(
        self, call: str, other: torch.optim.Optimizer, device: Any, override: Any
    ) -> None:
        position = {id(p): i for i, p in enumerate(self.reference)}
        self.param_groups = []
        self._group_to_param_list: list[list[int]] = []
        self.state = [collections.defaultdict(dict) for _ in other.param_groups]  # type: ignore[assignment]
        for gi, group in enumerate(other.param_groups):
            members = []
            for j, p in enumerate(group["params"]):
                if id(p) not in position:
                    raise ValueError(
                        f"{call}: parameter {j} of parameter group {gi} of the torch.optim "
                        "optimizer is not among reference_params; pass the parameters the "
                        "optimizer was built on, e.g. model.parameters()."
                    )
                members.append(position[id(p)])
                if other.state.get(p):
                    self.state[gi][j] = {
                        k: utils._recursive_copy_and_cast(v, device)
                        for k, v in other.state[p].items()
                    }
            settings = copy.deepcopy({k: v for k, v in group.items() if k != "params"})
            self.param_groups.append({**settings, "params": [None] * len(members)})
            self._group_to_param_list.append(members)
        self._apply_override_higher_style(self._check_override_higher_style(call, override))

    def _check_override_higher_style(self, call: str, override: Any) -> dict[str, Any]:
        if override is None:
            return {}
        if not isinstance(override, dict):
            raise TypeError(f"{call}: expected override to be a dict, got {override!r}.")
        for key, value in override.items():
            if not isinstance(value, (list, tuple)):
                raise TypeError(
                    f"{call}: override[{key!r}] must be a list with one value for all groups or "
                    f"one per group (higher's form, for a DifferentiableOptimizer with its own "
                    f"_update), got {type(value).__name__}. Write [value]."
                )
            _check_per_group(call, key, value, len(self.param_groups))
        return dict(override)

    def _apply_override_higher_style(self, override: dict[str, Any]) -> None:
        for key, value in override.items():
            for gi, group in enumerate(self.param_groups):
                group[key] = value[0] if len(value) == 1 else value[gi]

    def _step_higher_style(
        self, params: list[torch.Tensor], grads: list, **kwargs: Any
    ) -> list[torch.Tensor]:
        grouped = [[grads[i] for i in members] for members in self._group_to_param_list]
        for group, members in zip(self.param_groups, self._group_to_param_list):
            group["params"] = [params[i] for i in members]
        self._update(grouped, **kwargs)
        result = list(params)
        for group, members in zip(self.param_groups, self._group_to_param_list):
            for new, i in zip(group["params"], members):
                result[i] = new
        return result


def _check_per_group(call: str, key: str, value: list | tuple, groups: int) -> None:
    if len(value) not in (1, groups):
        raise ValueError(
            f"{call}: override[{key!r}] has {len(value)} values for {groups} parameter "
            "group(s); give one for all groups or one per group."
        )


def _check_loss(call: str, loss: Any) -> None:
    """A scalar tensor with a graph (``step``'s loss), or a clear error."""
    want = "expected a scalar tensor loss with a graph to the fast weights"
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"{call}: {want}; got {type(loss).__name__} {loss!r}. Pass the loss tensor itself "
            "(e.g. loss = F.mse_loss(fmodel(x), y)), not loss.item() or a Python number."
        )
    if loss.numel() != 1:
        raise ValueError(
            f"{call}: {want}; got a tensor of shape {tuple(loss.shape)}. Reduce it first, "
            "e.g. loss.mean() or loss.sum() (or use reduction='mean' in the loss function)."
        )
    if not loss.requires_grad:
        raise ValueError(
            f"{call}: {want}; got a tensor that does not require grad (detached, or computed "
            "under torch.no_grad()). Compute it with fmodel(x), with grad enabled, and do not "
            ".detach() it."
        )


def _check_optimizer(call: str, opt: Any) -> None:
    """A ``torch.optim`` optimizer instance, or a clear TypeError."""
    if isinstance(opt, torch.optim.Optimizer):
        return
    example = "e.g. torch.optim.SGD(model.parameters(), lr=0.1)"
    if isinstance(opt, type) and issubclass(opt, torch.optim.Optimizer):
        public = getattr(torch.optim, opt.__name__, None) is opt
        cls = f"torch.optim.{opt.__name__}" if public else f"{opt.__module__}.{opt.__qualname__}"
        seen = f"the class {cls}; instantiate it: {cls}(model.parameters(), lr=...)"
    elif isinstance(opt, mo.GradientTransformation):
        seen = "a metafunc optimizer (use metafunc.inner_loop for those)"
    else:
        seen = f"a {type(opt).__name__}"
    raise TypeError(f"{call}: expected a torch.optim optimizer instance, {example}; got {seen}.")
