"""The seed network of the original TensorFlow notebook: two 5×5 conv blocks and two dense layers."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model


@register_model("seed_cnn")
class SeedCNN(nn.Module):
    """conv5×5(32) → maxpool → BN → ReLU → conv5×5(64) → maxpool → BN → ReLU
    → Linear(64·(s/4)², 1024) → ReLU → Dropout(0.5) → Linear(1024, classes).

    Both poolings halve the image, so ``image_size`` must be at least 4.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"seed_cnn pools twice by 2, so it needs image_size >= 4 (got {image_size})")
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2, bias=True)
        self.pool1 = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2, bias=True)
        self.pool2 = nn.MaxPool2d(2)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * (image_size // 4) ** 2, 1024)
        self.relu3 = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.pool1(self.conv1(x))))
        x = self.relu2(self.bn2(self.pool2(self.conv2(x))))
        x = self.dropout(self.relu3(self.fc1(self.flatten(x))))
        return self.fc2(x)
