"""Hypothesis strategies for meta-learning code: pytrees, params, optimizers, tasks, inner loops.

Hypothesis draws the *structure* (which containers, how many leaves, shapes, dtypes, which
optimizer and flags, how many steps) and a seed; the tensors are built from a
``torch.Generator`` seeded with it. Shrinking then works on small integers and choices, so a
failing property is reported with a small, readable example: one leaf of shape ``(1,)``, seed 0,
``sgd`` with its first configuration.

Needs ``pip install metafunc[testing]`` (hypothesis).

Example:
    >>> import torch
    >>> from hypothesis import given, settings
    >>> from metafunc.testing import assert_pure, strategies as mst
    >>> @settings(max_examples=5, deadline=None)
    ... @given(params=mst.pytrees(containers=("dict",)), opt=mst.optimizers())
    ... def test_update_is_pure(params, opt):
    ...     grads = {k: torch.ones_like(v) for k, v in params.items()}
    ...     update = opt.build().update
    ...     assert_pure(update, grads, opt.build().init(params), params)
    >>> test_update_is_pure()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

try:
    from hypothesis import strategies as st
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "metafunc.testing.strategies needs hypothesis: pip install metafunc[testing] "
        "(or pip install 'hypothesis>=6.100'). The checks in metafunc.testing need only torch."
    ) from error

import optree
import torch
from torch import nn

import metafunc.optim as mo

from . import optimizers as registry

__all__ = [
    "DrawnOptimizer",
    "classification_tasks",
    "inner_loop_configs",
    "module_params",
    "optimizers",
    "pytrees",
    "shapes",
    "sinusoid_tasks",
    "tensors",
]

_FLOATS = (torch.float64, torch.float32)


def shapes(*, max_dims: int = 3, max_side: int = 4) -> st.SearchStrategy[tuple[int, ...]]:
    """Tensor shapes with up to ``max_dims`` dimensions of size 1 to ``max_side``; shrinks to
    ``(1,)``. (0-d shapes are drawn too, after ``(1,)``.)"""
    sides = st.lists(st.integers(1, max_side), min_size=1, max_size=max_dims).map(tuple)
    return st.one_of(sides, st.just(()))


@st.composite
def tensors(
    draw: st.DrawFn,
    shape: tuple[int, ...] | st.SearchStrategy[tuple[int, ...]] | None = None,
    dtypes: Sequence[torch.dtype] = _FLOATS,
    scale: float = 1.0,
) -> torch.Tensor:
    """A tensor of a drawn (or given) shape and dtype, normal entries times ``scale``, built
    from a drawn seed."""
    if shape is None:
        shape = shapes()
    if isinstance(shape, st.SearchStrategy):
        shape = draw(shape)
    dtype = draw(st.sampled_from(list(dtypes)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def pytrees(
    *,
    leaves: st.SearchStrategy[torch.Tensor] | None = None,
    max_leaves: int = 4,
    containers: Sequence[str] = ("dict", "list", "tuple", "nested"),
) -> st.SearchStrategy[Any]:
    """Pytrees of tensors: a dict ``{"p0": ..., "p1": ...}`` (params-like), a list, a tuple, or a
    dict of dicts and lists (``{"block": {"layers": [...]}, "head": ...}``), with 1 to
    ``max_leaves`` leaves drawn from ``leaves`` (default :func:`tensors`). Shrinks to a dict of
    one leaf of shape ``(1,)``."""
    leaf = tensors() if leaves is None else leaves
    many = st.lists(leaf, min_size=1, max_size=max_leaves)

    def build(kind: str, xs: list[torch.Tensor]) -> Any:
        if kind == "dict":
            return {f"p{i}": x for i, x in enumerate(xs)}
        if kind == "list":
            return list(xs)
        if kind == "tuple":
            return tuple(xs)
        return {"block": {"layers": xs[1:]}, "head": xs[0]}

    return st.tuples(st.sampled_from(list(containers)), many).map(lambda kx: build(*kx))


@st.composite
def module_params(
    draw: st.DrawFn, module: nn.Module, *, dtype: torch.dtype = torch.float64, scale: float = 0.5
) -> dict[str, torch.Tensor]:
    """New values for ``module``'s parameters: a dict with its ``named_parameters()`` names and
    shapes, normal entries times ``scale`` in ``dtype``, from a drawn seed (the module is not
    changed). Feed it to ``torch.func.functional_call`` or a :class:`metafunc.FunctionalModel`."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return {
        name: (scale * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(dtype)
        for name, p in module.named_parameters()
    }


@dataclasses.dataclass(frozen=True)
class DrawnOptimizer:
    """An optimizer drawn by :func:`optimizers`: a registry case and valid keyword arguments,
    some of which may be learnable tensors or per-parameter pytrees. Its ``repr`` is the call
    that builds it, so a failing example reads as code."""

    case: registry.OptimizerCase
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.case.name

    def build(self) -> mo.GradientTransformation:
        """``metafunc.optim.<name>(**kwargs)``."""
        return self.case.ours(**self.kwargs)

    def torch_optim_kwargs(self) -> dict[str, Any]:
        """The same hyperparameters as Python numbers, for the ``torch.optim`` oracle
        (``None`` where a per-parameter pytree has no single value)."""
        out: dict[str, Any] = {}
        for key, value in self.kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            elif isinstance(value, tuple):
                value = tuple(v.item() if isinstance(v, torch.Tensor) else v for v in value)
            elif isinstance(value, dict):
                value = None
            out[key] = value
        return out

    def __repr__(self) -> str:
        def show(v: Any) -> str:
            if isinstance(v, torch.Tensor):
                return f"torch.tensor({v.item():.6g})"
            if isinstance(v, dict):
                return "{" + ", ".join(f"{k!r}: {show(x)}" for k, x in v.items()) + "}"
            if isinstance(v, tuple):
                return "(" + ", ".join(show(x) for x in v) + ")"
            return repr(v)

        args = ", ".join(f"{k}={show(v)}" for k, v in self.kwargs.items())
        return f"mo.{self.case.name}({args})"


@st.composite
def optimizers(
    draw: st.DrawFn,
    names: Sequence[str] | None = None,
    *,
    kinds: Sequence[str] = ("number", "tensor", "pytree"),
    params: Any = None,
    dtype: torch.dtype = torch.float64,
) -> DrawnOptimizer:
    """A registered optimizer with drawn valid hyperparameters.

    Draws a case of :data:`metafunc.testing.optimizers.REGISTRY` (or of ``names``), one of its
    configurations (a valid combination of flags: ``nesterov``, ``amsgrad``, ...), and for each
    learnable hyperparameter whether to keep it, redraw it as a number, pass it as a learnable
    0-d ``tensor``, or (``lr`` only, when ``params`` is given) as a per-parameter ``pytree`` of
    0-d tensors with ``params``' structure. Values come from
    :data:`metafunc.testing.optimizers.RANGES`. Shrinks to a registered optimizer's first
    configuration with its hyperparameters as numbers (``mo.adagrad(lr=0.1)``).
    """
    pool = registry.REGISTRY if names is None else tuple(registry.BY_NAME[n] for n in names)
    case = draw(st.sampled_from(pool))
    config = dict(draw(st.sampled_from(case.configs)))
    changes: dict[str, Any] = {}
    for key in case.learnable:
        if config.get("nesterov") and key == "dampening":
            continue  # Nesterov momentum is defined for dampening == 0 only
        choices = ["keep", *(k for k in kinds if k != "pytree" or (key == "lr" and params))]
        kind = draw(st.sampled_from(choices))
        if kind == "keep":
            continue
        low, high = registry.RANGES[key]
        value = draw(st.floats(low, high, allow_nan=False, allow_infinity=False))
        if kind == "number":
            changes[key] = value
        elif kind == "tensor":
            changes[key] = torch.tensor(value, dtype=dtype)
        else:
            per_leaf = lambda _, value=value: torch.tensor(value, dtype=dtype)
            changes[key] = optree.tree_map(per_leaf, params)
    return DrawnOptimizer(case, registry.with_hypers(config, changes))


@st.composite
def sinusoid_tasks(
    draw: st.DrawFn,
    *,
    num_tasks: st.SearchStrategy[int] | None = None,
    shots: st.SearchStrategy[int] | None = None,
    dtype: torch.dtype = torch.float64,
) -> Any:
    """A meta-batch of sinusoid regression tasks (:class:`metafunc.data.Sinusoid`), an
    :class:`metafunc.data.Episode` with tensors ``(num_tasks, shots, 1)``."""
    from metafunc.data import Sinusoid

    n = draw(num_tasks if num_tasks is not None else st.integers(1, 4))
    k = draw(shots if shots is not None else st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    return Sinusoid().sample(n, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@st.composite
def classification_tasks(
    draw: st.DrawFn,
    *,
    num_tasks: st.SearchStrategy[int] | None = None,
    ways: st.SearchStrategy[int] | None = None,
    shots: st.SearchStrategy[int] | None = None,
    queries: st.SearchStrategy[int] | None = None,
    features: int = 4,
    dtype: torch.dtype = torch.float64,
) -> Any:
    """A meta-batch of N-way K-shot classification tasks, an :class:`metafunc.data.Episode`.

    Each task draws one Gaussian cluster centre per class in ``features`` dimensions; support
    inputs are ``(num_tasks, ways * shots, features)`` with integer labels ``0..ways-1``
    (``ways * queries`` query points likewise). Small and synthetic, so a property over many
    drawn episodes stays fast; for images use :class:`metafunc.data.EpisodeSampler`.
    """
    from metafunc.data import Episode

    n = draw(num_tasks if num_tasks is not None else st.integers(1, 3))
    w = draw(ways if ways is not None else st.integers(2, 5))
    k = draw(shots if shots is not None else st.integers(1, 3))
    q = draw(queries if queries is not None else st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    centres = 2.0 * torch.randn(n, w, features, generator=g, dtype=torch.float64)

    def points(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(w).repeat_interleave(per_class).expand(n, -1)
        noise = torch.randn(n, w * per_class, features, generator=g, dtype=torch.float64)
        x = torch.gather(centres, 1, labels[..., None].expand(-1, -1, features)) + noise
        return x.to(dtype), labels.clone()

    support, query = points(k), points(q)
    return Episode(support=support, query=query, info={"centres": centres.to(dtype)})


def inner_loop_configs(*, max_steps: int = 3) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments of :func:`metafunc.inner_loop`: ``steps`` (1 to ``max_steps``),
    ``first_order``, ``truncate`` (``None`` or 1 to ``steps``; never with ``first_order``) and
    ``checkpoint`` (``None``, ``"sqrt"`` or a segment length). Shrinks to ``{"steps": 1}``."""

    @st.composite
    def draw_config(draw: st.DrawFn) -> dict[str, Any]:
        steps = draw(st.integers(1, max_steps))
        first_order = draw(st.booleans())
        truncate = draw(st.none() | st.integers(1, steps))  # drawn always: shrinks to None
        truncate = None if first_order else truncate
        checkpoint = draw(st.none() | st.just("sqrt") | st.integers(1, steps))
        config: dict[str, Any] = {"steps": steps}
        if first_order:
            config["first_order"] = True
        if truncate is not None:
            config["truncate"] = truncate
        if checkpoint is not None:
            config["checkpoint"] = checkpoint
        return config

    return draw_config()
