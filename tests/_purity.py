"""Purity checks shared by the test files: no input tensor may be modified in place."""

from __future__ import annotations

import optree
import torch


def snapshot(tree):
    """Every tensor of ``tree`` with its version counter and a copy of its values."""
    return [(x, x._version, x.detach().clone()) for x in optree.tree_leaves(tree)]


def assert_unchanged(snapshot):
    """The tensors of a :func:`snapshot` were not written to: same version, same values."""
    for x, version, value in snapshot:
        assert x._version == version
        assert torch.equal(x.detach(), value)
