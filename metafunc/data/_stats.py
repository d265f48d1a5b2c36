"""Per-channel pixel statistics used in the few-shot literature (on the 0-255 scale / 255).

The values are those of MetaOptNet's data loaders (Lee et al. 2019, github.com/kjunelee/
MetaOptNet), which most ResNet-12 few-shot work has reused: one pair for the ImageNet subsets
(miniImageNet, tieredImageNet), one for the CIFAR-100 subsets (CIFAR-FS, FC100).
"""

from __future__ import annotations

IMAGENET_MEAN = (120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255)
IMAGENET_STD = (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)
CIFAR_MEAN = (129.37731888 / 255, 124.10583864 / 255, 112.47758569 / 255)
CIFAR_STD = (68.20947949 / 255, 65.43124043 / 255, 70.45866994 / 255)


def normalisation(
    normalize: bool, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``(mean, std)`` when ``normalize``, else ``(None, None)`` (pixels / 255 only)."""
    return (mean, std) if normalize else (None, None)
