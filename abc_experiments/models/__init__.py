"""CNN architectures of the experiments, built by name with :func:`build_model` from the
one table :data:`MODEL_REGISTRY` that ``@register_model`` fills.

Every convolution is a plain ``nn.Conv2d`` and every classifier a plain ``nn.Linear``, so that
``abc_experiments.nn`` can convert them to ABC layers by walking ``named_modules()``.
"""

from __future__ import annotations

from .registry import MODEL_REGISTRY, ModelEntry, build_model, check_model_options, model_names, register_model
from .seed_cnn import SeedCNN  # noqa: I001  (import order is registration order: the choices' order)
from .resnet_cifar import ResNet20
from .vgg_small import VGGSmall
from .resnet18 import PretrainedWeightsUnavailableError, resnet18

MODELS: tuple[str, ...] = model_names()  # in registration order


__all__ = [
    "MODELS",
    "MODEL_REGISTRY",
    "ModelEntry",
    "check_model_options",
    "model_names",
    "register_model",
    "PretrainedWeightsUnavailableError",
    "ResNet20",
    "SeedCNN",
    "VGGSmall",
    "build_model",
    "resnet18",
]
