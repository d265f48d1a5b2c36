"""``load_omniglot``: Omniglot from its standard folders on disk, rotations as new classes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .._checks import describe, int_at_least
from ._labelled import LabelledImages

__all__ = ["load_omniglot"]

_CALL = "load_omniglot(path, rotations=..., image_size=...)"
_LAYOUT = (
    "the standard Omniglot layout, <path>/<alphabet>/<character>/*.png (the unzipped "
    "images_background or images_evaluation folder), or a folder holding images_background "
    "and/or images_evaluation"
)
_SPLITS = ("images_background", "images_evaluation")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _pngs(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith(".")
    )


def _layout_error(message: str) -> ValueError:
    return ValueError(f"{_CALL}: {message} Expected {_LAYOUT}.")


def _characters(root: Path) -> list[tuple[str, Path, list[Path]]]:
    """``(alphabet/character, folder, png files)`` for every character under ``root``."""
    alphabets = _subdirs(root)
    if not alphabets:
        if _pngs(root):
            raise _layout_error(
                f"{str(root)!r} holds PNG files directly: it looks like one character's folder; "
                "pass the folder two levels up."
            )
        if not any(not p.name.startswith(".") for p in root.iterdir()):
            raise _layout_error(f"{str(root)!r} is empty.")
        raise _layout_error(f"{str(root)!r} holds no alphabet folders.")
    out = []
    for alphabet in alphabets:
        characters = _subdirs(alphabet)
        if not characters:
            if _pngs(alphabet):
                raise _layout_error(
                    f"{str(alphabet)!r} holds PNG files directly, one level too shallow: it looks "
                    "like a character folder, so the path looks like an alphabet folder; pass its "
                    "parent."
                )
            raise _layout_error(f"alphabet folder {str(alphabet)!r} holds no character folders.")
        for character in characters:
            files = _pngs(character)
            if not files:
                deeper = (
                    " (it holds subfolders: is the path one level too high?)"
                    if _subdirs(character)
                    else ""
                )
                raise _layout_error(
                    f"character folder {str(character)!r} holds no .png files{deeper}."
                )
            out.append((f"{alphabet.name}/{character.name}", character, files))
    return out


def _read(files: list[Path], image_size: int) -> torch.Tensor:
    """The drawings of one character: ``(n, 1, image_size, image_size)``, strokes 1, paper 0."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                grey = im.convert("L")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{_CALL}: cannot read {str(f)!r} as an image ({e}).") from e
        width, height = grey.size
        pixels = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8)
        images.append(pixels.reshape(1, 1, height, width))
    size = (image_size, image_size)
    if all(im.shape == images[0].shape for im in images):  # the usual case: one resize call
        batches = [torch.cat(images)]
    else:
        batches = images
    out = []
    for batch in batches:
        batch = 1.0 - batch.float() / 255.0  # black strokes on white paper -> strokes 1
        if tuple(batch.shape[-2:]) != size:
            batch = F.interpolate(batch, size=size, mode="area")
        out.append(batch)
    return torch.cat(out)


def load_omniglot(
    path: str | os.PathLike[str],
    *,
    rotations: Sequence[int] = (0, 90, 180, 270),
    image_size: int = 28,
) -> LabelledImages:
    """Reads Omniglot (Lake et al. 2015) from ``path``; every rotation of a character is a class.

    ``path`` is an unzipped ``images_background`` or ``images_evaluation`` folder
    (``<alphabet>/<character>/*.png``), or a folder holding either or both (both: background
    first). Nothing is downloaded, ever. Each drawing is read as greyscale, inverted so that
    strokes are 1 and paper 0, and resized to ``image_size`` x ``image_size`` by area averaging.
    Each angle of ``rotations`` (counter-clockwise, as ``torch.rot90(image, angle // 90,
    dims=(-2, -1))``) makes a new class, the usual augmentation (Santoro et al. 2016, Vinyals et
    al. 2016). Classes are ordered by alphabet, character, then rotation, and named
    ``"<alphabet>/<character>/rot<angle>"``; ``class_groups`` is ``"<alphabet>/<character>"``,
    so that :func:`split_classes` keeps the rotations of a character in one split. Needs Pillow.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> from metafunc.data import load_omniglot
        >>> tmp = tempfile.TemporaryDirectory()
        >>> for character in ("character01", "character02"):
        ...     folder = pathlib.Path(tmp.name, "Latin", character)
        ...     folder.mkdir(parents=True)
        ...     for i in range(3):
        ...         Image.new("L", (105, 105), 255).save(folder / f"{i}.png")
        >>> data = load_omniglot(tmp.name)
        >>> data, data.class_names[:2], data.class_groups[:2]
        (LabelledImages(24 images of shape (1, 28, 28), 8 classes),
         ['Latin/character01/rot0', 'Latin/character01/rot90'],
         ['Latin/character01', 'Latin/character01'])
        >>> load_omniglot(tmp.name, rotations=(0,), image_size=105).images.shape
        torch.Size([6, 1, 105, 105])
        >>> tmp.cleanup()
    """
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{_CALL}: expected path to be a str or os.PathLike, got {describe(path)}. Pass the "
            "folder of the unzipped Omniglot images, e.g. 'data/omniglot/images_background'."
        )
    if (
        isinstance(rotations, (str, bytes))
        or not isinstance(rotations, Sequence)
        or not rotations
        or not all(isinstance(r, int) and not isinstance(r, bool) for r in rotations)
    ):
        raise TypeError(
            f"{_CALL}: expected rotations to be a non-empty tuple of angles in degrees, got "
            f"{describe(rotations)}. Pass e.g. rotations=(0, 90, 180, 270) or (0,) for none."
        )
    if any(r not in (0, 90, 180, 270) for r in rotations) or len(set(rotations)) != len(rotations):
        raise ValueError(
            f"{_CALL}: expected distinct rotations among 0, 90, 180 and 270 degrees, got "
            f"{tuple(rotations)!r}."
        )
    int_at_least(_CALL, "image_size", image_size, minimum=1)
    try:
        import PIL.Image  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"{_CALL} reads the PNG files with Pillow, which is not installed: pip install pillow"
        ) from e

    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(
            f"{_CALL}: {str(path)!r} does not exist. Expected {_LAYOUT}. metafunc downloads "
            "nothing: unzip images_background.zip / images_evaluation.zip of "
            "github.com/brendenlake/omniglot there yourself."
        )
    if not folder.is_dir():
        raise ValueError(
            f"{_CALL}: {str(path)!r} is a file, not a folder (unzip it first?). Expected {_LAYOUT}."
        )
    roots = [folder / name for name in _SPLITS if (folder / name).is_dir()] or [folder]
    characters = [c for root in roots for c in _characters(root)]
    seen: dict[str, Path] = {}
    for name, character, _ in characters:
        if name in seen:
            raise ValueError(
                f"{_CALL}: the character {name!r} is in two folders, {str(seen[name])!r} and "
                f"{str(character)!r}; names must be unique. Load the folders separately."
            )
        seen[name] = character

    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    names: list[str] = []
    groups: list[str] = []
    for name, _, files in characters:
        drawings = _read(files, image_size)
        for angle in rotations:
            labels.append(torch.full((drawings.shape[0],), len(names), dtype=torch.long))
            images.append(torch.rot90(drawings, angle // 90, dims=(-2, -1)))
            names.append(f"{name}/rot{angle}")
            groups.append(name)
    return LabelledImages(torch.cat(images), torch.cat(labels), names, groups)
