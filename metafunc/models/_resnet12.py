"""ResNet-12: the residual backbone of MetaOptNet (Lee et al. 2019) and most later few-shot work."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import _checks
from ._common import WithHead, check_ways, pooled_size
from ._dropblock import DropBlock

__all__ = ["ResNet12"]


def _conv_bn(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out, track_running_stats=False),
    ]


class _Block(nn.Module):
    """Three conv 3x3-BatchNorm (LeakyReLU 0.1 between), a 1x1 conv-BatchNorm shortcut, the
    sum through LeakyReLU, a 2x2 max-pool, then DropBlock when given."""

    def __init__(self, c_in: int, c_out: int, drop: DropBlock | None) -> None:
        super().__init__()
        relu = lambda: nn.LeakyReLU(0.1)
        self.body = nn.Sequential(
            *_conv_bn(c_in, c_out, 3), relu(), *_conv_bn(c_out, c_out, 3), relu(),
            *_conv_bn(c_out, c_out, 3),
        )  # fmt: skip
        self.shortcut = nn.Sequential(*_conv_bn(c_in, c_out, 1))
        self.out = nn.Sequential(relu(), nn.MaxPool2d(2), *([drop] if drop is not None else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(WithHead):
    """Four residual blocks of widths ``channels`` (64-160-320-640), each halving the image.

    As in MetaOptNet (Lee et al. 2019): each block is three conv 3x3-BatchNorm layers with
    LeakyReLU(0.1) between them, a 1x1 conv-BatchNorm shortcut, LeakyReLU after the sum and a
    2x2 max-pool. The 84x84 miniImageNet image ends as a 5x5x640 map, flattened to 16000
    features (MetaOptNet's miniImageNet setting); ``avg_pool=True`` averages it to 640 (the
    choice of most later work). 12.4M parameters without a head. See :mod:`metafunc.models`
    for BatchNorm and ``ways``.

    DropBlock (Ghiasi et al. 2018) after blocks 3 and 4 when ``drop_prob > 0``; off by default.
    MetaOptNet trains with ``drop_prob=0.1, block_size=5`` there and also applies plain dropout
    after blocks 1 and 2, which is not reproduced here.

    Args:
        ways: ``None`` for the features, or the number of classes of a linear ``head``.
        in_channels: the input channels.
        channels: the four blocks' widths.
        image_size: the side of the square inputs (the flattened features' size depends on it).
        avg_pool: average the last map over space (``out_features = channels[-1]``).
        drop_prob, block_size: DropBlock's, for blocks 3 and 4.

    Example:
        >>> import torch
        >>> from metafunc.models import ResNet12
        >>> net = ResNet12(ways=5, channels=(4, 6, 8, 10), image_size=32)  # a narrow one
        >>> net(torch.randn(3, 3, 32, 32)).shape, net.out_features
        (torch.Size([3, 5]), 40)

    References: Lee, Maji, Ravichandran, Soatto, "Meta-learning with differentiable convex
    optimization", CVPR 2019, https://arxiv.org/abs/1904.03758; Oreshkin et al., "TADAM",
    NeurIPS 2018, https://arxiv.org/abs/1805.10123 (the architecture's origin).
    """

    def __init__(
        self, ways: int | None = None, *, in_channels: int = 3,
        channels: Sequence[int] = (64, 160, 320, 640), image_size: int = 84,
        avg_pool: bool = False, drop_prob: float = 0.0, block_size: int = 5,
    ) -> None:  # fmt: skip
        super().__init__()
        call = "ResNet12(ways, ...)"
        check_ways(call, ways)
        _checks.positive_int(call, "in_channels", in_channels)
        widths = tuple(channels)
        if len(widths) != 4 or not all(_checks.is_count(c) for c in widths):
            raise ValueError(
                f"{call}: expected channels to be 4 positive ints (one per block, e.g. "
                f"(64, 160, 320, 640)), got {channels!r}."
            )
        _checks.boolean(call, "avg_pool", avg_pool)
        side = pooled_size(call, image_size, 4)
        drop = DropBlock(drop_prob, block_size)  # checks the arguments, also at drop_prob=0
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip((in_channels, *widths[:3]), widths)):
            blocks.append(_Block(c_in, c_out, drop if i >= 2 and drop_prob > 0 else None))
        if avg_pool:
            blocks.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*blocks)
        self.out_features = widths[-1] * (1 if avg_pool else side * side)
        self.head = None if ways is None else nn.Linear(self.out_features, ways)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # MetaOptNet's initialisation
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
