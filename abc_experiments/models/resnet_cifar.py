"""ResNet-20 for CIFAR (He et al., 2016, section 4.2) with option-B (projection) shortcuts.

Where the shape changes (stages 2 and 3), the shortcut is a 1×1 strided convolution followed by
batch norm, named ``downsample`` as in torchvision; all other shortcuts are identities.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model

STAGE_WIDTHS = (16, 32, 64)
BLOCKS_PER_STAGE = 3  # depth 6·3 + 2 = 20


class BasicBlock(nn.Module):
    """Two 3×3 conv + BN layers with a residual connection: relu(bn2(conv2(relu(bn1(conv1 x)))) + x)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + shortcut)


@register_model("resnet20")
class ResNet20(nn.Module):
    """conv3×3(16) → BN → ReLU → 3 stages of 3 BasicBlocks (16/32/64 channels, stride 2 at stages
    2 and 3) → global average pool → Linear(64, classes). About 0.27M parameters for 10 classes.

    ``image_size`` is accepted for the common model signature; global pooling makes the network
    work at any size of at least 4.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"resnet20 downsamples by 4, so it needs image_size >= 4 (got {image_size})")
        self.conv1 = nn.Conv2d(in_channels, STAGE_WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.relu = nn.ReLU()
        self.layer1 = self._stage(STAGE_WIDTHS[0], STAGE_WIDTHS[0], stride=1)
        self.layer2 = self._stage(STAGE_WIDTHS[0], STAGE_WIDTHS[1], stride=2)
        self.layer3 = self._stage(STAGE_WIDTHS[1], STAGE_WIDTHS[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(STAGE_WIDTHS[2], num_classes)
        _init_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(BLOCKS_PER_STAGE - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _init_weights(model: nn.Module) -> None:
    """He (Kaiming) normal init for convolutions, as in the ResNet paper; BN starts as identity."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
