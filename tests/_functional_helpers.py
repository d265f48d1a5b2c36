"""Helpers and the layer zoo shared by the ``test_functional_*.py`` files.

Float64 comparisons to 1e-12, seeded inputs and weights, snapshots that prove a module was not
written to, the module's own gradients as the oracle, and ``CASES``: each case builds a module (one
layer kind, or a small network mixing them) and an input.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

DTYPE = torch.float64
TOL = 1e-12


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def assert_dicts_close(actual: dict, expected: dict, tol: float = TOL) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        assert_close(actual[k], expected[k], tol)


def assert_dicts_equal(actual: dict, expected: dict) -> None:
    """Exactly equal keys, values, dtypes and devices."""
    assert actual.keys() == expected.keys()
    for k in expected:
        assert actual[k].dtype == expected[k].dtype, k
        assert actual[k].device == expected[k].device, k
        assert torch.equal(actual[k], expected[k]), k


def randn(gen: torch.Generator, *shape: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=DTYPE).to(device)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fills every float parameter and buffer with values from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
            elif b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
    return module


def snapshot(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Values and versions of all of a module's params and buffers (aliases included)."""
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    return {k: (t.detach().clone(), t._version) for k, t in named}


def assert_unchanged(module: nn.Module, before: dict[str, tuple[torch.Tensor, int]]) -> None:
    after = snapshot(module)
    assert after.keys() == before.keys()
    for k, (value, version) in before.items():
        assert torch.equal(after[k][0], value), f"{k} changed value"
        assert after[k][1] == version, f"{k} changed version"


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return (out.square() + out.sin()).sum()


def module_grads(module: nn.Module, *args, seed: int | None = None) -> dict[str, torch.Tensor]:
    """``.grad`` of ``loss_of(module(*args))`` for a deep copy of ``module``, by trainable name."""
    reference = copy.deepcopy(module)
    if seed is not None:
        torch.manual_seed(seed)
    loss_of(reference(*args)).backward()
    grads = {}
    for k, p in reference.named_parameters():
        if p.requires_grad:
            grads[k] = p.grad
        else:
            assert p.grad is None, k
    return grads


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def small_mlp(device: str = "cpu", seed: int = 0) -> nn.Sequential:
    """``Linear(3, 4) -> Tanh -> Linear(4, 2)``: params 0.weight, 0.bias, 2.weight, 2.bias."""
    return randomize_(mlp([3, 4, 2]), seed).to(device=device, dtype=DTYPE)


def small_bn_net(device: str = "cpu", seed: int = 0) -> nn.Sequential:
    """``Linear(3, 4) -> BatchNorm1d(4)``."""
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    return randomize_(net, seed).to(device=device, dtype=DTYPE)


def _with_frozen() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    net[0].weight.requires_grad_(False)
    return net


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], torch.Tensor]
    has_batchnorm: bool = False

    def make(self, device: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
        module = randomize_(self.build(), seed).to(device=device, dtype=DTYPE)
        x = self.make_input(torch.Generator().manual_seed(seed + 1)).to(device)
        return module, x


CASES = [
    Case("linear", lambda: nn.Linear(3, 4), lambda g: randn(g, 5, 3)),
    Case("linear_no_bias", lambda: nn.Linear(3, 4, bias=False), lambda g: randn(g, 5, 3)),
    Case(
        "conv1d_maxpool",
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2)),
        lambda g: randn(g, 2, 2, 8),
    ),
    Case(
        "conv2d_avgpool",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 2)
        ),
        lambda g: randn(g, 2, 2, 6, 6),
    ),
    Case(
        "conv2d_maxpool",
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=1, padding=1), nn.MaxPool2d(2)),
        lambda g: randn(g, 2, 2, 4, 4),
    ),
    Case(
        "batchnorm1d",
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)),
        lambda g: randn(g, 6, 3),
        has_batchnorm=True,
    ),
    Case(
        "batchnorm1d_cumulative",  # momentum=None: running stats use num_batches_tracked
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None)),
        lambda g: randn(g, 6, 3),
        has_batchnorm=True,
    ),
    Case(
        "batchnorm2d",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten()
        ),
        lambda g: randn(g, 3, 2, 4, 4),
        has_batchnorm=True,
    ),
    Case(
        "layernorm",
        lambda: nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 2)),
        lambda g: randn(g, 4, 3),
    ),
    Case(
        "groupnorm",
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten()),
        lambda g: randn(g, 2, 2, 5, 5),
    ),
    Case(
        "dropout",
        lambda: nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 2)),
        lambda g: randn(g, 5, 3),
    ),
    Case(
        "embedding",
        lambda: nn.Sequential(nn.Embedding(7, 3, padding_idx=0), nn.Linear(3, 2)),
        lambda g: torch.randint(0, 7, (3, 4), generator=g),
    ),
    Case("frozen_param", _with_frozen, lambda g: randn(g, 4, 3)),
]
CASE_IDS = [c.name for c in CASES]
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


class TiedLM(nn.Module):
    """Embedding whose weight is reused by the output projection."""

    def __init__(self, vocab: int = 7, dim: int = 4, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(idx)))


def tied_lm(device: str) -> tuple[TiedLM, torch.Tensor]:
    net = randomize_(TiedLM(), 0).to(device=device, dtype=DTYPE)
    idx = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1)).to(device)
    return net, idx


def _x() -> torch.Tensor:
    return randn(torch.Generator().manual_seed(1), 4, 3)
