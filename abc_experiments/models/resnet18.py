"""torchvision's ResNet-18 with a choice of stem (ImageNet 7×7/2 + max-pool, or CIFAR 3×3/1).

``pretrained=True`` loads torchvision's ImageNet weights (``ResNet18_Weights.IMAGENET1K_V1``) for
every layer whose shape fits; layers that do not (``fc`` for another number of classes, ``conv1``
for another number of input channels or the CIFAR stem) keep their fresh initialisation, with a
warning.
"""

from __future__ import annotations

import os
import warnings

import torch
import torchvision
from torch import nn

from .registry import register_model

STEMS = ("auto", "imagenet", "cifar")
# stem="auto" picks the CIFAR stem up to this image size.
CIFAR_STEM_MAX_IMAGE_SIZE = 64
PRETRAINED_WEIGHTS = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


class PretrainedWeightsUnavailableError(RuntimeError):
    """torchvision's pretrained ResNet-18 weights are neither cached nor downloadable."""


def _resolve_stem(stem: str, image_size: int) -> str:
    if stem not in STEMS:
        raise ValueError(f"Unknown resnet18 stem {stem!r}; choose one of: {', '.join(STEMS)}")
    if stem == "auto":
        return "cifar" if image_size <= CIFAR_STEM_MAX_IMAGE_SIZE else "imagenet"
    return stem


def _stem_conv(stem: str, in_channels: int) -> nn.Conv2d:
    if stem == "cifar":
        return nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)


def _download_weights() -> dict[str, torch.Tensor]:
    try:
        return PRETRAINED_WEIGHTS.get_state_dict(progress=False)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
        filename = os.path.basename(PRETRAINED_WEIGHTS.url)
        raise PretrainedWeightsUnavailableError(
            f"Could not load the pretrained ResNet-18 weights ({error}). They are downloaded from the "
            f"torchvision hub ({PRETRAINED_WEIGHTS.url}), which this machine cannot reach (offline?). "
            f"Place {filename} in {checkpoints}/ (torch.hub.get_dir()/checkpoints, set by $TORCH_HOME), "
            f"or set model.options.pretrained=false."
        ) from error


def _load_matching_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load every tensor whose shape fits ``model``; warn about the layers left freshly initialised."""
    own = model.state_dict()
    matching = {key: value for key, value in weights.items() if key in own and own[key].shape == value.shape}
    skipped = sorted(set(weights) - set(matching))
    model.load_state_dict(matching, strict=False)
    if skipped:
        warnings.warn(
            f"resnet18: pretrained weights loaded except {', '.join(skipped)} (shape mismatch: other "
            f"classes, input channels or stem); those layers are freshly initialised.",
            stacklevel=3,
        )


@register_model("resnet18")
def resnet18(
    in_channels: int, image_size: int, num_classes: int, stem: str = "auto", pretrained: bool = False
) -> nn.Module:
    """torchvision's ResNet-18 for ``in_channels``×``image_size``² images and ``num_classes`` classes.

    Args:
        stem: ``"imagenet"`` (7×7 stride-2 conv + max-pool), ``"cifar"`` (3×3 stride-1 conv, no
            max-pool) or ``"auto"`` (cifar when ``image_size <= 64``).
        pretrained: start from torchvision's ImageNet weights.

    Raises:
        PretrainedWeightsUnavailableError: ``pretrained`` and the weights cannot be fetched.
    """
    stem = _resolve_stem(stem, image_size)
    model = torchvision.models.resnet18(num_classes=num_classes)
    if stem == "cifar" or in_channels != 3:
        model.conv1 = _stem_conv(stem, in_channels)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if stem == "cifar":
        model.maxpool = nn.Identity()
    if pretrained:
        _load_matching_weights(model, _download_weights())
    return model
