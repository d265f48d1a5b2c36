"""``load_cifar_fs``, ``load_fc100``: the few-shot splits of CIFAR-100 from its python pickles."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from . import _files
from ._labelled import LabelledImages
from ._stats import CIFAR_MEAN, CIFAR_STD, normalisation

__all__ = ["CIFAR_FS_SPLIT", "FC100_SPLIT", "load_cifar_fs", "load_fc100"]

CIFAR_FS_SPLIT: Mapping[str, tuple[str, ...]] = {
    "train": (
        "dolphin", "seal", "aquarium_fish", "ray", "trout", "orchid", "sunflower", "tulip",
        "bottle", "bowl", "can", "cup", "plate", "apple", "mushroom", "orange", "pear", "clock",
        "keyboard", "chair", "couch", "bee", "caterpillar", "cockroach", "bear", "lion", "tiger",
        "wolf", "bridge", "castle", "house", "road", "skyscraper", "cloud", "forest", "mountain",
        "elephant", "kangaroo", "porcupine", "possum", "raccoon", "skunk", "lobster", "spider",
        "boy", "girl", "dinosaur", "lizard", "snake", "turtle", "hamster", "mouse", "rabbit",
        "shrew", "squirrel", "oak_tree", "palm_tree", "pine_tree", "willow_tree", "bus", "train",
        "lawn_mower", "streetcar", "tank",
    ),
    "val": (
        "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea",
        "camel", "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
    ),
    "test": (
        "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe",
        "leopard", "plain", "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman",
        "bicycle", "pickup_truck", "rocket",
    ),
}  # fmt: skip
"""The CIFAR-FS class split of Bertinetto et al. 2019 (arXiv:1805.08136): 64 / 16 / 20 CIFAR-100
classes, by name (the split files of the authors' code, also shipped by torchmeta)."""

FC100_SPLIT: Mapping[str, tuple[str, ...]] = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables",
        "household_electrical_devices", "household_furniture", "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes", "reptiles", "trees", "vehicles_1", "vehicles_2",
    ),
    "val": (
        "large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
        "small_mammals",
    ),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}  # fmt: skip
"""The FC100 split of Oreshkin et al. 2018 (TADAM, arXiv:1805.10123): CIFAR-100 superclasses
12 / 4 / 4, so 60 / 20 / 20 classes, by superclass name."""

_LAYOUT = (
    "the CIFAR-100 python version: <path>/cifar-100-python/{train,test,meta} or "
    "<path>/{train,test,meta} (the unpacked cifar-100-python.tar.gz), pickles with 'data' "
    "(N, 3072) uint8, 'fine_labels' and 'coarse_labels', and 'fine_label_names' and "
    "'coarse_label_names' in meta"
)


def _read_cifar100(
    call: str, path: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[str]]:
    """All 60,000 images ``(N, 3, 32, 32)`` uint8 (train then test), fine and coarse labels, and
    the fine and coarse names."""
    folder = _files.check_path(call, path, "data/cifar-100-python")
    if (folder / "cifar-100-python").is_dir() and not (folder / "meta").is_file():
        folder = folder / "cifar-100-python"
    for name in ("meta", "train", "test"):
        if not (folder / name).is_file():
            raise _files.missing(call, folder, f"the file {name!r}", _LAYOUT)
    meta = _files.read_pickle(call, folder / "meta")
    fine_names = [str(n) for n in _files.entry(call, folder / "meta", meta, ["fine_label_names"])]
    coarse_names = [
        str(n) for n in _files.entry(call, folder / "meta", meta, ["coarse_label_names"])
    ]
    images: list[torch.Tensor] = []
    fine: list[torch.Tensor] = []
    coarse: list[torch.Tensor] = []
    for name in ("train", "test"):
        file: Path = folder / name
        part = _files.read_pickle(call, file)
        data = torch.as_tensor(_files.entry(call, file, part, ["data"]))
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{call}: expected 'data' of {str(file)!r} to be (N, 3072) uint8 (32x32 RGB, "
                f"channel planes), got shape {tuple(data.shape)} and dtype {data.dtype}."
            )
        images.append(data.reshape(-1, 3, 32, 32))
        for out, key in ((fine, "fine_labels"), (coarse, "coarse_labels")):
            labels = torch.as_tensor(list(_files.entry(call, file, part, [key])), dtype=torch.long)
            if labels.shape != (data.shape[0],):
                raise ValueError(
                    f"{call}: {str(file)!r} has {labels.numel()} {key!r} for "
                    f"{data.shape[0]} images."
                )
            out.append(labels)
    return torch.cat(images), torch.cat(fine), torch.cat(coarse), fine_names, coarse_names


def _subset(
    call: str,
    classes: list[str],
    pixels: torch.Tensor,
    fine: torch.Tensor,
    coarse: torch.Tensor,
    fine_names: list[str],
    coarse_names: list[str],
    normalize: bool,
) -> LabelledImages:
    index = {n: i for i, n in enumerate(fine_names)}
    absent = [c for c in classes if c not in index]
    if absent:
        raise ValueError(
            f"{call}: the classes {absent[:5]} of the split are not in 'fine_label_names' of "
            f"meta ({len(fine_names)} names, e.g. {fine_names[:3]}). Is it CIFAR-100?"
        )
    wanted = torch.tensor([index[c] for c in classes], dtype=torch.long)
    keep = (fine[:, None] == wanted).any(dim=1).nonzero().flatten()
    new_label = torch.full((len(fine_names),), -1, dtype=torch.long)
    new_label[wanted] = torch.arange(len(classes))
    groups = []
    for c in wanted.tolist():
        supers = coarse[fine == c].unique().tolist()
        groups.append(coarse_names[supers[0]] if len(supers) == 1 else "")
    mean, std = normalisation(normalize, CIFAR_MEAN, CIFAR_STD)
    return LabelledImages.from_pixels(
        pixels[keep], new_label[fine[keep]], list(classes), groups, mean=mean, std=std
    )


def _check(call: str, split: object, normalize: object) -> str:
    split = _files.check_split(call, split)
    if not isinstance(normalize, bool):
        raise TypeError(f"{call}: expected normalize to be a bool, got {normalize!r}.")
    return split


def load_cifar_fs(
    path: str | os.PathLike[str], split: str = "train", *, normalize: bool = True
) -> LabelledImages:
    """Reads one split of CIFAR-FS (Bertinetto et al. 2019): the 64 / 16 / 20 CIFAR-100 classes
    of :data:`CIFAR_FS_SPLIT`, all 600 32x32 images of each (CIFAR-100's train and test files
    together), from the CIFAR-100 python pickles in ``path``. Nothing downloads.

    ``path`` is the unpacked ``cifar-100-python`` folder (``train``, ``test``, ``meta``) or the
    folder holding it. Classes are labelled ``0 ..`` in the order of :data:`CIFAR_FS_SPLIT`,
    named by their CIFAR-100 name, grouped by superclass. The pixels of the split are kept as
    uint8 ``(N, 3, 32, 32)``; episodes convert the rows they draw: ``pixels / 255``, then with
    ``normalize`` the statistics of MetaOptNet (Lee et al. 2019), mean
    ``(129.38, 124.11, 112.48) / 255`` and std ``(68.21, 65.43, 70.46) / 255``. Needs numpy.

    Example:
        >>> from metafunc.data import CIFAR_FS_SPLIT
        >>> [len(CIFAR_FS_SPLIT[s]) for s in ("train", "val", "test")]
        [64, 16, 20]
        >>> CIFAR_FS_SPLIT["test"][:3]
        ('whale', 'poppy', 'rose')
    """
    call = "load_cifar_fs(path, split=..., normalize=...)"
    split = _check(call, split, normalize)
    return _subset(call, list(CIFAR_FS_SPLIT[split]), *_read_cifar100(call, path), normalize)


def load_fc100(
    path: str | os.PathLike[str], split: str = "train", *, normalize: bool = True
) -> LabelledImages:
    """Reads one split of FC100 (Oreshkin et al. 2018): the CIFAR-100 classes of the 12 / 4 / 4
    superclasses of :data:`FC100_SPLIT` (60 / 20 / 20 classes), all 600 32x32 images of each,
    from the CIFAR-100 python pickles in ``path``. Nothing downloads.

    As :func:`load_cifar_fs` otherwise (same layout, normalisation and storage); classes are
    labelled ``0 ..`` by superclass in the order of :data:`FC100_SPLIT`, then by CIFAR-100
    label, and grouped by superclass.

    Example:
        >>> from metafunc.data import FC100_SPLIT
        >>> [len(FC100_SPLIT[s]) for s in ("train", "val", "test")]
        [12, 4, 4]
        >>> FC100_SPLIT["test"]
        ('aquatic_mammals', 'insects', 'medium_mammals', 'people')
    """
    call = "load_fc100(path, split=..., normalize=...)"
    split = _check(call, split, normalize)
    pixels, fine, coarse, fine_names, coarse_names = _read_cifar100(call, path)
    index = {n: i for i, n in enumerate(coarse_names)}
    absent = [s for s in FC100_SPLIT[split] if s not in index]
    if absent:
        raise ValueError(
            f"{call}: the superclasses {absent} of the split are not in 'coarse_label_names' of "
            f"meta ({coarse_names[:3]}...). Is it CIFAR-100?"
        )
    classes = [
        fine_names[c]
        for s in FC100_SPLIT[split]
        for c in sorted(fine[coarse == index[s]].unique().tolist())
    ]
    return _subset(call, classes, pixels, fine, coarse, fine_names, coarse_names, normalize)
