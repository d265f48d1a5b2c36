"""``load_tieredimagenet``: tieredImageNet (Ren et al. 2018) from its released pickles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import _files
from ._encoded import EncodedImages
from ._labelled import LabelledImages
from ._stats import IMAGENET_MEAN, IMAGENET_STD, normalisation

__all__ = ["load_tieredimagenet"]

_CALL = "load_tieredimagenet(path, split=..., normalize=...)"
_LAYOUT = (
    "the released tieredImageNet files (Ren et al. 2018): <path>/{split}_labels.pkl (a dict with "
    "'label_specific', or 'labels') and the images as <path>/{split}_images_png.pkl (a list of "
    "PNG files as bytes) or <path>/{split}_images.npz (an 'images' array, (N, 84, 84, 3) uint8), "
    "for split in train, val, test"
)


def _label_list(file: Path, obj: Any, key: str, n: int | None) -> list[Any]:
    values = _files.entry(_CALL, file, obj, [key])
    try:
        out = [v.decode() if isinstance(v, bytes) else v for v in list(values)]
    except TypeError:
        raise ValueError(
            f"{_CALL}: expected {key!r} of {str(file)!r} to be a list, one entry per "
            f"{'image' if n is not None else 'class'}, got {type(values).__name__}."
        ) from None
    if n is not None and len(out) != n:
        raise ValueError(f"{_CALL}: {str(file)!r} has {len(out)} {key!r} entries for {n} images.")
    return [v.item() if hasattr(v, "item") else v for v in out]


def _labels(file: Path, n: int) -> tuple[torch.Tensor, list[str], list[str] | None]:
    """Labels ``0 ..`` (in the order of the file's class indices), class names, class groups."""
    obj = _files.read_pickle(_CALL, file)
    has_specific = isinstance(obj, dict) and any(
        k in obj for k in ("label_specific", b"label_specific")
    )
    key = "label_specific" if has_specific else "labels"
    specific = _label_list(file, obj, "label_specific" if has_specific else "labels", n)
    if not all(isinstance(v, int) for v in specific):
        raise ValueError(f"{_CALL}: expected integer class indices in {key!r} of {str(file)!r}.")
    values = sorted(set(specific))
    index = {v: i for i, v in enumerate(values)}
    labels = torch.tensor([index[v] for v in specific], dtype=torch.long)
    names = [str(v) for v in values]
    if has_specific and any(k in obj for k in ("label_specific_str", b"label_specific_str")):
        strings = _label_list(file, obj, "label_specific_str", None)
        if all(0 <= v < len(strings) for v in values):
            names = [str(strings[v]) for v in values]
    groups: list[str] | None = None
    if has_specific and any(k in obj for k in ("label_general", b"label_general")):
        general = _label_list(file, obj, "label_general", n)
        of_class: dict[int, Any] = {}
        for s, g in zip(specific, general):
            if of_class.setdefault(s, g) != g:
                raise ValueError(
                    f"{_CALL}: class {s} of {str(file)!r} is under two 'label_general' values, "
                    f"{of_class[s]!r} and {g!r}; a class has one superclass."
                )
        group_names = None
        if any(k in obj for k in ("label_general_str", b"label_general_str")):
            group_names = _label_list(file, obj, "label_general_str", None)
        groups = [
            str(group_names[g])
            if group_names is not None and isinstance(g, int) and 0 <= g < len(group_names)
            else str(g)
            for g in (of_class[v] for v in values)
        ]
    return labels, names, groups


def _images(folder: Path, split: str) -> Any:
    npz = folder / f"{split}_images.npz"
    png = folder / f"{split}_images_png.pkl"
    if npz.is_file():
        array = _files.load_npz_member(_CALL, npz, "images")
        return _files.uint8_images(_CALL, npz, array, _LAYOUT)
    if png.is_file():
        _files.require(_CALL, "PIL.Image", "pillow")
        encoded = _files.read_pickle(_CALL, png)
        if isinstance(encoded, (str, bytes)) or not isinstance(encoded, (list, tuple)):
            raise ValueError(
                f"{_CALL}: expected {str(png)!r} to hold a list of PNG files (bytes), got "
                f"{type(encoded).__name__}."
            )
        if not encoded:
            raise ValueError(f"{_CALL}: {str(png)!r} holds no images.")
        store = EncodedImages(encoded, size=(84, 84))
        store.decode(0)  # a file of something else fails here, not in the first episode
        return store
    raise _files.missing(_CALL, folder, f"{png.name} (or {npz.name})", _LAYOUT)


def load_tieredimagenet(
    path: str | os.PathLike[str], split: str = "train", *, normalize: bool = True
) -> LabelledImages:
    """Reads one split of tieredImageNet (Ren et al. 2018: 608 ImageNet classes under 34
    superclasses, split by superclass into 351 train, 97 val, 160 test classes; 84x84 RGB) from
    the released files in ``path``. Nothing downloads.

    Supported files, per ``split``:

    - labels: ``{split}_labels.pkl``, a dict with ``"label_specific"`` (the class of each image)
      and optionally ``"label_general"`` (its superclass), ``"label_specific_str"`` and
      ``"label_general_str"`` (names indexed by those values), as released by Ren et al.; or a
      dict with ``"labels"`` only, as in the converted files of MetaOptNet (Lee et al. 2019).
    - images: ``{split}_images.npz`` with an ``"images"`` array ``(N, 84, 84, 3)`` uint8 (the
      converted files; memory-mapped when stored uncompressed, as ``numpy.savez`` writes it, so
      the 12 GB train split is paged in as episodes touch it), else ``{split}_images_png.pkl``,
      the released list of PNG files as bytes, kept encoded and decoded per episode with Pillow
      (:class:`EncodedImages`). Pillow decodes PNGs as RGB; the ``.npz`` pixels are used as
      stored (the usual conversion script decodes with OpenCV, which gives BGR order).

    Classes are labelled ``0 ..`` in the order of the file's class indices, named by
    ``label_specific_str`` when present (else the index), and grouped by superclass
    (``class_groups``) when ``label_general`` is present. Episodes convert the rows they draw:
    ``pixels / 255``, then with ``normalize`` MetaOptNet's ImageNet-subset statistics, mean
    ``(120.40, 115.59, 104.54) / 255`` and std ``(70.68, 68.28, 72.55) / 255``. Needs numpy (and
    Pillow for the PNG pickles). Open only pickles you trust.

    Example:
        >>> import pathlib, pickle, tempfile
        >>> import numpy as np
        >>> from metafunc.data import load_tieredimagenet
        >>> tmp = tempfile.TemporaryDirectory()
        >>> np.savez(pathlib.Path(tmp.name, "val_images.npz"),
        ...          images=np.zeros((3, 84, 84, 3), np.uint8))
        >>> labels = {"label_specific": np.array([0, 1, 1]), "label_general": np.array([0, 0, 0]),
        ...           "label_specific_str": ["n01", "n02"], "label_general_str": ["animal"]}
        >>> with open(pathlib.Path(tmp.name, "val_labels.pkl"), "wb") as f:
        ...     pickle.dump(labels, f)
        >>> data = load_tieredimagenet(tmp.name, "val")
        >>> data, data.class_names, data.class_groups, data.images.dtype
        (LabelledImages(3 images of shape (3, 84, 84), 2 classes), ['n01', 'n02'],
         ['animal', 'animal'], torch.uint8)
        >>> del data
        >>> tmp.cleanup()
    """
    folder = _files.check_path(_CALL, path, "data/tiered-imagenet")
    split = _files.check_split(_CALL, split)
    if not isinstance(normalize, bool):
        raise TypeError(f"{_CALL}: expected normalize to be a bool, got {normalize!r}.")
    labels_file = folder / f"{split}_labels.pkl"
    if not labels_file.is_file():
        raise _files.missing(_CALL, folder, labels_file.name, _LAYOUT)
    pixels = _images(folder, split)
    labels, names, groups = _labels(labels_file, len(pixels))
    mean, std = normalisation(normalize, IMAGENET_MEAN, IMAGENET_STD)
    return LabelledImages.from_pixels(pixels, labels, names, groups, mean=mean, std=std)
