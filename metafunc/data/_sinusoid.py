"""Sinusoid regression tasks (Finn et al. 2017, section 5.1), generated on the fly."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .._checks import describe, int_at_least
from ._checks import check_generator, check_range
from ._episode import Episode

__all__ = ["Sinusoid"]


@dataclasses.dataclass(frozen=True)
class Sinusoid:
    """A distribution of sinusoid regression tasks ``y = amplitude * sin(x - phase)``.

    Each task draws ``amplitude`` and ``phase`` uniformly from their ranges; its points draw ``x``
    uniformly from ``x_range``. The defaults are those of MAML (Finn et al. 2017, section 5.1):
    amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5]. :meth:`sample` returns an
    :class:`Episode`; :meth:`evaluate` gives the true function, e.g. to draw it.

    Example:
        >>> import torch
        >>> from metafunc.data import Sinusoid
        >>> tasks = Sinusoid()
        >>> gen = torch.Generator().manual_seed(0)
        >>> episode = tasks.sample(25, shots=10, queries=15, generator=gen)
        >>> episode.support[0].shape, episode.query[1].shape
        (torch.Size([25, 10, 1]), torch.Size([25, 15, 1]))
        >>> sorted(episode.info)
        ['amplitude', 'phase']
        >>> Sinusoid(amplitude=(1.0, 1.0), phase=(0.0, 0.0)).sample(
        ...     1, shots=2, generator=gen).info["amplitude"]
        tensor([1.])
    """

    amplitude: tuple[float, float] = (0.1, 5.0)
    """``(low, high)`` of the uniform amplitude."""
    phase: tuple[float, float] = (0.0, math.pi)
    """``(low, high)`` of the uniform phase."""
    x_range: tuple[float, float] = (-5.0, 5.0)
    """``(low, high)`` of the uniform inputs."""

    def __post_init__(self) -> None:
        for name in ("amplitude", "phase", "x_range"):
            value = check_range(f"Sinusoid({name}=...)", name, getattr(self, name))
            object.__setattr__(self, name, value)

    def sample(
        self,
        num_tasks: int,
        shots: int,
        queries: int | None = None,
        *,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Episode:
        """Draws ``num_tasks`` tasks with ``shots`` support and ``queries`` query points each.

        ``queries`` defaults to ``shots``. Inputs and targets have shape ``(num_tasks, shots, 1)``
        (support) and ``(num_tasks, queries, 1)`` (query); ``info`` holds ``"amplitude"`` and
        ``"phase"``, each ``(num_tasks,)``. Every number comes from ``generator``, in a fixed
        order (amplitudes, phases, support inputs, query inputs), drawn in float64 on the
        generator's device and then converted to ``dtype`` on ``device``: the same seed gives the
        same tasks, and the same support points whatever ``queries`` is.

        Example:
            >>> import torch
            >>> from metafunc.data import Sinusoid
            >>> a = Sinusoid().sample(3, 5, generator=torch.Generator().manual_seed(1))
            >>> b = Sinusoid().sample(3, 5, 20, generator=torch.Generator().manual_seed(1))
            >>> torch.equal(a.support[0], b.support[0]), b.query[0].shape
            (True, torch.Size([3, 20, 1]))
        """
        call = "Sinusoid.sample(num_tasks, shots, queries, generator=...)"
        int_at_least(call, "num_tasks", num_tasks, minimum=1)
        int_at_least(call, "shots", shots, minimum=1)
        queries = shots if queries is None else int_at_least(call, "queries", queries, minimum=0)
        check_generator(call, generator)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(
                f"{call}: expected dtype to be a floating-point torch.dtype, got "
                f"{describe(dtype)}. Pass e.g. dtype=torch.float32."
            )
        if not isinstance(device, (str, torch.device)):
            raise TypeError(
                f"{call}: expected device to be a str or torch.device, got {describe(device)}. "
                "Pass e.g. device='cpu'."
            )

        def uniform(shape: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
            out = torch.empty(shape, dtype=torch.float64, device=generator.device)
            return out.uniform_(*bounds, generator=generator).to(device=device, dtype=dtype)

        amplitude = uniform((num_tasks,), self.amplitude)
        phase = uniform((num_tasks,), self.phase)
        xs = uniform((num_tasks, shots, 1), self.x_range)
        xq = uniform((num_tasks, queries, 1), self.x_range)
        return Episode(
            support=(xs, self.evaluate(xs, amplitude, phase)),
            query=(xq, self.evaluate(xq, amplitude, phase)),
            info={"amplitude": amplitude, "phase": phase},
        )

    @staticmethod
    def evaluate(
        x: torch.Tensor, amplitude: torch.Tensor | float, phase: torch.Tensor | float
    ) -> torch.Tensor:
        """The true function ``amplitude * sin(x - phase)``, per task.

        ``amplitude`` and ``phase`` are numbers, or tensors whose dims are the leading dims of
        ``x`` (``(num_tasks,)`` from an episode's ``info``, 0-d under ``vmap_tasks``); trailing
        singleton dims are added so that they broadcast against ``x``. Pass an episode's info as
        ``Sinusoid.evaluate(x, **episode.info)``.

        Example:
            >>> import torch
            >>> from metafunc.data import Sinusoid
            >>> x = torch.linspace(-5, 5, 100).expand(2, 100).unsqueeze(-1)  # 2 tasks, 100 points
            >>> Sinusoid.evaluate(x, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.5])).shape
            torch.Size([2, 100, 1])
            >>> Sinusoid.evaluate(torch.tensor([math.pi / 2]), 2.0, 0.0)
            tensor([2.])
        """
        call = "Sinusoid.evaluate(x, amplitude, phase)"
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{call}: expected x to be a tensor, got {describe(x)}. "
                "Pass e.g. torch.linspace(-5, 5, 100)."
            )

        def expand(name: str, value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                if value.dim() > x.dim() or tuple(value.shape) != tuple(x.shape[: value.dim()]):
                    raise ValueError(
                        f"{call}: expected {name} to have the leading dims of x "
                        f"{tuple(x.shape)}, got shape {tuple(value.shape)}. Pass one value per "
                        "task, e.g. episode.info[...] with x of the same episode."
                    )
                return value.reshape(value.shape + (1,) * (x.dim() - value.dim()))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
            raise TypeError(
                f"{call}: expected {name} to be a number or a tensor, got {describe(value)}."
            )

        return expand("amplitude", amplitude) * torch.sin(x - expand("phase", phase))
