"""The run's model, picked from :mod:`metafunc.models` by the flags, and the names of its warp
and head parameters."""

from __future__ import annotations

import argparse

from torch import nn

from .. import models
from ._cli import HEAD_ALGORITHMS


def input_shape(args: argparse.Namespace) -> tuple[int, ...]:
    """The shape of one input example: a number, a 28x28 character, an RGB image."""
    if args.task == "sinusoid":
        return (1,)
    if args.task in ("glyphs", "omniglot"):
        return (1, 28, 28)
    return (3, args.image_size, args.image_size)


def build(args: argparse.Namespace) -> nn.Module:
    """The sinusoid MLP, or the ``--backbone`` for images: with a ``--ways`` head for the
    gradient algorithms, the features alone for the heads (ProtoNet, R2-D2, MetaOptNet);
    WarpGrad's has warp layers."""
    warp = args.algorithm == "warpgrad"
    if args.task == "sinusoid":
        return models.MLP(warp=warp)
    channels, size = input_shape(args)[0], input_shape(args)[-1]
    ways = None if args.algorithm in HEAD_ALGORITHMS else args.ways
    if args.backbone == "resnet12":
        widths = (args.hidden, int(2.5 * args.hidden), 5 * args.hidden, 10 * args.hidden)
        return models.ResNet12(ways, in_channels=channels, channels=widths, image_size=size)
    if args.backbone == "wrn28_10":
        return models.WideResNet(ways, depth=28, widen=args.hidden, in_channels=channels)
    return models.WarpConv4(
        ways, in_channels=channels, hidden=args.hidden, image_size=size, warp=warp
    )


def _warp_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "warp_names", ()))


def _head_names(model: nn.Module) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    last = names[-1].rsplit(".", 1)[0]
    return [n for n in names if n.rsplit(".", 1)[0] == last]
