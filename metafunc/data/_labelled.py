"""``LabelledImages``: images, integer labels, class names (and groups of classes).

Images are held either as floats, used as they are, or as uint8 pixels (:meth:`from_pixels`),
converted to floats and normalised only for the rows an episode draws (:meth:`gather`): a
dataset of 12 GB of pixels would be 48 GB as float32.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .._checks import describe

__all__ = ["LabelledImages", "PixelStore"]


class PixelStore(Protocol):
    """What :meth:`LabelledImages.from_pixels` accepts besides a uint8 tensor: ``len``, a
    ``shape`` ``(N, C, H, W)``, and indexing by a long tensor of rows giving the uint8 pixels
    ``(*rows.shape, C, H, W)`` (e.g. images decoded from PNG bytes on access)."""

    @property
    def shape(self) -> torch.Size: ...

    def __len__(self) -> int: ...

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor: ...


def _check_names(call: str, name: str, value: object, num_classes: int | None) -> list[str]:
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or not all(isinstance(v, str) for v in value)
    ):
        raise TypeError(
            f"{call}: expected {name} to be a list of str, one per class, got {describe(value)}."
        )
    if num_classes is not None and len(value) != num_classes:
        raise ValueError(
            f"{call}: expected {name} to have one entry per class, {num_classes} (the labels run "
            f"from 0 to {num_classes - 1}), got {len(value)}. Pass one name per label value."
        )
    return list(value)


class LabelledImages:
    """A labelled image dataset: the input of :class:`EpisodeSampler`.

    ``images`` is a float tensor ``(N, C, H, W)`` (values in [0, 1] for the built-in datasets),
    or uint8 pixels with a normalisation, built by :meth:`from_pixels` (the few-shot readers);
    ``labels`` is ``(N,)`` with values ``0 .. num_classes - 1`` (any integer dtype, stored as
    ``torch.long``); ``class_names[label]`` names a class (default: ``"0"``, ``"1"``, ...).
    ``class_groups`` optionally gives each class a group name: classes of one group are kept in
    the same split by :func:`split_classes` (:func:`load_omniglot` groups the rotations of one
    character). :func:`load_omniglot` and :func:`procedural_glyphs` build one; so can you, from
    any tensors.

    Example:
        >>> import torch
        >>> from metafunc.data import LabelledImages
        >>> data = LabelledImages(torch.rand(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2]))
        >>> data
        LabelledImages(6 images of shape (1, 8, 8), 3 classes)
        >>> len(data), data.num_classes, data.class_names
        (6, 3, ['0', '1', '2'])
    """

    images: Any
    """``(N, C, H, W)`` floating-point images, or uint8 pixels (a tensor or a
    :class:`PixelStore`) when built by :meth:`from_pixels`: read rows with :meth:`gather`."""
    labels: torch.Tensor
    """``(N,)`` long labels, ``0 .. num_classes - 1``."""
    class_names: list[str]
    """One name per class."""
    class_groups: list[str] | None
    """One group name per class, or ``None``: classes of one group share a split."""
    mean: tuple[float, ...] | None
    """Per-channel mean subtracted by :meth:`gather` from uint8 pixels scaled to [0, 1]."""
    std: tuple[float, ...] | None
    """Per-channel standard deviation that :meth:`gather` divides by after the mean."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        class_names: Sequence[str] | None = None,
        class_groups: Sequence[str] | None = None,
    ) -> None:
        call = "LabelledImages(images, labels, class_names, class_groups)"
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise TypeError(
                f"{call}: expected images to be a 4-d tensor (N, C, H, W), got "
                f"{describe(images)}. Add a channel dim with images.unsqueeze(1) for (N, H, W)."
            )
        if not images.dtype.is_floating_point:
            raise TypeError(
                f"{call}: expected images to be floating point, got dtype {images.dtype}. "
                "Convert with images.float() / 255 for uint8 pixels, or keep them uint8 with "
                "LabelledImages.from_pixels(pixels, labels, ...), which converts per episode."
            )
        self._set(call, images, labels, class_names, class_groups)
        self.mean = self.std = None

    def _set(
        self,
        call: str,
        images: Any,
        labels: torch.Tensor,
        class_names: Sequence[str] | None,
        class_groups: Sequence[str] | None,
    ) -> None:
        if (
            not isinstance(labels, torch.Tensor)
            or labels.dim() != 1
            or labels.dtype.is_floating_point
            or labels.dtype.is_complex
            or labels.dtype == torch.bool
        ):
            raise TypeError(
                f"{call}: expected labels to be a 1-d integer tensor, got {describe(labels)}."
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{call}: expected one label per image, got {images.shape[0]} images and "
                f"{labels.shape[0]} labels."
            )
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(
                f"{call}: expected labels >= 0 (class indices), got {int(labels.min())}. Map your "
                "labels to 0 .. num_classes - 1, e.g. with labels.unique(return_inverse=True)[1]."
            )
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
        if class_names is None:
            class_names = [str(i) for i in range(num_classes)]
        names = _check_names(call, "class_names", class_names, None)
        if len(names) < num_classes:
            raise ValueError(
                f"{call}: got {len(names)} class_names but labels up to {num_classes - 1}. "
                "Pass one name per label value."
            )
        if len(set(names)) != len(names):
            twice = sorted(n for n, c in collections.Counter(names).items() if c > 1)[:5]
            raise ValueError(
                f"{call}: expected distinct class_names, got {twice} more than once. Give each "
                "class its own name (class_groups may repeat)."
            )
        self.images = images
        self.labels = labels.long()
        self.class_names = names
        self.class_groups = (
            None
            if class_groups is None
            else _check_names(call, "class_groups", class_groups, len(names))
        )

    @classmethod
    def from_pixels(
        cls,
        pixels: torch.Tensor | PixelStore,
        labels: torch.Tensor,
        class_names: Sequence[str] | None = None,
        class_groups: Sequence[str] | None = None,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> LabelledImages:
        """A dataset that keeps uint8 ``pixels`` ``(N, C, H, W)`` and converts per episode.

        :meth:`gather` (which :class:`EpisodeSampler` calls) reads only the rows drawn, moves
        them to the target device as uint8, and returns ``(pixels / 255 - mean) / std`` per
        channel in the default float dtype; without ``mean`` and ``std``, ``pixels / 255``.
        ``pixels`` may be a (possibly memory-mapped, possibly non-contiguous) uint8 tensor or a
        :class:`PixelStore` that decodes on access; nothing is copied here.

        Example:
            >>> import torch
            >>> from metafunc.data import LabelledImages
            >>> pixels = torch.full((4, 3, 2, 2), 255, dtype=torch.uint8)
            >>> data = LabelledImages.from_pixels(
            ...     pixels, torch.tensor([0, 0, 1, 1]), mean=(0.5,) * 3, std=(0.25,) * 3
            ... )
            >>> data.images.dtype, data.gather(torch.tensor([1, 2])).shape
            (torch.uint8, torch.Size([2, 3, 2, 2]))
            >>> data.gather(torch.tensor([0]))[0, :, 0, 0]  # (1 - 0.5) / 0.25
            tensor([2., 2., 2.])
        """
        call = "LabelledImages.from_pixels(pixels, labels, class_names, class_groups, mean, std)"
        if isinstance(pixels, torch.Tensor):
            if pixels.dim() != 4 or pixels.dtype != torch.uint8:
                raise TypeError(
                    f"{call}: expected pixels to be a 4-d uint8 tensor (N, C, H, W), got "
                    f"{describe(pixels)}. For (N, H, W, C) arrays pass pixels.permute(0, 3, 1, 2) "
                    "(a view, no copy); for float images use LabelledImages(images, labels)."
                )
        elif (
            not (
                hasattr(pixels, "shape")
                and hasattr(pixels, "__getitem__")
                and hasattr(pixels, "__len__")
            )
            or len(tuple(pixels.shape)) != 4
        ):
            raise TypeError(
                f"{call}: expected pixels to be a 4-d uint8 tensor (N, C, H, W) or a PixelStore "
                f"(shape, __len__ and __getitem__ by a tensor of rows), got {describe(pixels)}."
            )
        channels = int(pixels.shape[1])
        stats: list[tuple[float, ...] | None] = []
        for name, value in (("mean", mean), ("std", std)):
            if value is None:
                stats.append(None)
                continue
            ok = (
                isinstance(value, Sequence)
                and not isinstance(value, (str, bytes))
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            )
            if not ok:
                raise TypeError(
                    f"{call}: expected {name} to be a tuple of numbers, one per channel, got "
                    f"{describe(value)}."
                )
            if len(value) != channels or not all(math.isfinite(v) for v in value):
                raise ValueError(
                    f"{call}: expected {name} to hold {channels} finite numbers (one per channel "
                    f"of pixels of shape {tuple(pixels.shape)}), got {tuple(value)!r}."
                )
            stats.append(tuple(float(v) for v in value))
        if (stats[0] is None) != (stats[1] is None):
            raise ValueError(
                f"{call}: expected mean and std together or neither, got only "
                f"{'mean' if stats[1] is None else 'std'}. Pass std=(1.0,) * {channels} to "
                "subtract a mean only."
            )
        if stats[1] is not None and any(v <= 0 for v in stats[1]):
            raise ValueError(f"{call}: expected std > 0 in every channel, got {stats[1]!r}.")
        data = cls.__new__(cls)
        data._set(call, pixels, labels, class_names, class_groups)
        data.mean, data.std = stats
        return data

    def gather(self, rows: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
        """The images of dataset rows ``rows`` (a long tensor of any shape), as floats on
        ``device`` (default: where the images are): ``(*rows.shape, C, H, W)``.

        Float images are indexed as they are; uint8 pixels (:meth:`from_pixels`) are indexed,
        moved as uint8, then scaled to [0, 1] and normalised with ``mean`` and ``std``.

        Example:
            >>> import torch
            >>> from metafunc.data import LabelledImages
            >>> data = LabelledImages(torch.arange(4.0).reshape(4, 1, 1, 1), torch.arange(4))
            >>> data.gather(torch.tensor([[3, 0]])).flatten()
            tensor([3., 0.])
        """
        images = self.images
        home = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        out_device = home if device is None else torch.device(device)
        x = images[rows.to(home)]
        if self.mean is None and x.dtype.is_floating_point:
            return x.to(out_device)
        x = x.to(out_device).to(torch.get_default_dtype()).div_(255.0)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=out_device)[:, None, None]
            std = torch.tensor(self.std, dtype=x.dtype, device=out_device)[:, None, None]
            x = x.sub_(mean).div_(std)
        return x

    @property
    def num_classes(self) -> int:
        """The number of classes, ``len(class_names)``."""
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"LabelledImages({len(self)} images of shape {tuple(self.images.shape[1:])}, "
            f"{self.num_classes} classes)"
        )
