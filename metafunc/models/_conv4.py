"""Conv-4: the four-block convolutional backbone of few-shot learning (Vinyals et al. 2016)."""

from __future__ import annotations

from torch import nn

from .. import _checks
from ._common import WithHead, check_ways, pooled_size

__all__ = ["Conv4", "conv4_miniimagenet", "conv4_omniglot"]


class Conv4(WithHead):
    """Four blocks of conv 3x3 (padding 1) - BatchNorm - ReLU - 2x2 max-pool, then flatten.

    The backbone of Matching Networks (Vinyals et al. 2016), Prototypical Networks (Snell et al.
    2017) and MAML (Finn et al. 2017). An ``image_size`` side becomes ``image_size // 16`` after
    the four pools, so ``out_features = hidden * (image_size // 16) ** 2``: 64 for Omniglot
    (28x28, 64 filters), 800 for miniImageNet (84x84, 32 filters, MAML's width) and 1600 with
    64 filters (ProtoNet's). See :mod:`metafunc.models` for BatchNorm and ``ways``.

    Difference from MAML's Omniglot network: 2x2 max-pools everywhere (MAML's Omniglot code
    uses stride-2 convolutions instead; its miniImageNet code max-pools, as here).

    Args:
        ways: ``None`` for the features, or the number of classes of a linear ``head``.
        in_channels: 1 (Omniglot) or 3 (RGB).
        hidden: filters per block.
        image_size: the side of the square inputs (needed for the head's size).

    Example:
        >>> import torch, metafunc
        >>> from metafunc.models import conv4_omniglot
        >>> net = conv4_omniglot(ways=5)
        >>> net(torch.randn(2, 1, 28, 28)).shape, net.out_features
        (torch.Size([2, 5]), 64)
        >>> fm = metafunc.functionalize(net)  # exactly the module, as a pure function
    """

    def __init__(
        self, ways: int | None = None, *, in_channels: int = 3, hidden: int = 64,
        image_size: int = 84,
    ) -> None:  # fmt: skip
        super().__init__()
        call = "Conv4(ways, ...)"
        check_ways(call, ways)
        _checks.positive_int(call, "in_channels", in_channels)
        _checks.positive_int(call, "hidden", hidden)
        side = pooled_size(call, image_size, 4)
        blocks = []
        for c_in in (in_channels, hidden, hidden, hidden):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c_in, hidden, 3, padding=1, bias=False),
                    nn.BatchNorm2d(hidden, track_running_stats=False),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                )
            )
        self.features = nn.Sequential(*blocks)
        self.out_features = hidden * side * side
        self.head = None if ways is None else nn.Linear(self.out_features, ways)


def conv4_omniglot(ways: int | None = None, *, hidden: int = 64) -> Conv4:
    """Conv-4 for Omniglot: 1 channel, 28x28, 64 filters (MAML, ProtoNet); 64 features."""
    return Conv4(ways, in_channels=1, hidden=hidden, image_size=28)


def conv4_miniimagenet(ways: int | None = None, *, hidden: int = 32) -> Conv4:
    """Conv-4 for miniImageNet: 3 channels, 84x84; 32 filters (MAML's width, 800 features) by
    default, ``hidden=64`` for ProtoNet's (1600 features)."""
    return Conv4(ways, in_channels=3, hidden=hidden, image_size=84)
