"""Gradient-correctness checks for your own meta-learning code.

A meta-gradient that is silently wrong (a ``None`` that became zero, a detach in the wrong place,
a vmapped layer with a wrong second derivative, an optimizer that mutates its input) trains, just
worse. Three checks catch these in a test suite:

- :func:`check_grads`: first and second derivatives of ``fn`` against central finite differences
  in float64, leaf by leaf over pytree arguments; the report names the wrong leaf.
- :func:`assert_vmap_matches_loop`: ``torch.func.vmap`` against a per-task loop, outputs and
  derivatives with respect to the shared (meta) arguments; the report names the task.
- :func:`assert_pure`: no input tensor, module parameter or buffer written; repeat calls agree.

They need only torch. :mod:`metafunc.testing.strategies` (hypothesis strategies for pytrees,
optimizers, tasks and inner-loop configurations) and :mod:`metafunc.testing.pytest_plugin`
(fixtures and a ``float64`` marker) need ``pip install metafunc[testing]``.
:mod:`metafunc.testing.optimizers` is the registry of every optimizer with its ``torch.optim``
oracle, which the strategies draw from.

Example:
    >>> import torch
    >>> import metafunc, metafunc.optim as mo
    >>> from metafunc.testing import check_grads
    >>> def meta_loss(params):
    ...     loss = lambda p, batch: ((p["w"] * batch - 1.0) ** 2).sum()
    ...     adapted = metafunc.inner_loop(loss, params, mo.adam(lr=0.1), torch.ones(3), steps=2)
    ...     return loss(adapted.params, 2 * torch.ones(3))
    >>> check_grads(meta_loss, ({"w": torch.tensor([0.3, -0.2, 0.5])},), modes=("rev",))
"""

from . import optimizers
from ._grads import check_grads
from ._pure import assert_pure
from ._vmap_check import assert_vmap_matches_loop

__all__ = ["assert_pure", "assert_vmap_matches_loop", "check_grads", "optimizers"]
