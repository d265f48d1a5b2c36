"""``load_miniimagenet``: miniImageNet (Ravi & Larochelle split) from its pickles or its CSVs."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from .._checks import int_at_least
from . import _files
from ._labelled import LabelledImages
from ._stats import IMAGENET_MEAN, IMAGENET_STD, normalisation

__all__ = ["load_miniimagenet"]

_CALL = "load_miniimagenet(path, split=..., normalize=...)"
_LAYOUT = (
    "either the released pickles, <path>/mini-imagenet-cache-{train,val,test}.pkl (a dict with "
    "'image_data', (N, 84, 84, 3) uint8, and 'class_dict', {class: [row, ...]}), or the "
    "images-folder layout, <path>/images/<file> and <path>/{train,val,test}.csv with a "
    "'filename,label' header (Ravi & Larochelle 2017)"
)


def _from_pickle(file: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    obj = _files.read_pickle(_CALL, file)
    images = _files.uint8_images(
        _CALL, file, _files.entry(_CALL, file, obj, ["image_data"]), _LAYOUT
    )
    class_dict = _files.entry(_CALL, file, obj, ["class_dict"])
    if not isinstance(class_dict, dict) or not class_dict:
        raise ValueError(
            f"{_CALL}: expected 'class_dict' of {str(file)!r} to be a non-empty dict "
            f"{{class: [row, ...]}}, got {type(class_dict).__name__}."
        )
    names = sorted(str(k) for k in class_dict)
    by_name = {str(k): v for k, v in class_dict.items()}
    n = images.shape[0]
    labels = torch.full((n,), -1, dtype=torch.long)
    for label, name in enumerate(names):
        rows = torch.as_tensor([int(r) for r in by_name[name]], dtype=torch.long)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
            raise ValueError(
                f"{_CALL}: class {name!r} of {str(file)!r} lists row {int(rows.max())}, but "
                f"'image_data' has {n} images."
            )
        if bool((labels[rows] != -1).any()):
            raise ValueError(
                f"{_CALL}: a row of class {name!r} of {str(file)!r} is listed under another "
                "class too; each image must have one class."
            )
        labels[rows] = label
    if bool((labels == -1).any()):
        raise ValueError(
            f"{_CALL}: {int((labels == -1).sum())} of the {n} images of {str(file)!r} are in no "
            "class of 'class_dict'."
        )
    return images, labels, names


def _from_csv(
    folder: Path, file: Path, image_size: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image, UnidentifiedImageError

    images_dir = folder / "images"
    if not images_dir.is_dir():
        raise _files.missing(_CALL, folder, f"the images/ folder (beside {file.name})", _LAYOUT)
    with open(file, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        head = rows[0] if rows else "nothing"
        raise ValueError(
            f"{_CALL}: expected {str(file)!r} to start with the header 'filename,label', got "
            f"{head!r}."
        )
    entries = [r for r in rows[1:] if r]
    bad = [r for r in entries if len(r) != 2]
    if bad or not entries:
        raise ValueError(
            f"{_CALL}: expected rows 'filename,label' in {str(file)!r}, got "
            f"{bad[0] if bad else 'no rows'!r}."
        )
    names = sorted({label for _, label in entries})
    index = {name: i for i, name in enumerate(names)}
    pixels = torch.empty((len(entries), 3, image_size, image_size), dtype=torch.uint8)
    for i, (filename, _) in enumerate(entries):
        image_file = images_dir / filename
        if not image_file.is_file():
            raise FileNotFoundError(
                f"{_CALL}: {file.name} lists {filename!r}, which is not in {str(images_dir)!r}. "
                f"Expected {_LAYOUT}."
            )
        try:
            with Image.open(image_file) as im:
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{_CALL}: cannot read {str(image_file)!r} as an image ({e}).") from e
        if rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), resample=Image.Resampling.LANCZOS)
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        pixels[i] = data.reshape(image_size, image_size, 3).permute(2, 0, 1)
    labels = torch.tensor([index[label] for _, label in entries], dtype=torch.long)
    return pixels, labels, names


def load_miniimagenet(
    path: str | os.PathLike[str],
    split: str = "train",
    *,
    normalize: bool = True,
    image_size: int = 84,
) -> LabelledImages:
    """Reads one split of miniImageNet (Vinyals et al. 2016; the class split of Ravi & Larochelle
    2017: 64 train, 16 val, 20 test classes of 600 images each) from ``path``. Nothing downloads.

    Two layouts are read, the first found:

    - the released pickles ``mini-imagenet-cache-{split}.pkl``: a dict with ``"image_data"``, a
      ``(N, 84, 84, 3)`` uint8 array, and ``"class_dict"``, ``{class name: [row, ...]}``;
    - the images folder: ``images/<filename>`` and ``{split}.csv``, whose rows are
      ``filename,label`` after that header; images are read as RGB and resized to
      ``image_size`` x ``image_size`` with Pillow's Lanczos filter when they are not that size.

    The pixels stay uint8 ``(N, 3, 84, 84)`` (a view of the pickle's array: no copy; 1.3 GB for
    the whole set); episodes convert the rows they draw (:meth:`LabelledImages.from_pixels`):
    ``pixels / 255``, then with ``normalize`` the per-channel ImageNet-subset statistics of
    MetaOptNet (Lee et al. 2019) and most ResNet-12 work, mean ``(120.40, 115.59, 104.54) / 255``
    and std ``(70.68, 68.28, 72.55) / 255``; ``normalize=False`` keeps ``[0, 1]`` (MAML's code).
    Classes are sorted by name (the ImageNet synset ids) and labelled ``0 ..``. Unpickling needs
    numpy, the images folder Pillow. Open only pickles you trust.

    Example:
        >>> import pathlib, pickle, tempfile
        >>> import numpy as np
        >>> from metafunc.data import load_miniimagenet
        >>> tmp = tempfile.TemporaryDirectory()
        >>> cache = {"image_data": np.zeros((4, 84, 84, 3), np.uint8),
        ...          "class_dict": {"n01": [0, 1], "n02": [2, 3]}}
        >>> with open(pathlib.Path(tmp.name, "mini-imagenet-cache-test.pkl"), "wb") as f:
        ...     pickle.dump(cache, f)
        >>> data = load_miniimagenet(tmp.name, "test")
        >>> data, data.class_names, data.images.dtype
        (LabelledImages(4 images of shape (3, 84, 84), 2 classes), ['n01', 'n02'], torch.uint8)
        >>> tmp.cleanup()
    """
    folder = _files.check_path(_CALL, path, "data/mini-imagenet")
    split = _files.check_split(_CALL, split)
    if not isinstance(normalize, bool):
        raise TypeError(f"{_CALL}: expected normalize to be a bool, got {normalize!r}.")
    int_at_least(_CALL, "image_size", image_size, minimum=1)
    pickled = folder / f"mini-imagenet-cache-{split}.pkl"
    table = folder / f"{split}.csv"
    if pickled.is_file():
        pixels, labels, names = _from_pickle(pickled)
    elif table.is_file():
        _files.require(_CALL, "PIL.Image", "pillow")
        pixels, labels, names = _from_csv(folder, table, image_size)
    else:
        raise _files.missing(_CALL, folder, f"{pickled.name} (or {table.name})", _LAYOUT)
    mean, std = normalisation(normalize, IMAGENET_MEAN, IMAGENET_STD)
    return LabelledImages.from_pixels(pixels, labels, names, mean=mean, std=std)
