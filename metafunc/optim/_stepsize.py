"""Rprop and averaged SGD: rules that set their own step size and return the full update.

Each is a per-leaf kernel (``(g, *state, *, hyperparameters) -> (update, *state)``) that
:func:`._leafwise.leafwise` runs on every leaf, in float32 for half-precision leaves.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .._typing import Hyper, Updates
from . import _hyper
from ._base import GradientTransformation
from ._leafwise import leafwise, step_number


class ScaleByRpropState(NamedTuple):
    prev: Updates
    step_size: Updates


def rprop_kernel(g, prev, step, *, etaminus, etaplus, min_step, max_step):
    """Rprop on one leaf: ``prev`` is the last gradient (0 where it flipped sign), ``step`` the
    per-coordinate step sizes."""
    s = g * prev
    one = torch.ones_like(g)
    factor = torch.where(s > 0, one * etaplus, torch.where(s < 0, one * etaminus, one))
    step = torch.clamp(step * factor, min_step, max_step)
    g = torch.where(s < 0, 0.0, g)
    return torch.sign(g) * step, g, step


def _pair(call: str, name: str, value: Sequence[Hyper], what: str) -> Sequence[Hyper]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{call}: expected {name} to be a pair {what}, got {value!r}.")
    return value


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
    of ``prev`` and ``step_size``: by default float32 for float16 and bfloat16 params (whose
    arithmetic also runs in float32), the params' dtype otherwise.
    """
    call = "scale_by_rprop"
    _hyper.check(call, "lr", lr, low=0.0)
    etas = _pair(call, "etas", etas, "(etaminus, etaplus)")
    step_sizes = _pair(call, "step_sizes", step_sizes, "(min, max)")
    etaminus = _hyper.check(call, "etas[0]", etas[0], low=0.0, high=1.0, high_open=True)
    etaplus = _hyper.check(call, "etas[1]", etas[1], low=1.0)
    if isinstance(etaminus, (int, float)) and etaminus == 0:
        raise ValueError(f"{call}: expected 0 < etas[0] < 1 < etas[1], got etas={tuple(etas)}.")
    if isinstance(etaplus, (int, float)) and etaplus == 1:
        raise ValueError(f"{call}: expected 0 < etas[0] < 1 < etas[1], got etas={tuple(etas)}.")
    smin = _hyper.check(call, "step_sizes[0]", step_sizes[0], low=0.0)
    smax = _hyper.check(call, "step_sizes[1]", step_sizes[1], low=0.0, allow_inf=True)
    return leafwise(
        call,
        rprop_kernel,
        ScaleByRpropState,
        fields=("prev", "step_size"),
        hypers={
            "etaminus": ("etas[0]", etaminus),
            "etaplus": ("etas[1]", etaplus),
            "min_step": ("step_sizes[0]", smin),
            "max_step": ("step_sizes[1]", smax),
        },
        fill={"step_size": ("lr", lr)},
        accumulator_dtype=accumulator_dtype,
    )


class ScaleByAsgdState(NamedTuple):
    step: torch.Tensor
    ax: Updates


def asgd_kernel(g, ax, *, p, lr, lambd, alpha, t, mu):
    """ASGD on one leaf: the step to ``theta_t`` from the param ``p``, and the new average."""
    eta = lr / (1 + lambd * lr * (t - 1)) ** alpha
    new_p = p * (1 - lambd * eta) - eta * g
    return new_p - p, torch.where(mu == 1, new_p, ax + (new_p - ax) * mu)


def asgd_schedule(step: torch.Tensor, *, t0: float) -> dict[str, torch.Tensor]:
    """The step number ``t`` and the averaging weight ``mu_t = 1 / max(1, t - 1 - t0)``."""
    t = step_number(step)["t"]
    return {"t": t, "mu": 1.0 / torch.clamp(t - 1 - t0, min=1.0)}


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
    ``theta_t``, so ``update`` needs them. ``accumulator_dtype``: the dtype of ``ax``, as in
    :func:`scale_by_rprop`.
    """
    call = "scale_by_asgd"
    _hyper.check(call, "lr", lr, low=0.0)
    _hyper.check(call, "lambd", lambd, low=0.0)
    _hyper.check(call, "alpha", alpha)
    if _hyper.is_tree(t0) or isinstance(t0, torch.Tensor):
        raise TypeError(f"{call}: expected t0 to be a number, got {type(t0).__name__}.")
    _hyper.check(call, "t0", t0, allow_inf=True)
    return leafwise(
        call,
        asgd_kernel,
        ScaleByAsgdState,
        fields=("ax",),
        hypers={"lr": ("lr", lr), "lambd": ("lambd", lambd), "alpha": ("alpha", alpha)},
        schedule=functools.partial(asgd_schedule, t0=t0),
        params="use",
        accumulator_dtype=accumulator_dtype,
    )
