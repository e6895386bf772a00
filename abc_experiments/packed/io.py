"""Packing a converted model, and the pickle-free packed file (safetensors).

File layout (safetensors; nothing is unpickled on load):

* tensor ``bits`` (uint8): every packed layer's weight bits, dense (M bits per binary weight, each
  layer's blob rounded up to whole bytes), concatenated in layer order;
* tensor ``floats`` (float32): every packed layer's alphas, shifts, betas, bias and, where
  ``pack_model`` folded the BatchNorm that follows it, that BatchNorm's scale and shift (2 floats per
  channel instead of its 4); then every other floating-point entry of the state dict (BatchNorm not
  folded, the full-precision first and last layers);
* tensor ``ints`` (int64), only if the rest of the state dict has integer entries (other than
  BatchNorm's ``num_batches_tracked``, which inference does not use and is not stored);
* header metadata ``abc_packed``: JSON with the format version, the architecture (what
  ``build_model`` needs), one row per packed layer (``layer_fields``: name, M, N, scope, bias,
  binary weight count, bit offset and length, the folded BatchNorm's name or ""; the geometry comes
  from the rebuilt architecture),
  the SHA-256 of the other state entries' names and shapes (the rebuilt model must match it) and
  of each tensor's bytes (a corrupt file is refused).

Few large tensors and a compact header instead of hundreds of small tensors: for ResNet-20 a
per-tensor header would weigh a third as much as the packed weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models import build_model
from ..nn.layers import ABCLayer
from .fusion import PackedConvChain, fold_batchnorms
from .layers import PackedABCConv2d, PackedABCLayer, PackedABCLinear, pack_layer

FORMAT = "abc-packed"
VERSION = 2  # 2: folded BatchNorm (layer field "batchnorm"); version 1 files (none folded) still load
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "abc_packed"
ARCHITECTURE_KEYS = ("name", "in_channels", "image_size", "num_classes")


class PackedFormatError(ValueError):
    """The file is not a packed ABC model, or it is corrupt or inconsistent."""


def pack_model(model: nn.Module, *, fold_batchnorm: bool = True) -> nn.Module:
    """A deep copy of the eval-mode converted ``model`` with every ABC layer replaced by its packed
    version (:class:`PackedABCConv2d` / :class:`PackedABCLinear`), in eval mode.

    With ``fold_batchnorm`` (the default), each BatchNorm2d that directly follows a packed conv (its
    only input, and the conv output's only user) is folded into the conv and replaced by
    ``nn.Identity`` (:func:`~abc_experiments.packed.fold_batchnorms`): one pass less at run time, and
    2 floats per channel in the file instead of 4. Equal to the BatchNorm up to float rounding."""
    if model.training or any(m.training for m in model.modules()):
        raise RuntimeError("pack_model needs an eval-mode model: call model.eval() first (switching to eval "
                           "fits and freezes the ABC alphas; packing a training-mode model would freeze "
                           "whatever the last training step left)")
    names = [name for name, m in model.named_modules() if isinstance(m, ABCLayer)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no ABC layers to pack: convert it first "
                         "(abc_experiments.nn.convert)")
    packed = copy.deepcopy(model).cpu()
    for name in names:
        packed.set_submodule(name, pack_layer(packed.get_submodule(name)))
    if fold_batchnorm:
        fold_batchnorms(packed)
    return packed.eval()


def packed_layers(model: nn.Module) -> list[tuple[str, PackedABCLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PackedABCLayer)]


def _rest_state(model: nn.Module, layer_names: list[str]) -> dict[str, Tensor]:
    """State entries outside the packed layers (minus num_batches_tracked)."""
    prefixes = tuple(f"{name}." for name in layer_names)
    return {key: value for key, value in model.state_dict().items()
            if not key.startswith(prefixes) and not key.endswith("num_batches_tracked")}


def _digest(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


LAYER_FIELDS = ["name", "M", "N", "scope", "bias", "weights", "bit_offset", "bit_bytes", "batchnorm"]
LAYER_FLOATS = ("alphas", "shifts", "betas", "bias", "output_scale", "output_shift")  # in this order


def _layout(rest: dict[str, Tensor]) -> list:
    """[name, "f" (float32) or "i" (int64), shape] of each non-packed state entry, in order."""
    return [[key, "f" if value.is_floating_point() else "i", list(value.shape)] for key, value in rest.items()]


def _layout_digest(rest: dict[str, Tensor]) -> str:
    return hashlib.sha256(json.dumps(_layout(rest), separators=(",", ":")).encode()).hexdigest()


def _check_architecture(architecture: dict) -> dict:
    if not isinstance(architecture, dict):
        raise TypeError("architecture must be a dict like {'name': 'seed_cnn', 'in_channels': 1, "
                        "'image_size': 28, 'num_classes': 10, 'options': {}}")
    missing = [key for key in ARCHITECTURE_KEYS if key not in architecture]
    if missing:
        raise ValueError(f"architecture lacks {', '.join(missing)} (needed by build_model)")
    result = dict(architecture)
    result.setdefault("options", {})
    json.dumps(result)  # must be JSON-able
    return result


def serialize(model: nn.Module, architecture: dict | None = None) -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata) of the packed file for ``model`` (packed or eval-mode converted)."""
    if any(isinstance(m, PackedConvChain) for m in model.modules()):
        raise ValueError("cannot save a fuse_batchnorm_relu result with chained packed convs (its layers no longer "
                         "have the architecture's names): save the pack_model result")
    if not packed_layers(model):
        model = pack_model(model)
    layers = packed_layers(model)
    names = [name for name, _ in layers]
    bits, floats, ints, rows = [], [], [], []
    bit_offset = 0
    for name, layer in layers:
        stored = layer.stored_tensors()
        count = stored["weight_bits"].numel()
        rows.append([name, layer.M, layer.N, layer.scope, int(layer.bias is not None), layer.binary_weights(),
                     bit_offset, count, layer.folded_batchnorm or ""])
        bits.append(stored["weight_bits"])
        bit_offset += count
        floats += [stored[key].reshape(-1) for key in LAYER_FLOATS if key in stored]
    rest = _rest_state(model, names)
    for value in rest.values():
        value = value.detach().cpu()
        (floats if value.is_floating_point() else ints).append(
            value.float().reshape(-1) if value.is_floating_point() else value.long().reshape(-1))
    tensors = {"bits": torch.cat(bits), "floats": torch.cat(floats) if floats else torch.zeros(0)}
    if ints:
        tensors["ints"] = torch.cat(ints)
    meta = {"format": FORMAT, "version": VERSION,
            "architecture": None if architecture is None else _check_architecture(architecture),
            "M": sorted({layer.M for _, layer in layers}), "N": sorted({layer.N for _, layer in layers}),
            "layer_fields": LAYER_FIELDS, "layers": rows, "rest_sha256": _layout_digest(rest),
            "sha256": {key: _digest(tensor) for key, tensor in tensors.items()}}
    return tensors, meta


def save_packed(model: nn.Module, path, *, architecture: dict) -> Path:
    """Write the packed ``model`` (a :func:`pack_model` result, or an eval-mode converted model,
    which is packed first) to ``path`` as a pickle-free safetensors file. ``architecture``:
    ``{"name", "in_channels", "image_size", "num_classes", "options"}`` for ``build_model``, plus
    anything JSON-able you want kept (e.g. the input shape)."""
    from safetensors.torch import save_file

    if architecture is None:
        raise ValueError("save_packed needs architecture=... (what build_model needs to rebuild the model)")
    tensors, meta = serialize(model, architecture)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta, separators=(",", ":"))})
    return path


def read_packed(path) -> tuple[dict[str, Tensor], dict]:
    """The tensors and metadata of a packed file, checked; PackedFormatError if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if METADATA_KEY not in header:
                raise PackedFormatError(f"{path} is a safetensors file but not a packed ABC model "
                                        f"(no {METADATA_KEY!r} metadata)")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        meta = json.loads(header[METADATA_KEY])
    except PackedFormatError:
        raise
    except Exception as error:  # safetensors' own errors, bad JSON, truncated files
        raise PackedFormatError(f"{path} is not a readable packed ABC model file: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PackedFormatError(f"{path}: unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if meta.get("version") not in READABLE_VERSIONS:
        raise PackedFormatError(f"{path}: format version {meta.get('version')} (this code reads "
                                f"{', '.join(map(str, READABLE_VERSIONS))})")
    for key, digest in meta.get("sha256", {}).items():
        if key not in tensors or _digest(tensors[key]) != digest:
            raise PackedFormatError(f"{path}: tensor {key!r} is missing or corrupt (checksum mismatch)")
    if set(tensors) != set(meta.get("sha256", {})):
        raise PackedFormatError(f"{path}: unexpected tensors {sorted(set(tensors) - set(meta['sha256']))}")
    return tensors, meta


def _build_layer(entry: dict, original: nn.Module, bits: Tensor, floats: Tensor, offset: int, batchnorm: str
                 ) -> tuple[PackedABCLayer, int]:
    """The packed layer for ``entry``, with ``original``'s (the float architecture's) geometry and
    the affine of the BatchNorm ``batchnorm`` folded in (checked by :func:`_folded_batchnorm`; "" for none)."""
    M, N, scope = entry["M"], entry["N"], entry["scope"]
    if type(original) not in (nn.Conv2d, nn.Linear):
        raise PackedFormatError(f"layer {entry['name']}: the architecture has a {type(original).__name__} there, "
                                "not a Conv2d or Linear")
    if original.weight.numel() != entry["weights"]:
        raise PackedFormatError(f"layer {entry['name']}: {entry['weights']} binary weights in the file, "
                                f"{original.weight.numel()} in the architecture's {original}")
    out = original.weight.shape[0]
    shapes = {"alphas": (M,) if scope == "per_layer" else (M, out), "shifts": (N,), "betas": (N,)}
    if entry["bias"]:
        shapes["bias"] = (out,)
    if batchnorm:
        shapes["output_scale"] = shapes["output_shift"] = (out,)
    parts = {}
    for key, shape in shapes.items():
        count = math.prod(shape)
        if offset + count > floats.numel():
            raise PackedFormatError("float data too short for the layers it describes")
        parts[key] = floats[offset:offset + count].view(shape)
        offset += count
    start, count = entry["bit_offset"], entry["bit_bytes"]
    if start < 0 or start + count > bits.numel():
        raise PackedFormatError(f"layer {entry['name']}: bits out of range")
    parts["weight_bits"] = bits[start:start + count]
    if isinstance(original, nn.Conv2d):
        affine = (parts.pop("output_scale"), parts.pop("output_shift")) if batchnorm else None
        layer = PackedABCConv2d(original.in_channels, out, original.kernel_size, original.stride, original.padding,
                                original.dilation, original.groups, original.padding_mode, M=M, N=N, scope=scope,
                                **parts)
        if affine is not None:
            layer.set_output_affine(*affine, batchnorm=batchnorm)
    else:
        layer = PackedABCLinear(original.in_features, out, M=M, N=N, scope=scope, **parts)
    return layer, offset


def _folded_batchnorm(entry: dict, model: nn.Module, original: nn.Module) -> str:
    """The checked name of the BatchNorm folded into ``entry``'s layer ("" for none; version 1 files
    have no such field): a BatchNorm2d over the conv's output channels in the rebuilt model."""
    name = entry.get("batchnorm", "")
    if not isinstance(name, str):
        raise PackedFormatError(f"layer {entry['name']}: 'batchnorm' must be a module name or \"\", got {name!r}")
    if not name:
        return ""
    try:
        bn = model.get_submodule(name)
    except AttributeError:
        raise PackedFormatError(f"layer {entry['name']}: the folded BatchNorm {name!r} is not a module of the "
                                "architecture") from None
    width = original.weight.shape[0] if isinstance(original, nn.Conv2d) else None
    if type(bn) is not nn.BatchNorm2d or bn.num_features != width:
        raise PackedFormatError(f"layer {entry['name']}: the folded BatchNorm {name!r} is {type(bn).__name__} "
                                f"in the architecture, not a BatchNorm2d over the output channels of a Conv2d there")
    return name


def load_packed(path) -> nn.Module:
    """Rebuild the model saved by :func:`save_packed`: the float architecture from ``build_model``,
    the converted layers replaced by packed layers from the file, the rest of the state dict
    loaded; in eval mode. No pickle, no Hydra. Raises :class:`PackedFormatError` for a file that is
    not a packed model or is corrupt."""
    tensors, meta = read_packed(path)
    try:
        arch = meta["architecture"]
        model = build_model(arch["name"], arch["in_channels"], arch["image_size"], arch["num_classes"],
                            **arch.get("options", {}))
        bits, floats = tensors["bits"], tensors["floats"]
        if bits.dtype != torch.uint8 or floats.dtype != torch.float32:
            raise PackedFormatError("bits must be uint8 and floats float32")
        offset = 0
        entries = [dict(zip(meta["layer_fields"], row)) for row in meta["layers"]]
        for entry in entries:
            original = model.get_submodule(entry["name"])
            bn_name = _folded_batchnorm(entry, model, original)
            layer, offset = _build_layer(entry, original, bits, floats, offset, bn_name)
            model.set_submodule(entry["name"], layer)
            if bn_name:
                model.set_submodule(bn_name, nn.Identity())
        rest = _rest_state(model, [entry["name"] for entry in entries])
        if _layout_digest(rest) != meta["rest_sha256"]:
            raise PackedFormatError("the file's non-ABC state (BatchNorm, float layers) does not match the "
                                    f"architecture {arch['name']!r} rebuilt from its metadata")
        ints = tensors.get("ints", torch.zeros(0, dtype=torch.long))
        state, int_offset = {}, 0
        for key, kind, shape in _layout(rest):
            count = math.prod(shape)
            source, start = (floats, offset) if kind == "f" else (ints, int_offset)
            if start + count > source.numel():
                raise PackedFormatError("state data too short for the entries it describes")
            state[key] = source[start:start + count].view(shape).to(rest[key].dtype)
            if kind == "f":
                offset += count
            else:
                int_offset += count
        if offset != floats.numel() or int_offset != ints.numel():
            raise PackedFormatError("the file holds more data than its metadata describes")
        model.load_state_dict(state, strict=False)
    except PackedFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise PackedFormatError(f"{path}: inconsistent packed model file ({type(error).__name__}: {error})") from error
    return model.eval()


def _header_bytes(path) -> int:
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def packed_size_report(source, architecture: dict | None = None) -> dict:
    """Sizes of a packed model file (a path) or of the file a model would give (a packed or
    converted eval-mode model; pass ``architecture`` to count the float model exactly):

    ``file_bytes``, ``header_bytes``, ``binary_weight_bytes`` (the packed bits), ``float_bytes`` (the
    rest), ``binary_weights`` (count), ``bits_per_binary_weight`` (8 · binary bytes / count, ≈ M),
    ``fp32_bytes`` (the float model's parameters and floating buffers at 32 bit) and ``ratio``
    (fp32_bytes / file_bytes)."""
    if isinstance(source, (str, os.PathLike)):
        tensors, meta = read_packed(source)
        file_bytes, header = os.path.getsize(source), _header_bytes(source)
    else:
        from safetensors.torch import save

        tensors, meta = serialize(source, architecture)
        blob = save(tensors, metadata={METADATA_KEY: json.dumps(meta, separators=(",", ":"))})
        file_bytes, header = len(blob), 8 + struct.unpack("<Q", blob[:8])[0]
    arch = meta.get("architecture") or architecture
    fields = meta["layer_fields"]
    binary = sum(row[fields.index("weights")] for row in meta["layers"])
    if arch:
        float_model = build_model(arch["name"], arch["in_channels"], arch["image_size"], arch["num_classes"],
                                  **arch.get("options", {}))
        fp32 = 4 * (sum(p.numel() for p in float_model.parameters())
                    + sum(b.numel() for b in float_model.buffers() if b.is_floating_point()))
    else:  # estimate: the original float weights of the packed layers plus the stored floats
        fp32 = 4 * (binary + tensors["floats"].numel())
    bit_bytes = tensors["bits"].numel()
    return {"file_bytes": file_bytes, "header_bytes": header, "binary_weight_bytes": bit_bytes,
            "float_bytes": file_bytes - header - bit_bytes, "binary_weights": binary,
            "bits_per_binary_weight": 8 * bit_bytes / binary if binary else 0.0, "fp32_bytes": fp32,
            "ratio": fp32 / file_bytes}
