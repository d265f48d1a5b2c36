"""Gradient estimators for meta-losses of long unrolls: truncated backprop, ES and PES.

An :class:`Unroll` ``(init, step)`` describes the long inner computation (training a model with a
learned optimizer, say); an estimator cuts it into truncations of ``steps`` steps and, at each
``estimate``, returns a gradient estimate for the meta-parameters ``theta``:

- :func:`backprop`: exact within a truncation (exact overall when ``steps == horizon``); biased
  when truncated;
- :func:`es`: antithetic evolution strategies per truncation, vmapped over the perturbations;
  needs no backward pass; biased when truncated, as truncated backprop is;
- :func:`pes`: persistent evolution strategies, unbiased over the truncations of an unroll.

All three share one call shape: ``state = est.init(theta, seed=0)``;
``grad, loss, state = est.estimate(theta, state)``. :func:`meta_train` runs one with a
:mod:`metafunc.optim` meta-optimizer.
"""

from ._estimators import (
    Estimate,
    GradientEstimator,
    PESState,
    TruncatedState,
    backprop,
    es,
    pes,
)
from ._loop import MetaTrainResult, meta_train
from ._unroll import Unroll, optimizer_unroll

__all__ = [
    "Estimate",
    "GradientEstimator",
    "MetaTrainResult",
    "PESState",
    "TruncatedState",
    "Unroll",
    "backprop",
    "es",
    "meta_train",
    "optimizer_unroll",
    "pes",
]
