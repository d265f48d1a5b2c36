"""Helpers shared by the ``test_data_*.py`` files: a seeded generator, and a list flattener."""

from __future__ import annotations

import torch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat(parts) -> list[int]:
    return [c for part in parts for c in part]
