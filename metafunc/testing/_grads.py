"""``check_grads``: a function's derivatives against central finite differences, leaf by leaf.

The analytic side is ``torch.func`` itself (``grad`` for reverse mode, ``jvp`` for forward mode,
nested for second order): the autodiff the code under test relies on. The oracle is a central
difference of ``fn``'s values in float64, which shares nothing with autodiff.

One global random direction hides an error in a small leaf behind a large one (a 1 % error in one
entry of a 10 000-entry leaf moves a global projection by 1e-6 relative); so every leaf gets its
own random direction, and every entry of a leaf up to ``exhaustive_numel`` entries is compared
on its own. A function with several or non-scalar outputs is reduced to a scalar by a fixed random
projection of its floating-point outputs, so every output entry takes part.

Second order (``order=2``) checks the derivative of the first derivative, as ``jax.test_util
.check_grads`` does: ``h(x) = <grad f(x), v>`` for a fixed random ``v``, whose derivative is
taken by reverse-over-reverse (``"rev"``) or forward-over-reverse (``"fwd"``) and compared with
central differences of ``h``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, cast

import optree
import torch

from .. import _checks
from ._common import default_dtype, float_copy, fmt, is_float, leaves_with_names

__all__ = ["check_grads"]

_CALL = "check_grads(fn, args, ...)"

# how each mode computes the analytic derivative: torch.func transforms, or torch.autograd.grad
# (for code that torch.func cannot transform: requires_grad_() inside fn, higher-style loops)
_MODES = {"rev": "func", "fwd": "func", "autograd": "autograd"}

_DETACHED = (
    "zero/None gradient where the numeric one is not: is the tensor detached, or was the "
    "gradient cut by copy/clone/no_grad? (higher's copy_initial_weights=True, the default, "
    "detaches the initial weights; torch.func.grad returns zeros where torch.autograd.grad "
    "would return None.)"
)


class _Comparison(NamedTuple):
    leaf: int  # index into the differentiated leaves
    where: str  # "a random direction" or "element (i, j)"
    mode: str
    analytic: float
    numeric: float


def check_grads(
    fn: Callable[..., Any],
    args: tuple,
    *,
    order: int = 1,
    modes: Sequence[str] = ("rev", "fwd"),
    argnums: int | Sequence[int] | None = None,
    eps: float = 1e-6,
    atol: float = 1e-7,
    rtol: float = 1e-5,
    exhaustive_numel: int = 32,
    seed: int = 0,
) -> None:
    """Asserts that ``fn``'s derivatives match central finite differences, in float64.

    ``fn(*args)`` may return a tensor or any pytree of tensors (its floating-point leaves are
    projected on a fixed random pytree to give a scalar ``s``); ``args`` are pytrees (dicts of
    params, optimizer states, nested containers). Every floating-point tensor leaf of the
    arguments selected by ``argnums`` is differentiated; integer tensors and Python objects are
    held fixed. ``fn`` runs on float64 *copies* of the arguments, with float64 as torch's default
    dtype, so the caller's tensors keep their values and version counters.

    For each differentiated leaf ``x_j``, with ``u`` one random unit direction in that leaf (and,
    for leaves with at most ``exhaustive_numel`` entries, every unit vector as well)::

        | D s(x)[u] - (s(x + eps u) - s(x - eps u)) / (2 eps) |  <=  atol + rtol * |numeric|

    where ``D s(x)[u]`` is computed by reverse mode (``torch.func.grad``) and/or forward mode
    (``torch.func.jvp``). With ``order=2`` the same test is run first on ``s``, then on
    ``h(x) = <grad s(x), v>`` (``v`` a fixed random pytree): reverse-over-reverse and
    forward-over-reverse second derivatives.

    Args:
        fn: the function to check, e.g. a meta-loss ``fn(params) -> scalar``.
        args: the tuple of ``fn``'s positional arguments (pytrees of tensors).
        order: 1 (first derivatives) or 2 (first and second derivatives).
        modes: ``"rev"``, ``"fwd"`` or both: how the analytic derivative is computed.
        argnums: the positions in ``args`` to differentiate (default: all).
        eps: the finite-difference step, in float64.
        atol, rtol: the tolerance on each comparison (see above).
        exhaustive_numel: leaves with at most this many entries are also checked entry by entry.
        seed: seeds the random directions and projections.

    Raises:
        AssertionError: a derivative disagrees. The message names the key path of the worst leaf
            (``args[0]['w']``), the direction or element, the analytic and numeric values, their
            ratio, the tolerances, and the likely cause where it can tell.

    Example:
        >>> import torch
        >>> from metafunc.testing import check_grads
        >>> def meta_loss(params):
        ...     inner = torch.func.grad(lambda p: (p["w"] ** 4).sum())(params)
        ...     adapted = {"w": params["w"] - 0.1 * inner["w"]}
        ...     return (adapted["w"] ** 2).sum()
        >>> check_grads(meta_loss, ({"w": torch.tensor([0.5, -1.0])},), order=2)
        >>> def first_order(params):  # the inner gradient is detached: a first-order meta-loss
        ...     inner = torch.func.grad(lambda p: (p["w"] ** 4).sum())(params)
        ...     return ((params["w"] - 0.1 * inner["w"].detach()) ** 2).sum()
        >>> check_grads(first_order, ({"w": torch.tensor([0.5, -1.0])},))
        Traceback (most recent call last):
        ...
        AssertionError: check_grads(fn, args, order=1): ... w.r.t. args[0]['w'] is wrong ...
    """
    argnums = _check_arguments(fn, args, order, modes, argnums, eps, atol, rtol, exhaustive_numel)
    with default_dtype(torch.float64):
        problem = _Problem(fn, float_copy(args), argnums, seed)
        for k in range(1, order + 1):
            comparisons = []
            for family in ("func", "autograd"):
                chosen = [m for m in modes if _MODES[m] == family]
                if chosen:
                    phi = problem.scalar if k == 1 else problem.second_order(family)
                    tangents = _tangents(problem, exhaustive_numel, seed + k)
                    comparisons += _compare(phi, problem, chosen, eps, tangents)
            _report(comparisons, problem, k, modes, eps, atol, rtol)


def _check_arguments(
    fn: Any,
    args: Any,
    order: Any,
    modes: Any,
    argnums: Any,
    eps: Any,
    atol: Any,
    rtol: Any,
    exhaustive_numel: Any,
) -> tuple[int, ...]:
    _checks.is_callable(_CALL, "fn", fn)
    if not isinstance(args, tuple):
        raise TypeError(
            f"{_CALL}: expected args to be the tuple of fn's positional arguments, got "
            f"{type(args).__name__}. For a single argument write args=(params,)."
        )
    _checks.one_of(_CALL, "order", order, (1, 2))
    if isinstance(modes, str) or not modes or any(m not in _MODES for m in modes):
        raise ValueError(
            f"{_CALL}: expected modes to be a non-empty tuple of 'rev', 'fwd' and 'autograd', "
            f"got {modes!r}."
        )
    if argnums is None:
        argnums = tuple(range(len(args)))
    elif _checks._is_int(argnums):
        argnums = (argnums,)
    if not (
        isinstance(argnums, (tuple, list))
        and argnums
        and all(_checks._is_int(i) and -len(args) <= i < len(args) for i in argnums)
    ):
        raise ValueError(
            f"{_CALL}: expected argnums to be an int or a tuple of ints indexing args "
            f"(len {len(args)}), got {argnums!r}."
        )
    _checks.positive_finite(_CALL, "eps", eps, meaning="the finite-difference step")
    _checks.at_least(_CALL, "atol", atol)
    _checks.at_least(_CALL, "rtol", rtol)
    _checks.nonnegative_int(_CALL, "exhaustive_numel", exhaustive_numel)
    return tuple(i % len(args) for i in argnums)


class _Problem:
    """``fn`` as a scalar function of the list of differentiated leaves."""

    def __init__(self, fn: Callable[..., Any], args: tuple, argnums: tuple[int, ...], seed: int):
        self.fn = fn
        self.names, self.leaves, self.spec = leaves_with_names(args, "args")
        accessors = optree.tree_flatten_with_accessor(cast(Any, args))[0]
        self.positions = [
            i
            for i, (acc, leaf) in enumerate(zip(accessors, self.leaves))
            if is_float(leaf) and acc[0].entry in argnums
        ]
        if not self.positions:
            raise ValueError(
                f"{_CALL}: no floating-point tensor among args{list(argnums)}: nothing to "
                "differentiate. Pass the params as tensors (e.g. a dict of float tensors)."
            )
        self.x = [self.leaves[i] for i in self.positions]
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.weights: list[torch.Tensor] | None = None

    def leaf_name(self, j: int) -> str:
        return self.names[self.positions[j]]

    def call(self, xs: list[torch.Tensor]) -> Any:
        # fresh copies of the held-fixed tensors, so a fn that writes into its inputs cannot
        # move the point the differences are taken at
        leaves = [x.clone() if isinstance(x, torch.Tensor) else x for x in self.leaves]
        for i, x in zip(self.positions, xs):
            leaves[i] = x
        args = optree.tree_unflatten(self.spec, leaves)
        return self.fn(*args)

    def scalar(self, xs: list[torch.Tensor]) -> torch.Tensor:
        outs = [o for o in optree.tree_leaves(self.call(xs)) if is_float(o)]
        if not outs:
            raise TypeError(
                f"{_CALL}: fn returned no floating-point tensor: nothing to compare. Return the "
                "loss (or a pytree of float tensors)."
            )
        if self.weights is None:
            if len(outs) == 1 and outs[0].numel() == 1:
                self.weights = [torch.ones((), dtype=torch.float64)]
            else:
                self.weights = [
                    torch.randn(o.shape, generator=self.generator, dtype=torch.float64)
                    for o in outs
                ]
        if len(outs) != len(self.weights):
            raise ValueError(f"{_CALL}: fn returned a different number of outputs between calls.")
        return sum(((w * o).sum() for w, o in zip(self.weights, outs)), torch.zeros(()))

    def second_order(self, family: str) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        """``h(x) = <grad s(x), v>``, the gradient taken by ``family``'s own means."""
        g = torch.Generator().manual_seed(self.seed + 1)
        v = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in self.x]

        def h(xs: list[torch.Tensor]) -> torch.Tensor:
            if family == "func":
                grads = torch.func.grad(self.scalar)(xs)
            else:
                xs = [t if t.requires_grad else t.requires_grad_() for t in xs]
                grads = _autograd_grad(self.scalar(xs), xs, create_graph=True)
            return sum(((gi * vi).sum() for gi, vi in zip(grads, v)), torch.zeros(()))

        return h


def _autograd_grad(
    s: torch.Tensor, xs: list[torch.Tensor], *, create_graph: bool
) -> list[torch.Tensor]:
    """``torch.autograd.grad`` with a ``None`` (an input the graph does not reach) as zeros."""
    if not s.requires_grad:
        return [torch.zeros_like(x) for x in xs]
    found = torch.autograd.grad(s, xs, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(x) if d is None else d for x, d in zip(xs, found)]


def _tangents(
    problem: _Problem, exhaustive_numel: int, seed: int
) -> Iterator[tuple[int, str, torch.Tensor]]:
    """``(leaf, where, tangent)``: one random unit direction per leaf, and the unit vectors of
    the small leaves."""
    g = torch.Generator().manual_seed(seed)
    for j, x in enumerate(problem.x):
        if x.numel() == 0:
            continue
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        yield j, "a random direction", d / d.norm().clamp_min(1e-300)
        if x.numel() <= exhaustive_numel:
            for flat in range(x.numel()):
                e = torch.zeros(x.numel(), dtype=torch.float64)
                e[flat] = 1.0
                index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape))
                yield j, f"element {index}", e.reshape(x.shape)


def _compare(
    phi: Callable[[list[torch.Tensor]], torch.Tensor],
    problem: _Problem,
    modes: Sequence[str],
    eps: float,
    tangents: Iterator[tuple[int, str, torch.Tensor]],
) -> list[_Comparison]:
    x = problem.x
    zeros = [torch.zeros_like(t) for t in x]

    def value(xs: list[torch.Tensor]) -> float:
        # leaves that require grad: a fn that calls torch.autograd.grad on its inputs runs too
        return float(phi([t.clone().requires_grad_() for t in xs]).detach())

    if "fwd" in modes:
        _load_forward_ad()
    full: dict[str, list[torch.Tensor]] = {}
    if "rev" in modes:
        full["rev"] = [g.detach() for g in torch.func.grad(phi)([t.clone() for t in x])]
    if "autograd" in modes:
        leaves = [t.clone().requires_grad_() for t in x]
        full["autograd"] = _autograd_grad(phi(leaves), leaves, create_graph=False)
    out = []
    for j, where, d in tangents:
        plus = [t + eps * d if i == j else t for i, t in enumerate(x)]
        minus = [t - eps * d if i == j else t for i, t in enumerate(x)]
        numeric = (value(plus) - value(minus)) / (2 * eps)
        for mode, grads in full.items():
            out.append(_Comparison(j, where, mode, float((grads[j] * d).sum()), numeric))
        if "fwd" in modes:
            tangent = [d if i == j else z for i, z in enumerate(zeros)]
            dot = torch.func.jvp(phi, ([t.clone() for t in x],), (tangent,))[1]
            out.append(_Comparison(j, where, "fwd", float(dot.detach()), numeric))
    return out


def _load_forward_ad() -> None:
    """Loads torch's forward-AD decompositions now, under a filter: on first use torch builds
    them with ``torch.jit.script``, whose DeprecationWarning (torch's own, not the caller's)
    fails a test suite that turns warnings into errors."""
    load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
    if load is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.script", DeprecationWarning)
            load()


def _excess(c: _Comparison, atol: float, rtol: float) -> float:
    """How many tolerances apart the two values are (inf where one is not finite)."""
    if not (math.isfinite(c.analytic) and math.isfinite(c.numeric)):
        both_nan = math.isnan(c.analytic) and math.isnan(c.numeric)
        return 0.0 if both_nan or c.analytic == c.numeric else math.inf
    return abs(c.analytic - c.numeric) / (atol + rtol * abs(c.numeric) or 1e-300)


def _report(
    comparisons: list[_Comparison],
    problem: _Problem,
    order: int,
    modes: Sequence[str],
    eps: float,
    atol: float,
    rtol: float,
) -> None:
    bad = [c for c in comparisons if _excess(c, atol, rtol) > 1.0]
    if not bad:
        return
    worst = max(bad, key=lambda c: _excess(c, atol, rtol))
    # within the worst leaf, an entry-by-entry failure says more than a random direction
    entries = [c for c in bad if c.leaf == worst.leaf and c.where.startswith("element")]
    if entries:
        worst = max(entries, key=lambda c: _excess(c, atol, rtol))
    name = problem.leaf_name(worst.leaf)
    what = "first derivative" if order == 1 else "second derivative"
    how = {
        ("rev", 1): "reverse mode, torch.func.grad",
        ("fwd", 1): "forward mode, torch.func.jvp",
        ("autograd", 1): "torch.autograd.grad",
        ("rev", 2): "reverse-over-reverse, torch.func.grad",
        ("fwd", 2): "forward-over-reverse, torch.func.jvp of torch.func.grad",
        ("autograd", 2): "torch.autograd.grad twice",
    }[worst.mode, order]
    ratio = worst.analytic / worst.numeric if worst.numeric else math.inf
    others = sorted({problem.leaf_name(c.leaf) for c in bad} - {name})
    lines = [
        f"check_grads(fn, args, order={order}): the {what} ({how}) w.r.t. {name} is wrong "
        f"along {worst.where}:",
        f"  analytic = {fmt(worst.analytic)}",
        f"  numeric  = {fmt(worst.numeric)}  (central difference, eps={eps:g}, float64)",
        f"  analytic / numeric = {fmt(ratio)};  |analytic - numeric| = "
        f"{fmt(abs(worst.analytic - worst.numeric))} > atol + rtol * |numeric| with "
        f"atol={atol:g}, rtol={rtol:g}",
        f"  {len(bad)} of {len(comparisons)} comparisons failed"
        + (f"; other leaves with failures: {', '.join(others)}" if others else ""),
        f"  likely cause: {_cause(worst, bad, comparisons, order, modes)}",
    ]
    raise AssertionError("\n".join(lines))


def _cause(
    worst: _Comparison,
    bad: list[_Comparison],
    comparisons: list[_Comparison],
    order: int,
    modes: Sequence[str],
) -> str:
    if not math.isfinite(worst.numeric):
        return (
            "fn is not finite next to this point (the numeric derivative is "
            f"{fmt(worst.numeric)}): check it at another point, or with a smaller eps."
        )
    if not math.isfinite(worst.analytic):
        return (
            f"the analytic derivative is {fmt(worst.analytic)} where the numeric one is finite: "
            "an op with an infinite or undefined derivative at this point (sqrt or pow of 0, "
            "the norm of a zero vector), often reached by double backward through an inner "
            "gradient (an Adam denominator sqrt(v) at an exactly-zero gradient entry). Use a "
            "form that is safe at 0 (torch.where with a safe input)."
        )
    same_leaf = [c for c in comparisons if c.leaf == worst.leaf and c.mode == worst.mode]
    if all(c.analytic == 0.0 for c in same_leaf):
        return _DETACHED
    bad_modes = {c.mode for c in bad}
    if bad_modes == {"fwd"}:
        return (
            "reverse mode agrees with the numeric derivative but forward mode does not: a custom "
            "autograd.Function (or op) whose jvp is wrong."
        )
    if "fwd" in modes and "fwd" not in bad_modes:
        return (
            "forward mode agrees with the numeric derivative but reverse mode does not: a "
            "custom autograd.Function (or op) whose backward is wrong."
        )
    if order == 2:
        return (
            "the first derivative is right but the second is not: something on the path is "
            "differentiated once only (create_graph=False, a detached inner gradient, an inner "
            "loop run with first_order=True), or a backward whose own derivative is wrong."
        )
    return (
        "part of the path is cut from the graph (a detach, no_grad or .data; an inner loop "
        "that silently runs first order: first_order=True, create_graph=False or a detached "
        "inner gradient), or a custom autograd.Function whose backward is wrong."
    )
