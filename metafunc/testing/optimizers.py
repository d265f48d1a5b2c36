"""Every named optimizer of :mod:`metafunc.optim` with its ``torch.optim`` oracle: the registry.

Each :class:`OptimizerCase` pairs a metafunc optimizer factory with its ``torch.optim`` namesake
(the oracle of the trajectory tests), lists configurations (hyperparameter values as Python
numbers, each a valid combination of flags) and the hyperparameters that are smooth enough to be
differentiated when given as learnable tensors. Generic properties (purity, structure and dtype
preservation, vmap == loop, derivatives against finite differences) run over :data:`REGISTRY`,
in optax's ``alias_test`` style; :func:`metafunc.testing.strategies.optimizers` draws from it.

Example:
    >>> from metafunc.testing.optimizers import BY_NAME, with_hypers
    >>> case = BY_NAME["adam"]
    >>> case.theirs.__name__, case.learnable[:2]
    ('Adam', ('lr', 'betas.0'))
    >>> with_hypers(case.configs[0], {"betas.1": 0.99})
    {'lr': 0.01, 'betas': (0.9, 0.99)}
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import metafunc.optim as mo

__all__ = [
    "BY_NAME",
    "CASE_CONFIGS",
    "RANGES",
    "REGISTRY",
    "OptimizerCase",
    "hyper_value",
    "loss_fn",
    "with_hypers",
]


@dataclass(frozen=True)
class OptimizerCase:
    """One optimizer of the registry."""

    name: str
    """The factory's name in :mod:`metafunc.optim` (``"adam"``)."""
    ours: Callable[..., mo.GradientTransformation]
    """The metafunc factory."""
    theirs: type[torch.optim.Optimizer]
    """The ``torch.optim`` class with the same hyperparameter names and defaults: the oracle."""
    configs: tuple[dict[str, Any], ...]
    """Keyword arguments of ``ours`` (and ``theirs``), each a valid combination of flags."""
    learnable: tuple[str, ...] = field(default=())
    """Hyperparameters (by keyword; ``"betas.0"`` is the first entry of ``betas``) whose
    derivatives are smooth enough to be checked against finite differences when passed as
    learnable tensors."""
    eps_name: str | None = None
    """An eps-like hyperparameter to raise for float16 (its true derivative at a zero gradient
    is ``lr / eps``, which overflows float16 at the default eps)."""

    def __repr__(self) -> str:  # readable hypothesis examples and pytest ids
        return self.name


REGISTRY: tuple[OptimizerCase, ...] = (
    OptimizerCase(
        "sgd",
        mo.sgd,
        torch.optim.SGD,
        (
            {"lr": 0.1},
            {"lr": 0.05, "momentum": 0.9},
            {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1},
            {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01},
            {"lr": 0.05, "momentum": 0.5, "maximize": True},
        ),
        learnable=("lr", "momentum", "dampening", "weight_decay"),
    ),
    OptimizerCase(
        "adam",
        mo.adam,
        torch.optim.Adam,
        (
            {"lr": 0.01},
            {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1},
            {"lr": 0.02, "amsgrad": True},
            {"lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
        ),
        learnable=("lr", "betas.0", "betas.1", "eps", "weight_decay"),
        eps_name="eps",
    ),
    OptimizerCase(
        "adamw",
        mo.adamw,
        torch.optim.AdamW,
        ({"lr": 0.01}, {"lr": 0.02, "weight_decay": 0.3, "amsgrad": True}),
        learnable=("lr", "betas.0", "betas.1", "weight_decay"),
        eps_name="eps",
    ),
    OptimizerCase(
        "adamax",
        mo.adamax,
        torch.optim.Adamax,
        ({"lr": 0.02}, {"lr": 0.02, "betas": (0.7, 0.95), "weight_decay": 0.1}),
        learnable=("lr", "betas.0", "betas.1"),
        eps_name="eps",
    ),
    OptimizerCase(
        "nadam",
        mo.nadam,
        torch.optim.NAdam,
        (
            {"lr": 0.02},
            {"lr": 0.02, "momentum_decay": 0.01, "weight_decay": 0.1},
            {"lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True},
        ),
        learnable=("lr", "betas.0", "betas.1", "momentum_decay"),
        eps_name="eps",
    ),
    OptimizerCase(
        "radam",
        mo.radam,
        torch.optim.RAdam,
        (
            {"lr": 0.02},
            {"lr": 0.02, "betas": (0.9, 0.9), "weight_decay": 0.1},
            {"lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True},
        ),
        learnable=("lr", "betas.0", "betas.1"),
        eps_name="eps",
    ),
    OptimizerCase(
        "rmsprop",
        mo.rmsprop,
        torch.optim.RMSprop,
        (
            {"lr": 0.01},
            {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "weight_decay": 0.1},
            {"lr": 0.01, "centered": True, "momentum": 0.3},
        ),
        learnable=("lr", "alpha", "momentum"),
        eps_name="eps",
    ),
    OptimizerCase(
        "adagrad",
        mo.adagrad,
        torch.optim.Adagrad,
        (
            {"lr": 0.1},
            {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.2},
        ),
        learnable=("lr", "lr_decay"),
        eps_name="eps",
    ),
    OptimizerCase(
        "adadelta",
        mo.adadelta,
        torch.optim.Adadelta,
        ({"lr": 1.0}, {"lr": 0.5, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.1}),
        learnable=("lr", "rho", "eps"),
    ),
    OptimizerCase(
        "rprop",
        mo.rprop,
        torch.optim.Rprop,
        ({"lr": 0.01}, {"lr": 0.02, "etas": (0.4, 1.5), "step_sizes": (1e-4, 0.05)}),
        learnable=("lr", "etas.0", "etas.1"),
    ),
    OptimizerCase(
        "asgd",
        mo.asgd,
        torch.optim.ASGD,
        (
            {"lr": 0.05},
            {"lr": 0.05, "lambd": 0.01, "alpha": 0.5, "t0": 10.0, "weight_decay": 0.1},
        ),
        learnable=("lr", "lambd", "alpha"),
    ),
)

"""Every named optimizer of :mod:`metafunc.optim`, in a fixed order."""

BY_NAME = {case.name: case for case in REGISTRY}
"""The cases of :data:`REGISTRY` by name."""

CASE_CONFIGS = [(case, i) for case in REGISTRY for i in range(len(case.configs))]
"""Every ``(case, index into case.configs)`` pair."""

RANGES: dict[str, tuple[float, float]] = {
    "lr": (1e-3, 0.3),
    "momentum": (0.0, 0.95),
    "dampening": (0.0, 0.9),
    "weight_decay": (0.0, 0.2),
    "betas.0": (0.5, 0.95),
    "betas.1": (0.9, 0.9999),
    "eps": (1e-8, 1e-3),
    "alpha": (0.5, 0.99),
    "lr_decay": (0.0, 0.1),
    "momentum_decay": (1e-3, 1e-2),
    "rho": (0.5, 0.95),
    "etas.0": (0.3, 0.9),
    "etas.1": (1.1, 1.5),
    "lambd": (0.0, 0.01),
}
"""A valid, well-conditioned ``(low, high)`` range for each learnable hyperparameter: what the
strategies draw values from. (``lr`` for Adadelta, which scales a unit-free step, is drawn from
the same range: any positive value is valid.)"""


def with_hypers(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``config`` with some hyperparameters replaced; ``"betas.0"`` addresses a tuple entry."""
    out = dict(config)
    for key, value in values.items():
        name, _, index = key.partition(".")
        if index:
            default = out.get(name) or _DEFAULT_PAIRS[name]
            pair = list(default)
            pair[int(index)] = value
            out[name] = tuple(pair)
        else:
            out[name] = value
    return out


def hyper_value(case: OptimizerCase, config: dict[str, Any], key: str) -> float:
    """The current numeric value of a hyperparameter in ``config`` (torch's default if absent)."""
    name, _, index = key.partition(".")
    value = config.get(name, inspect.signature(case.ours).parameters[name].default)
    return float(value[int(index)] if index else value)


_DEFAULT_PAIRS = {"betas": (0.9, 0.999), "etas": (0.5, 1.2), "step_sizes": (1e-6, 50.0)}


def loss_fn(params: dict[str, torch.Tensor], coeffs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A smooth non-convex loss whose gradient keeps changing along the trajectory."""
    total: Any = 0.0
    for k, p in params.items():
        c = coeffs[k]
        total = (
            total + (c * torch.sin(2.0 * p) + 0.5 * c.abs() * p**2 + 0.3 * c * torch.cos(p)).sum()
        )
    return total
