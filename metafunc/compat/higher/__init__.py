"""``import metafunc.compat.higher as higher``: run code written for facebookresearch/higher.

higher is archived; this layer gives every public name of higher 0.2.1 (``innerloop_ctx``,
``monkeypatch``, ``get_diff_optim``, ``create_diff_optim``, ``register_optim``, and the modules
``optim``, ``patch`` and ``utils``) on metafunc's core, with the same meaning of every option, and
``torch.optim``'s numbers where higher 0.2.1 departs from them (its Adam at small ``eps``, its
RMSprop, which warns that its gradients may be wrong).

As in higher, the differentiable optimizer starts from the *state* of the ``torch.optim``
optimizer it is given (momentum buffers, moments, step counts; copied, per parameter and group):
warm up with ``torch.optim``, then unroll the same optimizer, and the unrolled steps are those
``torch.optim`` would have taken next. ``fmodel`` mirrors the module: ``fmodel.f(x)`` runs
submodule ``f`` with the fast weights, and ``fmodel.f.weight`` is its current fast weight.

The one option to understand is ``copy_initial_weights`` (default ``True``): it makes the fast
weights start from *detached copies*, so **the model's own parameters get no meta-gradient**.
For MAML pass ``copy_initial_weights=False``, or its clearer alias ``meta_grad_to_model=True``.
``track_higher_grads=False`` detaches every step (cheap evaluation; no meta-gradient crosses a
step, and, as in higher, none reaches the initial weights); for first-order MAML in native
metafunc use ``inner_loop(..., first_order=True)``, which passes it straight through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import optim, patch, utils
from ._base import _check_optimizer
from .optim import create_diff_optim, get_diff_optim, register_optim
from .patch import FunctionalModule, _resolve_initial, monkeypatch

__all__ = [
    "FunctionalModule",
    "create_diff_optim",
    "get_diff_optim",
    "innerloop_ctx",
    "monkeypatch",
    "optim",
    "patch",
    "register_optim",
    "utils",
]


@contextlib.contextmanager
def innerloop_ctx(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: dict[str, Any] | None = None,
    track_higher_grads: bool = True,
    *,
    meta_grad_to_model: bool | None = None,
) -> Iterator[tuple[FunctionalModule, optim.DifferentiableOptimizer]]:
    """Yields ``(fmodel, diffopt)`` for an inner loop, as higher's ``innerloop_ctx``.

    ``copy_initial_weights=True`` (the default, as in higher) detaches the initial weights:
    after ``meta_loss.backward()`` the model's parameters have **no** ``.grad`` — the
    meta-gradient stops at ``fmodel.parameters(time=0)``. Pass ``copy_initial_weights=False``
    (or ``meta_grad_to_model=True``) for MAML. ``override`` replaces hyperparameters of
    ``opt``'s groups (learnable tensors get meta-gradients); ``track_higher_grads=False``
    detaches every step. If ``opt`` has stepped, the differentiable optimizer starts from a copy
    of its state, and its steps are those ``opt`` would take next.

    Example (MAML, one task):
        >>> import torch
        >>> import metafunc.compat.higher as higher
        >>> model = torch.nn.Linear(1, 1)
        >>> inner = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.ones(4, 1), torch.zeros(4, 1)
        >>> ctx = higher.innerloop_ctx(model, inner, copy_initial_weights=False)
        >>> with ctx as (fmodel, diffopt):
        ...     for _ in range(3):
        ...         _ = diffopt.step(((fmodel(x) - y) ** 2).mean())
        ...     ((fmodel(x) - y) ** 2).mean().backward()
        >>> model.weight.grad is not None
        True
    """
    call = "innerloop_ctx(model, opt, ...)"
    detach = _resolve_initial(call, copy_initial_weights, meta_grad_to_model)
    _check_optimizer(call, opt)
    fmodel = monkeypatch(
        model, device, copy_initial_weights=detach, track_higher_grads=track_higher_grads
    )
    diffopt = get_diff_optim(
        opt,
        model.parameters(),
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
    )
    yield fmodel, diffopt
