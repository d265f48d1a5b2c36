"""Exact BatchNorm, InstanceNorm and LayerNorm under ``torch.func.vmap``.

On torch 2.13 the *second-order* derivative of ``F.batch_norm`` (training mode),
``F.instance_norm`` and ``F.layer_norm`` with affine parameters is wrong under ``vmap`` (far
beyond round-off, in the MAML meta-gradient of the weights feeding the norm; upstream
pytorch/functorch#534), while a per-task loop is exact. While a :class:`FunctionalModel` with norm
layers runs under ``vmap`` (or inside :func:`exact_norms`), these functions are replaced by
compositions of elementary ops, whose batching rules are correct to float64 round-off. Everything
else runs unchanged. A model that calls these functions itself (``F.layer_norm`` in a custom
``forward``, with no norm *module*) is not detected: wrap such code in :func:`exact_norms`.

Running statistics are not written in place (a batched update cannot be written into an unbatched
buffer): they are handed back to :meth:`FunctionalModel.apply` through :func:`buffer_updates`, so
a vmapped model returns per-task running statistics.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch._C._functorch import TransformType, get_interpreter_stack
from torch.overrides import TorchFunctionMode

__all__ = ["buffer_updates", "exact_norms", "under_vmap"]


class _State(threading.local):
    """Per thread: the running-statistics updates of the innermost :func:`buffer_updates`, or None.
    A thread-local rather than a ContextVar, which torch.compile cannot trace."""

    def __init__(self) -> None:  # runs in each thread that uses it
        self.updates: dict[int, torch.Tensor] | None = None


_STATE = _State()


@torch.compiler.assume_constant_result  # dynamo evaluates it while tracing (see the docstring)
def under_vmap() -> bool:
    """Whether the caller runs inside a ``torch.func.vmap`` transform.

    Under ``torch.compile`` the answer is taken as a constant of the trace: dynamo pushes the
    transforms of the traced code onto the functorch stack while it traces, and guards on the
    stack it was entered with.
    """
    stack = get_interpreter_stack()
    return bool(stack) and any(i.key() == TransformType.Vmap for i in stack)


@contextlib.contextmanager
def buffer_updates() -> Iterator[dict[int, torch.Tensor]]:
    """Collects running-statistics updates made by the exact norms, keyed by ``id(buffer)``."""
    updates: dict[int, torch.Tensor] = {}
    previous = _STATE.updates
    _STATE.updates = updates
    try:
        yield updates
    finally:
        _STATE.updates = previous


def _current(buffer: torch.Tensor) -> torch.Tensor:
    """The latest value of a running statistic (a norm layer may run twice in one forward)."""
    updates = _STATE.updates
    return buffer if updates is None else updates.get(id(buffer), buffer)


def _store(buffer: torch.Tensor, value: torch.Tensor) -> None:
    updates = _STATE.updates
    if updates is None:
        buffer.copy_(value)  # outside FunctionalModel.apply: behave like torch (in place)
    else:
        updates[id(buffer)] = value


def _running_update(running_mean, running_var, mean, var, n, momentum) -> None:
    """``mean``/``var`` (biased) have one row per instance and one column per channel."""
    if running_mean is None or running_var is None:
        return
    with torch.no_grad():
        old_mean, old_var = _current(running_mean), _current(running_var)
        m = momentum
        unbiased = var.detach() * (n / max(n - 1, 1))
        new_mean = (1 - m) * old_mean + m * mean.detach().mean(0)
        new_var = (1 - m) * old_var + m * unbiased.mean(0)
    _store(running_mean, new_mean.to(running_mean.dtype))
    _store(running_var, new_var.to(running_var.dtype))


def _normalize(input, mean, var, weight, bias, eps):
    shape = [1, -1] + [1] * (input.dim() - 2)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    shape = [1, -1] + [1] * (input.dim() - 2)
    if not training:
        mean, var = _current(running_mean), _current(running_var)
        return _normalize(input, mean.reshape(shape), var.reshape(shape), weight, bias, eps)
    F._verify_batch_size(input.size())  # type: ignore[attr-defined]  # torch's own check, with torch's message
    dims = [0, *range(2, input.dim())]
    mean = input.mean(dims, keepdim=True)
    centered = input - mean
    var = (centered * centered).mean(dims, keepdim=True)
    n = input.numel() // input.shape[1]
    _running_update(running_mean, running_var, mean.reshape(1, -1), var.reshape(1, -1), n, momentum)
    return _normalize(input, mean, var, weight, bias, eps)


def _instance_norm(
    input,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
):
    shape = [1, -1] + [1] * (input.dim() - 2)
    if not use_input_stats:
        mean, var = _current(running_mean), _current(running_var)
        return _normalize(input, mean.reshape(shape), var.reshape(shape), weight, bias, eps)
    F._verify_spatial_size(input.size())  # type: ignore[attr-defined]  # torch's own check, with torch's message
    dims = tuple(range(2, input.dim()))
    mean = input.mean(dims, keepdim=True)
    centered = input - mean
    var = (centered * centered).mean(dims, keepdim=True)
    n = input[0, 0].numel()
    rows = input.shape[:2]
    _running_update(running_mean, running_var, mean.reshape(rows), var.reshape(rows), n, momentum)
    return _normalize(input, mean, var, weight, bias, eps)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = input.mean(dims, keepdim=True)
    centered = input - mean
    var = (centered * centered).mean(dims, keepdim=True)
    out = centered * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


class _ExactNorms(TorchFunctionMode):
    # The replacements have the parameter names and defaults of the torch functions (checked in
    # tests/test_compile.py), so the call binds as torch's would; no inspect.Signature.bind, which
    # torch.compile cannot trace.
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        if func is F.instance_norm:
            return _instance_norm(*args, **kwargs)
        return func(*args, **kwargs)


def exact_norms() -> contextlib.AbstractContextManager:
    """A context in which ``F.batch_norm``, ``F.instance_norm`` and ``F.layer_norm`` are computed
    from elementary ops.

    :class:`FunctionalModel` enables it by itself when a model with norm layers runs under
    ``vmap``; use it directly for code that calls those functions outside a FunctionalModel.

    Example:
        >>> import torch, metafunc
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> with metafunc.exact_norms():
        ...     y = torch.nn.functional.layer_norm(x, (3,))
        >>> torch.allclose(y, torch.nn.functional.layer_norm(x, (3,)))
        True
    """
    return _ExactNorms()
