"""``LabelledImages``: images, integer labels, class names (and groups of classes)."""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch

from .._checks import describe

__all__ = ["LabelledImages"]


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
    """A labelled image dataset held in memory: the input of :class:`EpisodeSampler`.

    ``images`` is a float tensor ``(N, C, H, W)`` (values in [0, 1] for the built-in datasets);
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

    images: torch.Tensor
    """``(N, C, H, W)`` floating-point images."""
    labels: torch.Tensor
    """``(N,)`` long labels, ``0 .. num_classes - 1``."""
    class_names: list[str]
    """One name per class."""
    class_groups: list[str] | None
    """One group name per class, or ``None``: classes of one group share a split."""

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
                "Convert with images.float() / 255 for uint8 pixels."
            )
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
