"""Packed inference (abc_experiments.packed): packed layers equal an independent float64 numpy
reference of the ABC layer (and the eval-mode float ABC layers) on every kernel path this machine
runs, whole converted models give the same logits, and the pickle-free file round-trips exactly."""

from __future__ import annotations

import json
import math
import struct
import warnings

import numpy as np
import pytest
import torch
from helpers import RunIf, rel_err
from torch import nn

from abc_experiments import packed as P
from abc_experiments.cpp_build import openmp_flags
from abc_experiments.models import build_model
from abc_experiments.nn import ABCConv2d, ABCLinear, calibrate, convert
from abc_experiments.packed import _bits, _ext

# avx512_emulated: the AVX-512 code with its AVX-512 intrinsics emulated, runs on any AVX2 CPU
ISAS = ("avx512", "avx512_emulated", "avx2", "portable", "reference")
PATHS = [pytest.param(isa, marks=RunIf(packed_isa=isa), id=isa) for isa in ISAS]
NATIVE = [pytest.param(isa, marks=RunIf(packed_isa=isa), id=isa) for isa in ISAS if isa != "reference"]


def float64_staircase(x: torch.Tensor, layer) -> np.ndarray:
    """(N, *x.shape) float64 Hₙ(x) = ±1 (x + vₙ rounded to float32, as every kernel compares it), or
    x itself as a single term for N = 0; and the betas (ones for N = 0)."""
    xs = x.numpy()
    if layer.N == 0:
        return xs[None].astype(np.float64), np.ones(1)
    act = layer.activation_binarizer
    shifts = act.shifts.detach().numpy().astype(np.float32).reshape(-1, *([1] * xs.ndim))
    return np.where(xs[None] + shifts >= np.float32(0.5), 1.0, -1.0), act.betas.detach().numpy().astype(np.float64)


def float64_bases(layer) -> tuple[np.ndarray, np.ndarray]:
    """The layer's binary weight bases (M, C_out, ...) and alphas as (M, C_out), in float64."""
    wb = layer.weight_binarizer
    bases = wb.compute_bases(layer.weight.detach()).numpy().astype(np.float64)
    alphas = wb.alphas.numpy().astype(np.float64).reshape(layer.M, -1)
    return bases, np.broadcast_to(alphas, (layer.M, bases.shape[1]))


def numpy_abc_conv(layer, x: torch.Tensor) -> torch.Tensor:
    """Σₘ Σₙ αₘ βₙ conv(Bₘ, Hₙ(x)) + bias (paper eq. 9: M·N binary convolutions), in float64
    numpy from the layer's stored bases, alphas, shifts and betas (zero padding, groups = 1)."""
    H, betas = float64_staircase(x, layer)
    B, alphas = float64_bases(layer)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    H = np.pad(H, ((0, 0), (0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh = (H.shape[-2] - dh * (kh - 1) - 1) // sh + 1
    ow = (H.shape[-1] - dw * (kw - 1) - 1) // sw + 1
    taps = np.stack([np.stack([H[..., i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
                               for j in range(kw)], -3) for i in range(kh)], -4)  # (N, b, C, kh, kw, oh, ow)
    convs = np.einsum("mocij,nbcijyx->mnboyx", B, taps, optimize=True)  # every binary convolution
    out = np.einsum("mo,n,mnboyx->boyx", alphas, betas, convs)
    if layer.bias is not None:
        out = out + layer.bias.detach().numpy().astype(np.float64).reshape(1, -1, 1, 1)
    return torch.from_numpy(out)


def numpy_abc_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """Σₘ Σₙ αₘ βₙ Hₙ(x) Bₘᵀ + bias in float64 numpy (see :func:`numpy_abc_conv`)."""
    H, betas = float64_staircase(x, layer)
    B, alphas = float64_bases(layer)
    out = np.einsum("mo,n,nbi,moi->bo", alphas, betas, H, B, optimize=True)
    if layer.bias is not None:
        out = out + layer.bias.detach().numpy().astype(np.float64)
    return torch.from_numpy(out)


def randomize_activations(layer, generator) -> None:
    """Non-default shifts (multiples of 1/8, so inputs can hit thresholds exactly) and betas."""
    if layer.N == 0:
        return
    with torch.no_grad():
        act = layer.activation_binarizer
        act.shifts.copy_(torch.randint(-4, 5, (layer.N,), generator=generator) / 8.0)
        act.betas.copy_(torch.rand(layer.N, generator=generator) + 0.05)


def tie_input(shape, shifts, generator) -> torch.Tensor:
    """Normal values, a third of them replaced by exact thresholds 0.5 − vₙ (x + vₙ == 0.5)."""
    x = torch.randn(shape, generator=generator)
    if shifts.numel():
        ties = 0.5 - shifts[torch.randint(shifts.numel(), shape, generator=generator)]
        x = torch.where(torch.rand(shape, generator=generator) < 0.33, ties, x)
    return x


# (C_in, C_out, kernel, stride, padding, dilation, H, W, M, N, scope, bias)
CONV_CASES = [
    (17, 33, 3, 1, 1, 1, 9, 11, 1, 1, "per_layer", True),
    (17, 33, 3, 2, 1, 1, 13, 10, 3, 3, "per_channel", False),
    (64, 64, 3, 1, 1, 1, 12, 12, 2, 5, "per_layer", True),
    (70, 9, (3, 5), (2, 1), (2, 0), (1, 2), 11, 14, 5, 2, "per_channel", True),
    (3, 16, 5, 1, 2, 1, 8, 8, 5, 5, "per_layer", False),
    (130, 24, 1, 2, 0, 1, 7, 9, 3, 1, "per_channel", True),
    (32, 8, 3, 1, 3, 3, 10, 10, 1, 3, "per_layer", True),
    (8, 40, 2, 3, 1, 1, 16, 5, 2, 2, "per_channel", False),
    (5, 7, 3, 1, 0, 1, 3, 3, 1, 7, "per_layer", True),  # N > 5: planes in chunks
    (200, 12, 3, 1, 1, 1, 6, 7, 2, 2, "per_channel", True),  # 36 words per output: counters spilled
]


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_matches_float64_reference_and_float_layer(isa, case):
    cin, cout, k, s, p, d, H, W, M, N, scope, bias = CONV_CASES[case]
    g = torch.Generator().manual_seed(case)
    layer = ABCConv2d.from_conv(nn.Conv2d(cin, cout, k, s, p, d, bias=bias), M, N, scope=scope).eval()
    randomize_activations(layer, g)
    packed = P.PackedABCConv2d.from_abc(layer)
    assert packed.native
    for batch in (1, 3):
        x = tie_input((batch, cin, H, W), layer.activation_binarizer.shifts.detach(), g)
        truth = numpy_abc_conv(layer, x)
        with torch.no_grad():
            ref = layer(x)
        with P.use_isa(isa):
            out = packed(x)
        assert out.shape == ref.shape == truth.shape
        assert rel_err(out.double(), truth) <= 1e-5 and rel_err(ref.double(), truth) <= 1e-5
        assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("M,N,scope,features", [(1, 1, "per_layer", (64, 10)), (3, 2, "per_channel", (100, 37)),
                                                (2, 5, "per_layer", (3136, 65)), (5, 3, "per_channel", (7, 3))])
def test_linear_matches_float64_reference_and_float_layer(isa, M, N, scope, features):
    g = torch.Generator().manual_seed(M * 10 + N)
    layer = ABCLinear.from_linear(nn.Linear(*features), M, N, scope=scope).eval()
    randomize_activations(layer, g)
    packed = P.PackedABCLinear.from_abc(layer)
    for rows in (1, 5, 33):
        x = tie_input((rows, features[0]), layer.activation_binarizer.shifts.detach(), g)
        truth = numpy_abc_linear(layer, x)
        with torch.no_grad():
            ref = layer(x)
        with P.use_isa(isa):
            out = packed(x)
        assert rel_err(out.double(), truth) <= 1e-5 and rel_err(ref.double(), truth) <= 1e-5
        assert rel_err(out, ref) <= 1e-5
    with P.use_isa(isa):  # extra leading dimensions
        assert packed(x.view(1, rows, -1)).shape == (1, rows, features[1])


@pytest.mark.parametrize("isa", NATIVE)
def test_counters_never_overflow(isa):
    """Every bit a mismatch (weights all ones, inputs all zero bits) over 36 words per output: the
    AVX2 path's byte counters (8 per step) must be spilled before they wrap."""
    cin, cout, k = 256, 16, 3
    wk = torch.full((1, cout // 8, k, k, cin // 64, 8), -1, dtype=torch.int64)  # all bits set
    coef = torch.ones(1, 1, cout)
    K = cin * k * k
    x = torch.zeros(2, cin, 5, 6)  # 0 + 0 < 0.5: every activation bit is 0
    out = P.ops.packed_conv2d(x, wk, coef, torch.zeros(cout, 3, 4), torch.zeros(1), cout, (k, k), (1, 1), (0, 0),
                              (1, 1), K / 2, isa=isa)
    assert torch.equal(out, torch.full((2, cout, 3, 4), K / 2))  # coef · (K − K/2) everywhere


@pytest.mark.parametrize("isa", NATIVE)
def test_activation_packing(isa):
    g = torch.Generator().manual_seed(1)
    shifts = torch.tensor([0.25, -0.125, 0.0])
    x = tie_input((2, 75, 5, 13), shifts, g)
    words = P.ops.pack_activations(x, shifts, (1, 2), isa=isa)
    assert words.shape == (2, 7, 17, 3, 2)
    bits = (x.unsqueeze(0) + shifts.view(-1, 1, 1, 1, 1)) >= 0.5  # (N, B, C, H, W)
    expected = torch.zeros(2, 7, 17, 3, 2, dtype=torch.int64)
    expected[:, 1:6, 2:15] = _bits.pack_words(bits.permute(1, 3, 4, 0, 2))
    assert torch.equal(words, expected)
    channels_last = x.contiguous(memory_format=torch.channels_last)  # the chain's form: the same words
    assert torch.equal(P.ops.pack_activations(channels_last, shifts, (1, 2), isa=isa), expected)
    rows = P.ops.pack_rows(x[:, :, 0, 0].contiguous(), shifts, isa=isa)
    assert torch.equal(rows, _bits.pack_words(bits[:, :, :, 0, 0].permute(1, 0, 2)))


@pytest.mark.parametrize("isa", NATIVE)
def test_a_channels_last_input_gives_a_channels_last_output_with_the_same_numbers(isa):
    """As F.conv2d: the output follows the input's memory format; the numbers are the NCHW path's
    bit for bit, with a residual given in either layout and the ReLU."""
    g = torch.Generator().manual_seed(4)
    layer = ABCConv2d.from_conv(nn.Conv2d(24, 20, 3, padding=1), 2, 3).eval()
    randomize_activations(layer, g)
    packed = P.PackedABCConv2d.from_abc(layer)
    packed.relu = True
    x = torch.randn(2, 24, 7, 9, generator=g)
    residual = torch.randn(2, 20, 7, 9, generator=g)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), P.use_isa(isa):
        expected, expected_res = packed(x), packed(x, residual)
        for _ in range(2):  # the first call checks, the second takes the cached fast path
            got = packed(x_cl)
            assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, expected)
        for r in (residual, residual.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(packed(x_cl, r), expected_res)
        wide = torch.zeros(2, 24, 7, 18)
        wide[..., ::2] = x
        assert torch.equal(packed(wide[..., ::2]), expected)  # neither layout: made NCHW first


@RunIf(packed_kernels=True)
def test_kernels_run_on_torch_threads_with_the_same_results():
    """``torch.set_num_threads`` governs the kernels' parallel_for (an extension built without
    -fopenmp runs it on one thread, silently), and the outputs do not depend on the thread count."""
    layer = ABCConv2d.from_conv(nn.Conv2d(24, 40, 3, padding=1), 2, 3).eval()
    packed = P.PackedABCConv2d.from_abc(layer)
    x = torch.randn(4, 24, 9, 11, generator=torch.Generator().manual_seed(0))
    threads, outputs = torch.get_num_threads(), {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            if openmp_flags() or count == 1:
                assert torch.ops.abc_packed.parallel_threads(64) == count
            with torch.no_grad():
                outputs[count] = packed(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[1], outputs[2])


def test_bits_round_trip():
    g = torch.Generator().manual_seed(0)
    bits = torch.rand(3, 5, 7, generator=g) < 0.5
    assert torch.equal(_bits.unpack_bits(_bits.pack_bits(bits), bits.numel()).view(bits.shape), bits)
    assert _bits.pack_bits(bits).numel() == math.ceil(105 / 8)
    words = _bits.pack_words(bits)
    assert words.shape == (3, 5, 1) and torch.equal(_bits.unpack_words(words, 7), bits)


@RunIf(packed_isa="portable")
def test_op_wrappers_check_inputs():
    shifts = torch.zeros(1)
    with pytest.raises(TypeError, match="float32"):
        P.ops.pack_activations(torch.zeros(1, 2, 3, 3, dtype=torch.float64), shifts, isa="portable")
    with pytest.raises(ValueError, match="contiguous"):
        P.ops.pack_activations(torch.zeros(1, 3, 3, 2).permute(0, 3, 2, 1), shifts, isa="portable")  # neither
    with pytest.raises(ValueError, match="contiguous"):
        P.ops.pack_activations(torch.zeros(1, 2, 3, 6)[..., ::2], shifts, isa="portable")
    with pytest.raises(ValueError, match="4-d"):
        P.ops.pack_activations(torch.zeros(2, 3, 3), shifts, isa="portable")


@pytest.mark.parametrize("isa", [p for p in PATHS if p.values[0] in ("portable", "reference")])
def test_fallbacks_groups_and_padding_modes(isa):
    g = torch.Generator().manual_seed(3)
    for conv in (nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.Conv2d(6, 10, 3, padding=1, padding_mode="reflect"),
                 nn.Conv2d(6, 10, 3, padding="same", dilation=2)):
        layer = ABCConv2d.from_conv(conv, 2, 3, scope="per_channel").eval()
        randomize_activations(layer, g)
        packed = P.PackedABCConv2d.from_abc(layer)
        assert not packed.native  # reference path, noted in the log
        x = tie_input((2, conv.in_channels, 7, 9), layer.activation_binarizer.shifts.detach(), g)
        with torch.no_grad(), P.use_isa(isa):
            assert rel_err(packed(x), layer(x)) <= 1e-5


def test_full_precision_activation_layers():
    conv = ABCConv2d.from_conv(nn.Conv2d(17, 33, 3, stride=2, padding=1), 3, 0, scope="per_channel").eval()
    linear = ABCLinear.from_linear(nn.Linear(50, 20), 2, 0).eval()
    x = torch.randn(2, 17, 9, 9)
    for layer, inp in ((conv, x), (linear, torch.randn(4, 50))):
        packed = P.pack_layer(layer)
        assert packed.N == 0 and packed.weight_bits.dtype == torch.uint8
        with torch.no_grad():
            assert rel_err(packed(inp), layer(inp)) <= 1e-5


def test_pack_model_refuses_training_mode():
    model = build_model("seed_cnn", 1, 28, 10)
    convert(model, 1, 1)
    with pytest.raises(RuntimeError, match="eval"):
        P.pack_model(model)
    with pytest.raises(ValueError, match="no ABC layers"):
        P.pack_model(build_model("seed_cnn", 1, 28, 10).eval())


def converted(name, shape, M, N, *, linear=False, seed=0):
    """A converted, calibrated (small samples: seconds) eval-mode model on random data."""
    torch.manual_seed(seed)
    model = build_model(name, shape[0], shape[1], 10)
    report = convert(model, M, N, scope="per_channel", linear=linear)
    calibrate(model, [torch.randn(4, *shape)], max_samples=4096, iterations=5)
    return model.eval(), report


MODELS = {"seed_cnn": ((1, 28, 28), True), "resnet20": ((3, 32, 32), False)}


@pytest.fixture(scope="module")
def models():
    """seed_cnn (linear=True) and resnet20, converted to ABC(2, 3) and calibrated once."""
    return {name: converted(name, shape, 2, 3, linear=linear) for name, (shape, linear) in MODELS.items()}


# resnet20 on the default native path (avx2) in the quick loop; its other paths are slow: the layer
# tests above hold every path to the float64 reference, and seed_cnn runs every path end to end
LOGIT_CASES = [pytest.param(name, isa, id=f"{name}-{isa}", marks=[RunIf(packed_isa=isa)]
                            + ([pytest.mark.slow] if name == "resnet20" and isa != "avx2" else []))
               for isa in ISAS for name in MODELS]


@pytest.mark.parametrize("name,isa", LOGIT_CASES)
def test_converted_model_same_logits(isa, name, models):
    (shape, linear), (model, report) = MODELS[name], models[name]
    if linear:
        assert "fc1" in report.converted
    packed = P.pack_model(model)
    assert {n for n, _ in P.packed_layers(packed)} == set(report.converted)
    assert model.training is False and isinstance(model.get_submodule(report.converted[0]), ABCConv2d)
    inputs = {}
    for layer_name, layer in P.packed_layers(packed):
        layer.register_forward_pre_hook(lambda _, args, key=layer_name: inputs.__setitem__(key, args[0]))
    x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), P.use_isa(isa):
        ref, out = model(x), packed(x)
        # in the model, every packed layer equals its float layer on the input that reaches it (then
        # the BatchNorm that pack_model folded into it, if any)
        assert set(inputs) == set(report.converted)
        for layer_name, layer_input in inputs.items():
            layer = packed.get_submodule(layer_name)
            want = model.get_submodule(layer_name)(layer_input)
            if layer.folded_batchnorm:
                want = model.get_submodule(layer.folded_batchnorm)(want)
            assert rel_err(layer(layer_input), want) <= 1e-5
    folded = {layer.folded_batchnorm for _, layer in P.packed_layers(packed)} - {None}
    # resnet20: every BatchNorm after a converted conv (not the first conv's); seed_cnn pools first
    assert len(folded) == (20 if name == "resnet20" else 0)  # 18 3×3 convs, 2 shortcut 1×1
    assert all(isinstance(packed.get_submodule(bn), nn.Identity) for bn in folded)
    # End to end, the logits are the same, except that a layer's output (equal to rounding, ~1e-7)
    # can land within rounding of one of the next layer's thresholds and binarize the other way:
    # a random-weight resnet20 has one such activation in ~1 image of 6 on the kernels, ~1 of 64 on the
    # reference path (its only rounding is the folded BatchNorm's). Same predictions always.
    per_image = (out - ref).abs().amax(1) / ref.abs().amax(1)
    exact = (per_image <= 1e-5).float().mean().item()
    assert exact >= (0.95 if isa == "reference" else 0.75)
    assert torch.equal(out.argmax(1), ref.argmax(1))


def file_parts(path):
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return raw, header_len, json.loads(raw[8:8 + header_len])


def test_save_load_round_trip_exact(tmp_path, models):
    model, report = models["seed_cnn"]
    packed = P.pack_model(model)
    arch = {"name": "seed_cnn", "in_channels": 1, "image_size": 28, "num_classes": 10, "options": {},
            "input_shape": [1, 28, 28]}
    path = P.save_packed(packed, tmp_path / "model.safetensors", architecture=arch)
    loaded = P.load_packed(path)
    assert not loaded.training
    assert {n for n, _ in P.packed_layers(loaded)} == set(report.converted)
    x = torch.randn(16, 1, 28, 28)
    for isa in P.available_isas():
        with torch.no_grad(), P.use_isa(isa):
            assert torch.equal(loaded(x), packed(x))
    # pickle-free: an 8-byte little-endian header length, then the safetensors JSON header
    raw, header_len, header = file_parts(path)
    assert raw[8:9] == b"{" and not raw.startswith(b"\x80") and not raw.startswith(b"PK")
    meta = json.loads(header["__metadata__"]["abc_packed"])
    assert meta["architecture"]["name"] == "seed_cnn" and meta["M"] == [2] and meta["N"] == [3]
    # an unpacked eval-mode model is packed on the way
    P.save_packed(model, tmp_path / "again.safetensors", architecture=arch)
    assert (tmp_path / "again.safetensors").read_bytes() == raw


def rewrite_metadata(source, target, change) -> None:
    """Copy a packed file with its metadata changed by ``change(meta)`` (the tensors, so their
    checksums, unchanged)."""
    from safetensors.torch import save_file

    tensors, meta = P.read_packed(source)
    change(meta)
    save_file(tensors, str(target), metadata={"abc_packed": json.dumps(meta)})


def test_folded_batchnorm_is_stored_and_loaded_exactly(tmp_path, models):
    model, report = models["resnet20"]
    packed = P.pack_model(model)
    folded = {name: layer.folded_batchnorm for name, layer in P.packed_layers(packed)}
    assert folded["layer1.0.conv1"] == "layer1.0.bn1" and folded["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    arch = {"name": "resnet20", "in_channels": 3, "image_size": 32, "num_classes": 10}
    path = P.save_packed(packed, tmp_path / "r20.safetensors", architecture=arch)
    loaded = P.load_packed(path)
    assert {name: layer.folded_batchnorm for name, layer in P.packed_layers(loaded)} == folded
    assert all(isinstance(loaded.get_submodule(bn), nn.Identity) for bn in folded.values())
    assert isinstance(loaded.bn1, nn.BatchNorm2d)  # after the float first conv: stored whole
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for isa in P.available_isas():
        with torch.no_grad(), P.use_isa(isa):
            assert torch.equal(loaded(x), packed(x)), isa
    # the folded BatchNorm named in the file must be a BatchNorm2d of the conv's width there
    def misplace(meta):
        column = meta["layer_fields"].index("batchnorm")
        meta["layers"][0][column] = "layer1.0.conv2"
    rewrite_metadata(path, tmp_path / "misplaced.safetensors", misplace)
    with pytest.raises(P.PackedFormatError, match="not a BatchNorm2d over the output channels"):
        P.load_packed(tmp_path / "misplaced.safetensors")
    for value, message in ((5, "must be a module name"), ("layer1.0.nope", "is not a module of the architecture")):
        def bad_name(meta, value=value):
            meta["layers"][0][meta["layer_fields"].index("batchnorm")] = value
        rewrite_metadata(path, tmp_path / "bad_name.safetensors", bad_name)
        with pytest.raises(P.PackedFormatError, match=message):
            P.load_packed(tmp_path / "bad_name.safetensors")
    # a run-time fusion (ReLU and residual in the kernel) is not something a file can hold
    with pytest.raises(ValueError, match="fused at run time"):
        P.save_packed(P.fuse_batchnorm_relu(packed, chain=False), tmp_path / "fused.safetensors",
                      architecture=arch)


@pytest.mark.parametrize("version", [1, 2])
def test_older_files_still_load(tmp_path, models, version):
    """Version 1 files had no folded BatchNorm ("batchnorm" field), versions 1 and 2 no input offset
    ("input_offset"): they load as what they computed (nothing folded, offset 0)."""
    model, _ = models["resnet20"]
    packed = P.pack_model(model, fold_batchnorm=False)
    for _, layer in P.packed_layers(packed):
        layer.input_offset.zero_()  # what those versions computed
        layer._derive()  # rebuild what depends on the stored tensors
    arch = {"name": "resnet20", "in_channels": 3, "image_size": 32, "num_classes": 10}
    path = P.save_packed(packed, tmp_path / "now.safetensors", architecture=arch)

    def older(meta):
        kept = len(meta["layer_fields"]) - (P.io.VERSION - version)  # each version added one field
        meta["version"] = version
        meta["layer_fields"] = meta["layer_fields"][:kept]
        for row in meta["layers"]:
            del row[kept:]
    rewrite_metadata(path, tmp_path / "old.safetensors", older)
    loaded = P.load_packed(tmp_path / "old.safetensors")
    assert len([m for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)]) == 21
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))
    future = P.io.VERSION + 1
    rewrite_metadata(path, tmp_path / "future.safetensors", lambda meta: meta.update(version=future))
    with pytest.raises(P.PackedFormatError, match=f"format version {future}"):
        P.load_packed(tmp_path / "future.safetensors")


def test_file_size_is_M_bits_per_weight_plus_floats(tmp_path, models):
    M = 2
    model, report = models["resnet20"]
    arch = {"name": "resnet20", "in_channels": 3, "image_size": 32, "num_classes": 10}
    path = P.save_packed(model, tmp_path / "r20.safetensors", architecture=arch)
    raw, header_len, header = file_parts(path)
    layers = dict(model.named_modules())
    folded = {name: layer.folded_batchnorm for name, layer in P.packed_layers(P.pack_model(model))}
    assert all(isinstance(layers[bn], nn.BatchNorm2d) for bn in folded.values())  # each conv's BatchNorm
    bit_bytes = sum(math.ceil(M * layers[name].weight.numel() / 8) for name in report.converted)
    # per packed layer: alphas, shifts, betas, bias, and its folded BatchNorm's scale and shift
    packed_floats = sum(layers[name].weight_binarizer.alphas.numel() + 2 * layers[name].N
                        + (0 if layers[name].bias is None else layers[name].bias.numel())
                        + 2 * layers[name].out_channels * (folded[name] is not None)
                        for name in report.converted)
    stored_elsewhere = tuple(f"{n}." for n in [*report.converted, *folded.values()] if n)
    rest_floats = sum(v.numel() for k, v in model.state_dict().items()
                      if not k.startswith(stored_elsewhere) and v.is_floating_point())
    assert len(raw) == 8 + header_len + bit_bytes + 4 * (packed_floats + rest_floats)
    sizes = P.packed_size_report(path)
    assert sizes["file_bytes"] == len(raw) and sizes["binary_weight_bytes"] == bit_bytes
    binary = sum(layers[name].weight.numel() for name in report.converted)
    assert sizes["binary_weights"] == binary and M <= sizes["bits_per_binary_weight"] < M + 0.01
    float_model = build_model("resnet20", 3, 32, 10)
    assert sizes["fp32_bytes"] == 4 * (sum(p.numel() for p in float_model.parameters())
                                       + sum(b.numel() for b in float_model.buffers() if b.is_floating_point()))
    assert P.packed_size_report(model, architecture=arch)["file_bytes"] == len(raw)
    # without the fold, each of those BatchNorms is stored whole: 4 floats a channel instead of 2
    unfolded = P.packed_size_report(P.pack_model(model, fold_batchnorm=False), architecture=arch)
    channels = sum(layers[bn].num_features for bn in folded.values() if bn)
    assert unfolded["float_bytes"] - sizes["float_bytes"] == 4 * 2 * channels


def test_corrupt_or_foreign_files_raise(tmp_path, models):
    from safetensors.torch import save_file

    model, _ = models["seed_cnn"]
    arch = {"name": "seed_cnn", "in_channels": 1, "image_size": 28, "num_classes": 10}
    good = P.save_packed(model, tmp_path / "good.safetensors", architecture=arch).read_bytes()
    _, header_len, _ = file_parts(tmp_path / "good.safetensors")
    flipped = bytearray(good)
    flipped[8 + header_len + 5] ^= 0xFF
    foreign = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    pickled = tmp_path / "pickled.pt"
    torch.save(model.state_dict(), pickled)
    cases = {"truncated": good[: len(good) // 2], "garbage": b"\x00" * 64, "flipped": bytes(flipped),
             "empty": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for path in [tmp_path / name for name in cases] + [foreign, pickled]:
        with pytest.raises(P.PackedFormatError):
            P.load_packed(path)


@RunIf(packed_kernels=True)
def test_the_isa_codes_are_the_kernels_own_list():
    from abc_experiments.packed import _ext

    names = torch.ops.abc_packed.isa_names()
    assert _ext.ISA_CODES == {name: code for code, name in enumerate(names)}
    assert set(names) == set(_ext.ISAS + _ext.TEST_ISAS) - {"reference"}
    with pytest.raises(RuntimeError, match=f"unknown isa code {len(names)}"):
        torch.ops.abc_packed.pack_nchw(torch.zeros(1, 1, 1, 1), torch.zeros(1), 0, 0, len(names))


def test_isa_selection(monkeypatch):
    monkeypatch.setenv(P.ENV_VAR, "reference")
    assert P.get_isa() == "reference"
    monkeypatch.setenv(P.ENV_VAR, "sse9")
    with pytest.raises(ValueError, match="unknown packed kernel path"):
        P.get_isa()
    monkeypatch.delenv(P.ENV_VAR)
    assert P.get_isa() == P.available_isas()[0]
    with P.use_isa("reference"):
        assert P.get_isa() == "reference"
    # the emulated AVX-512 path is for tests: run by name only, never the default
    assert "avx512_emulated" not in P.available_isas()
    if "avx2" in P.cpu_isas():
        with P.use_isa("avx512_emulated"):
            assert P.get_isa() == "avx512_emulated"
    missing = [isa for isa in ("avx512", "avx2") if isa not in P.available_isas()]
    if missing and P.extension_available():
        with pytest.raises(RuntimeError, match="cannot run"), P.use_isa(missing[0]):
            pass


def test_unbuildable_extension_warns_once_and_falls_back(monkeypatch):
    def broken():
        raise RuntimeError("Ninja is required to load C++ extensions (pretend)")

    monkeypatch.setattr(_ext, "_load", broken)
    monkeypatch.setitem(_ext._state, "loaded", None)
    monkeypatch.setitem(_ext._state, "error", None)
    monkeypatch.setitem(_ext._state, "forced", None)
    monkeypatch.delenv(P.ENV_VAR, raising=False)
    layer = ABCConv2d.from_conv(nn.Conv2d(4, 8, 3, padding=1), 2, 2).eval()
    x = torch.randn(1, 4, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed = P.pack_layer(layer)
        assert P.get_isa() == "reference" and P.available_isas() == ("reference",)
        out = packed(x)
        packed(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, P.PackedKernelWarning)]
    assert len(messages) == 1 and "Ninja is required" in messages[0] and "pip install ninja" in messages[0]
    with torch.no_grad():
        assert torch.equal(out, layer(x))


def test_dense_taps_when_a_kernel_row_fits_in_fewer_words():
    """Below 64 input channels a kernel row's bits are packed as one string (16 channels, 3×3:
    one word per row, not three); at 64 channels nothing is gained and the layout stays per tap."""
    def layout(cin, k):
        layer = ABCConv2d.from_conv(nn.Conv2d(cin, 16, k, padding=1), 1, 1).eval()
        return tuple(P.PackedABCConv2d.from_abc(layer)._wk.shape)

    assert layout(16, 3) == (1, 2, 3, 1, 1, 8)
    assert layout(32, 5) == (1, 2, 5, 1, 3, 8)
    assert layout(64, 3) == (1, 2, 3, 3, 1, 8)
    assert layout(70, 3) == (1, 2, 3, 1, 4, 8)
