"""One registry of every named optimizer, shared by all optimizer property tests.

Each case pairs a metafunc optimizer with its ``torch.optim`` oracle and lists configurations
(hyperparameter values as Python numbers) and the hyperparameters that are smooth enough to be
checked by gradcheck when given as learnable tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import metafunc.optim as mo


@dataclass(frozen=True)
class Case:
    name: str
    ours: Callable[..., mo.GradientTransformation]
    theirs: type[torch.optim.Optimizer]
    configs: tuple[dict[str, Any], ...]
    # hyperparameters (by kwarg name; "betas.0" is the first entry of betas) checked by gradcheck
    learnable: tuple[str, ...] = field(default=())
    # an eps-like hyperparameter to raise for float16 safety tests (its true derivative at a zero
    # gradient is lr/eps, which overflows float16 at the default eps)
    eps_name: str | None = None

    def __repr__(self) -> str:  # readable hypothesis / pytest ids
        return self.name


REGISTRY: tuple[Case, ...] = (
    Case(
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
    Case(
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
    Case(
        "adamw",
        mo.adamw,
        torch.optim.AdamW,
        ({"lr": 0.01}, {"lr": 0.02, "weight_decay": 0.3, "amsgrad": True}),
        learnable=("lr", "betas.0", "betas.1", "weight_decay"),
        eps_name="eps",
    ),
    Case(
        "adamax",
        mo.adamax,
        torch.optim.Adamax,
        ({"lr": 0.02}, {"lr": 0.02, "betas": (0.7, 0.95), "weight_decay": 0.1}),
        learnable=("lr", "betas.0", "betas.1"),
        eps_name="eps",
    ),
    Case(
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
    Case(
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
    Case(
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
    Case(
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
    Case(
        "adadelta",
        mo.adadelta,
        torch.optim.Adadelta,
        ({"lr": 1.0}, {"lr": 0.5, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.1}),
        learnable=("lr", "rho", "eps"),
    ),
    Case(
        "rprop",
        mo.rprop,
        torch.optim.Rprop,
        ({"lr": 0.01}, {"lr": 0.02, "etas": (0.4, 1.5), "step_sizes": (1e-4, 0.05)}),
        learnable=("lr", "etas.0", "etas.1"),
    ),
    Case(
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

BY_NAME = {case.name: case for case in REGISTRY}
CASE_CONFIGS = [(case, i) for case in REGISTRY for i in range(len(case.configs))]


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


def hyper_value(case: Case, config: dict[str, Any], key: str) -> float:
    """The current numeric value of a hyperparameter in ``config`` (torch's default if absent)."""
    import inspect

    name, _, index = key.partition(".")
    value = config.get(name, inspect.signature(case.ours).parameters[name].default)
    return float(value[int(index)] if index else value)


_DEFAULT_PAIRS = {"betas": (0.9, 0.999), "etas": (0.5, 1.2), "step_sizes": (1e-6, 50.0)}


def loss_fn(params: dict[str, torch.Tensor], coeffs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A smooth non-convex loss whose gradient keeps changing along the trajectory."""
    total = 0.0
    for k, p in params.items():
        c = coeffs[k]
        total = (
            total + (c * torch.sin(2.0 * p) + 0.5 * c.abs() * p**2 + 0.3 * c * torch.cos(p)).sum()
        )
    return total
