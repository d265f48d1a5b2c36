"""Wide residual networks (Zagoruyko & Komodakis 2016); WRN-28-10 as in LEO and later work."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from ._common import WithHead, check_ways

__all__ = ["WideResNet", "wrn28_10"]


class _Block(nn.Module):
    """Pre-activation basic block: BatchNorm-ReLU-conv 3x3 (stride), BatchNorm-ReLU-conv 3x3,
    plus the input (through a 1x1 conv of the pre-activated input when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(c_in, track_running_stats=False), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out, track_running_stats=False),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        )
        self.project = (
            None
            if c_in == c_out and stride == 1
            else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pre(x)
        return self.body(a) + (x if self.project is None else self.project(a))


class WideResNet(WithHead):
    """WRN-``depth``-``widen``: a 3x3 conv to 16 channels, three groups of ``(depth - 4) / 6``
    pre-activation blocks of widths ``16 widen``, ``32 widen``, ``64 widen`` (strides 1, 2, 2),
    then BatchNorm-ReLU and a global average pool: ``out_features = 64 * widen`` (640 for
    WRN-28-10, 36.5M parameters without a head). Any square image size works (the pool is
    global); few-shot work feeds it 80x80 or 84x84 images. See :mod:`metafunc.models` for
    BatchNorm and ``ways``. No dropout (the original's is optional, and off here).

    Args:
        ways: ``None`` for the features, or the number of classes of a linear ``head``.
        depth: ``6 n + 4`` for ``n`` blocks per group (28: 4 blocks).
        widen: the widening factor ``k``.
        in_channels: the input channels.

    Example:
        >>> import torch
        >>> from metafunc.models import WideResNet
        >>> net = WideResNet(ways=5, depth=10, widen=1)  # WRN-10-1, one block per group
        >>> net(torch.randn(2, 3, 16, 16)).shape, net.out_features
        (torch.Size([2, 5]), 64)

    References: Zagoruyko, Komodakis, "Wide residual networks", BMVC 2016,
    https://arxiv.org/abs/1605.07146; Rusu et al., "Meta-learning with latent embedding
    optimization" (LEO), ICLR 2019, https://arxiv.org/abs/1807.05960 (WRN-28-10 features for
    few-shot learning).
    """

    def __init__(
        self, ways: int | None = None, *, depth: int = 28, widen: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        call = "WideResNet(ways, ...)"
        check_ways(call, ways)
        _checks.positive_int(call, "depth", depth)
        _checks.positive_int(call, "widen", widen)
        _checks.positive_int(call, "in_channels", in_channels)
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(
                f"{call}: expected depth = 6 n + 4 with n >= 1 blocks per group (10, 16, 22, "
                f"28, ...), got {depth}."
            )
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)]
        c_in = 16
        for width, stride in zip(widths, (1, 2, 2)):
            for i in range(n):
                layers.append(_Block(c_in, width, stride if i == 0 else 1))
                c_in = width
        layers += [
            nn.BatchNorm2d(c_in, track_running_stats=False),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        ]
        self.features = nn.Sequential(*layers)
        self.out_features = widths[-1]
        self.head = None if ways is None else nn.Linear(self.out_features, ways)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # as in the original code
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def wrn28_10(ways: int | None = None) -> WideResNet:
    """WRN-28-10: ``WideResNet(ways, depth=28, widen=10)``; 640 features."""
    return WideResNet(ways, depth=28, widen=10)
