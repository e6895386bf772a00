"""Packed inference for converted ABC-Net models (issue 9).

``pack_model`` replaces every ABC layer of an eval-mode converted model by a packed layer (weight
bases as bits, binary convolution by xor + popcount in C++ kernels: AVX-512 VPOPCNTDQ, AVX2 or
portable, picked at run time; a pure-torch reference path when the extension is unavailable);
and folds the BatchNorm that follows a packed conv into it (``fold_batchnorms``);
``save_packed`` / ``load_packed`` write and read a pickle-free safetensors file (``check_packed_header``
checks every header field against the file's own contents before anything is built);
``fuse_batchnorm_relu`` fuses the residual additions and ReLUs into the packed convs too and runs
consecutive packed convs as one operator call (``chain_packed_convs``), for speed.
"""

from . import ops  # the operators with argument checks: pack_activations, packed_conv2d, ...
from ._ext import (
    ENV_VAR,
    ISAS,
    PackedKernelWarning,
    available_isas,
    build_directory,
    cpu_isas,
    extension_available,
    extension_error,
    get_isa,
    set_isa,
    use_isa,
)
from .fusion import PackedConvChain, chain_packed_convs, fold_batchnorms, fuse_batchnorm_relu
from .io import (
    PackedFormatError,
    check_packed_header,
    load_packed,
    pack_model,
    packed_layers,
    packed_size_report,
    read_packed,
    save_packed,
)
from .layers import PackedABCConv2d, PackedABCLayer, PackedABCLinear, pack_layer

__all__ = [
    "ENV_VAR", "ISAS", "PackedABCConv2d", "PackedConvChain", "chain_packed_convs", "PackedABCLayer", "PackedABCLinear",
    "PackedFormatError", "check_packed_header",
    "PackedKernelWarning", "available_isas", "build_directory", "cpu_isas", "extension_available",
    "extension_error", "fold_batchnorms", "fuse_batchnorm_relu", "get_isa", "load_packed", "pack_layer", "pack_model",
    "packed_layers", "ops", "packed_size_report", "read_packed", "save_packed", "set_isa", "use_isa",
]
