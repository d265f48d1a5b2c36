"""What the few-shot readers share: path checks, layout errors, pickles, memory-mapped npz.

Every reader names its call and its expected layout; a missing file is a ``FileNotFoundError``
that says which file, in which folder, and what the folder holds instead.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._checks import describe

SPLITS = ("train", "val", "test")


def check_path(call: str, path: object, example: str) -> Path:
    """``path`` as a ``Path`` to an existing folder (``TypeError``/``FileNotFoundError``/
    ``ValueError`` otherwise)."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{call}: expected path to be a str or os.PathLike, got {describe(path)}. Pass the "
            f"folder that holds the files, e.g. {example!r}."
        )
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(
            f"{call}: {str(path)!r} does not exist. metafunc downloads nothing: pass the folder "
            f"that holds the dataset's files, e.g. {example!r}."
        )
    if not folder.is_dir():
        raise ValueError(
            f"{call}: {str(path)!r} is a file, not a folder (unpack it first, or pass the "
            "folder that holds it)."
        )
    return folder


def check_split(call: str, split: object) -> str:
    if split not in SPLITS:
        raise ValueError(
            f"{call}: expected split to be 'train', 'val' or 'test' (the standard class split), "
            f"got {split!r}."
        )
    return str(split)


def listing(folder: Path, limit: int = 12) -> str:
    """What ``folder`` holds, for an error message: up to ``limit`` names, folders with a '/'."""
    names = sorted(
        p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith(".")
    )
    if not names:
        return "it is empty"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return "it holds " + ", ".join(names[:limit]) + more


def missing(call: str, folder: Path, wanted: str, layout: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{call}: {wanted} not found in {str(folder)!r}; {listing(folder)}. Expected {layout}."
    )


def require(call: str, module: str, extra: str) -> Any:
    """Imports ``module`` (numpy, PIL.Image), or says which package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{call} needs {extra}, which is not installed: pip install {extra}"
        ) from e


def read_pickle(call: str, file: Path) -> Any:
    """Unpickles ``file``; ``latin1`` decodes the Python 2 pickles (CIFAR-100, tieredImageNet) and
    changes nothing for Python 3 ones. Only open files you trust: a pickle can run code."""
    require(call, "numpy", "numpy")
    try:
        with open(file, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
        raise ValueError(f"{call}: cannot read {str(file)!r} as a pickle ({e}).") from e


def entry(call: str, file: Path, obj: Any, keys: Sequence[str]) -> Any:
    """``obj[key]`` for the first of ``keys`` present (``str`` or ``bytes`` keys), else an error
    naming the keys the file has."""
    if isinstance(obj, dict):
        for key in keys:
            for k in (key, key.encode()):
                if k in obj:
                    return obj[k]
        found = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in obj)
        raise ValueError(
            f"{call}: {str(file)!r} has no {' or '.join(repr(k) for k in keys)} entry; its keys "
            f"are {found[:10]}. Is it the right file?"
        )
    raise ValueError(
        f"{call}: expected {str(file)!r} to hold a dict with {keys[0]!r}, got "
        f"{type(obj).__name__}. Is it the right file?"
    )


def uint8_images(call: str, file: Path, array: Any, layout: str) -> torch.Tensor:
    """An ``(N, H, W, 3)`` uint8 array as an ``(N, 3, H, W)`` tensor view (no copy)."""
    np = require(call, "numpy", "numpy")
    if not isinstance(array, np.ndarray) or array.ndim != 4 or array.shape[-1] != 3:
        shape = getattr(array, "shape", None)
        raise ValueError(
            f"{call}: expected the images of {str(file)!r} to be an (N, H, W, 3) array "
            f"({layout}), got {type(array).__name__} of shape {shape}."
        )
    if array.dtype != np.uint8:
        raise ValueError(
            f"{call}: expected the images of {str(file)!r} to be uint8 pixels, got {array.dtype}."
        )
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def load_npz_member(call: str, file: Path, name: str) -> Any:
    """Array ``name`` of the ``.npz`` ``file``: memory-mapped (copy on write, so torch may wrap
    it) when the member is stored uncompressed, as ``numpy.savez`` writes it; read into memory
    when compressed (``numpy.savez_compressed``)."""
    np = require(call, "numpy", "numpy")
    member = name + ".npy"
    try:
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
            if member not in names:
                raise ValueError(
                    f"{call}: {str(file)!r} has no {name!r} array; it has "
                    f"{[n.removesuffix('.npy') for n in names][:10]}. Is it the right file?"
                )
            info = archive.getinfo(member)
            if info.compress_type != zipfile.ZIP_STORED:
                with archive.open(member) as f:
                    return np.lib.format.read_array(f, allow_pickle=False)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{call}: cannot read {str(file)!r} as an .npz archive ({e}).") from e
    with open(file, "rb") as f:
        # the member's data start after its local header: 30 bytes, its name and an extra field
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{call}: the {name!r} array of {str(file)!r} holds Python objects.")
    order = "F" if fortran else "C"
    return np.memmap(file, dtype=dtype, mode="c", offset=offset, shape=shape, order=order)
