"""The runner's models: an MLP for sinusoid regression and the 4-block conv net for images, each
with optional WarpGrad warp layers, and the names of their warp and head parameters."""

from __future__ import annotations

import torch
from torch import nn


def _mlp(warp: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(1, 40), nn.ReLU()]
    if warp:  # WarpGrad: warp layers between the task layers, never adapted
        layers += [nn.Linear(40, 40), nn.ReLU()]
    layers += [nn.Linear(40, 40), nn.ReLU()]
    if warp:
        layers += [nn.Linear(40, 40), nn.ReLU()]
    layers += [nn.Linear(40, 1)]
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """The 4-block few-shot conv net (Vinyals et al. 2016): conv3x3-BatchNorm-ReLU-maxpool blocks
    and a linear head; with ``warp=True`` a warp conv (3x3, never adapted) follows blocks 1-3."""

    def __init__(self, ways: int, hidden: int = 32, image_size: int = 28, warp: bool = False):
        super().__init__()
        blocks: list[nn.Module] = []
        channels = 1
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
                blocks.append(nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU()))
            channels = hidden
        self.features = nn.Sequential(*blocks)
        size = image_size
        for _ in range(4):
            size //= 2
        self.head = nn.Linear(hidden * max(size, 1) ** 2, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _warp_names(model: nn.Module, task: str) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    if task == "sinusoid":
        return [n for n in names if n.split(".")[0] in ("2", "6")]
    warp_blocks = {str(i) for i in (1, 3, 5)}  # features.<i> are the warp blocks
    return [n for n in names if n.startswith("features.") and n.split(".")[1] in warp_blocks]


def _head_names(model: nn.Module, task: str) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    last = names[-1].rsplit(".", 1)[0]
    return [n for n in names if n.rsplit(".", 1)[0] == last]
