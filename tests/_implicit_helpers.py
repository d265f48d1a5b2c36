"""Helpers shared by the ``test_implicit_*.py`` files.

Flat views of pytrees, seeded well-conditioned matrices (orthogonal, symmetric positive definite),
a count of autograd graph nodes and pure-Python bisection, in float64.
"""

from __future__ import annotations

import optree
import torch
from hypothesis import HealthCheck, settings

D = torch.float64

# the `device` fixture is a plain parameter, safe to share across hypothesis examples
with_device = settings(
    suppress_health_check=[
        *settings.default.suppress_health_check,
        HealthCheck.function_scoped_fixture,
    ]
)


def _flat(tree) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in optree.tree_leaves(tree)])


def _unflat(vec: torch.Tensor, like):
    leaves, spec = optree.tree_flatten(like)
    parts = torch.split(vec, [x.numel() for x in leaves])
    return optree.tree_unflatten(spec, [p.reshape(x.shape) for p, x in zip(parts, leaves)])


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    return q * torch.sign(torch.diagonal(r))


def _spd(n: int, g: torch.Generator, lo: float = 1.0, hi: float = 3.0) -> torch.Tensor:
    """A random SPD matrix with eigenvalues in [lo, hi] (both attained when n > 1)."""
    q = _orthogonal(n, g)
    ev = lo + (hi - lo) * torch.rand(n, generator=g, dtype=D)
    if n > 1:
        ev[0], ev[1] = lo, hi
    return (q * ev) @ q.T


def _graph_nodes(tensors) -> int:
    """Autograd nodes reachable from the tensors' grad_fn."""
    seen, stack = set(), [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def _bisect(g, lo: float, hi: float, iters: int = 200) -> float:
    """The root of an increasing g on [lo, hi] by bisection (pure Python floats)."""
    assert g(lo) < 0 < g(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if g(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
