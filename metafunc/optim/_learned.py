"""A learned optimizer: the update of each parameter element is computed by a small MLP.

The MLP's weights are meta-parameters: a dict of tensors passed to :func:`learned` like any
learnable hyperparameter, and the meta-gradient flows to them through every ``update``. The same
MLP is applied to every element of every leaf (it is tiny, so an optimizer for a network with a
million weights still has a few thousand meta-parameters), on features that are normalised per
leaf so that one set of weights serves leaves of any scale. The design follows the per-parameter
MLP optimizers of Metz et al. (2020, https://arxiv.org/abs/2009.11243) and Vicol et al. (2021,
https://arxiv.org/abs/2112.13835), simplified.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import optree
import torch

from .. import _checks
from .._typing import Params, PyTree, Updates
from ._base import GradientTransformation, check_state

__all__ = ["LearnedState", "init_learned_weights", "learned", "learned_num_features"]

_CALL = "learned(weights, ...)"
_EPS = 1e-8  # under the square roots of the second-moment accumulator and of the normalisers


class LearnedState(NamedTuple):
    """The state of :func:`learned`.

    Attributes:
        step: the number of updates made, a 0-d int64 tensor.
        momenta: one pytree like the params per momentum timescale (``betas``).
        rms: the running mean of the squared gradient, a pytree like the params.
    """

    step: torch.Tensor
    momenta: tuple[Updates, ...]
    rms: Updates


def learned_num_features(betas: Sequence[float] = (0.5, 0.9, 0.99), timescales: int = 4) -> int:
    """How many input features the MLP of :func:`learned` takes: the gradient, the parameter,
    each momentum, the second moment, each momentum divided by its square root, its inverse
    square root, and ``timescales`` step encodings."""
    return 4 + 2 * len(betas) + timescales


def init_learned_weights(
    generator: torch.Generator | None = None,
    *,
    hidden: Sequence[int] = (32, 32),
    betas: Sequence[float] = (0.5, 0.9, 0.99),
    timescales: Sequence[float] = (1.0, 10.0, 100.0, 1000.0),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Random weights for :func:`learned`: ``{"w0", "b0", ..., "wL", "bL"}``.

    Hidden layers take the usual ``1 / sqrt(fan_in)`` scale; the output layer (two outputs: a
    direction and a log-magnitude) starts a hundred times smaller, so that a new learned optimizer
    takes small steps and meta-training starts from a stable unroll. Pass the same ``betas`` and
    ``timescales`` (only their number matters here) to :func:`learned`.

    Example:
        >>> import torch, metafunc
        >>> w = metafunc.optim.init_learned_weights(torch.Generator().manual_seed(0), hidden=(8,))
        >>> {k: tuple(v.shape) for k, v in w.items()}
        {'w0': (14, 8), 'b0': (8,), 'w1': (8, 2), 'b1': (2,)}
    """
    call = "init_learned_weights(generator, hidden=...)"
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{call}: expected generator to be a torch.Generator or None, got "
            f"{type(generator).__name__}. Pass torch.Generator().manual_seed(0)."
        )
    sizes = list(hidden) if isinstance(hidden, (list, tuple)) else None
    if sizes is None or not all(_checks.is_count(h) for h in sizes):
        raise ValueError(
            f"{call}: expected hidden to be a list or tuple of positive ints (the widths of the "
            f"hidden layers), got {hidden!r}. Pass e.g. hidden=(32, 32)."
        )
    widths = [learned_num_features(betas, len(timescales)), *sizes, 2]
    weights: dict[str, torch.Tensor] = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        last = i == len(widths) - 2
        scale = (0.01 if last else 1.0) / math.sqrt(fan_in)
        w = torch.randn(fan_in, fan_out, generator=generator, dtype=torch.float64) * scale
        weights[f"w{i}"] = w.to(dtype=dtype, device=device)
        weights[f"b{i}"] = torch.zeros(fan_out, dtype=dtype, device=device)
    return weights


def _check_weights(weights: Any, features: int) -> int:
    """Validates the MLP weights in the factory; returns the number of layers."""
    if not isinstance(weights, dict) or not weights:
        raise TypeError(
            f"{_CALL}: expected weights to be a non-empty dict of tensors "
            f"{{'w0', 'b0', ..., 'wL', 'bL'}}, got {type(weights).__name__}. Make them with "
            f"metafunc.optim.init_learned_weights(generator)."
        )
    layers = len(weights) // 2
    expected = [f"{p}{i}" for i in range(layers) for p in ("w", "b")]
    if sorted(weights) != sorted(expected) or len(weights) % 2:
        raise ValueError(
            f"{_CALL}: expected the weights' keys to be {expected} (w and b for each layer), got "
            f"{sorted(weights)}. Make them with metafunc.optim.init_learned_weights(generator)."
        )
    fan_in = features
    for i in range(layers):
        w, b = weights[f"w{i}"], weights[f"b{i}"]
        for k, t in ((f"w{i}", w), (f"b{i}", b)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(
                    f"{_CALL}: expected weights[{k!r}] to be a floating-point tensor, got "
                    f"{_checks.describe(t)}."
                )
        out = 2 if i == layers - 1 else (w.shape[1] if w.dim() == 2 else -1)
        if tuple(w.shape) != (fan_in, out) or tuple(b.shape) != (out,):
            raise ValueError(
                f"{_CALL}: layer {i} has w{i} of shape {tuple(w.shape)} and b{i} of shape "
                f"{tuple(b.shape)}; expected ({fan_in}, {out if out > 0 else 'width'}) and "
                f"({out if out > 0 else 'width'},) ({features} input features for these betas and "
                f"timescales, 2 outputs). Pass the same betas and timescales to "
                f"init_learned_weights(...) and learned(...)."
            )
        fan_in = out
    return layers


def learned(
    weights: dict[str, torch.Tensor],
    *,
    betas: Sequence[float] = (0.5, 0.9, 0.99),
    rms_decay: float = 0.999,
    timescales: Sequence[float] = (1.0, 10.0, 100.0, 1000.0),
    step_mult: float = 0.01,
    exp_mult: float = 0.1,
) -> GradientTransformation:
    """A learned optimizer: a per-element MLP, whose weights are meta-parameters, gives the update.

    For every element of every leaf, with gradient ``g``, parameter ``p``, momenta
    ``m_k <- b_k m_k + (1 - b_k) g`` (one per ``betas``), second moment ``v <- r v + (1 - r) g^2``
    (``r = rms_decay``) and step count ``t``, the features are
    ``[g, p, m_1.., v, m_1 / sqrt(v).., 1 / sqrt(v)]``, each divided by its root mean square over
    the leaf (so the optimizer is invariant to the scale of a leaf's gradients), and
    ``tanh(t / s)`` for each of ``timescales``. The MLP (ReLU hidden layers) maps them to a
    direction ``d`` and a log-magnitude ``a``, and the update is
    ``step_mult * d * exp(exp_mult * a)``: an additive update, applied with
    :func:`metafunc.apply_updates`, so it goes last in a :func:`chain`.

    It is pure and differentiable in ``weights`` (and in the gradients and params), runs under
    ``torch.func.vmap`` (per-task normalisation and state, shared weights) and composes with
    :func:`chain`, :func:`metafunc.inner_loop` (truncation, checkpointing, the tape) and
    :func:`metafunc.vmap_tasks`. The arithmetic runs in the params' dtype (float32 for half
    precision), the weights cast to it.

    Args:
        weights: the MLP's weights, from :func:`init_learned_weights` (or meta-trained).
        betas: momentum decay rates, each in ``[0, 1)``.
        rms_decay: decay rate of the second moment, in ``[0, 1)``.
        timescales: positive step counts for the step encodings ``tanh(t / s)``.
        step_mult, exp_mult: the output scales above, positive.

    Returns:
        A :class:`GradientTransformation` with state :class:`LearnedState`. ``update`` needs the
        params (they are a feature).

    Example:
        >>> import torch, metafunc
        >>> weights = metafunc.optim.init_learned_weights(torch.Generator().manual_seed(0))
        >>> opt = metafunc.optim.learned(weights)
        >>> params = {"w": torch.ones(3)}
        >>> updates, state = opt.update({"w": torch.ones(3)}, opt.init(params), params)
        >>> updates["w"].shape, int(state.step)
        (torch.Size([3]), 1)

    Differences from the papers: no per-tensor Adafactor features and no learned-optimizer
    hierarchy; a single MLP over all leaves.
    """
    for name, decays in (("betas", betas), ("timescales", timescales)):
        if not isinstance(decays, (list, tuple)) or not decays:
            raise TypeError(
                f"{_CALL}: expected {name} to be a non-empty list or tuple of numbers, got "
                f"{decays!r}."
            )
    for b in betas:
        if not (isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1):
            raise ValueError(f"{_CALL}: expected every beta in [0, 1), got {b!r} in {betas!r}.")
    if not (isinstance(rms_decay, (int, float)) and 0 <= rms_decay < 1):
        raise ValueError(f"{_CALL}: expected rms_decay in [0, 1), got {rms_decay!r}.")
    for s in timescales:
        _checks.positive_finite(_CALL, "every timescale", s)
    _checks.positive_finite(_CALL, "step_mult", step_mult)
    _checks.positive_finite(_CALL, "exp_mult", exp_mult)
    layers = _check_weights(weights, learned_num_features(betas, len(timescales)))
    decays = tuple(float(b) for b in betas)
    scales = tuple(float(s) for s in timescales)

    def init(params: Params) -> LearnedState:
        zeros = optree.tree_map(torch.zeros_like, cast(Any, params))
        count = torch.zeros((), dtype=torch.int64, device=_device(params))
        return LearnedState(count, tuple(zeros for _ in decays), zeros)

    def update(updates: Updates, state: Any, params: Params | None = None):
        call = "learned(weights, ...).update"
        check_state(call, "learned", state, LearnedState)
        if params is None:
            raise ValueError(
                f"{call}: expected the params (the learned optimizer reads them as a feature), "
                f"got None. Call opt.update(grads, state, params)."
            )
        momenta = tuple(
            optree.tree_map(lambda m, g, b=b: b * m + (1 - b) * g, ms, updates)
            for b, ms in zip(decays, state.momenta)
        )
        rms = optree.tree_map(
            lambda v, g: rms_decay * v + (1 - rms_decay) * g * g, state.rms, updates
        )
        count = state.step + 1
        steps = count.to(torch.float64)
        encoding = torch.stack([torch.tanh(steps / s) for s in scales])

        dtypes = [torch.promote_types(g.dtype, torch.float32) for g in optree.tree_leaves(updates)]
        dtype = dtypes[0] if dtypes else torch.float32
        for other in dtypes:
            dtype = torch.promote_types(dtype, other)

        def features(g, p, v, *ms):
            g, p, v = g.to(dtype), p.to(dtype), v.to(dtype)
            ms = tuple(m.to(dtype) for m in ms)
            inv = torch.rsqrt(v + _EPS)
            raw = torch.stack([g, p, *ms, v, *(m * inv for m in ms), inv], dim=-1)
            raw = raw.reshape(-1, raw.shape[-1])
            # each feature divided by its root mean square over the leaf (one op for all)
            return raw * torch.rsqrt((raw * raw).mean(0) + _EPS)

        feats, spec = optree.tree_flatten(
            optree.tree_map(features, updates, cast(Any, params), rms, *momenta)
        )
        sizes = [f.shape[0] for f in feats]
        x = torch.cat(feats) if len(feats) > 1 else feats[0]
        h = torch.cat([x, encoding.to(dtype).expand(x.shape[0], len(scales))], dim=-1)
        for i in range(layers):  # one MLP pass over the elements of all leaves
            h = h @ weights[f"w{i}"].to(dtype) + weights[f"b{i}"].to(dtype)
            if i < layers - 1:
                h = torch.relu(h)
        steps_out = step_mult * h[:, 0] * torch.exp(exp_mult * h[:, 1])
        pieces = torch.split(steps_out, sizes) if len(sizes) > 1 else [steps_out]
        shaped = optree.tree_unflatten(spec, list(pieces))
        new_updates = optree.tree_map(
            lambda piece, g: piece.reshape(g.shape).to(g.dtype), shaped, updates
        )
        return new_updates, LearnedState(count, momenta, rms)

    return GradientTransformation(init, update)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """``x`` divided by its root mean square over the leaf (per task under vmap)."""
    return x * torch.rsqrt((x * x).mean() + _EPS)


def _device(tree: PyTree) -> torch.device | None:
    leaves = optree.tree_leaves(tree)
    return leaves[0].device if leaves else None
