"""DropBlock (Ghiasi et al. 2018): dropout of contiguous square regions of a feature map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks

__all__ = ["DropBlock"]


class DropBlock(nn.Module):
    """Zeroes ``block_size x block_size`` squares of each channel in training mode; the identity
    in evaluation mode and at ``drop_prob=0``.

    Block centres are drawn independently per example, channel and position with probability
    ``gamma = drop_prob / block_size**2 * side**2 / (side - block_size + 1)**2`` (Ghiasi et al.
    2018, eq. 1, for a square ``side x side`` map; ``block_size`` is clipped to ``side``), each
    centre is grown to its square by a max-pool, and the kept activations are rescaled by
    ``numel / kept`` (over the whole batch) so that their mean is unchanged. About
    ``drop_prob`` of the activations are dropped.

    Random: under :func:`~metafunc.vmap_tasks` it needs ``randomness="different"`` (each task
    its own blocks) or a per-task loop; metafunc's learners map tasks with
    ``randomness="error"``, so use them with ``strategy="loop"`` while ``drop_prob > 0``.

    Args:
        drop_prob: the fraction of activations to drop, in [0, 1).
        block_size: the side of the dropped squares, an odd positive int (MetaOptNet: 5 on
            miniImageNet, 2 on CIFAR-FS; odd here so that the squares are centred).

    Example:
        >>> import torch
        >>> from metafunc.models import DropBlock
        >>> drop = DropBlock(0.1, block_size=3).eval()
        >>> x = torch.randn(2, 4, 8, 8)
        >>> torch.equal(drop(x), x)
        True

    References: Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional
    networks", NeurIPS 2018, https://arxiv.org/abs/1810.12890.
    """

    def __init__(self, drop_prob: float = 0.1, block_size: int = 5) -> None:
        super().__init__()
        call = "DropBlock(drop_prob, block_size)"
        if not (isinstance(drop_prob, (int, float)) and 0 <= drop_prob < 1):
            raise ValueError(f"{call}: expected drop_prob in [0, 1), got {drop_prob!r}.")
        _checks.positive_int(call, "block_size", block_size)
        if block_size % 2 == 0:
            raise ValueError(
                f"{call}: expected an odd block_size (the square is centred on its seed), got "
                f"{block_size}; pass {block_size + 1} or {block_size - 1}."
            )
        self.drop_prob, self.block_size = float(drop_prob), block_size

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0:
            return x
        side = min(x.shape[-2], x.shape[-1])
        size = min(self.block_size, side - (1 - side % 2))  # odd, at most the map's side
        gamma = self.drop_prob / size**2 * side**2 / (side - size + 1) ** 2
        seeds = torch.bernoulli(torch.full_like(x, min(gamma, 1.0)))
        dropped = F.max_pool2d(seeds, size, stride=1, padding=size // 2)
        keep = 1 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp(min=1))
