"""higher's differentiable optimizers, as wrappers of :mod:`metafunc.optim`.

A ``DifferentiableOptimizer`` reads a ``torch.optim`` optimizer's parameter groups (their
hyperparameters) and steps a list of fast weights with
the matching pure :mod:`metafunc.optim` optimizer, which follows ``torch.optim`` to float64
round-off. Where higher 0.2.1 departs from ``torch.optim`` (its Adam drifts, 4e-2 after 5 steps
at ``eps=1e-3``; its RMSprop warns that its gradients may be wrong), this layer follows
``torch.optim``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from ... import optim as mo
from ...optim._base import apply_updates
from .patch import FunctionalModule

__all__ = [
    "DifferentiableASGD",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableNAdam",
    "DifferentiableOptimizer",
    "DifferentiableRAdam",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableSGD",
    "get_diff_optim",
    "register_optim",
]

# group keys of torch.optim that metafunc has no use for (implementation switches)
_IGNORED = {"params", "foreach", "fused", "capturable", "differentiable", "initial_lr", "name"}


class DifferentiableOptimizer:
    """Steps fast weights differentiably with the hyperparameters of a ``torch.optim`` optimizer.

    Args (as higher's):
        other: the ``torch.optim`` optimizer whose parameter groups give the hyperparameters.
        reference_params: the parameters ``other`` was built on, in the order of the fast weights
            (``module.parameters()``).
        fmodel: the ``monkeypatch``'d model whose fast weights :meth:`step` updates.
        device: unused (the fast weights carry their device); accepted for higher's signature.
        override: ``{hyperparameter: value}`` replacing the groups' values: a number or tensor
            for every group, or (as higher requires) a list with one value for all groups or one
            per group. Tensors that require grad are
            learnable: the meta-gradient flows into them.
        grad_callback: ``f(list of grads) -> list of grads`` applied before every step.
        track_higher_grads: differentiate through the steps (``False``: every step's new
            weights are detached, as in higher, so no meta-gradient crosses a step).
    """

    metafunc_optimizer: Callable[..., mo.GradientTransformation] = staticmethod(mo.sgd)
    # group settings the metafunc optimizer implies (torch's AdamW sets decoupled_weight_decay)
    implied: ClassVar[dict[str, Any]] = {}

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
        _check_optimizer(f"{name}(other, ...)", other)
        self.reference = list(reference_params)
        self.fmodel, self.grad_callback = fmodel, grad_callback
        self.track_higher_grads = bool(track_higher_grads)
        group_of = {id(p): i for i, g in enumerate(other.param_groups) for p in g["params"]}
        self.group = [group_of.get(id(p)) for p in self.reference]
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
        # a step count above 0, or (SGD's momentum buffer) state without one
        if any(float(st["step"]) > 0 if "step" in st else st for st in other.state.values()):
            raise ValueError(
                f"{name}: the torch.optim optimizer already has state (it has taken steps); "
                "the differentiable version starts from a fresh state. Build the inner-loop "
                "optimizer anew for each task, as in higher's examples."
            )
        self._override = self._check_override(name, override)
        self._other = other
        # one metafunc optimizer state per parameter (index), made at its first step, as
        # torch.optim's per-parameter state: a parameter without a gradient keeps its step count
        self.state: dict[int, Any] = {}

    # hyperparameters -------------------------------------------------------------------------
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
            if isinstance(value, (list, tuple)) and key not in ("betas", "etas", "step_sizes"):
                if len(value) not in (1, len(self.param_groups)):
                    raise ValueError(
                        f"{call}: override[{key!r}] has {len(value)} values for "
                        f"{len(self.param_groups)} parameter group(s); give one for all groups "
                        "or one per group."
                    )
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
                        names = self.fmodel.names if self.fmodel is not None else []
                        param = (
                            f"parameter {names[i]!r}"
                            if len(names) == len(self.reference)
                            else f"parameter {i}"
                        )
                        raise ValueError(
                            f"{call}: override[{key!r}] has a tensor of shape {tuple(t.shape)}, "
                            f"which does not broadcast to {param} of parameter group {gi} "
                            f"(shape {tuple(p.shape)}); a hyperparameter tensor applies to every "
                            "parameter of its group, so it must broadcast to each shape unchanged. "
                            f"Give a 0-dim tensor, e.g. override={{{key!r}: torch.tensor(0.1, "
                            "requires_grad=True)}, or a list with one per parameter group."
                        )

    def _group_value(self, key: str, gi: int, override: dict[str, Any]) -> Any:
        if key in override:
            value = override[key]
            per_group = isinstance(value, (list, tuple)) and (
                key not in ("betas", "etas", "step_sizes") or isinstance(value[0], (list, tuple))
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
            if self.fmodel is None:
                raise ValueError(
                    f"{call}: no params given and no fmodel to take them from; pass params= or "
                    "build the optimizer with fmodel=."
                )
            params = self.fmodel.fast_params
        params = list(params)
        if len(params) != len(self.reference):
            raise ValueError(
                f"{call}: expected {len(self.reference)} params (one per reference parameter), "
                f"got {len(params)}."
            )
        _check_loss(call, loss)
        merged = {**self._override, **self._check_override(call, override)}
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
        self._override = merged
        grads: list[torch.Tensor | None] = [None] * len(params)
        for i, g in zip(active, raw):
            grads[i] = g
        callback = grad_callback or self.grad_callback
        if callback is not None:
            grads = list(callback(grads))
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
            result[i] = apply_updates({"p": param}, updates)["p"]
        if not self.track_higher_grads:
            result = [r.detach().requires_grad_(p.requires_grad) for r, p in zip(result, params)]
        if self.fmodel is not None:
            self.fmodel.update_params(result)
        return result


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


def _make(
    name: str,
    fn: Callable[..., mo.GradientTransformation],
    doc: str,
    implied: dict[str, Any] | None = None,
):
    attrs = {"metafunc_optimizer": staticmethod(fn), "implied": implied or {}}
    cls = type(name, (DifferentiableOptimizer,), attrs)
    cls.__doc__ = (
        f"{doc}, differentiable (higher's ``{name}``), via ``metafunc.optim.{fn.__name__}``."
    )
    return cls


DifferentiableSGD = _make("DifferentiableSGD", mo.sgd, "torch.optim.SGD")
DifferentiableAdam = _make("DifferentiableAdam", mo.adam, "torch.optim.Adam")
DifferentiableAdamW = _make(
    "DifferentiableAdamW", mo.adamw, "torch.optim.AdamW", {"decoupled_weight_decay": True}
)
DifferentiableAdamax = _make("DifferentiableAdamax", mo.adamax, "torch.optim.Adamax")
DifferentiableNAdam = _make("DifferentiableNAdam", mo.nadam, "torch.optim.NAdam")
DifferentiableRAdam = _make("DifferentiableRAdam", mo.radam, "torch.optim.RAdam")
DifferentiableRMSprop = _make("DifferentiableRMSprop", mo.rmsprop, "torch.optim.RMSprop")
DifferentiableAdagrad = _make("DifferentiableAdagrad", mo.adagrad, "torch.optim.Adagrad")
DifferentiableAdadelta = _make("DifferentiableAdadelta", mo.adadelta, "torch.optim.Adadelta")
DifferentiableRprop = _make("DifferentiableRprop", mo.rprop, "torch.optim.Rprop")
DifferentiableASGD = _make("DifferentiableASGD", mo.asgd, "torch.optim.ASGD")

_REGISTRY: dict[type, type] = {
    torch.optim.SGD: DifferentiableSGD,
    torch.optim.Adam: DifferentiableAdam,
    torch.optim.AdamW: DifferentiableAdamW,
    torch.optim.Adamax: DifferentiableAdamax,
    torch.optim.NAdam: DifferentiableNAdam,
    torch.optim.RAdam: DifferentiableRAdam,
    torch.optim.RMSprop: DifferentiableRMSprop,
    torch.optim.Adagrad: DifferentiableAdagrad,
    torch.optim.Adadelta: DifferentiableAdadelta,
    torch.optim.Rprop: DifferentiableRprop,
    torch.optim.ASGD: DifferentiableASGD,
}


def register_optim(optim_type: type, diff_optim_type: type) -> None:
    """Registers the differentiable class used by :func:`get_diff_optim` for ``optim_type``."""
    if not (isinstance(optim_type, type) and issubclass(optim_type, torch.optim.Optimizer)):
        raise TypeError(
            f"register_optim: expected a torch.optim.Optimizer subclass, got {optim_type!r}."
        )
    if not (
        isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)
    ):
        raise TypeError(
            f"register_optim: expected a DifferentiableOptimizer subclass, got {diff_optim_type!r}."
        )
    _REGISTRY[optim_type] = diff_optim_type


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[torch.Tensor],
    fmodel: FunctionalModule | None = None,
    device: Any = None,
    override: dict[str, Any] | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """The differentiable version of ``opt`` (higher's ``get_diff_optim``)."""
    _check_optimizer("get_diff_optim(opt, ...)", opt)
    cls = _REGISTRY.get(type(opt))
    if cls is None:
        known = sorted(t.__name__ for t in _REGISTRY)
        raise ValueError(
            f"get_diff_optim: no differentiable version of {type(opt).__name__} is registered "
            f"(known: {known}); register one with register_optim(optim_type, diff_optim_type)."
        )
    return cls(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )
