"""MLP: the fully connected network of MAML's sinusoid regression, with optional warp layers."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .. import _checks

__all__ = ["MLP"]


class MLP(nn.Sequential):
    """Linear-ReLU hidden layers and a linear output; with ``warp=True`` a warp layer follows
    each hidden layer.

    ``MLP()`` is the network of MAML's sinusoid regression (Finn et al. 2017): 1 input, two
    hidden layers of 40 ReLU units, 1 output. With ``warp=True`` each hidden layer's ReLU is
    followed by a warp layer (``Linear(h, h)``-ReLU) as in WarpGrad (Flennerhag et al. 2020):
    the warp layers are meta-learned and never adapted, and their parameter names are
    ``warp_names``, the ``warp=`` argument of :class:`~metafunc.algorithms.WarpGrad`. The
    layers are an ``nn.Sequential``, so parameters are named by position (``"0.weight"``, ...).

    Args:
        in_features: the input's size.
        out_features: the output's size.
        hidden: the hidden layers' widths.
        warp: insert a warp layer after each hidden layer.

    Example:
        >>> import torch, metafunc
        >>> from metafunc.models import MLP
        >>> net = MLP(warp=True)
        >>> net(torch.randn(5, 1)).shape, net.warp_names
        (torch.Size([5, 1]), ('2.weight', '2.bias', '6.weight', '6.bias'))
        >>> learner = metafunc.algorithms.WarpGrad(
        ...     metafunc.functionalize(net), "mse", warp=net.warp_names, inner_lr=0.01)

    References: Finn, Abbeel, Levine, "Model-agnostic meta-learning for fast adaptation of deep
    networks", ICML 2017, https://arxiv.org/abs/1703.03400; Flennerhag et al., "Meta-learning
    with warped gradient descent", ICLR 2020, https://arxiv.org/abs/1909.00025.
    """

    warp_names: tuple[str, ...]
    """The warp layers' parameter names (empty without ``warp``)."""

    def __init__(
        self, in_features: int = 1, out_features: int = 1, hidden: Sequence[int] = (40, 40), *,
        warp: bool = False,
    ) -> None:  # fmt: skip
        call = "MLP(in_features, out_features, hidden, ...)"
        _checks.positive_int(call, "in_features", in_features)
        _checks.positive_int(call, "out_features", out_features)
        widths = tuple(hidden) if isinstance(hidden, Sequence) else None
        if widths is None or not all(_checks.is_count(h) for h in widths):
            raise ValueError(
                f"{call}: expected hidden to be a sequence of positive ints (the hidden "
                f"layers' widths, e.g. (40, 40)), got {hidden!r}."
            )
        _checks.boolean(call, "warp", warp)
        layers: list[nn.Module] = []
        warps: list[int] = []
        width = in_features
        for h in widths:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if warp:  # never adapted: between the task layers
                warps.append(len(layers))
                layers += [nn.Linear(h, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
        self.warp_names = tuple(f"{i}.{p}" for i in warps for p in ("weight", "bias"))
