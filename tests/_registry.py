"""The optimizer registry of the test suite: the public one, :mod:`metafunc.testing.optimizers`."""

from __future__ import annotations

from metafunc.testing.optimizers import (
    BY_NAME,
    CASE_CONFIGS,
    REGISTRY,
    OptimizerCase,
    hyper_value,
    loss_fn,
    with_hypers,
)

Case = OptimizerCase

__all__ = [
    "BY_NAME",
    "CASE_CONFIGS",
    "REGISTRY",
    "Case",
    "hyper_value",
    "loss_fn",
    "with_hypers",
]
