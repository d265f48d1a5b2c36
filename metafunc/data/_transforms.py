"""Episode transforms: per-task augmentation and reordering, applied by :class:`EpisodeSampler`.

An episode transform is a pure function ``transform(episode, generator) -> episode`` that draws
its random numbers from ``generator`` (so the same seed gives the same augmented episode) and
returns a new :class:`Episode`; :func:`compose` chains them. The sampler does the rest of what a
learn2learn ``TaskDataset`` pipeline spells as transforms: ``NWays`` / ``KShots`` /
``FilterLabels`` are its ``ways``, ``shots`` + ``queries`` and ``classes`` arguments,
``LoadData`` its gather, ``RemapLabels`` its relabelling of the drawn classes ``0 .. ways - 1``,
all fused into one vectorised draw per meta-batch.

The image transforms act on the float images of both sets of every task, images ``(tasks, n, C,
H, W)``, after the normalisation of :meth:`LabelledImages.from_pixels`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .._checks import describe, int_at_least
from ._episode import Episode

__all__ = [
    "EpisodeTransform",
    "compose",
    "random_crop",
    "random_flip",
    "random_rot90",
    "shuffle_examples",
]

EpisodeTransform = Callable[[Episode, torch.Generator], Episode]
"""``transform(episode, generator) -> episode``: see the module docstring."""


def _uniform(generator: torch.Generator, *shape: int, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers from ``generator``, on ``device`` (drawn where the generator is)."""
    return torch.rand(*shape, generator=generator, device=generator.device).to(device)


def _images(episode: Episode) -> list[torch.Tensor]:
    return [episode.support[0], episode.query[0]]


def _with_images(episode: Episode, support: torch.Tensor, query: torch.Tensor) -> Episode:
    return episode._replace(support=(support, episode.support[1]), query=(query, episode.query[1]))


def _check_images(call: str, x: torch.Tensor) -> None:
    if x.dim() != 5:
        raise ValueError(
            f"{call}: expected images of shape (tasks, n, C, H, W), got {tuple(x.shape)}. Image "
            "transforms apply to image episodes (EpisodeSampler over a LabelledImages)."
        )


def compose(*transforms: EpisodeTransform) -> EpisodeTransform:
    """One transform that applies ``transforms`` in order, each with the same generator.

    Example:
        >>> import torch
        >>> from metafunc.data import EpisodeSampler, compose, procedural_glyphs, random_flip
        >>> from metafunc.data import random_rot90
        >>> augment = compose(random_flip(), random_rot90(per_class=True))
        >>> sampler = EpisodeSampler(procedural_glyphs(10, 6, seed=0), ways=5, shots=1,
        ...                          queries=2, transform=augment)
        >>> sampler.sample(4, generator=torch.Generator().manual_seed(0)).query[0].shape
        torch.Size([4, 10, 1, 28, 28])
    """
    for i, t in enumerate(transforms):
        if not callable(t):
            raise TypeError(
                f"compose(*transforms): expected each transform to be callable as "
                f"transform(episode, generator), got {describe(t)} at position {i}."
            )

    def composed(episode: Episode, generator: torch.Generator) -> Episode:
        for t in transforms:
            episode = t(episode, generator)
        return episode

    return composed


def random_flip(p: float = 0.5) -> EpisodeTransform:
    """Flips each image left-right with probability ``p`` (torchvision's
    ``RandomHorizontalFlip``, drawn per image of every task).

    Example:
        >>> import torch
        >>> from metafunc.data import Episode, random_flip
        >>> x = torch.arange(4.0).reshape(1, 1, 1, 2, 2)
        >>> episode = Episode((x, torch.zeros(1, 1)), (x, torch.zeros(1, 1)), {})
        >>> random_flip(1.0)(episode, torch.Generator()).support[0].flatten()
        tensor([1., 0., 3., 2.])
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"random_flip(p): expected p to be a probability in [0, 1], got {p!r}.")

    def flip(episode: Episode, generator: torch.Generator) -> Episode:
        out = []
        for x in _images(episode):
            _check_images("random_flip(p)", x)
            chosen = _uniform(generator, *x.shape[:2], device=x.device) < p
            out.append(torch.where(chosen[..., None, None, None], x.flip(-1), x))
        return _with_images(episode, *out)

    return flip


def random_crop(size: int, padding: int = 0) -> EpisodeTransform:
    """Pads each image by ``padding`` zeros on every side, then crops a ``size`` x ``size``
    window at a random place (torchvision's ``RandomCrop(size, padding)``, drawn per image).

    The zeros are the mean colour once the images are normalised. The usual augmentation of
    ResNet-12 few-shot training (MetaOptNet): ``random_crop(84, padding=8)`` on
    miniImageNet, ``random_crop(32, padding=4)`` on CIFAR-FS and FC100.

    Example:
        >>> import torch
        >>> from metafunc.data import Episode, random_crop
        >>> x = torch.ones(2, 3, 1, 8, 8)
        >>> episode = Episode((x, torch.zeros(2, 3)), (x, torch.zeros(2, 3)), {})
        >>> out = random_crop(8, padding=2)(episode, torch.Generator().manual_seed(0))
        >>> out.support[0].shape, bool(out.support[0].sum() < x.sum())  # some padding shows
        (torch.Size([2, 3, 1, 8, 8]), True)
    """
    call = "random_crop(size, padding)"
    int_at_least(call, "size", size, minimum=1)
    int_at_least(call, "padding", padding, minimum=0)

    def crop(episode: Episode, generator: torch.Generator) -> Episode:
        out = []
        for x in _images(episode):
            _check_images(call, x)
            tasks, n, c, h, w = x.shape
            if size > h + 2 * padding or size > w + 2 * padding:
                raise ValueError(
                    f"{call}: a {size}x{size} crop does not fit in images of {h}x{w} padded by "
                    f"{padding}. Lower size or raise padding."
                )
            flat = F.pad(x.reshape(tasks * n, c, h, w), (padding,) * 4)
            u = _uniform(generator, 2, tasks * n, device=x.device)
            top = (u[0] * (h + 2 * padding - size + 1)).long()
            left = (u[1] * (w + 2 * padding - size + 1)).long()
            span = torch.arange(size, device=x.device)
            rows = (top[:, None] + span)[:, None, :, None]
            cols = (left[:, None] + span)[:, None, None, :]
            batch = torch.arange(tasks * n, device=x.device)[:, None, None, None]
            chan = torch.arange(c, device=x.device)[None, :, None, None]
            out.append(flat[batch, chan, rows, cols].reshape(tasks, n, c, size, size))
        return _with_images(episode, *out)

    return crop


def random_rot90(*, per_class: bool = False) -> EpisodeTransform:
    """Rotates images by a random multiple of 90 degrees (counter-clockwise, as
    ``torch.rot90``); the images must be square.

    ``per_class=False`` draws an angle per image (an augmentation); ``per_class=True`` one per
    class of each task, the same for its support and query images: a rotated class is a new
    class, the task augmentation of Omniglot's rotations (Santoro et al. 2016) drawn afresh for
    every task.

    Example:
        >>> import torch
        >>> from metafunc.data import Episode, random_rot90
        >>> x = torch.arange(4.0).reshape(1, 1, 1, 2, 2).expand(1, 4, 1, 2, 2)
        >>> y = torch.tensor([[0, 0, 1, 1]])
        >>> out = random_rot90(per_class=True)(Episode((x, y), (x, y), {}),
        ...                                    torch.Generator().manual_seed(1))
        >>> torch.equal(out.support[0][0, 0], out.support[0][0, 1])  # one angle per class
        True
    """
    if not isinstance(per_class, bool):
        raise TypeError(f"random_rot90(per_class=...): expected a bool, got {describe(per_class)}.")

    def rotate(episode: Episode, generator: torch.Generator) -> Episode:
        call = "random_rot90(per_class=...)"
        xs, ys = _images(episode), [episode.support[1], episode.query[1]]
        for x in xs:
            _check_images(call, x)
            if x.shape[-1] != x.shape[-2]:
                raise ValueError(f"{call}: expected square images, got {tuple(x.shape[-2:])}.")
        tasks = xs[0].shape[0]
        if per_class:
            ways = int(max(int(y.max()) if y.numel() else 0 for y in ys)) + 1
            per_task = (_uniform(generator, tasks, ways, device=xs[0].device) * 4).long()
            angles = [per_task.gather(1, y.long()) for y in ys]
        else:
            angles = [(_uniform(generator, *x.shape[:2], device=x.device) * 4).long() for x in xs]
        out = []
        for x, k in zip(xs, angles):
            result = x
            for quarter in (1, 2, 3):
                turned = torch.rot90(x, quarter, dims=(-2, -1))
                result = torch.where((k == quarter)[..., None, None, None], turned, result)
            out.append(result)
        return _with_images(episode, *out)

    return rotate


def _take(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``t`` ``(tasks, n, ...)`` reordered along dim 1 by ``order`` ``(tasks, n)``."""
    index = order.reshape(*order.shape, *([1] * (t.dim() - 2))).expand_as(t)
    return t.gather(1, index)


def shuffle_examples() -> EpisodeTransform:
    """Shuffles the examples of the support set and of the query set of each task (the sampler
    orders them by label), together with their labels and ``info`` rows.

    Example:
        >>> import torch
        >>> from metafunc.data import EpisodeSampler, shuffle_examples
        >>> inputs, labels = torch.arange(12.0).unsqueeze(1), torch.arange(12) % 3
        >>> sampler = EpisodeSampler((inputs, labels), ways=3, shots=2, queries=2,
        ...                          transform=shuffle_examples())
        >>> episode = sampler.sample(1, generator=torch.Generator().manual_seed(0))
        >>> sorted(episode.support[1][0].tolist())
        [0, 0, 1, 1, 2, 2]
    """

    def shuffle(episode: Episode, generator: torch.Generator) -> Episode:
        info = dict(episode.info)
        sets = []
        for name, (x, y) in (("support", episode.support), ("query", episode.query)):
            order = _uniform(generator, *y.shape[:2], device=y.device).argsort(dim=1)
            sets.append((_take(x, order), _take(y, order)))
            key = f"{name}_indices"
            if key in info and tuple(info[key].shape[:2]) == tuple(y.shape[:2]):
                info[key] = _take(info[key], order.to(info[key].device))
        return Episode(support=sets[0], query=sets[1], info=info)

    return shuffle
