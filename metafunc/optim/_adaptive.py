"""Adaptive scalings: the per-coordinate rules behind Adam, RMSprop, Adagrad and their relatives.

Each ``scale_by_*`` returns a descent *direction*; the named optimizers in ``_alias.py`` chain it
with :func:`scale_by_learning_rate`. Square roots of second-moment estimates use
:func:`safe_sqrt`, so an exactly-zero gradient entry gives a finite meta-gradient.

Each update is a per-leaf kernel run by :func:`._precision.run_leaves`, which widens half-precision
leaves to float32 and keeps their state in ``accumulator_dtype`` (default: float32 for float16 and
bfloat16 params, the params' dtype otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import optree
import torch

from .. import _tree
from .._typing import Hyper, Updates
from . import _hyper, _precision
from ._base import GradientTransformation, _count, check_state
from ._hyper import safe_sqrt


def _betas(call: str, betas: Sequence[Hyper]) -> tuple[Hyper, Hyper]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(
            f"{call}: expected betas to be a pair (beta1, beta2), got {betas!r}. "
            f"Pass e.g. betas=(0.9, 0.999)."
        )
    b1 = _hyper.check(call, "betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    b2 = _hyper.check(call, "betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    return b1, b2


def _check_init(call: str, params, hypers: dict[str, Hyper]) -> None:
    """Validates params and, for per-parameter hyperparameters, their match with the params."""
    _tree.check_floating(f"{call}.init", params)
    for name, value in hypers.items():
        _hyper.match(f"{call}.init", name, value, params)


def _per_leaf(call: str, hypers: dict[str, Hyper], updates) -> list[list]:
    """Each hyperparameter's per-leaf values, in the order of ``hypers``."""
    return [_hyper.leaves(call, name, value, updates) for name, value in hypers.items()]


def _step(count: torch.Tensor) -> torch.Tensor:
    return (count + 1).to(torch.float64)


def _unflatten(spec, values: list):
    return optree.tree_unflatten(spec, values)


class ScaleByAdamState(NamedTuple):
    step: torch.Tensor
    mu: Updates
    nu: Updates
    nu_max: Updates | tuple


def scale_by_adam(
    betas: Sequence[Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    amsgrad: bool = False,
    *,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` (Kingma & Ba, arXiv:1412.6980).

    .. math::
        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\quad
        v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2, \\quad
        d_t = \\frac{m_t / (1-\\beta_1^t)}{\\sqrt{v_t} / \\sqrt{1-\\beta_2^t} + \\epsilon}

    With ``amsgrad`` the running maximum of ``v_t`` replaces ``v_t`` (Reddi et al., ICLR 2018).

    ``accumulator_dtype`` is the dtype of ``mu`` and ``nu``; by default float32 for float16 and
    bfloat16 params (whose arithmetic also runs in float32), the params' dtype otherwise.
    """
    call = "scale_by_adam"
    b1, b2 = _betas(call, betas)
    _hyper.check(call, "eps", eps, low=0.0)
    _precision.check_accumulator_dtype(call, accumulator_dtype)
    hypers = {"betas[0]": b1, "betas[1]": b2, "eps": eps}

    def init(params):
        _check_init(call, params, hypers)
        acc = accumulator_dtype
        return ScaleByAdamState(
            _count(params),
            _precision.zeros(params, acc),
            _precision.zeros(params, acc),
            _precision.zeros(params, acc) if amsgrad else (),
        )

    def kernel(g, state, c1, c2, e, t):
        m, v, vmax = state
        m = m + (g - m) * (1 - c1)
        v = v * c2 + g * g * (1 - c2)
        if amsgrad:
            vmax = torch.maximum(vmax, v)
        denom = safe_sqrt(vmax if amsgrad else v) / torch.sqrt(1 - c2**t) + e
        return m / denom / (1 - c1**t), (m, v, vmax)

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByAdamState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.mu", state.mu)
        leaves, spec = optree.tree_flatten(updates)
        t = _step(state.step)
        vmaxs = optree.tree_leaves(state.nu_max) if amsgrad else [None] * len(leaves)
        out, (mus, nus, vmaxs) = _precision.run_leaves(
            kernel,
            leaves,
            (optree.tree_leaves(state.mu), optree.tree_leaves(state.nu), vmaxs),
            *_per_leaf(call, hypers, updates),
            shared=(t,),
            accumulator_dtype=accumulator_dtype,
        )
        new_state = ScaleByAdamState(
            state.step + 1,
            _unflatten(spec, mus),
            _unflatten(spec, nus),
            _unflatten(spec, vmaxs) if amsgrad else (),
        )
        return _unflatten(spec, out), new_state

    return GradientTransformation(init, update)


class ScaleByAdamaxState(NamedTuple):
    step: torch.Tensor
    mu: Updates
    u_inf: Updates


def scale_by_adamax(
    betas: Sequence[Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    *,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Adamax's direction ``m_hat / u``, ``u_t = max(beta2 u_{t-1}, |g_t| + eps)``.

    Kingma & Ba, arXiv:1412.6980, section 7. ``accumulator_dtype``: as in :func:`scale_by_adam`.
    """
    call = "scale_by_adamax"
    b1, b2 = _betas(call, betas)
    _hyper.check(call, "eps", eps, low=0.0)
    _precision.check_accumulator_dtype(call, accumulator_dtype)
    hypers = {"betas[0]": b1, "betas[1]": b2, "eps": eps}

    def init(params):
        _check_init(call, params, hypers)
        acc = accumulator_dtype
        return ScaleByAdamaxState(
            _count(params), _precision.zeros(params, acc), _precision.zeros(params, acc)
        )

    def kernel(g, state, c1, c2, e, t):
        m, u = state
        m = m + (g - m) * (1 - c1)
        u = torch.maximum(u * c2, g.abs() + e)
        return m / u / (1 - c1**t), (m, u)

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByAdamaxState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.mu", state.mu)
        leaves, spec = optree.tree_flatten(updates)
        out, (mus, us) = _precision.run_leaves(
            kernel,
            leaves,
            (optree.tree_leaves(state.mu), optree.tree_leaves(state.u_inf)),
            *_per_leaf(call, hypers, updates),
            shared=(_step(state.step),),
            accumulator_dtype=accumulator_dtype,
        )
        new_state = ScaleByAdamaxState(state.step + 1, _unflatten(spec, mus), _unflatten(spec, us))
        return _unflatten(spec, out), new_state

    return GradientTransformation(init, update)


class ScaleByNadamState(NamedTuple):
    step: torch.Tensor
    mu_product: Updates
    mu: Updates
    nu: Updates


def scale_by_nadam(
    betas: Sequence[Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    momentum_decay: Hyper = 4e-3,
    *,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """NAdam's direction with torch's momentum schedule (Dozat 2016).

    .. math::
        \\mu_t = \\beta_1 (1 - \\tfrac12 0.96^{t \\psi}), \\quad
        d_t = \\frac{(1-\\mu_t)\\, g_t}{(1-\\prod_{i\\le t}\\mu_i)(\\sqrt{\\hat v_t}+\\epsilon)}
            + \\frac{\\mu_{t+1}\\, m_t}{(1-\\prod_{i\\le t+1}\\mu_i)(\\sqrt{\\hat v_t}+\\epsilon)}

    ``accumulator_dtype``: the dtype of ``mu`` and ``nu``, as in :func:`scale_by_adam`; the
    per-leaf products ``mu_product`` are float64 numbers.
    """
    call = "scale_by_nadam"
    b1, b2 = _betas(call, betas)
    _hyper.check(call, "eps", eps, low=0.0)
    _hyper.check(call, "momentum_decay", momentum_decay, low=0.0)
    _precision.check_accumulator_dtype(call, accumulator_dtype)
    hypers = {"betas[0]": b1, "betas[1]": b2, "eps": eps, "momentum_decay": momentum_decay}

    def init(params):
        _check_init(call, params, hypers)
        ones = optree.tree_map(
            lambda p: torch.ones((), dtype=torch.float64, device=p.device), params
        )
        acc = accumulator_dtype
        return ScaleByNadamState(
            _count(params), ones, _precision.zeros(params, acc), _precision.zeros(params, acc)
        )

    def kernel(g, state, c1, c2, e, mu_t, mu_next, prod, t):
        m, v = state
        m = m + (g - m) * (1 - c1)
        v = v * c2 + g * g * (1 - c2)
        denom = safe_sqrt(v / (1 - c2**t)) + e
        d = g / denom * ((1.0 - mu_t) / (1.0 - prod)) + m / denom * (
            mu_next / (1.0 - prod * mu_next)
        )
        return d, (m, v)

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByNadamState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.mu", state.mu)
        leaves, spec = optree.tree_flatten(updates)
        t = _step(state.step)
        b1s, b2s, epss, mds = _per_leaf(call, hypers, updates)
        # the momentum schedule: float64 numbers per leaf, outside the leaf's arithmetic
        mu_ts = [c1 * (1.0 - 0.5 * 0.96 ** (t * md)) for c1, md in zip(b1s, mds)]
        mu_nexts = [c1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * md)) for c1, md in zip(b1s, mds)]
        prods = [p * mu_t for p, mu_t in zip(optree.tree_leaves(state.mu_product), mu_ts)]
        out, (mus, nus) = _precision.run_leaves(
            kernel,
            leaves,
            (optree.tree_leaves(state.mu), optree.tree_leaves(state.nu)),
            b1s,
            b2s,
            epss,
            mu_ts,
            mu_nexts,
            prods,
            shared=(t,),
            accumulator_dtype=accumulator_dtype,
        )
        new_state = ScaleByNadamState(
            state.step + 1, _unflatten(spec, prods), _unflatten(spec, mus), _unflatten(spec, nus)
        )
        return _unflatten(spec, out), new_state

    return GradientTransformation(init, update)


class ScaleByRadamState(NamedTuple):
    step: torch.Tensor
    mu: Updates
    nu: Updates


def scale_by_radam(
    betas: Sequence[Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    *,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Rectified Adam's direction (Liu et al., arXiv:1908.03265), with torch's ``rho_t > 5``.

    While the variance of the adaptive rate is intractable (``rho_t <= 5``) the direction is the
    bias-corrected momentum ``m_hat``; afterwards it is
    ``r_t * m_hat * sqrt(1-beta2^t) / (sqrt(v)+eps)``. ``accumulator_dtype``: as in
    :func:`scale_by_adam`.
    """
    call = "scale_by_radam"
    b1, b2 = _betas(call, betas)
    _hyper.check(call, "eps", eps, low=0.0)
    _precision.check_accumulator_dtype(call, accumulator_dtype)
    hypers = {"betas[0]": b1, "betas[1]": b2, "eps": eps}

    def init(params):
        _check_init(call, params, hypers)
        acc = accumulator_dtype
        return ScaleByRadamState(
            _count(params), _precision.zeros(params, acc), _precision.zeros(params, acc)
        )

    def kernel(g, state, c1, c2, e, t):
        m, v = state
        m = m + (g - m) * (1 - c1)
        v = v * c2 + g * g * (1 - c2)
        bc2 = 1 - c2**t
        m_hat = m / (1 - c1**t)
        rho_inf = 2 / (1 - c2) - 1
        rho_t = rho_inf - 2 * t * (c2**t) / bc2
        tractable = rho_t > 5.0
        rect_sq = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        rect = torch.sqrt(torch.where(tractable, rect_sq, 1.0))
        adaptive = torch.sqrt(bc2) / (safe_sqrt(v) + e)
        return torch.where(tractable, m_hat * adaptive * rect, m_hat), (m, v)

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByRadamState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.mu", state.mu)
        leaves, spec = optree.tree_flatten(updates)
        out, (mus, nus) = _precision.run_leaves(
            kernel,
            leaves,
            (optree.tree_leaves(state.mu), optree.tree_leaves(state.nu)),
            *_per_leaf(call, hypers, updates),
            shared=(_step(state.step),),
            accumulator_dtype=accumulator_dtype,
        )
        new_state = ScaleByRadamState(state.step + 1, _unflatten(spec, mus), _unflatten(spec, nus))
        return _unflatten(spec, out), new_state

    return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
    nu: Updates
    mu: Updates | tuple


def scale_by_rms(
    alpha: Hyper = 0.99,
    eps: Hyper = 1e-8,
    centered: bool = False,
    *,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """RMSprop's direction ``g / (sqrt(v) + eps)`` (Hinton's lecture 6e); ``centered`` subtracts the
    squared running mean of the gradient from ``v`` (Graves, arXiv:1308.0850).

    ``accumulator_dtype``: as in :func:`scale_by_adam`.
    """
    call = "scale_by_rms"
    _hyper.check(call, "alpha", alpha, low=0.0)
    _hyper.check(call, "eps", eps, low=0.0)
    _precision.check_accumulator_dtype(call, accumulator_dtype)
    hypers = {"alpha": alpha, "eps": eps}

    def init(params):
        acc = accumulator_dtype
        _check_init(call, params, hypers)
        return ScaleByRmsState(
            _precision.zeros(params, acc), _precision.zeros(params, acc) if centered else ()
        )

    def kernel(g, state, a, e):
        v, ga = state
        v = v * a + g * g * (1 - a)
        if centered:
            ga = ga + (g - ga) * (1 - a)
            avg = safe_sqrt(v - ga * ga)
        else:
            avg = safe_sqrt(v)
        return g / (avg + e), (v, ga)

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByRmsState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.nu", state.nu)
        leaves, spec = optree.tree_flatten(updates)
        mus = optree.tree_leaves(state.mu) if centered else [None] * len(leaves)
        out, (nus, mus) = _precision.run_leaves(
            kernel,
            leaves,
            (optree.tree_leaves(state.nu), mus),
            *_per_leaf(call, hypers, updates),
            accumulator_dtype=accumulator_dtype,
        )
        new_state = ScaleByRmsState(
            _unflatten(spec, nus), _unflatten(spec, mus) if centered else ()
        )
        return _unflatten(spec, out), new_state

    return GradientTransformation(init, update)


class ScaleByAdagradState(NamedTuple):
    step: torch.Tensor
    sum: Updates


def scale_by_adagrad(
    lr_decay: Hyper = 0.0,
    eps: Hyper = 1e-10,
    initial_accumulator_value: float = 0.0,
    *,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Adagrad's direction ``g / (sqrt(sum g^2) + eps) / (1 + (t-1) lr_decay)``.

    Duchi, Hazan & Singer, JMLR 2011. ``accumulator_dtype``: the dtype of ``sum``, as in
    :func:`scale_by_adam`.
    """
    call = "scale_by_adagrad"
    _hyper.check(call, "lr_decay", lr_decay, low=0.0)
    _hyper.check(call, "eps", eps, low=0.0)
    _hyper.check(call, "initial_accumulator_value", initial_accumulator_value, low=0.0)
    _precision.check_accumulator_dtype(call, accumulator_dtype)
    hypers = {"lr_decay": lr_decay, "eps": eps}

    def init(params):
        _check_init(call, params, hypers)
        accs = _hyper.leaves(call, "initial_accumulator_value", initial_accumulator_value, params)
        return ScaleByAdagradState(
            _count(params), _precision.zeros(params, accumulator_dtype, accs)
        )

    def kernel(g, state, dec, e, t):
        (s,) = state
        s = s + g * g
        return g / (safe_sqrt(s) + e) / (1 + (t - 1) * dec), (s,)

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByAdagradState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.sum", state.sum)
        leaves, spec = optree.tree_flatten(updates)
        out, (sums,) = _precision.run_leaves(
            kernel,
            leaves,
            (optree.tree_leaves(state.sum),),
            *_per_leaf(call, hypers, updates),
            shared=(_step(state.step),),
            accumulator_dtype=accumulator_dtype,
        )
        return _unflatten(spec, out), ScaleByAdagradState(state.step + 1, _unflatten(spec, sums))

    return GradientTransformation(init, update)


class ScaleByAdadeltaState(NamedTuple):
    nu: Updates
    acc_delta: Updates


def scale_by_adadelta(
    rho: Hyper = 0.9, eps: Hyper = 1e-6, *, accumulator_dtype: torch.dtype | None = None
) -> GradientTransformation:
    """Adadelta's direction ``sqrt(acc + eps) / sqrt(v + eps) * g`` (Zeiler, arXiv:1212.5701).

    ``accumulator_dtype``: as in :func:`scale_by_adam`.
    """
    call = "scale_by_adadelta"
    _hyper.check(call, "rho", rho, low=0.0, high=1.0)
    _hyper.check(call, "eps", eps, low=0.0)
    _precision.check_accumulator_dtype(call, accumulator_dtype)
    hypers = {"rho": rho, "eps": eps}

    def init(params):
        _check_init(call, params, hypers)
        acc = accumulator_dtype
        return ScaleByAdadeltaState(_precision.zeros(params, acc), _precision.zeros(params, acc))

    def kernel(g, state, r, e):
        v, acc = state
        v = v * r + g * g * (1 - r)
        delta = safe_sqrt(acc + e) / safe_sqrt(v + e) * g
        acc = acc * r + delta * delta * (1 - r)
        return delta, (v, acc)

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByAdadeltaState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.nu", state.nu)
        leaves, spec = optree.tree_flatten(updates)
        out, (nus, accs) = _precision.run_leaves(
            kernel,
            leaves,
            (optree.tree_leaves(state.nu), optree.tree_leaves(state.acc_delta)),
            *_per_leaf(call, hypers, updates),
            accumulator_dtype=accumulator_dtype,
        )
        new_state = ScaleByAdadeltaState(_unflatten(spec, nus), _unflatten(spec, accs))
        return _unflatten(spec, out), new_state

    return GradientTransformation(init, update)


class ScaleByRpropState(NamedTuple):
    prev: Updates
    step_size: Updates


def scale_by_rprop(
    lr: Hyper = 1e-2,
    etas: Sequence[Hyper] = (0.5, 1.2),
    step_sizes: Sequence[Hyper] = (1e-6, 50.0),
    *,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Rprop's direction ``sign(g) * step`` with per-coordinate step sizes.

    Riedmiller & Braun, ICNN 1993.

    Step sizes start at ``lr``, grow by ``etas[1]`` while the gradient keeps its sign and shrink by
    ``etas[0]`` when it flips (the flipped coordinate then skips one update), clamped to
    ``step_sizes``. The sign has zero derivative, so meta-gradients flow through the step sizes
    (into ``lr`` and ``etas``), not through the gradient values. ``accumulator_dtype``: the dtype
    of ``prev`` and ``step_size``, as in :func:`scale_by_adam`.
    """
    call = "scale_by_rprop"
    _hyper.check(call, "lr", lr, low=0.0)
    if not isinstance(etas, (tuple, list)) or len(etas) != 2:
        raise TypeError(f"{call}: expected etas to be a pair (etaminus, etaplus), got {etas!r}.")
    if not isinstance(step_sizes, (tuple, list)) or len(step_sizes) != 2:
        raise TypeError(f"{call}: expected step_sizes to be a pair (min, max), got {step_sizes!r}.")
    etaminus = _hyper.check(call, "etas[0]", etas[0], low=0.0, high=1.0, high_open=True)
    etaplus = _hyper.check(call, "etas[1]", etas[1], low=1.0)
    if isinstance(etaminus, (int, float)) and etaminus == 0:
        raise ValueError(f"{call}: expected 0 < etas[0] < 1 < etas[1], got etas={tuple(etas)}.")
    if isinstance(etaplus, (int, float)) and etaplus == 1:
        raise ValueError(f"{call}: expected 0 < etas[0] < 1 < etas[1], got etas={tuple(etas)}.")
    smin = _hyper.check(call, "step_sizes[0]", step_sizes[0], low=0.0)
    smax = _hyper.check(call, "step_sizes[1]", step_sizes[1], low=0.0, allow_inf=True)
    _precision.check_accumulator_dtype(call, accumulator_dtype)
    hypers = {"etas[0]": etaminus, "etas[1]": etaplus, "step_sizes[0]": smin, "step_sizes[1]": smax}

    def init(params):
        _check_init(call, params, {"lr": lr, **hypers})
        lrs = _hyper.leaves(call, "lr", lr, params)
        acc = accumulator_dtype
        return ScaleByRpropState(_precision.zeros(params, acc), _precision.zeros(params, acc, lrs))

    def kernel(g, state, em, ep, lo, hi):
        prev, step = state
        s = g * prev
        one = torch.ones_like(g)
        factor = torch.where(s > 0, one * ep, torch.where(s < 0, one * em, one))
        step = torch.clamp(step * factor, lo, hi)
        g = torch.where(s < 0, 0.0, g)
        return torch.sign(g) * step, (g, step)

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByRpropState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.prev", state.prev)
        leaves, spec = optree.tree_flatten(updates)
        out, (prevs, steps) = _precision.run_leaves(
            kernel,
            leaves,
            (optree.tree_leaves(state.prev), optree.tree_leaves(state.step_size)),
            *_per_leaf(call, hypers, updates),
            accumulator_dtype=accumulator_dtype,
        )
        new_state = ScaleByRpropState(_unflatten(spec, prevs), _unflatten(spec, steps))
        return _unflatten(spec, out), new_state

    return GradientTransformation(init, update)


class ScaleByAsgdState(NamedTuple):
    step: torch.Tensor
    ax: Updates


def scale_by_asgd(
    lr: Hyper = 1e-2,
    lambd: Hyper = 1e-4,
    alpha: Hyper = 0.75,
    t0: float = 1e6,
    *,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Averaged SGD as in ``torch.optim.ASGD`` (Polyak & Juditsky 1992); returns the full update.

    .. math::
        \\eta_t = \\frac{lr}{(1 + \\lambda\\, lr\\, (t-1))^{\\alpha}}, \\quad
        \\theta_t = \\theta_{t-1}(1 - \\lambda \\eta_t) - \\eta_t g_t, \\quad
        \\bar\\theta_t = \\bar\\theta_{t-1} + \\mu_t (\\theta_t - \\bar\\theta_{t-1}),\\;
        \\mu_t = 1 / \\max(1, t - 1 - t_0)

    The average ``state.ax`` is what ASGD evaluates with; the update moves the params to
    ``theta_t``. ``accumulator_dtype``: the dtype of ``ax``, as in :func:`scale_by_adam`.
    """
    call = "scale_by_asgd"
    _hyper.check(call, "lr", lr, low=0.0)
    _hyper.check(call, "lambd", lambd, low=0.0)
    _hyper.check(call, "alpha", alpha)
    if _hyper.is_tree(t0) or isinstance(t0, torch.Tensor):
        raise TypeError(f"{call}: expected t0 to be a number, got {type(t0).__name__}.")
    _hyper.check(call, "t0", t0, allow_inf=True)
    _precision.check_accumulator_dtype(call, accumulator_dtype)
    hypers = {"lr": lr, "lambd": lambd, "alpha": alpha}

    def init(params):
        _check_init(call, params, hypers)
        return ScaleByAsgdState(_count(params), _precision.zeros(params, accumulator_dtype))

    def kernel(g, state, p, r, lam, al, t, mu):
        (ax,) = state
        eta = r / (1 + lam * r * (t - 1)) ** al
        new_p = p * (1 - lam * eta) - eta * g
        return new_p - p, (torch.where(mu == 1, new_p, ax + (new_p - ax) * mu),)

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByAsgdState)
        if params is None:
            raise ValueError(
                f"{call}.update: ASGD's decay term needs the current params, got params=None. "
                f"Call opt.update(grads, state, params)."
            )
        _tree.check_same(f"{call}.update", "updates", updates, "params", params)
        _tree.check_same(f"{call}.update", "updates", updates, "state.ax", state.ax)
        leaves, spec = optree.tree_flatten(updates)
        t = _step(state.step)
        mu = 1.0 / torch.clamp(t - 1 - t0, min=1.0)
        out, (axs,) = _precision.run_leaves(
            kernel,
            leaves,
            (optree.tree_leaves(state.ax),),
            optree.tree_leaves(params),
            *_per_leaf(call, hypers, updates),
            shared=(t, mu),
            accumulator_dtype=accumulator_dtype,
        )
        return _unflatten(spec, out), ScaleByAsgdState(state.step + 1, _unflatten(spec, axs))

    return GradientTransformation(init, update)
