"""RMSprop, Adagrad and Adadelta: directions scaled by a running root-mean-square of the gradient.

Each ``scale_by_*`` returns a descent *direction* from a per-leaf kernel
(``(g, *state, *, hyperparameters) -> (direction, *state)``) that :func:`._leafwise.leafwise` runs
on every leaf, in float32 for half-precision leaves.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .._typing import Hyper, Updates
from . import _hyper
from ._base import GradientTransformation
from ._leafwise import leafwise, safe_sqrt, step_number


class ScaleByRmsState(NamedTuple):
    nu: Updates
    mu: Updates | tuple


def rms_kernel(g, v, mean=None, *, alpha, eps, centered=False):
    """RMSprop on one leaf; ``centered`` keeps the running ``mean`` of the gradient too."""
    v = v * alpha + g * g * (1 - alpha)
    if centered:
        mean = mean + (g - mean) * (1 - alpha)
        return g / (safe_sqrt(v - mean * mean) + eps), v, mean
    return g / (safe_sqrt(v) + eps), v


def scale_by_rms(
    alpha: Hyper = 0.99,
    eps: Hyper = 1e-8,
    centered: bool = False,
    *,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """RMSprop's direction ``g / (sqrt(v) + eps)`` (Hinton's lecture 6e); ``centered`` subtracts the
    squared running mean of the gradient from ``v`` (Graves, arXiv:1308.0850).

    ``accumulator_dtype``: the dtype of ``nu`` (and ``mu``), by default float32 for float16 and
    bfloat16 params (whose arithmetic also runs in float32), the params' dtype otherwise.
    """
    call = "scale_by_rms"
    _hyper.check(call, "alpha", alpha, low=0.0)
    _hyper.check(call, "eps", eps, low=0.0)
    return leafwise(
        call,
        functools.partial(rms_kernel, centered=True) if centered else rms_kernel,
        ScaleByRmsState,
        fields=("nu", "mu") if centered else ("nu",),
        hypers={"alpha": ("alpha", alpha), "eps": ("eps", eps)},
        accumulator_dtype=accumulator_dtype,
    )


class ScaleByAdagradState(NamedTuple):
    step: torch.Tensor
    sum: Updates


def adagrad_kernel(g, total, *, lr_decay, eps, t):
    """Adagrad on one leaf: ``total`` is the sum of the squared gradients."""
    total = total + g * g
    return g / (safe_sqrt(total) + eps) / (1 + (t - 1) * lr_decay), total


def scale_by_adagrad(
    lr_decay: Hyper = 0.0,
    eps: Hyper = 1e-10,
    initial_accumulator_value: float = 0.0,
    *,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Adagrad's direction ``g / (sqrt(sum g^2) + eps) / (1 + (t-1) lr_decay)``.

    Duchi, Hazan & Singer, JMLR 2011. ``accumulator_dtype``: the dtype of ``sum``, as in
    :func:`scale_by_rms`.
    """
    call = "scale_by_adagrad"
    _hyper.check(call, "lr_decay", lr_decay, low=0.0)
    _hyper.check(call, "eps", eps, low=0.0)
    _hyper.check(call, "initial_accumulator_value", initial_accumulator_value, low=0.0)
    return leafwise(
        call,
        adagrad_kernel,
        ScaleByAdagradState,
        fields=("sum",),
        hypers={"lr_decay": ("lr_decay", lr_decay), "eps": ("eps", eps)},
        schedule=step_number,
        fill={"sum": ("initial_accumulator_value", initial_accumulator_value)},
        accumulator_dtype=accumulator_dtype,
    )


class ScaleByAdadeltaState(NamedTuple):
    nu: Updates
    acc_delta: Updates


def adadelta_kernel(g, v, acc, *, rho, eps):
    """Adadelta on one leaf: ``v`` and ``acc`` average the squared gradients and deltas."""
    v = v * rho + g * g * (1 - rho)
    delta = safe_sqrt(acc + eps) / safe_sqrt(v + eps) * g
    acc = acc * rho + delta * delta * (1 - rho)
    return delta, v, acc


def scale_by_adadelta(
    rho: Hyper = 0.9, eps: Hyper = 1e-6, *, accumulator_dtype: torch.dtype | None = None
) -> GradientTransformation:
    """Adadelta's direction ``sqrt(acc + eps) / sqrt(v + eps) * g`` (Zeiler, arXiv:1212.5701).

    ``accumulator_dtype``: as in :func:`scale_by_rms`.
    """
    call = "scale_by_adadelta"
    _hyper.check(call, "rho", rho, low=0.0, high=1.0)
    _hyper.check(call, "eps", eps, low=0.0)
    return leafwise(
        call,
        adadelta_kernel,
        ScaleByAdadeltaState,
        fields=("nu", "acc_delta"),
        hypers={"rho": ("rho", rho), "eps": ("eps", eps)},
        accumulator_dtype=accumulator_dtype,
    )
