"""WarpConv4: Conv-4 as in MAML's code (biased convolutions), with optional WarpGrad warp layers."""

from __future__ import annotations

from torch import nn

from .. import _checks
from ._common import WithHead, check_ways, pooled_size

__all__ = ["WarpConv4"]


class WarpConv4(WithHead):
    """:class:`Conv4` with biased convolutions and, with ``warp=True``, a warp layer (conv 3x3
    (padding 1)-ReLU) after each of the first three blocks.

    The warp layers are WarpGrad's (Flennerhag et al. 2020): meta-learned and never adapted, so
    their parameters precondition the task layers' updates; their names are ``warp_names``, the
    ``warp=`` argument of :class:`~metafunc.algorithms.WarpGrad`. The blocks are Conv-4's (conv
    3x3 - BatchNorm - ReLU - 2x2 max-pool, ``out_features = hidden * (image_size // 16) ** 2``),
    except that each convolution has a bias, as in MAML's reference code; a bias before a
    BatchNorm is cancelled by it, so its gradient is zero (hence :class:`Conv4` has none). This
    is the network of ``python -m metafunc train`` on glyphs and Omniglot (``warp=False``
    unless the algorithm is WarpGrad). See :mod:`metafunc.models` for BatchNorm and ``ways``.

    Args:
        ways: ``None`` for the features, or the number of classes of a linear ``head``.
        in_channels: 1 (Omniglot) or 3 (RGB).
        hidden: filters per block (warp layers too).
        image_size: the side of the square inputs (needed for the head's size).
        warp: add the three warp layers.

    Example:
        >>> import torch
        >>> from metafunc.models import WarpConv4
        >>> net = WarpConv4(ways=5, in_channels=1, hidden=8, image_size=28)
        >>> net(torch.randn(2, 1, 28, 28)).shape, net.warp_names[:2]
        (torch.Size([2, 5]), ('features.1.0.weight', 'features.1.0.bias'))

    References: Flennerhag, Rusu, Pascanu, Visin, Yin, Hadsell, "Meta-learning with warped
    gradient descent", ICLR 2020, https://arxiv.org/abs/1909.00025.
    """

    warp_names: tuple[str, ...]
    """The warp layers' parameter names (empty without ``warp``)."""

    def __init__(
        self, ways: int | None = None, *, in_channels: int = 3, hidden: int = 64,
        image_size: int = 84, warp: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        call = "WarpConv4(ways, ...)"
        check_ways(call, ways)
        _checks.positive_int(call, "in_channels", in_channels)
        _checks.positive_int(call, "hidden", hidden)
        _checks.boolean(call, "warp", warp)
        side = pooled_size(call, image_size, 4)
        blocks: list[nn.Module] = []
        warps: list[int] = []
        channels = in_channels
        for i in range(4):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(channels, hidden, 3, padding=1),
                    nn.BatchNorm2d(hidden, track_running_stats=False),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                )
            )
            if warp and i < 3:
                warps.append(len(blocks))
                blocks.append(nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU()))
            channels = hidden
        self.features = nn.Sequential(*blocks)
        self.out_features = hidden * side * side
        self.head = None if ways is None else nn.Linear(self.out_features, ways)
        self.warp_names = tuple(f"features.{i}.0.{p}" for i in warps for p in ("weight", "bias"))
