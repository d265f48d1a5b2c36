"""``EncodedImages``: compressed images (PNG, JPEG bytes) held as they are, decoded on access."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch

from .._checks import describe

__all__ = ["EncodedImages"]


class EncodedImages:
    """A :class:`PixelStore` of encoded images, decoded (with Pillow) only when indexed.

    tieredImageNet's released ``*_images_png.pkl`` holds 779,165 PNG files as bytes, about a
    third of the 16.5 GB they decode to; keeping the bytes and decoding the few hundred rows of an
    episode keeps the memory of the set to that of its files. ``encoded`` is a sequence of
    ``bytes`` (or 1-d uint8 arrays, as ``cv2.imencode`` returns) with one image each; ``size``
    is ``(height, width)`` and ``mode`` the Pillow mode every image is converted to (``"RGB"``:
    3 channels; ``"L"``: 1). An image of another size is an error: resize the files first.

    Example:
        >>> import io
        >>> import torch
        >>> from PIL import Image
        >>> from metafunc.data import EncodedImages, LabelledImages
        >>> def png(value):
        ...     buffer = io.BytesIO()
        ...     Image.new("RGB", (4, 4), (value, 0, 0)).save(buffer, format="PNG")
        ...     return buffer.getvalue()
        >>> store = EncodedImages([png(0), png(255)], size=(4, 4))
        >>> store.shape, store[torch.tensor([1])][0, :, 0, 0]
        (torch.Size([2, 3, 4, 4]), tensor([255,   0,   0], dtype=torch.uint8))
        >>> LabelledImages.from_pixels(store, torch.tensor([0, 1]))
        LabelledImages(2 images of shape (3, 4, 4), 2 classes)
    """

    def __init__(self, encoded: Sequence[Any], *, size: tuple[int, int], mode: str = "RGB"):
        call = "EncodedImages(encoded, size=..., mode=...)"
        if isinstance(encoded, (str, bytes)) or not isinstance(encoded, Sequence):
            raise TypeError(
                f"{call}: expected encoded to be a list of encoded images (bytes), got "
                f"{describe(encoded)}."
            )
        if (
            not isinstance(size, tuple)
            or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)
        ):
            raise TypeError(
                f"{call}: expected size to be a (height, width) tuple of ints >= 1, got "
                f"{describe(size)}."
            )
        if mode not in ("RGB", "L"):
            raise ValueError(f"{call}: expected mode 'RGB' or 'L', got {mode!r}.")
        self._encoded = encoded
        self._size = size
        self._mode = mode
        channels = 3 if mode == "RGB" else 1
        self._shape = torch.Size((len(encoded), channels, *size))

    @property
    def shape(self) -> torch.Size:
        """``(N, C, H, W)``: the shape of all the images decoded."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """``torch.uint8``: what indexing returns."""
        return torch.uint8

    def __len__(self) -> int:
        return int(self._shape[0])

    def decode(self, row: int) -> torch.Tensor:
        """Image ``row`` as uint8 ``(C, H, W)``."""
        from PIL import Image, UnidentifiedImageError

        item = self._encoded[row]
        try:
            with Image.open(io.BytesIO(bytes(item))) as im:
                im = im.convert(self._mode)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(
                f"EncodedImages: cannot decode image {row} ({describe(item)[:60]}...): {e}."
            ) from e
        width, height = im.size
        if (height, width) != self._size:
            raise ValueError(
                f"EncodedImages: image {row} is {height}x{width}, expected {self._size[0]}x"
                f"{self._size[1]} (size). Resize the images to one size before reading them."
            )
        pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        return pixels.reshape(height, width, -1).permute(2, 0, 1)

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        """The images of ``rows`` (a long tensor of any shape): uint8 ``(*rows.shape, C, H, W)``."""
        flat = rows.reshape(-1).tolist()
        if not flat:
            return torch.empty((*rows.shape, *self._shape[1:]), dtype=torch.uint8)
        n = len(self)
        bad = [r for r in flat if not -n <= r < n]
        if bad:
            raise IndexError(f"EncodedImages: row {bad[0]} is out of range for {n} images.")
        out = torch.stack([self.decode(r) for r in flat])
        return out.reshape(*rows.shape, *self._shape[1:])

    def __repr__(self) -> str:
        return f"EncodedImages({len(self)} images of shape {tuple(self._shape[1:])})"
