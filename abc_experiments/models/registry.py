"""The one table of architectures: ``@register_model`` adds a builder, and the config's choices, the
builder and the error messages all read :data:`MODEL_REGISTRY` (in the manner of timm's registry).

A builder takes ``(in_channels, image_size, num_classes, **options)``; its options are the
model-specific settings of ``conf/model/<name>.yaml`` (``model.options``), checked here by name and
by the builder itself by value.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

_FIXED = ("in_channels", "image_size", "num_classes")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    options: tuple[str, ...]  # keyword options the builder accepts besides the input shape


MODEL_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str) -> Callable:
    """Decorator: register ``builder`` (a class or function) under ``name``."""

    def decorate(builder):
        if name in MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        parameters = inspect.signature(builder).parameters
        options = tuple(p for p in parameters if p not in _FIXED and p != "self")
        MODEL_REGISTRY[name] = ModelEntry(name, builder, options)
        return builder

    return decorate


def model_names() -> tuple[str, ...]:
    return tuple(MODEL_REGISTRY)


def check_model_options(name: str, options: dict) -> None:
    """Raise ValueError for an unknown model or an option the model does not take."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_REGISTRY)}")
    unknown = sorted(set(options) - set(MODEL_REGISTRY[name].options))
    if unknown:
        takes = ", ".join(MODEL_REGISTRY[name].options) or "no options"
        raise ValueError(f"model {name} does not take option(s) {', '.join(unknown)} (it takes: {takes})")


def build_model(name: str, in_channels: int, image_size: int, num_classes: int, **options) -> nn.Module:
    """Build model ``name`` for the given input shape and classes, with its model-specific options.

    Raises:
        ValueError: unknown ``name``, an option the model does not take, or a bad option value.
    """
    check_model_options(name, options)
    return MODEL_REGISTRY[name].builder(in_channels=in_channels, image_size=image_size,
                                        num_classes=num_classes, **options)
