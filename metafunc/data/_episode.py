"""``Episode``: one meta-batch of few-shot tasks, support and query, with a leading task dim."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class Episode(NamedTuple):
    """A meta-batch of tasks: ``support`` and ``query`` are ``(inputs, targets)`` pairs whose
    tensors all start with the task dimension, so they feed :func:`metafunc.vmap_tasks` directly.

    ``info`` holds what generated the tasks (sinusoid amplitudes and phases, the dataset classes
    and example indices of a classification episode), one entry per task along dim 0.

    Example:
        >>> import torch, metafunc
        >>> from metafunc.data import Sinusoid
        >>> episode = Sinusoid().sample(8, shots=5, generator=torch.Generator().manual_seed(0))
        >>> (xs, ys), (xq, yq) = episode.support, episode.query
        >>> xs.shape, yq.shape
        (torch.Size([8, 5, 1]), torch.Size([8, 5, 1]))
        >>> sse = lambda support, query: ((support[1] - query[1].mean()) ** 2).sum()
        >>> metafunc.vmap_tasks(sse, strategy="vmap")(episode.support, episode.query).shape
        torch.Size([8])
    """

    support: tuple[torch.Tensor, torch.Tensor]
    """``(inputs, targets)`` of the support (adaptation) set, each ``(num_tasks, n, ...)``."""
    query: tuple[torch.Tensor, torch.Tensor]
    """``(inputs, targets)`` of the query (evaluation) set, each ``(num_tasks, m, ...)``."""
    info: dict[str, Any]
    """What generated the tasks, keyed by name, each entry ``(num_tasks, ...)``."""
