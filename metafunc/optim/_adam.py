"""The Adam family: Adam (and AMSGrad), Adamax, NAdam and RAdam, as per-leaf kernels.

Each ``scale_by_*`` returns a descent *direction*; the named optimizers in ``_alias.py`` chain it
with :func:`scale_by_learning_rate`. A kernel is the rule for one leaf
(``(g, *state, *, hyperparameters, t) -> (direction, *state)``, ``t`` the 1-based step as a float64
tensor); :func:`._leafwise.leafwise` runs it on every leaf, in float32 for half-precision leaves.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .._typing import Hyper, Updates
from . import _hyper
from ._base import GradientTransformation
from ._leafwise import leafwise, safe_sqrt, step_number


def betas_pair(call: str, betas: Sequence[Hyper]) -> tuple[Hyper, Hyper]:
    """In a factory: ``betas`` is a pair of numbers in ``[0, 1)`` (or tensors, or pytrees)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(
            f"{call}: expected betas to be a pair (beta1, beta2), got {betas!r}. "
            f"Pass e.g. betas=(0.9, 0.999)."
        )
    b1 = _hyper.check(call, "betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    b2 = _hyper.check(call, "betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    return b1, b2


def _hypers(call: str, betas: Sequence[Hyper], eps: Hyper) -> dict[str, tuple[str, Hyper]]:
    """The family's shared hyperparameters, validated, as :func:`leafwise` takes them."""
    b1, b2 = betas_pair(call, betas)
    _hyper.check(call, "eps", eps, low=0.0)
    return {"b1": ("betas[0]", b1), "b2": ("betas[1]", b2), "eps": ("eps", eps)}


class ScaleByAdamState(NamedTuple):
    step: torch.Tensor
    mu: Updates
    nu: Updates
    nu_max: Updates | tuple


def adam_kernel(g, m, v, vmax=None, *, b1, b2, eps, t, amsgrad=False):
    """Adam on one leaf; with ``amsgrad``, ``vmax`` is the running maximum of ``v``."""
    m = m + (g - m) * (1 - b1)
    v = v * b2 + g * g * (1 - b2)
    if amsgrad:
        vmax = torch.maximum(vmax, v)
    denom = safe_sqrt(vmax if amsgrad else v) / torch.sqrt(1 - b2**t) + eps
    direction = m / denom / (1 - b1**t)
    return (direction, m, v, vmax) if amsgrad else (direction, m, v)


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
    return leafwise(
        call,
        functools.partial(adam_kernel, amsgrad=True) if amsgrad else adam_kernel,
        ScaleByAdamState,
        fields=("mu", "nu", "nu_max") if amsgrad else ("mu", "nu"),
        hypers=_hypers(call, betas, eps),
        schedule=step_number,
        accumulator_dtype=accumulator_dtype,
    )


class ScaleByAdamaxState(NamedTuple):
    step: torch.Tensor
    mu: Updates
    u_inf: Updates


def adamax_kernel(g, m, u, *, b1, b2, eps, t):
    """Adamax on one leaf: ``u`` is the exponentially weighted infinity norm."""
    m = m + (g - m) * (1 - b1)
    u = torch.maximum(u * b2, g.abs() + eps)
    return m / u / (1 - b1**t), m, u


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
    return leafwise(
        call,
        adamax_kernel,
        ScaleByAdamaxState,
        fields=("mu", "u_inf"),
        hypers=_hypers(call, betas, eps),
        schedule=step_number,
        accumulator_dtype=accumulator_dtype,
    )


class ScaleByNadamState(NamedTuple):
    step: torch.Tensor
    mu_product: Updates
    mu: Updates
    nu: Updates


def nadam_kernel(g, m, v, product, *, b1, b2, eps, momentum_decay, t):
    """NAdam on one leaf; ``product`` is the running product of the momentum coefficients, a
    float64 number."""
    mu_t = b1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    product = product * mu_t
    m = m + (g - m) * (1 - b1)
    v = v * b2 + g * g * (1 - b2)
    denom = safe_sqrt(v / (1 - b2**t)) + eps
    direction = g / denom * ((1.0 - mu_t) / (1.0 - product)) + m / denom * (
        mu_next / (1.0 - product * mu_next)
    )
    return direction, m, v, product


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
    hypers = _hypers(call, betas, eps)
    _hyper.check(call, "momentum_decay", momentum_decay, low=0.0)
    return leafwise(
        call,
        nadam_kernel,
        ScaleByNadamState,
        fields=("mu", "nu", "mu_product"),
        hypers={**hypers, "momentum_decay": ("momentum_decay", momentum_decay)},
        schedule=step_number,
        products=("mu_product",),
        accumulator_dtype=accumulator_dtype,
    )


class ScaleByRadamState(NamedTuple):
    step: torch.Tensor
    mu: Updates
    nu: Updates


def radam_kernel(g, m, v, *, b1, b2, eps, t):
    """RAdam on one leaf: the rectified adaptive step once its variance is tractable."""
    m = m + (g - m) * (1 - b1)
    v = v * b2 + g * g * (1 - b2)
    bc2 = 1 - b2**t
    m_hat = m / (1 - b1**t)
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * (b2**t) / bc2
    tractable = rho_t > 5.0
    rect_sq = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    rect = torch.sqrt(torch.where(tractable, rect_sq, 1.0))
    adaptive = torch.sqrt(bc2) / (safe_sqrt(v) + eps)
    return torch.where(tractable, m_hat * adaptive * rect, m_hat), m, v


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
    return leafwise(
        call,
        radam_kernel,
        ScaleByRadamState,
        fields=("mu", "nu"),
        hypers=_hypers(call, betas, eps),
        schedule=step_number,
        accumulator_dtype=accumulator_dtype,
    )
