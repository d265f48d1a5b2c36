"""What the backbones share: argument checks and the optional linear head."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks


def check_ways(call: str, ways: int | None) -> None:
    """``ways`` is ``None`` (features) or a positive int (a linear head)."""
    if ways is not None:
        _checks.positive_int(call, "ways", ways, or_none=True)


def pooled_size(call: str, image_size: int, halvings: int) -> int:
    """The side of the feature map after ``halvings`` 2x2 max-pools (each rounds down)."""
    _checks.positive_int(call, "image_size", image_size)
    side = image_size >> halvings
    if side == 0:
        raise ValueError(
            f"{call}: image_size={image_size} is halved {halvings} times to nothing; pass "
            f"image_size >= {2**halvings} (the side of the square input images)."
        )
    return side


class WithHead(nn.Module):
    """A backbone's ``features`` flattened, then ``head`` when the backbone has ``ways``."""

    features: nn.Module
    head: nn.Module | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x).flatten(1)
        return out if self.head is None else self.head(out)
