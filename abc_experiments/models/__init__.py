"""CNN architectures of the experiments, built by name with :func:`build_model`.

Every convolution is a plain ``nn.Conv2d`` and every classifier a plain ``nn.Linear``, so that
``abc_experiments.nn`` can convert them to ABC layers by walking ``named_modules()``.
"""

from __future__ import annotations

from torch import nn

from .resnet18 import PretrainedWeightsUnavailableError, resnet18
from .resnet_cifar import ResNet20
from .seed_cnn import SeedCNN
from .vgg_small import VGGSmall

MODELS: tuple[str, ...] = ("seed_cnn", "resnet20", "vgg_small", "resnet18")

_BUILDERS = {
    "seed_cnn": SeedCNN,
    "resnet20": ResNet20,
    "vgg_small": VGGSmall,
    "resnet18": resnet18,
}


def build_model(name: str, in_channels: int, image_size: int, num_classes: int, **kwargs) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`) for the given input shape and classes.

    ``kwargs`` go to the model (only ``resnet18`` takes any: ``stem``, ``pretrained``).

    Raises:
        ValueError: unknown ``name``.
    """
    if name not in _BUILDERS:
        raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return _BUILDERS[name](in_channels=in_channels, image_size=image_size, num_classes=num_classes, **kwargs)


__all__ = [
    "MODELS",
    "PretrainedWeightsUnavailableError",
    "ResNet20",
    "SeedCNN",
    "VGGSmall",
    "build_model",
    "resnet18",
]
