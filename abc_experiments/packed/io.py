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

from ..models import build_model, check_model_options
from ..nn.layers import ABCLayer
from .fusion import PackedConvChain, fold_batchnorms
from .layers import PackedABCConv2d, PackedABCLayer, PackedABCLinear, pack_layer

FORMAT = "abc-packed"
VERSION = 3  # 3: input offsets (layer field "input_offset"); 2: folded BatchNorm (field "batchnorm")
READABLE_VERSIONS = (1, 2, 3)  # older files load with what they lack as 0 / "" (how they computed)
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
        layer = pack_layer(packed.get_submodule(name))
        layer.name = name
        packed.set_submodule(name, layer)
    if fold_batchnorm:
        fold_batchnorms(packed)
    return packed.eval()


def packed_layers(model: nn.Module) -> list[tuple[str, PackedABCLayer]]:
    """Returns:
        (module name, layer) of every packed layer of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PackedABCLayer)]


def _rest_state(model: nn.Module, layer_names: list[str]) -> dict[str, Tensor]:
    """State entries outside the packed layers (minus num_batches_tracked)."""
    prefixes = tuple(f"{name}." for name in layer_names)
    return {key: value for key, value in model.state_dict().items()
            if not key.startswith(prefixes) and not key.endswith("num_batches_tracked")}


def _digest(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


LAYER_FIELDS = ["name", "M", "N", "scope", "bias", "weights", "bit_offset", "bit_bytes", "batchnorm", "input_offset"]
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
    result["options"] = dict(result.get("options") or {})
    if "pretrained" in result["options"]:
        # the file holds the weights: pretrained ones would be overwritten, and load_packed never
        # downloads (it refuses a file that asks for them)
        result["options"]["pretrained"] = False
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
        rows.append([name, layer.M, layer.N, layer.scope, int(layer.bias is not None), layer.binary_weight_count(),
                     bit_offset, count, layer.folded_batchnorm or "", float(layer.input_offset)])
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
    """The tensors and metadata of a packed file, checked: its format and version, that it holds
    exactly the tensors ``bits``, ``floats`` (and ``ints``) its header lists (names checked before
    any tensor is read), with their dtypes and checksums.

    Arguments:
        path: the file.

    Returns:
        (tensors, metadata).

    Raises:
        PackedFormatError: not a packed model file, or corrupt."""
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
            meta = json.loads(header[METADATA_KEY])
            _check_format(path, meta)
            _check_tensor_names(path, set(handle.keys()), meta)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except PackedFormatError:
        raise
    except Exception as error:  # safetensors' own errors, bad JSON, truncated files
        raise PackedFormatError(f"{path} is not a readable packed ABC model file: {error}") from error
    for key, tensor in tensors.items():
        if tensor.dtype != TENSOR_DTYPES[key] or tensor.dim() != 1:
            raise PackedFormatError(f"{path}: tensor {key!r} must be a {TENSOR_DTYPES[key]} vector, got "
                                    f"{tensor.dtype} {tuple(tensor.shape)}")
    for key, digest in meta["sha256"].items():
        if _digest(tensors[key]) != digest:
            raise PackedFormatError(f"{path}: tensor {key!r} is corrupt (checksum mismatch)")
    return tensors, meta


TENSOR_DTYPES = {"bits": torch.uint8, "floats": torch.float32, "ints": torch.int64}


def _check_format(path, meta) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PackedFormatError(f"{path}: unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if meta.get("version") not in READABLE_VERSIONS or isinstance(meta.get("version"), bool):
        raise PackedFormatError(f"{path}: format version {meta.get('version')} (this code reads "
                                f"{', '.join(map(str, READABLE_VERSIONS))})")


def _check_tensor_names(path, names: set[str], meta: dict) -> None:
    """The file's tensors must be exactly those its header checksums, all of them known."""
    digests = meta.get("sha256")
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise PackedFormatError(f"{path}: the header's 'sha256' must map each tensor name to its checksum")
    unknown = sorted((names | set(digests)) - set(TENSOR_DTYPES))
    if unknown:
        raise PackedFormatError(f"{path}: unexpected tensors {unknown} (a packed file holds only "
                                f"{', '.join(TENSOR_DTYPES)}): refused")
    if names != set(digests):
        raise PackedFormatError(f"{path}: tensors {sorted(names ^ set(digests))} are missing or have no checksum")
    if not {"bits", "floats"} <= names:
        raise PackedFormatError(f"{path}: a packed file needs the tensors 'bits' and 'floats'")


# the largest integer a header field may hold: the real bounds come from the file's tensors
MAX_HEADER_INT = 2**31 - 1


def _header_int(value, what: str, low: int) -> int:
    if type(value) is not int or not low <= value <= MAX_HEADER_INT:
        raise PackedFormatError(f"{what} must be an integer in [{low}, {MAX_HEADER_INT}], got {value!r}")
    return value


def _check_header_architecture(arch) -> dict:
    """The architecture fields: a registered model, positive sizes, options it takes; never
    ``pretrained`` (a packed file holds its weights; loading must not reach the network)."""
    if not isinstance(arch, dict):
        raise PackedFormatError(f"the header's architecture must be a dict, got {arch!r}: the file was not written "
                                "by save_packed")
    missing = [key for key in ARCHITECTURE_KEYS if key not in arch]
    if missing:
        raise PackedFormatError(f"the header's architecture lacks {', '.join(missing)}")
    if not isinstance(arch["name"], str):
        raise PackedFormatError(f"architecture name must be a string, got {arch['name']!r}")
    for key in ARCHITECTURE_KEYS[1:]:
        _header_int(arch[key], f"architecture {key}", 1)
    options = arch.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise PackedFormatError(f"architecture options must be a dict of named options, got {options!r}")
    if "pretrained" in options and options["pretrained"] is not False:
        raise PackedFormatError(f"architecture options ask for pretrained={options['pretrained']!r}: a packed file "
                                "holds its own weights and loading it never downloads anything; refused (save the "
                                "model with options.pretrained=false)")
    try:
        check_model_options(arch["name"], options)
    except ValueError as error:
        raise PackedFormatError(f"architecture: {error}") from None
    return {**arch, "options": options}


def _layer_floats(entry: dict, out: int) -> int:
    """How many floats a packed layer with ``out`` output channels stores."""
    return (entry["M"] * (1 if entry["scope"] == "per_layer" else out) + 2 * entry["N"]
            + out * bool(entry["bias"]) + 2 * out * bool(entry["batchnorm"]))


def check_packed_header(meta: dict, tensors: dict[str, Tensor]) -> list[dict]:
    """Check every field of a packed file's header against bounds that the file itself sets, before
    anything is built: the architecture (a registered model, options it takes, never
    ``pretrained``), each layer row (types, M, N, scope; its bits exactly ``ceil(M·weights/8)``
    bytes, the rows back to back covering all of ``bits``), and, on a model built on the ``meta``
    device (no memory, no download), that each row names a Conv2d or Linear with that many weights,
    each folded BatchNorm a BatchNorm2d over its channels, and that the floats and ints the layers
    and the rest of the state need are exactly those of the file (no extra data either way).

    Arguments:
        meta: the header's ``abc_packed`` metadata (JSON-decoded).
        tensors: the file's tensors by name (``bits``, ``floats``, optionally ``ints``).

    Returns:
        the layer rows as dicts (``LAYER_FIELDS``; ``batchnorm`` is "" for none), in file order.

    Raises:
        PackedFormatError: the first field out of bounds, saying which and why."""
    _check_format("header", meta)
    if not isinstance(tensors, dict) or not {"bits", "floats"} <= set(tensors) or set(tensors) - set(TENSOR_DTYPES):
        raise PackedFormatError(f"expected the tensors bits, floats (and ints), got {sorted(tensors)}")
    sizes = {key: tensors[key].numel() for key in TENSOR_DTYPES if key in tensors}
    sizes.setdefault("ints", 0)
    arch = _check_header_architecture(meta.get("architecture"))
    fields = meta.get("layer_fields")
    readable = [LAYER_FIELDS[:len(LAYER_FIELDS) - (VERSION - meta["version"])]]  # each version added one field
    if fields not in readable:
        raise PackedFormatError(f"layer_fields must be {LAYER_FIELDS}, got {fields!r}")
    rows = meta.get("layers")
    if not isinstance(rows, list) or not rows:
        raise PackedFormatError("the header lists no packed layers")
    if not isinstance(meta.get("rest_sha256"), str):
        raise PackedFormatError("the header lacks the rest_sha256 layout checksum")
    entries, names, bit_offset, least_floats = [], set(), 0, 0
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(fields):
            raise PackedFormatError(f"layer row {i} must be a list of {len(fields)} fields ({', '.join(fields)})")
        entry = dict(zip(fields, row))
        entry.setdefault("batchnorm", "")
        entry.setdefault("input_offset", 0.0)
        what = f"layer row {i} ({entry['name']!r})"
        if not isinstance(entry["name"], str) or not entry["name"] or entry["name"] in names:
            raise PackedFormatError(f"{what}: the name must be a module name, once")
        names.add(entry["name"])
        _header_int(entry["M"], f"{what}: M", 1)
        _header_int(entry["N"], f"{what}: N", 0)
        _header_int(entry["weights"], f"{what}: weights", 1)
        if entry["scope"] not in ("per_layer", "per_channel"):
            raise PackedFormatError(f"{what}: scope must be per_layer or per_channel, got {entry['scope']!r}")
        if entry["bias"] not in (0, 1) or type(entry["bias"]) not in (int, bool):
            raise PackedFormatError(f"{what}: bias must be 0 or 1, got {entry['bias']!r}")
        if not isinstance(entry["batchnorm"], str):
            raise PackedFormatError(f"layer {entry['name']}: 'batchnorm' must be a module name or \"\", got "
                                    f"{entry['batchnorm']!r}")
        offset = entry["input_offset"]
        if type(offset) not in (int, float) or not math.isfinite(offset) or (offset and not entry["N"]):
            raise PackedFormatError(f"{what}: input_offset must be a finite number (0 where N = 0), got {offset!r}")
        want = (entry["M"] * entry["weights"] + 7) // 8
        if (entry["bit_offset"] != bit_offset or entry["bit_bytes"] != want or type(entry["bit_bytes"]) is not int
                or type(entry["bit_offset"]) is not int):
            raise PackedFormatError(f"{what}: its bits must be the {want} bytes at offset {bit_offset} (M = "
                                    f"{entry['M']} bits for each of {entry['weights']} weights, rows back to back), "
                                    f"got {entry['bit_bytes']!r} at {entry['bit_offset']!r}")
        bit_offset += want
        if bit_offset > sizes["bits"]:
            raise PackedFormatError(f"{what}: bits out of range (the file holds {sizes['bits']} bytes of bits)")
        least_floats += entry["M"] + 2 * entry["N"]
        if least_floats > sizes["floats"]:
            raise PackedFormatError(f"{what}: float data too short for the layers it describes")
        entries.append(entry)
    if bit_offset != sizes["bits"]:
        raise PackedFormatError(f"the file holds {sizes['bits']} bytes of bits, its layers use {bit_offset}")
    model = _build_on_meta(arch)
    floats, folded = 0, set()
    for entry in entries:
        try:
            original = model.get_submodule(entry["name"])
        except AttributeError:
            raise PackedFormatError(f"layer {entry['name']}: not a module of the architecture "
                                    f"{arch['name']!r}") from None
        _check_layer_geometry(entry, original)
        entry["batchnorm"] = _folded_batchnorm(entry, model, original)
        if entry["batchnorm"] and (entry["batchnorm"] in folded or entry["batchnorm"] in names):
            raise PackedFormatError(f"layer {entry['name']}: the BatchNorm {entry['batchnorm']!r} is folded twice or "
                                    "is a packed layer")
        folded.add(entry["batchnorm"])
        floats += _layer_floats(entry, original.weight.shape[0])
    rest = _rest_state(model, [entry["name"] for entry in entries] + [name for name in folded if name])
    if _layout_digest(rest) != meta["rest_sha256"]:
        raise PackedFormatError("the file's non-ABC state (BatchNorm, float layers) does not match the "
                                f"architecture {arch['name']!r} rebuilt from its metadata")
    floats += sum(value.numel() for value in rest.values() if value.is_floating_point())
    ints = sum(value.numel() for value in rest.values() if not value.is_floating_point())
    if floats != sizes["floats"] or ints != sizes["ints"]:
        raise PackedFormatError(f"the model needs {floats} floats and {ints} integers, the file holds "
                                f"{sizes['floats']} and {sizes['ints']}: refused")
    return entries


def _check_layer_geometry(entry: dict, original: nn.Module) -> None:
    """A header row's layer is a Conv2d or Linear of the architecture with the row's weight count."""
    if type(original) not in (nn.Conv2d, nn.Linear):
        raise PackedFormatError(f"layer {entry['name']}: the architecture has a {type(original).__name__} there, "
                                "not a Conv2d or Linear")
    if original.weight.numel() != entry["weights"]:
        raise PackedFormatError(f"layer {entry['name']}: {entry['weights']} binary weights in the file, "
                                f"{original.weight.numel()} in the architecture's {original}")


def _build_on_meta(arch: dict) -> nn.Module:
    """The architecture built on the meta device: shapes without memory (and never pretrained)."""
    try:
        with torch.device("meta"):
            return build_model(arch["name"], arch["in_channels"], arch["image_size"], arch["num_classes"],
                               **arch["options"])
    except Exception as error:  # the builder's own refusals of the sizes
        raise PackedFormatError(f"architecture {arch['name']!r} cannot be built from the header's fields "
                                f"({type(error).__name__}: {error})") from None


def _build_layer(entry: dict, original: nn.Module, bits: Tensor, floats: Tensor, offset: int, batchnorm: str
                 ) -> tuple[PackedABCLayer, int]:
    """The packed layer for ``entry``, with ``original``'s (the float architecture's) geometry and
    the affine of the BatchNorm ``batchnorm`` folded in (checked by :func:`_folded_batchnorm`; "" for none)."""
    M, N, scope = entry["M"], entry["N"], entry["scope"]
    _check_layer_geometry(entry, original)
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
                                input_offset=entry["input_offset"], **parts)
        if affine is not None:
            layer.set_output_affine(*affine, batchnorm=batchnorm)
    else:
        layer = PackedABCLinear(original.in_features, out, M=M, N=N, scope=scope, input_offset=entry["input_offset"],
                                **parts)
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
    loaded; in eval mode. No pickle, no Hydra, no network: every header field is checked against
    the file's own contents (:func:`check_packed_header`) before anything is built.

    Arguments:
        path: the packed file.

    Returns:
        the packed model, in eval mode.

    Raises:
        PackedFormatError: a file that is not a packed model, is corrupt, or whose header does not
            describe exactly its contents (extra tensors or data, ``pretrained`` options included)."""
    tensors, meta = read_packed(path)
    try:
        entries = check_packed_header(meta, tensors)
    except PackedFormatError as error:
        raise PackedFormatError(f"{path}: {error}") from None
    try:
        arch = _check_header_architecture(meta["architecture"])
        model = build_model(arch["name"], arch["in_channels"], arch["image_size"], arch["num_classes"],
                            **arch["options"])
        bits, floats = tensors["bits"], tensors["floats"]
        offset = 0
        for entry in entries:
            original = model.get_submodule(entry["name"])
            bn_name = _folded_batchnorm(entry, model, original)
            layer, offset = _build_layer(entry, original, bits, floats, offset, bn_name)
            layer.name = entry["name"]
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
        try:
            check_packed_header(meta, tensors)
        except PackedFormatError as error:
            raise PackedFormatError(f"{source}: {error}") from None
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
        float_model = _build_on_meta(_check_architecture(arch))  # only counted: no memory, no download
        fp32 = 4 * (sum(p.numel() for p in float_model.parameters())
                    + sum(b.numel() for b in float_model.buffers() if b.is_floating_point()))
    else:  # estimate: the original float weights of the packed layers plus the stored floats
        fp32 = 4 * (binary + tensors["floats"].numel())
    bit_bytes = tensors["bits"].numel()
    return {"file_bytes": file_bytes, "header_bytes": header, "binary_weight_bytes": bit_bytes,
            "float_bytes": file_bytes - header - bit_bytes, "binary_weights": binary,
            "bits_per_binary_weight": 8 * bit_bytes / binary if binary else 0.0, "fp32_bytes": fp32,
            "ratio": fp32 / file_bytes}
