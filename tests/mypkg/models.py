"""A user's own model: a small ResNet of torchvision BasicBlocks behind a custom stem."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


class Net(nn.Module):
    """stem conv + BN + ReLU, ``blocks`` BasicBlocks per stage (two stages), a linear head."""

    def __init__(self, width: int = 16, blocks: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False),
                             nn.BatchNorm2d(2 * width))
        self.stages = nn.Sequential(
            *[BasicBlock(width, width) for _ in range(blocks)],
            BasicBlock(width, 2 * width, stride=2, downsample=down),
            *[BasicBlock(2 * width, 2 * width) for _ in range(blocks - 1)])
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def make_net(width: int = 16, blocks: int = 1, num_classes: int = 10) -> nn.Module:
    """The factory ``--model mypkg.models:make_net --model-kwargs width=8`` calls."""
    return Net(width, blocks, num_classes)
