"""``EpisodeSampler``: N-way K-shot classification episodes over any labelled dataset."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import describe, int_at_least
from ._checks import check_generator, check_labels
from ._episode import Episode
from ._labelled import LabelledImages
from ._transforms import EpisodeTransform

__all__ = ["EpisodeSampler"]

_CALL = "EpisodeSampler(dataset, classes, ways=..., shots=..., queries=..., transform=...)"


class EpisodeSampler:
    """Samples N-way K-shot episodes from ``classes`` of a labelled dataset.

    ``dataset`` is a :class:`LabelledImages` or a pair ``(inputs, labels)`` of tensors (inputs
    ``(N, ...)`` of any shape, labels ``(N,)`` integers); ``classes`` lists the label values to
    draw from (e.g. one list of :func:`split_classes`), ``None`` for all. Each task of
    :meth:`sample` picks ``ways`` distinct classes in a random order and relabels them
    ``0 .. ways - 1`` in that order, then picks ``shots + queries`` distinct examples of each
    class: ``shots`` go to the support set, ``queries`` to the query set, so no example is in both.

    A :class:`LabelledImages` of uint8 pixels (the few-shot readers) is converted and normalised
    here, for the drawn rows only (:meth:`LabelledImages.gather`). ``transform`` (an episode
    transform such as ``compose(random_crop(84, padding=8), random_flip())``, see
    :func:`compose`) is applied last to every meta-batch, with the same generator.

    Example:
        >>> import torch
        >>> from metafunc.data import EpisodeSampler, procedural_glyphs
        >>> data = procedural_glyphs(20, 8, seed=0)
        >>> sampler = EpisodeSampler(data, range(10), ways=5, shots=1, queries=3)
        >>> episode = sampler.sample(4, generator=torch.Generator().manual_seed(0))
        >>> episode.support[0].shape, episode.support[1]
        (torch.Size([4, 5, 1, 28, 28]), tensor([[0, 1, 2, 3, 4], ..., [0, 1, 2, 3, 4]]))
        >>> episode.query[0].shape, episode.query[1].shape
        (torch.Size([4, 15, 1, 28, 28]), torch.Size([4, 15]))
    """

    ways: int
    shots: int
    queries: int
    classes: list[int]
    """The label values sampled from, in the order given."""
    transform: EpisodeTransform | None
    """Applied to every sampled episode, or ``None``."""

    def __init__(
        self,
        dataset: LabelledImages | tuple[torch.Tensor, torch.Tensor],
        classes: Sequence[int] | torch.Tensor | None = None,
        *,
        ways: int,
        shots: int,
        queries: int,
        transform: EpisodeTransform | None = None,
    ) -> None:
        if transform is not None and not callable(transform):
            raise TypeError(
                f"{_CALL}: expected transform to be None or callable as transform(episode, "
                f"generator), got {describe(transform)}. Chain several with compose(...)."
            )
        self.transform = transform
        self._dataset = dataset if isinstance(dataset, LabelledImages) else None
        if isinstance(dataset, LabelledImages):
            inputs, labels, names = dataset.images, dataset.labels, dataset.class_names
        elif (
            isinstance(dataset, (tuple, list))
            and len(dataset) == 2
            and all(isinstance(t, torch.Tensor) for t in dataset)
        ):
            inputs, labels = dataset
            names = None
            if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise TypeError(
                    f"{_CALL}: expected labels (dataset[1]) to be a 1-d integer tensor, got "
                    f"{describe(labels)}."
                )
            if inputs.dim() < 1 or inputs.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{_CALL}: expected inputs (dataset[0]) to have one row per label, got "
                    f"inputs of shape {tuple(inputs.shape)} and {labels.shape[0]} labels."
                )
        else:
            raise TypeError(
                f"{_CALL}: expected dataset to be a LabelledImages or an (inputs, labels) pair "
                f"of tensors, got {describe(dataset)}."
            )
        self.ways = int_at_least(_CALL, "ways", ways, minimum=1)
        self.shots = int_at_least(_CALL, "shots", shots, minimum=1)
        self.queries = int_at_least(_CALL, "queries", queries, minimum=0)
        labels = labels.long().cpu()
        if classes is None:
            classes = labels.unique().tolist()
        self.classes = check_labels(_CALL, classes, "a list of integer labels (or None for all)")
        if len(self.classes) < self.ways:
            raise ValueError(
                f"{_CALL}: {len(self.classes)} classes given, fewer than ways={self.ways}. Pass "
                "more classes or a smaller ways."
            )

        # examples of each class: rows of a (num_classes, max_count) table of dataset indices
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        wanted = torch.tensor(self.classes, dtype=torch.long)
        starts = torch.searchsorted(sorted_labels, wanted, side="left")
        ends = torch.searchsorted(sorted_labels, wanted, side="right")
        counts = ends - starts
        need = self.shots + self.queries
        short = (counts < need).nonzero().flatten().tolist()
        if short:

            def name(c: int) -> str:
                if names is not None and 0 <= c < len(names):
                    return f"{names[c]!r} (label {c})"
                return f"label {c}"

            listed = ", ".join(f"{name(self.classes[i])}: {int(counts[i])}" for i in short[:5])
            more = f" and {len(short) - 5} more" if len(short) > 5 else ""
            raise ValueError(
                f"{_CALL}: every class needs at least shots + queries = {self.shots} + "
                f"{self.queries} = {need} examples; {len(short)} have fewer ({listed}{more} "
                "examples). Lower shots or queries, or leave those classes out of classes."
            )
        width = int(counts.max())
        offsets = torch.arange(width)
        valid = offsets < counts[:, None]
        positions = torch.where(valid, starts[:, None] + offsets, 0)
        self._table = order[positions]  # (num_classes, width) dataset indices, padded
        self._counts = counts
        self._inputs = inputs

    def sample(
        self,
        num_tasks: int,
        *,
        generator: torch.Generator,
        device: str | torch.device | None = None,
    ) -> Episode:
        """Draws ``num_tasks`` episodes; every random number comes from ``generator``.

        Returns an :class:`Episode` with ``support = (inputs, labels)`` of shapes
        ``(num_tasks, ways * shots, ...)`` and ``(num_tasks, ways * shots)``, and ``query`` the
        same with ``queries``. Examples are ordered by label: position ``i`` of the support has
        label ``i // shots``. ``info`` holds ``"classes"`` ``(num_tasks, ways)`` (the dataset
        label of each new label), ``"support_indices"`` and ``"query_indices"`` (the dataset
        rows). Everything is on ``device`` (default: the dataset's).

        Example:
            >>> import torch
            >>> from metafunc.data import EpisodeSampler
            >>> inputs, labels = torch.arange(12.0).unsqueeze(1), torch.arange(12) % 3
            >>> sampler = EpisodeSampler((inputs, labels), ways=2, shots=2, queries=2)
            >>> episode = sampler.sample(1, generator=torch.Generator().manual_seed(0))
            >>> episode.support[1], episode.query[1]
            (tensor([[0, 0, 1, 1]]), tensor([[0, 0, 1, 1]]))
            >>> classes = episode.info["classes"][0]  # the dataset label of new labels 0 and 1
            >>> torch.equal(episode.support[0][0, :, 0] % 3, classes[episode.support[1][0]])
            True
        """
        call = "EpisodeSampler.sample(num_tasks, generator=...)"
        int_at_least(call, "num_tasks", num_tasks, minimum=1)
        check_generator(call, generator)
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(
                f"{call}: expected device to be None, a str or a torch.device, got "
                f"{describe(device)}."
            )
        ways, shots, need = self.ways, self.shots, self.shots + self.queries
        num_classes, width = self._table.shape
        # a random permutation of the classes per task (float64 keys: ties are negligible)
        keys = torch.rand(
            num_tasks,
            num_classes,
            generator=generator,
            device=generator.device,
            dtype=torch.float64,
        )
        chosen = keys.topk(ways, dim=1, largest=False).indices.cpu()  # (tasks, ways) table rows
        # `need` distinct examples of each chosen class: the smallest random keys among its own
        keys = torch.rand(
            num_tasks,
            ways,
            width,
            generator=generator,
            device=generator.device,
            dtype=torch.float64,
        ).cpu()
        keys = keys.masked_fill(torch.arange(width) >= self._counts[chosen][..., None], 2.0)
        picks = keys.topk(need, dim=-1, largest=False).indices  # (tasks, ways, need), ascending
        rows = self._table[chosen[..., None], picks]
        support_idx = rows[..., :shots].reshape(num_tasks, ways * shots)
        query_idx = rows[..., shots:].reshape(num_tasks, ways * self.queries)
        if self._dataset is not None:
            images = self._dataset.images
            data_device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        else:
            data_device = self._inputs.device
        out_device = data_device if device is None else torch.device(device)

        def gather(idx: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
            if self._dataset is not None:
                x = self._dataset.gather(idx, out_device)
            else:
                x = self._inputs[idx.to(data_device)].to(out_device)
            y = torch.arange(ways, device=out_device).repeat_interleave(per_class)
            return x, y.expand(num_tasks, ways * per_class).clone()

        classes = torch.tensor(self.classes, dtype=torch.long)[chosen]
        episode = Episode(
            support=gather(support_idx, shots),
            query=gather(query_idx, self.queries),
            info={
                "classes": classes.to(out_device),
                "support_indices": support_idx.to(out_device),
                "query_indices": query_idx.to(out_device),
            },
        )
        return episode if self.transform is None else self.transform(episode, generator)

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler({len(self.classes)} classes, ways={self.ways}, shots={self.shots}, "
            f"queries={self.queries})"
        )
