"""ABC-Net in plain PyTorch: binary weight and activation bases, ABC layers, conversion,
calibration and a layer summary (Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural
Network", NIPS 2017, arXiv 1711.11294). No Hydra here: the runner composes these pieces."""

from .activations import ActivationBinarizer, fit_activation_bases, heaviside_bases
from .calibrate import (
    calibrate,
    correct_batchnorm_to_reference,
    recalibrate_batchnorm,
    reference_statistics,
    running_stats,
)
from .convert import (
    ConversionReport,
    LayerPrecisionError,
    NothingToConvertError,
    abc_layers,
    check_layer_precision,
    convert,
    plan_conversion,
)
from .layers import ABCConv2d, ABCLayer, ABCLinear
from .summary import LayerSummary, ModelSummary, summary
from .weights import (
    WeightBinarizer,
    alternating_bases,
    combine,
    fit_alphas,
    fit_alphas_adam,
    nearest_code_bases,
    residual_bases,
    sign,
    weight_bases,
    weight_shifts,
)

__all__ = [
    "ABCConv2d", "ABCLayer", "ABCLinear", "ActivationBinarizer", "ConversionReport", "LayerSummary",
    "LayerPrecisionError", "NothingToConvertError", "check_layer_precision", "plan_conversion",
    "ModelSummary", "WeightBinarizer", "alternating_bases", "abc_layers", "calibrate", "combine", "convert",
    "fit_activation_bases", "fit_alphas", "fit_alphas_adam", "heaviside_bases", "recalibrate_batchnorm",
    "correct_batchnorm_to_reference", "reference_statistics", "running_stats",
    "nearest_code_bases", "residual_bases", "sign", "summary", "weight_bases", "weight_shifts",
]
