"""VGG-Small, the CIFAR network of binary-network papers (XNOR-Net, LQ-Nets, ...).

Six 3×3 convolutions (128, 128, 256, 256, 512, 512 channels) in three pairs, each pair ending
with a 2×2 max-pool, and one linear classifier. Layer order: conv → (max-pool) → BN → ReLU,
the order of XNOR-Net and its successors: pooling comes before the activation because
max-pooling binarised activations would return almost only +1.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .registry import register_model

CONV_WIDTHS = (128, 128, 256, 256, 512, 512)


def _features(in_channels: int) -> nn.Sequential:
    """conv1..conv6 with their BN/ReLU; a max-pool after every second convolution."""
    layers: list[tuple[str, nn.Module]] = []
    for index, width in enumerate(CONV_WIDTHS, start=1):
        layers.append((f"conv{index}", nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False)))
        if index % 2 == 0:
            layers.append((f"pool{index}", nn.MaxPool2d(2)))
        layers.append((f"bn{index}", nn.BatchNorm2d(width)))
        layers.append((f"relu{index}", nn.ReLU()))
        in_channels = width
    return nn.Sequential(OrderedDict(layers))


@register_model("vgg_small")
class VGGSmall(nn.Module):
    """``features`` (6 convs, 3 max-pools) → flatten → ``classifier`` Linear(512·(s/8)², classes)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"vgg_small pools 3 times by 2, so it needs image_size >= 8 (got {image_size})")
        self.features = _features(in_channels)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(CONV_WIDTHS[-1] * (image_size // 8) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))
