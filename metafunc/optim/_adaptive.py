"""Adaptive scalings: the per-coordinate rules behind Adam, RMSprop, Adagrad and their relatives.

Each ``scale_by_*`` returns a descent *direction*; the named optimizers in ``_alias.py`` chain it
with :func:`scale_by_learning_rate`. Square roots of second-moment estimates use
:func:`safe_sqrt`, so an exactly-zero gradient entry gives a finite meta-gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import optree
import torch

from .. import _tree
from .._typing import Hyper, Updates
from . import _hyper
from ._base import GradientTransformation, _count, check_state
from ._hyper import safe_sqrt


def _zeros(params):
    return optree.tree_map(torch.zeros_like, params)


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


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _up(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Half-precision leaves are computed in float32 (results are cast back to the leaf dtype), so
    that ``eps=1e-8`` does not underflow to 0 in float16 and turn a zero gradient into 0/0."""
    if tensors[0].dtype in _LOW_PRECISION:
        return tuple(t.float() for t in tensors)
    return tensors


class ScaleByAdamState(NamedTuple):
    step: torch.Tensor
    mu: Updates
    nu: Updates
    nu_max: Updates | tuple


def scale_by_adam(
    betas: Sequence[Hyper] = (0.9, 0.999), eps: Hyper = 1e-8, amsgrad: bool = False
) -> GradientTransformation:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` (Kingma & Ba, arXiv:1412.6980).

    .. math::
        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\quad
        v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2, \\quad
        d_t = \\frac{m_t / (1-\\beta_1^t)}{\\sqrt{v_t} / \\sqrt{1-\\beta_2^t} + \\epsilon}

    With ``amsgrad`` the running maximum of ``v_t`` replaces ``v_t`` (Reddi et al., ICLR 2018).
    """
    call = "scale_by_adam"
    b1, b2 = _betas(call, betas)
    _hyper.check(call, "eps", eps, low=0.0)
    hypers = {"betas[0]": b1, "betas[1]": b2, "eps": eps}

    def init(params):
        _check_init(call, params, hypers)
        return ScaleByAdamState(
            _count(params), _zeros(params), _zeros(params), _zeros(params) if amsgrad else ()
        )

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByAdamState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.mu", state.mu)
        leaves, spec = optree.tree_flatten(updates)
        t = _step(state.step)
        b1s, b2s, epss = _per_leaf(call, hypers, updates)
        vmaxs = optree.tree_leaves(state.nu_max) if amsgrad else [None] * len(leaves)
        mus, nus, maxs, out = [], [], [], []
        for g, m, v, vmax, c1, c2, e in zip(
            leaves,
            optree.tree_leaves(state.mu),
            optree.tree_leaves(state.nu),
            vmaxs,
            b1s,
            b2s,
            epss,
        ):
            dt = g.dtype
            g, m, v = _up(g, m, v)
            m = m + (g - m) * (1 - c1)
            v = v * c2 + g * g * (1 - c2)
            mus.append(m.to(dt))
            nus.append(v.to(dt))
            if amsgrad:
                v = torch.maximum(vmax, v)
                maxs.append(v.to(dt))
            denom = safe_sqrt(v) / torch.sqrt(1 - c2**t) + e
            out.append((m / denom / (1 - c1**t)).to(dt))
        new_state = ScaleByAdamState(
            state.step + 1,
            optree.tree_unflatten(spec, mus),
            optree.tree_unflatten(spec, nus),
            optree.tree_unflatten(spec, maxs) if amsgrad else (),
        )
        return optree.tree_unflatten(spec, out), new_state

    return GradientTransformation(init, update)


class ScaleByAdamaxState(NamedTuple):
    step: torch.Tensor
    mu: Updates
    u_inf: Updates


def scale_by_adamax(
    betas: Sequence[Hyper] = (0.9, 0.999), eps: Hyper = 1e-8
) -> GradientTransformation:
    """Adamax's direction ``m_hat / u``, ``u_t = max(beta2 u_{t-1}, |g_t| + eps)``.

    Kingma & Ba, arXiv:1412.6980, section 7.
    """
    call = "scale_by_adamax"
    b1, b2 = _betas(call, betas)
    _hyper.check(call, "eps", eps, low=0.0)
    hypers = {"betas[0]": b1, "betas[1]": b2, "eps": eps}

    def init(params):
        _check_init(call, params, hypers)
        return ScaleByAdamaxState(_count(params), _zeros(params), _zeros(params))

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByAdamaxState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.mu", state.mu)
        leaves, spec = optree.tree_flatten(updates)
        t = _step(state.step)
        b1s, b2s, epss = _per_leaf(call, hypers, updates)
        mus, us, out = [], [], []
        for g, m, u, c1, c2, e in zip(
            leaves, optree.tree_leaves(state.mu), optree.tree_leaves(state.u_inf), b1s, b2s, epss
        ):
            dt = g.dtype
            g, m, u = _up(g, m, u)
            m = m + (g - m) * (1 - c1)
            u = torch.maximum(u * c2, g.abs() + e)
            mus.append(m.to(dt))
            us.append(u.to(dt))
            out.append((m / u / (1 - c1**t)).to(dt))
        new_state = ScaleByAdamaxState(
            state.step + 1, optree.tree_unflatten(spec, mus), optree.tree_unflatten(spec, us)
        )
        return optree.tree_unflatten(spec, out), new_state

    return GradientTransformation(init, update)


class ScaleByNadamState(NamedTuple):
    step: torch.Tensor
    mu_product: Updates
    mu: Updates
    nu: Updates


def scale_by_nadam(
    betas: Sequence[Hyper] = (0.9, 0.999), eps: Hyper = 1e-8, momentum_decay: Hyper = 4e-3
) -> GradientTransformation:
    """NAdam's direction with torch's momentum schedule (Dozat 2016).

    .. math::
        \\mu_t = \\beta_1 (1 - \\tfrac12 0.96^{t \\psi}), \\quad
        d_t = \\frac{(1-\\mu_t)\\, g_t}{(1-\\prod_{i\\le t}\\mu_i)(\\sqrt{\\hat v_t}+\\epsilon)}
            + \\frac{\\mu_{t+1}\\, m_t}{(1-\\prod_{i\\le t+1}\\mu_i)(\\sqrt{\\hat v_t}+\\epsilon)}
    """
    call = "scale_by_nadam"
    b1, b2 = _betas(call, betas)
    _hyper.check(call, "eps", eps, low=0.0)
    _hyper.check(call, "momentum_decay", momentum_decay, low=0.0)
    hypers = {"betas[0]": b1, "betas[1]": b2, "eps": eps, "momentum_decay": momentum_decay}

    def init(params):
        _check_init(call, params, hypers)
        ones = optree.tree_map(
            lambda p: torch.ones((), dtype=torch.float64, device=p.device), params
        )
        return ScaleByNadamState(_count(params), ones, _zeros(params), _zeros(params))

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByNadamState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.mu", state.mu)
        leaves, spec = optree.tree_flatten(updates)
        t = _step(state.step)
        b1s, b2s, epss, mds = _per_leaf(call, hypers, updates)
        prods, mus, nus, out = [], [], [], []
        for g, prod, m, v, c1, c2, e, md in zip(
            leaves,
            optree.tree_leaves(state.mu_product),
            optree.tree_leaves(state.mu),
            optree.tree_leaves(state.nu),
            b1s,
            b2s,
            epss,
            mds,
        ):
            mu_t = c1 * (1.0 - 0.5 * 0.96 ** (t * md))
            mu_next = c1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * md))
            prod = prod * mu_t
            dt = g.dtype
            g, m, v = _up(g, m, v)
            m = m + (g - m) * (1 - c1)
            v = v * c2 + g * g * (1 - c2)
            denom = safe_sqrt(v / (1 - c2**t)) + e
            d = g / denom * ((1.0 - mu_t) / (1.0 - prod)) + m / denom * (
                mu_next / (1.0 - prod * mu_next)
            )
            prods.append(prod)
            mus.append(m.to(dt))
            nus.append(v.to(dt))
            out.append(d.to(dt))
        new_state = ScaleByNadamState(
            state.step + 1,
            optree.tree_unflatten(spec, prods),
            optree.tree_unflatten(spec, mus),
            optree.tree_unflatten(spec, nus),
        )
        return optree.tree_unflatten(spec, out), new_state

    return GradientTransformation(init, update)


class ScaleByRadamState(NamedTuple):
    step: torch.Tensor
    mu: Updates
    nu: Updates


def scale_by_radam(
    betas: Sequence[Hyper] = (0.9, 0.999), eps: Hyper = 1e-8
) -> GradientTransformation:
    """Rectified Adam's direction (Liu et al., arXiv:1908.03265), with torch's ``rho_t > 5``.

    While the variance of the adaptive rate is intractable (``rho_t <= 5``) the direction is the
    bias-corrected momentum ``m_hat``; afterwards it is
    ``r_t * m_hat * sqrt(1-beta2^t) / (sqrt(v)+eps)``.
    """
    call = "scale_by_radam"
    b1, b2 = _betas(call, betas)
    _hyper.check(call, "eps", eps, low=0.0)
    hypers = {"betas[0]": b1, "betas[1]": b2, "eps": eps}

    def init(params):
        _check_init(call, params, hypers)
        return ScaleByRadamState(_count(params), _zeros(params), _zeros(params))

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByRadamState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.mu", state.mu)
        leaves, spec = optree.tree_flatten(updates)
        t = _step(state.step)
        b1s, b2s, epss = _per_leaf(call, hypers, updates)
        mus, nus, out = [], [], []
        for g, m, v, c1, c2, e in zip(
            leaves, optree.tree_leaves(state.mu), optree.tree_leaves(state.nu), b1s, b2s, epss
        ):
            dt = g.dtype
            g, m, v = _up(g, m, v)
            m = m + (g - m) * (1 - c1)
            v = v * c2 + g * g * (1 - c2)
            mus.append(m.to(dt))
            nus.append(v.to(dt))
            bc2 = 1 - c2**t
            m_hat = m / (1 - c1**t)
            rho_inf = 2 / (1 - c2) - 1
            rho_t = rho_inf - 2 * t * (c2**t) / bc2
            tractable = rho_t > 5.0
            rect_sq = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            rect = torch.sqrt(torch.where(tractable, rect_sq, 1.0))
            adaptive = torch.sqrt(bc2) / (safe_sqrt(v) + e)
            d = torch.where(tractable, m_hat * adaptive * rect, m_hat)
            out.append(d.to(dt))
        new_state = ScaleByRadamState(
            state.step + 1, optree.tree_unflatten(spec, mus), optree.tree_unflatten(spec, nus)
        )
        return optree.tree_unflatten(spec, out), new_state

    return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
    nu: Updates
    mu: Updates | tuple


def scale_by_rms(
    alpha: Hyper = 0.99, eps: Hyper = 1e-8, centered: bool = False
) -> GradientTransformation:
    """RMSprop's direction ``g / (sqrt(v) + eps)`` (Hinton's lecture 6e); ``centered`` subtracts the
    squared running mean of the gradient from ``v`` (Graves, arXiv:1308.0850)."""
    call = "scale_by_rms"
    _hyper.check(call, "alpha", alpha, low=0.0)
    _hyper.check(call, "eps", eps, low=0.0)
    hypers = {"alpha": alpha, "eps": eps}

    def init(params):
        _check_init(call, params, hypers)
        return ScaleByRmsState(_zeros(params), _zeros(params) if centered else ())

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByRmsState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.nu", state.nu)
        leaves, spec = optree.tree_flatten(updates)
        alphas, epss = _per_leaf(call, hypers, updates)
        mus = optree.tree_leaves(state.mu) if centered else [None] * len(leaves)
        new_nu, new_mu, out = [], [], []
        for g, v, ga, a, e in zip(leaves, optree.tree_leaves(state.nu), mus, alphas, epss):
            dt = g.dtype
            g, v = _up(g, v)
            v = v * a + g * g * (1 - a)
            new_nu.append(v.to(dt))
            if centered:
                assert ga is not None  # centered: mus holds the gradient averages
                (ga,) = _up(ga)
                ga = ga + (g - ga) * (1 - a)
                new_mu.append(ga.to(dt))
                avg = safe_sqrt(v - ga * ga)
            else:
                avg = safe_sqrt(v)
            out.append((g / (avg + e)).to(dt))
        new_state = ScaleByRmsState(
            optree.tree_unflatten(spec, new_nu),
            optree.tree_unflatten(spec, new_mu) if centered else (),
        )
        return optree.tree_unflatten(spec, out), new_state

    return GradientTransformation(init, update)


class ScaleByAdagradState(NamedTuple):
    step: torch.Tensor
    sum: Updates


def scale_by_adagrad(
    lr_decay: Hyper = 0.0, eps: Hyper = 1e-10, initial_accumulator_value: float = 0.0
) -> GradientTransformation:
    """Adagrad's direction ``g / (sqrt(sum g^2) + eps) / (1 + (t-1) lr_decay)``.

    Duchi, Hazan & Singer, JMLR 2011.
    """
    call = "scale_by_adagrad"
    _hyper.check(call, "lr_decay", lr_decay, low=0.0)
    _hyper.check(call, "eps", eps, low=0.0)
    _hyper.check(call, "initial_accumulator_value", initial_accumulator_value, low=0.0)
    hypers = {"lr_decay": lr_decay, "eps": eps}

    def init(params):
        _check_init(call, params, hypers)
        accs = _hyper.leaves(call, "initial_accumulator_value", initial_accumulator_value, params)
        leaves, spec = optree.tree_flatten(params)
        sums = [(torch.zeros_like(p) + a).to(p.dtype) for p, a in zip(leaves, accs)]
        return ScaleByAdagradState(_count(params), optree.tree_unflatten(spec, sums))

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByAdagradState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.sum", state.sum)
        leaves, spec = optree.tree_flatten(updates)
        t = _step(state.step)
        decays, epss = _per_leaf(call, hypers, updates)
        sums, out = [], []
        for g, s, dec, e in zip(leaves, optree.tree_leaves(state.sum), decays, epss):
            dt = g.dtype
            g, s = _up(g, s)
            s = s + g * g
            sums.append(s.to(dt))
            out.append((g / (safe_sqrt(s) + e) / (1 + (t - 1) * dec)).to(dt))
        return optree.tree_unflatten(spec, out), ScaleByAdagradState(
            state.step + 1, optree.tree_unflatten(spec, sums)
        )

    return GradientTransformation(init, update)


class ScaleByAdadeltaState(NamedTuple):
    nu: Updates
    acc_delta: Updates


def scale_by_adadelta(rho: Hyper = 0.9, eps: Hyper = 1e-6) -> GradientTransformation:
    """Adadelta's direction ``sqrt(acc + eps) / sqrt(v + eps) * g`` (Zeiler, arXiv:1212.5701)."""
    call = "scale_by_adadelta"
    _hyper.check(call, "rho", rho, low=0.0, high=1.0)
    _hyper.check(call, "eps", eps, low=0.0)
    hypers = {"rho": rho, "eps": eps}

    def init(params):
        _check_init(call, params, hypers)
        return ScaleByAdadeltaState(_zeros(params), _zeros(params))

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByAdadeltaState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.nu", state.nu)
        leaves, spec = optree.tree_flatten(updates)
        rhos, epss = _per_leaf(call, hypers, updates)
        nus, accs, out = [], [], []
        for g, v, acc, r, e in zip(
            leaves, optree.tree_leaves(state.nu), optree.tree_leaves(state.acc_delta), rhos, epss
        ):
            dt = g.dtype
            g, v, acc = _up(g, v, acc)
            v = v * r + g * g * (1 - r)
            delta = safe_sqrt(acc + e) / safe_sqrt(v + e) * g
            acc = acc * r + delta * delta * (1 - r)
            nus.append(v.to(dt))
            accs.append(acc.to(dt))
            out.append(delta.to(dt))
        return optree.tree_unflatten(spec, out), ScaleByAdadeltaState(
            optree.tree_unflatten(spec, nus), optree.tree_unflatten(spec, accs)
        )

    return GradientTransformation(init, update)


class ScaleByRpropState(NamedTuple):
    prev: Updates
    step_size: Updates


def scale_by_rprop(
    lr: Hyper = 1e-2,
    etas: Sequence[Hyper] = (0.5, 1.2),
    step_sizes: Sequence[Hyper] = (1e-6, 50.0),
) -> GradientTransformation:
    """Rprop's direction ``sign(g) * step`` with per-coordinate step sizes.

    Riedmiller & Braun, ICNN 1993.

    Step sizes start at ``lr``, grow by ``etas[1]`` while the gradient keeps its sign and shrink by
    ``etas[0]`` when it flips (the flipped coordinate then skips one update), clamped to
    ``step_sizes``. The sign has zero derivative, so meta-gradients flow through the step sizes
    (into ``lr`` and ``etas``), not through the gradient values.
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
    hypers = {"etas[0]": etaminus, "etas[1]": etaplus, "step_sizes[0]": smin, "step_sizes[1]": smax}

    def init(params):
        _check_init(call, params, {"lr": lr, **hypers})
        lrs = _hyper.leaves(call, "lr", lr, params)
        leaves, spec = optree.tree_flatten(params)
        steps = [(torch.zeros_like(p) + r).to(p.dtype) for p, r in zip(leaves, lrs)]
        return ScaleByRpropState(_zeros(params), optree.tree_unflatten(spec, steps))

    def update(updates, state, params=None):
        check_state(f"{call}.update", call, state, ScaleByRpropState)
        _tree.check_same(f"{call}.update", "updates", updates, "state.prev", state.prev)
        leaves, spec = optree.tree_flatten(updates)
        ems, eps_, lows, highs = _per_leaf(call, hypers, updates)
        prevs, steps, out = [], [], []
        for g, prev, step, em, ep, lo, hi in zip(
            leaves,
            optree.tree_leaves(state.prev),
            optree.tree_leaves(state.step_size),
            ems,
            eps_,
            lows,
            highs,
        ):
            s = g * prev
            one = torch.ones_like(g)
            factor = torch.where(s > 0, one * ep, torch.where(s < 0, one * em, one))
            step = torch.clamp(step * factor, lo, hi).to(g.dtype)
            g = torch.where(s < 0, 0.0, g)
            prevs.append(g)
            steps.append(step)
            out.append((torch.sign(g) * step).to(g.dtype))
        return optree.tree_unflatten(spec, out), ScaleByRpropState(
            optree.tree_unflatten(spec, prevs), optree.tree_unflatten(spec, steps)
        )

    return GradientTransformation(init, update)


class ScaleByAsgdState(NamedTuple):
    step: torch.Tensor
    ax: Updates


def scale_by_asgd(
    lr: Hyper = 1e-2, lambd: Hyper = 1e-4, alpha: Hyper = 0.75, t0: float = 1e6
) -> GradientTransformation:
    """Averaged SGD as in ``torch.optim.ASGD`` (Polyak & Juditsky 1992); returns the full update.

    .. math::
        \\eta_t = \\frac{lr}{(1 + \\lambda\\, lr\\, (t-1))^{\\alpha}}, \\quad
        \\theta_t = \\theta_{t-1}(1 - \\lambda \\eta_t) - \\eta_t g_t, \\quad
        \\bar\\theta_t = \\bar\\theta_{t-1} + \\mu_t (\\theta_t - \\bar\\theta_{t-1}),\\;
        \\mu_t = 1 / \\max(1, t - 1 - t_0)

    The average ``state.ax`` is what ASGD evaluates with; the update moves the params to
    ``theta_t``.
    """
    call = "scale_by_asgd"
    _hyper.check(call, "lr", lr, low=0.0)
    _hyper.check(call, "lambd", lambd, low=0.0)
    _hyper.check(call, "alpha", alpha)
    if _hyper.is_tree(t0) or isinstance(t0, torch.Tensor):
        raise TypeError(f"{call}: expected t0 to be a number, got {type(t0).__name__}.")
    _hyper.check(call, "t0", t0, allow_inf=True)
    hypers = {"lr": lr, "lambd": lambd, "alpha": alpha}

    def init(params):
        _check_init(call, params, hypers)
        return ScaleByAsgdState(_count(params), _zeros(params))

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
        lrs, lambds, alphas = _per_leaf(call, hypers, updates)
        mu = 1.0 / torch.clamp(t - 1 - t0, min=1.0)
        axs, out = [], []
        for g, p, ax, r, lam, al in zip(
            leaves, optree.tree_leaves(params), optree.tree_leaves(state.ax), lrs, lambds, alphas
        ):
            eta = r / (1 + lam * r * (t - 1)) ** al
            new_p = (p * (1 - lam * eta) - eta * g).to(p.dtype)
            axs.append(torch.where(mu == 1, new_p, ax + (new_p - ax) * mu).to(p.dtype))
            out.append((new_p - p).to(g.dtype))
        return optree.tree_unflatten(spec, out), ScaleByAsgdState(
            state.step + 1, optree.tree_unflatten(spec, axs)
        )

    return GradientTransformation(init, update)
