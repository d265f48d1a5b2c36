"""Gradient estimators for the meta-loss of a long unroll, one truncation at a time.

Each is a :class:`GradientEstimator` ``(init, estimate)`` of pure functions, in the shape of the
optimizers: ``state = est.init(theta, seed=0)``; ``grad, loss, state = est.estimate(theta,
state)``. One ``estimate`` advances the unroll by ``steps`` inner steps (a truncation) and
estimates the gradient of the mean loss over those steps; after ``horizon`` steps the next call
starts a new unroll (``unroll.init``). Averaged over the truncations of one unroll, the estimates
of :func:`pes` (and of :func:`backprop` and :func:`es` when ``steps == horizon``) are unbiased for
the gradient of the unroll's meta-loss; :func:`backprop` and :func:`es` with ``steps < horizon``
ignore how ``theta`` shaped the state a truncation starts from, and are biased.

The random numbers come from a ``torch.Generator`` whose state is kept in the estimator's state
(``state.rng``), so that ``estimate`` is a pure function and a run is reproduced from its seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from .. import _checks
from .._tree_math import detach, grad_or_zeros
from .._typing import PyTree
from ._unroll import Unroll, run_segment

__all__ = [
    "Estimate",
    "GradientEstimator",
    "PESState",
    "TruncatedState",
    "backprop",
    "es",
    "pes",
]


class Estimate(NamedTuple):
    """What ``estimate`` returns: the gradient estimate (a pytree like ``theta``), the mean loss
    of the truncation at the unperturbed ``theta`` (a 0-d tensor, no graph), the new state."""

    grad: PyTree
    loss: torch.Tensor
    state: Any


class GradientEstimator(NamedTuple):
    """A gradient estimator: ``state = init(theta, seed=0)``;
    ``grad, loss, state = estimate(theta, state)``. Neither mutates its inputs."""

    init: Callable[..., Any]
    estimate: Callable[[PyTree, Any], Estimate]


class TruncatedState(NamedTuple):
    """The state of :func:`backprop` and :func:`es`: the unroll's inner state, the number of
    steps taken in this unroll, and the random generator's state."""

    inner: PyTree
    step: int
    rng: torch.Tensor


class PESState(NamedTuple):
    """The state of :func:`pes`.

    Attributes:
        inner: the inner state of each particle, stacked: ``num_pairs`` positive ones, then
            ``num_pairs`` negative ones, then the unperturbed one.
        accum: per pair, the sum of the perturbations its positive particle has seen in this
            unroll: a pytree like ``theta`` with a leading ``num_pairs`` dimension.
        step: the number of steps taken in this unroll.
        rng: the random generator's state.
    """

    inner: PyTree
    accum: PyTree
    step: int
    rng: torch.Tensor


def _check(call: str, unroll: Any, steps: Any, horizon: Any) -> None:
    if not isinstance(unroll, Unroll):
        raise TypeError(
            f"{call}: expected unroll to be a metafunc.estimators.Unroll(init, step), got "
            f"{type(unroll).__name__}. Build one with Unroll(init, step) or optimizer_unroll(...)."
        )
    _checks.positive_int(call, "steps", steps)
    _checks.positive_int(call, "horizon", horizon)
    if horizon % steps:
        raise ValueError(
            f"{call}: expected horizon to be a multiple of steps (each unroll is cut into whole "
            f"truncations), got horizon={horizon}, steps={steps}. Pass e.g. "
            f"horizon={max(1, horizon // steps) * steps}."
        )


def _check_noise(call: str, std: Any, num_pairs: Any) -> None:
    _checks.positive_finite(call, "std", std, meaning="the perturbations' standard deviation")
    _checks.positive_int(call, "num_pairs", num_pairs)


def _check_state(call: str, state: Any, expected: type) -> None:
    if not isinstance(state, expected):
        raise TypeError(
            f"{call}: expected the {expected.__name__} from this estimator's init, got "
            f"{type(state).__name__}. Pass state = est.init(theta, seed=...), then the state "
            f"each estimate returns."
        )


def _generator(rng: torch.Tensor) -> torch.Generator:
    g = torch.Generator()
    g.set_state(rng)
    return g


def _check_theta(call: str, theta: Any) -> None:
    _checks.float_tree(
        call, "theta", theta, meaning="the meta-parameters", example="{'lr': torch.tensor(0.1)}"
    )


def _start(unroll: Unroll, theta: PyTree, g: torch.Generator) -> PyTree:
    with torch.no_grad():
        return detach(unroll.init(detach(theta), g))


def _noise(theta: PyTree, num_pairs: int, std: float, g: torch.Generator) -> PyTree:
    def draw(x):
        e = torch.randn((num_pairs, *x.shape), generator=g, dtype=torch.float64)
        return (std * e).to(dtype=x.dtype, device=x.device)

    return optree.tree_map(draw, detach(theta))


def _particles(theta: PyTree, eps: PyTree) -> PyTree:
    """``[theta + eps_i..., theta - eps_i..., theta]`` stacked on a leading dimension."""
    return optree.tree_map(
        lambda x, e: torch.cat([x + e, x - e, x.unsqueeze(0)]), detach(theta), eps
    )


def _antithetic(eps: PyTree, losses: torch.Tensor, num_pairs: int, std: float) -> PyTree:
    """``mean_i eps_i (L+_i - L-_i) / (2 std^2)``."""
    diff = (losses[:num_pairs] - losses[num_pairs : 2 * num_pairs]) / (2 * std**2)

    def leaf(e):
        return (e * diff.to(e.dtype).reshape(-1, *([1] * (e.dim() - 1)))).mean(0)

    return optree.tree_map(leaf, eps)


def _truncated(call: str, unroll: Unroll, horizon: int):
    """``init`` and ``resume`` of a :class:`TruncatedState` estimator: ``resume(theta, state)``
    checks its arguments and gives ``(generator, inner, step)``, restarting the unroll when the
    horizon is reached."""

    def init(theta: PyTree, *, seed: int = 0) -> TruncatedState:
        g = torch.Generator().manual_seed(seed)
        _check_theta(f"{call}.init", theta)
        return TruncatedState(_start(unroll, theta, g), 0, g.get_state())

    def resume(theta: PyTree, state: TruncatedState) -> tuple[torch.Generator, PyTree, int]:
        _check_theta(f"{call}.estimate", theta)
        _check_state(f"{call}.estimate", state, TruncatedState)
        g = _generator(state.rng)
        inner, t = state.inner, state.step
        if t == horizon:
            inner, t = _start(unroll, theta, g), 0
        return g, inner, t

    return init, resume


def backprop(unroll: Unroll, *, steps: int, horizon: int) -> GradientEstimator:
    """Truncated backpropagation through time: the exact gradient of each truncation's loss, with
    the state it starts from taken as a constant.

    With ``steps == horizon`` this is exact backpropagation through the whole unroll; with
    ``steps < horizon`` it is biased (short-horizon bias: Wu et al. 2018,
    https://arxiv.org/abs/1803.02021) but its memory grows with ``steps`` only. The gradient is
    taken by ``torch.autograd.grad``, so ``unroll.step`` may use :func:`metafunc.inner_loop` with
    ``checkpoint=``.

    Example:
        >>> import torch
        >>> from metafunc.estimators import Unroll, backprop
        >>> unroll = Unroll(lambda th, g: torch.zeros(()),
        ...                 lambda th, x, t: (x + th["a"], (x + th["a"]) ** 2))
        >>> est = backprop(unroll, steps=2, horizon=2)
        >>> theta = {"a": torch.tensor(1.0)}
        >>> grad, loss, state = est.estimate(theta, est.init(theta, seed=0))
        >>> grad["a"], loss   # d/da mean(a^2, (2a)^2) = 5a
        (tensor(5.), tensor(2.5000))
    """
    call = "backprop(unroll, steps=..., horizon=...)"
    _check(call, unroll, steps, horizon)

    init, resume = _truncated(call, unroll, horizon)

    def estimate(theta: PyTree, state: TruncatedState) -> Estimate:
        g, inner, t = resume(theta, state)

        def fn(th):
            new_inner, loss = run_segment(unroll, th, inner, t, steps)
            return loss, new_inner

        grad, (loss, new_inner) = grad_or_zeros(fn, detach(theta), has_aux=True)
        new_state = TruncatedState(detach(new_inner), t + steps, g.get_state())
        return Estimate(grad, loss.detach(), new_state)

    return GradientEstimator(init, estimate)


def es(
    unroll: Unroll, *, steps: int, horizon: int, std: float, num_pairs: int
) -> GradientEstimator:
    """Antithetic evolution strategies on each truncation, vmapped over the perturbations.

    For ``eps_i ~ N(0, std^2 I)``, ``i < num_pairs``, the estimate is
    ``mean_i eps_i (L(theta + eps_i) - L(theta - eps_i)) / (2 std^2)`` with ``L`` the truncation's
    mean loss from the shared state; the state then advances with ``theta`` unperturbed (one more
    particle in the same vmap). It is unbiased for the gradient of the Gaussian-smoothed loss
    (exact for a quadratic), needs no backward pass and no differentiable ``step``, and is
    indifferent to chaotic or discontinuous losses. With ``steps < horizon`` it shares
    truncated backprop's bias; :func:`pes` removes it. Salimans et al. 2017,
    https://arxiv.org/abs/1703.03864.

    Args:
        unroll: the :class:`Unroll`.
        steps: inner steps per truncation (per ``estimate``).
        horizon: inner steps per unroll, a multiple of ``steps``.
        std: the perturbations' standard deviation.
        num_pairs: antithetic pairs (``2 * num_pairs + 1`` particles run in one vmap).
    """
    call = "es(unroll, steps=..., horizon=..., std=..., num_pairs=...)"
    _check(call, unroll, steps, horizon)
    _check_noise(call, std, num_pairs)

    def segment(th, inner, t):
        return run_segment(unroll, th, inner, t, steps)

    init, resume = _truncated(call, unroll, horizon)

    def estimate(theta: PyTree, state: TruncatedState) -> Estimate:
        g, inner, t = resume(theta, state)
        eps = _noise(theta, num_pairs, std, g)
        with torch.no_grad():
            run = torch.func.vmap(segment, in_dims=(0, None, None), out_dims=(0, 0))
            new_inner, losses = run(_particles(theta, eps), inner, t)
        grad = _antithetic(eps, losses, num_pairs, std)
        mean_inner = optree.tree_map(lambda x: x[-1], new_inner)
        return Estimate(grad, losses[-1], TruncatedState(mean_inner, t + steps, g.get_state()))

    return GradientEstimator(init, estimate)


def pes(
    unroll: Unroll, *, steps: int, horizon: int, std: float, num_pairs: int
) -> GradientEstimator:
    """Persistent evolution strategies: unbiased over the truncations of one long unroll.

    Each antithetic pair keeps its own inner states (one perturbed by ``+eps``, one by ``-eps``,
    fresh ``eps`` at every truncation) and the sum ``xi_i`` of the perturbations its positive
    particle has seen since the unroll started. The estimate for a truncation is
    ``mean_i xi_i (L+_i - L-_i) / (2 std^2)``, with ``L+-_i`` the truncation's mean loss along each
    particle's own trajectory: the accumulated ``xi_i`` accounts for how the perturbations of
    earlier truncations shaped the state, which truncated backprop and :func:`es` ignore. Summed
    over an unroll's truncations it is an unbiased estimate of the gradient of the (smoothed)
    meta-loss; its variance grows with the number of truncations. Vicol, Metz and Sohl-Dickstein
    2021, https://arxiv.org/abs/2112.13835.

    Args:
        unroll: the :class:`Unroll`.
        steps: inner steps per truncation (per ``estimate``).
        horizon: inner steps per unroll, a multiple of ``steps``; the inner states and the
            accumulators start anew after it.
        std: the perturbations' standard deviation.
        num_pairs: antithetic pairs (``2 * num_pairs + 1`` particles in one vmap; the last,
            unperturbed, gives the reported loss).

    Example: the estimate averaged over many pairs approaches the gradient.
        >>> import torch
        >>> from metafunc.estimators import Unroll, pes
        >>> unroll = Unroll(lambda th, g: torch.zeros((), dtype=torch.float64),
        ...                 lambda th, x, t: (x + th["a"], (x + th["a"]) ** 2))
        >>> est = pes(unroll, steps=1, horizon=2, std=0.1, num_pairs=20000)
        >>> theta = {"a": torch.tensor(1.0, dtype=torch.float64)}
        >>> g1, _, state = est.estimate(theta, est.init(theta, seed=0))
        >>> g2, _, state = est.estimate(theta, state)
        >>> mean = float(g1["a"] + g2["a"]) / 2   # d/da mean(a^2, (2a)^2) = 5a
        >>> abs(mean - 5.0) < 0.3   # the standard error is about 0.05 here
        True
    """
    call = "pes(unroll, steps=..., horizon=..., std=..., num_pairs=...)"
    _check(call, unroll, steps, horizon)
    _check_noise(call, std, num_pairs)
    particles = 2 * num_pairs + 1

    def segment(th, inner, t):
        return run_segment(unroll, th, inner, t, steps)

    def fresh(theta: PyTree, g: torch.Generator) -> tuple[PyTree, PyTree]:
        inner = _start(unroll, theta, g)
        stacked = optree.tree_map(lambda x: x.unsqueeze(0).expand(particles, *x.shape), inner)
        accum = optree.tree_map(
            lambda x: torch.zeros((num_pairs, *x.shape), dtype=x.dtype, device=x.device),
            detach(theta),
        )
        return stacked, accum

    def init(theta: PyTree, *, seed: int = 0) -> PESState:
        _check_theta(f"{call}.init", theta)
        g = torch.Generator().manual_seed(seed)
        inner, accum = fresh(theta, g)
        return PESState(inner, accum, 0, g.get_state())

    def estimate(theta: PyTree, state: PESState) -> Estimate:
        _check_theta(f"{call}.estimate", theta)
        _check_state(f"{call}.estimate", state, PESState)
        g = _generator(state.rng)
        inner, accum, t = state.inner, state.accum, state.step
        if t == horizon:
            (inner, accum), t = fresh(theta, g), 0
        eps = _noise(theta, num_pairs, std, g)
        accum = optree.tree_map(torch.add, accum, eps)
        with torch.no_grad():
            run = torch.func.vmap(segment, in_dims=(0, 0, None), out_dims=(0, 0))
            new_inner, losses = run(_particles(theta, eps), inner, t)
        grad = _antithetic(accum, losses, num_pairs, std)
        return Estimate(grad, losses[-1], PESState(new_inner, accum, t + steps, g.get_state()))

    return GradientEstimator(init, estimate)
