"""The packed engine refuses what it cannot compute instead of crashing or answering wrongly (issue 18,
part 2): every packed layer, chain and C++ operator checks an input's rank, channel count, spatial size,
dtype and device before a kernel reads it; an empty batch gives an empty output; float16/bfloat16 are
computed in float32 and converted back; ``load_state_dict`` rebuilds every derived tensor (or refuses,
saying how to repack) and ``state_dict`` holds the folded BatchNorms; ``load_packed`` refuses crafted
headers (huge sizes, ``pretrained``, extra tensors or data) quickly, without allocating or downloading."""

from __future__ import annotations

import json
import socket
import sys
import time
import tracemalloc

import pytest
import torch
from torch import nn

from abc_experiments import packed as P
from abc_experiments.models import build_model
from abc_experiments.nn import ABCConv2d, ABCLinear, convert
from abc_experiments.packed import _ext
from abc_experiments.packed.io import _digest, serialize


def paths() -> tuple[str, ...]:
    """The kernel paths this machine runs (native ones only where the extension builds)."""
    native = _ext.runnable_isas() if P.extension_available() else ()
    return (*native, "reference")


def model_paths() -> tuple[str, ...]:
    """For whole models: the best native path and the reference (the emulated and portable paths are
    slow, and each is checked against the reference layer by layer in test_packed.py)."""
    native = P.cpu_isas()[:1] if P.extension_available() else ()
    return (*native, "reference")


def native_path() -> str:
    if not P.extension_available() or not P.cpu_isas():
        pytest.skip(f"the C++ extension is unavailable: {P.extension_error()}")
    return P.cpu_isas()[0]


def converted(name: str, shape, M: int, N: int, *, linear: bool = False, seed: int = 0) -> nn.Module:
    """A converted eval-mode model with random weights, activation shifts and BatchNorm statistics (no
    calibration: these tests need distinct states, not accuracy)."""
    g = torch.manual_seed(seed)
    model = build_model(name, shape[0], shape[1], 10)
    convert(model, M, N, scope="per_channel", linear=linear)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (ABCConv2d, ABCLinear)) and module.N:
                module.activation_binarizer.shifts.copy_(torch.randint(-4, 5, (module.N,), generator=g) / 8.0)
                module.activation_binarizer.betas.copy_(torch.rand(module.N, generator=g) + 0.05)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
    return model.eval()


SEED_CNN = ((1, 28, 28), {"name": "seed_cnn", "in_channels": 1, "image_size": 28, "num_classes": 10})
RESNET20 = ((3, 32, 32), {"name": "resnet20", "in_channels": 3, "image_size": 32, "num_classes": 10})


@pytest.fixture(scope="module")
def models():
    """Two seeds of seed_cnn (linear=True) and resnet20 at ABC(2, 3), converted and calibrated once."""
    return {("seed_cnn", seed): converted("seed_cnn", SEED_CNN[0], 2, 3, linear=True, seed=seed) for seed in (0, 1)} | {
        ("resnet20", seed): converted("resnet20", RESNET20[0], 2, 3, seed=seed) for seed in (0, 1)}


def standalone_conv(cin=20, cout=12, k=3, padding=0, seed=0) -> P.PackedABCConv2d:
    torch.manual_seed(seed)
    layer = ABCConv2d.from_conv(nn.Conv2d(cin, cout, k, padding=padding), 2, 3).eval()
    return P.PackedABCConv2d.from_abc(layer)


def standalone_linear(features=100, out=7, seed=0) -> P.PackedABCLinear:
    torch.manual_seed(seed)
    return P.PackedABCLinear.from_abc(ABCLinear.from_linear(nn.Linear(features, out), 2, 3).eval())


# --------------------------------------------------------------------------------------- empty batch

@pytest.mark.parametrize("isa", model_paths())
def test_empty_batch_gives_an_empty_output_like_the_float_model(isa, models):
    for name, (shape, _) in (("seed_cnn", SEED_CNN), ("resnet20", RESNET20)):
        model = models[(name, 0)]
        packed = P.pack_model(model)
        x = torch.zeros(0, *shape)
        with torch.no_grad(), P.use_isa(isa):
            want = model(x).shape
            for runner in (packed, P.fuse_batchnorm_relu(packed)):
                out = runner(x)
                assert out.shape == want == (0, 10)
    layer, lin = standalone_conv(padding=1), standalone_linear()
    with torch.no_grad(), P.use_isa(isa):
        assert layer(torch.zeros(0, 20, 9, 7)).shape == (0, 12, 9, 7)
        assert lin(torch.zeros(0, 100)).shape == (0, 7) and lin(torch.zeros(2, 0, 100)).shape == (2, 0, 7)


def test_empty_batch_in_the_cpp_operators():
    isa = native_path()
    layer = standalone_conv(padding=1)
    op, args = layer._operator_args(9, 7, isa)
    assert op(torch.zeros(0, 20, 9, 7), *args, False, None).shape == (0, 12, 9, 7)
    lin = standalone_linear()
    out = torch.ops.abc_packed.linear(torch.zeros(0, 100), lin._wk, lin._coef, lin._bterm, lin.shifts, 7, lin.K / 2,
                                      _ext.ISA_CODES[isa])
    assert out.shape == (0, 7)


# ----------------------------------------------------------------------------------- wrong channels

# (model, layer, channel counts that round to the layer's number of 64-bit words: the cases that
# returned numbers before)
CHANNEL_CASES = [("seed_cnn", "conv2", 32, (26, 30, 33, 38)), ("resnet20", "layer3.0.conv2", 64, (54, 60)),
                 ("resnet20", "layer2.1.conv1", 32, (22, 31, 33, 42))]


@pytest.mark.parametrize("isa", paths())
@pytest.mark.parametrize("case", CHANNEL_CASES, ids=lambda case: f"{case[0]}-{case[1]}")
def test_wrong_channel_counts_raise_naming_the_layer(isa, case, models):
    name, layer_name, channels, wrong = case
    layer = P.pack_model(models[(name, 0)]).get_submodule(layer_name)
    assert layer.in_channels == channels
    with torch.no_grad(), P.use_isa(isa):
        layer(torch.zeros(1, channels, 8, 8))  # the right count runs
        for count in wrong:
            with pytest.raises(ValueError, match=rf"'{layer_name}'.*expected an input with {channels} channels, "
                                                 rf"got shape \(1, {count}, 8, 8\)"):
                layer(torch.zeros(1, count, 8, 8))


@pytest.mark.parametrize("isa", model_paths())
def test_a_chain_refuses_wrong_channels_through_its_layer(isa, models):
    fused = P.fuse_batchnorm_relu(P.pack_model(models[("resnet20", 0)]))
    chain = next(m for m in fused.modules() if isinstance(m, P.PackedConvChain))
    first = chain.layers[0]
    with torch.no_grad(), P.use_isa(isa):
        chain(torch.zeros(1, first.in_channels, 8, 8))
        with pytest.raises(ValueError, match=rf"'{chain.names[0]}'.*expected an input with {first.in_channels}"):
            chain(torch.zeros(1, first.in_channels + 2, 8, 8))
        with pytest.raises(ValueError, match="4-d input"):
            chain(torch.zeros(first.in_channels, 8, 8))


def test_cpp_operators_check_channels_size_and_device():
    """The operators' own TORCH_CHECKs, called directly: same word count, other channel count."""
    isa = native_path()
    layer = standalone_conv(cin=20, padding=0)  # 20 channels: 1 word, like 17..64
    op, args = layer._operator_args(6, 6, isa)
    assert op(torch.zeros(1, 20, 6, 6), *args, False, None).shape == (1, 12, 4, 4)
    with pytest.raises(RuntimeError, match="the input has 22 channels"):
        op(torch.zeros(1, 22, 6, 6), *args, False, None)
    with pytest.raises(RuntimeError, match="smaller than"):
        op(torch.zeros(1, 20, 2, 6), *args, False, None)
    with pytest.raises(RuntimeError, match="CPU"):
        op(torch.zeros(1, 20, 6, 6, device="meta"), *args, False, None)
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.zeros(1, 20, 6, 6, dtype=torch.float64), *args, False, None)
    lin = standalone_linear(features=100)
    lin_args = (lin._wk, lin._coef, lin._bterm, lin.shifts, 7, lin.K / 2, _ext.ISA_CODES[isa])
    with pytest.raises(RuntimeError, match="the input has 90 channels"):
        torch.ops.abc_packed.linear(torch.zeros(3, 90), *lin_args)
    # a chain program that names another channel count for its step than the input's
    chain = P.PackedConvChain([layer], ["conv"], 1, [(0, -1)], [1])
    tensors, program, code = chain._program((isa, (1, 20, 6, 6), layer.state_version), [torch.zeros(1, 20, 6, 6)], isa)
    assert program[-1] == 20  # the step's in_channels
    with pytest.raises(RuntimeError, match="expects 20 input channels"):
        torch.ops.abc_packed.conv2d_chain([torch.zeros(1, 24, 6, 6)], tensors, program, code)


# ------------------------------------------------------------------------------------- rank, size

@pytest.mark.parametrize("isa", paths())
def test_wrong_rank_and_too_small_inputs_raise(isa):
    layer, lin = standalone_conv(k=3, padding=0), standalone_linear()
    with torch.no_grad(), P.use_isa(isa):
        for shape in ((20, 6, 6), (2, 20, 6), (1, 1, 20, 6, 6)):
            with pytest.raises(ValueError, match=r"expected a 4-d input \(batch, 20 channels"):
                layer(torch.zeros(shape))
        for shape in ((1, 20, 2, 6), (1, 20, 6, 1), (1, 20, 0, 6)):
            with pytest.raises(ValueError, match="packed conv2d"):
                layer(torch.zeros(shape))
        for x in (torch.zeros(3, 99), torch.zeros(()), torch.zeros(2, 100, 1)):
            with pytest.raises(ValueError, match=r"packed linear \(100 -> 7 features\): expected an input of shape"):
                lin(x)
        assert lin(torch.zeros(100)).shape == (7,)  # one sample without a batch, like nn.Linear


def test_a_shape_checked_once_skips_the_checks_only_for_that_shape_and_path():
    """forward's fast path (an input shape that passed the checks on this path before) must still
    refuse every other input, follow a change of path, and forget what it knew on a state change."""
    isa = native_path()
    layer = standalone_conv(k=3, padding=1)
    x = torch.rand(2, 20, 6, 6)
    with torch.no_grad(), P.use_isa(isa):
        first = layer(x)
        assert (x.shape, x.stride(), isa) in layer._checked
        assert torch.equal(layer(x), first)
        for bad in (torch.rand(2, 19, 6, 6), torch.rand(2, 20, 6), torch.zeros(2, 20, 6, 6, dtype=torch.int32)):
            with pytest.raises(ValueError):
                layer(bad)
        assert torch.equal(layer(x.to(memory_format=torch.channels_last)), first)  # same shape, run channels-last
        assert torch.equal(layer(x.transpose(2, 3).contiguous().transpose(2, 3)), first)  # neither: made contiguous
    with torch.no_grad(), P.use_isa("reference"):
        reference = layer(x)  # the reference path, not the native call remembered for this shape
        assert (x.shape, x.stride(), "reference") not in layer._checked
    assert torch.allclose(reference, first, rtol=1e-5, atol=1e-5)
    layer.load_state_dict(standalone_conv(k=3, padding=1, seed=1).state_dict())
    assert not layer._checked
    with torch.no_grad(), P.use_isa(isa):
        assert torch.equal(layer(x), standalone_conv(k=3, padding=1, seed=1)(x))


# ------------------------------------------------------------------------------------------- dtype

@pytest.mark.parametrize("isa", paths())
def test_integer_dtypes_are_refused_and_half_precision_computed_in_float32(isa):
    layer, lin = standalone_conv(padding=1), standalone_linear()
    g = torch.Generator().manual_seed(0)
    x, rows = torch.randn(2, 20, 7, 6, generator=g), torch.randn(5, 100, generator=g)
    with torch.no_grad(), P.use_isa(isa):
        for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64):
            with pytest.raises(ValueError, match=f"floating-point input.*got {dtype}"):
                layer(x.to(dtype))
            with pytest.raises(ValueError, match=f"got {dtype}"):
                lin(rows.to(dtype))
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            low = x.to(dtype)
            out = layer(low)
            # exactly the float32 layer on the same values, rounded once to the input's dtype
            assert out.dtype == dtype and torch.equal(out, layer(low.float()).to(dtype))
            assert torch.equal(lin(rows.to(dtype)), lin(rows.to(dtype).float()).to(dtype))


def test_half_model_keeps_the_packed_tensors_in_float32():
    layer = standalone_conv(padding=1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(1, 20, 7, 6).half()
    want = layer(x)
    layer.half()
    assert all(torch.equal(layer.state_dict()[k], v) and layer.state_dict()[k].dtype == v.dtype
               for k, v in before.items())
    assert torch.equal(layer(x), want)


# ------------------------------------------------------------------------------------------ device

@pytest.mark.parametrize("isa", paths())
def test_an_input_on_another_device_is_refused(isa):
    """A 'meta' tensor stands for any other device (no GPU needed)."""
    layer, lin = standalone_conv(padding=1), standalone_linear()
    with torch.no_grad(), P.use_isa(isa):
        with pytest.raises(ValueError, match="input is on meta but the layer is on cpu"):
            layer(torch.zeros(1, 20, 7, 6, device="meta"))
        with pytest.raises(ValueError, match="input is on meta but the layer is on cpu"):
            lin(torch.zeros(1, 100, device="meta"))
    with pytest.raises(ValueError, match="expected a tensor input"):
        layer([[1.0]])


# --------------------------------------------------------------------------- state dict round trips

@pytest.mark.parametrize("name", ["seed_cnn", "resnet20"])
def test_load_state_dict_rebuilds_every_derived_tensor(name, models):
    source, target = P.pack_model(models[(name, 0)]), P.pack_model(models[(name, 1)])
    shape = (SEED_CNN if name == "seed_cnn" else RESNET20)[0]
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(3))
    state = source.state_dict()
    if name == "resnet20":  # the folded BatchNorms are in the state
        folded = [n for n, layer in P.packed_layers(source) if layer.folded_batchnorm]
        assert len(folded) == 20 and all(f"{n}.output_scale" in state and f"{n}.output_shift" in state
                                         for n in folded)
    for isa in model_paths():
        with torch.no_grad(), P.use_isa(isa):
            assert not torch.equal(target(x), source(x))  # the caches of every layer are filled
    target.load_state_dict(state)
    for isa in model_paths():
        with torch.no_grad(), P.use_isa(isa):
            assert torch.equal(target(x), source(x)), isa
    # fused models too: a chain's cached programs hold the layers' tensors
    fused_source, fused_target = (P.fuse_batchnorm_relu(m) for m in (source, P.pack_model(models[(name, 1)])))
    with torch.no_grad():
        fused_target(x)
        fused_target.load_state_dict(fused_source.state_dict())
        for isa in model_paths():
            with P.use_isa(isa):
                assert torch.equal(fused_target(x), fused_source(x)), isa


def test_loaded_state_saves_and_loads_to_the_same_outputs(tmp_path, models):
    source, target = P.pack_model(models[("resnet20", 0)]), P.pack_model(models[("resnet20", 1)])
    target.load_state_dict(source.state_dict())
    path = P.save_packed(target, tmp_path / "r20.safetensors", architecture=RESNET20[1])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(P.load_packed(path)(x), source(x))
        assert torch.equal(P.load_packed(path).state_dict()["layer1.0.conv1.output_scale"],
                           source.state_dict()["layer1.0.conv1.output_scale"])


def test_load_state_dict_of_another_packing_is_refused_with_how_to_repack(models):
    other_M = converted("seed_cnn", SEED_CNN[0], 3, 3, linear=True)
    target = P.pack_model(models[("seed_cnn", 0)])
    with pytest.raises(RuntimeError, match="pack the model they come from"):
        target.load_state_dict(P.pack_model(other_M).state_dict())
    # folded in one, not in the other: the BatchNorm's keys and the fold's do not match
    folded, unfolded = P.pack_model(models[("resnet20", 0)]), P.pack_model(models[("resnet20", 1)],
                                                                           fold_batchnorm=False)
    with pytest.raises(RuntimeError, match="output_scale"):
        unfolded.load_state_dict(folded.state_dict())
    with pytest.raises(RuntimeError, match="output_scale"):
        folded.load_state_dict(unfolded.state_dict())


# -------------------------------------------------------------------------------- crafted headers

def craft(source, target, change_meta=None, change_tensors=None) -> None:
    """Copy a packed file with its metadata and/or tensors changed (checksums recomputed)."""
    from safetensors.torch import save_file

    tensors, meta = P.read_packed(source)
    if change_tensors:
        change_tensors(tensors)
        meta["sha256"] = {key: _digest(value) for key, value in tensors.items()}
    if change_meta:
        change_meta(meta)
    save_file(tensors, str(target), metadata={"abc_packed": json.dumps(meta)})


def set_arch(**fields):
    return lambda meta: meta["architecture"].update(fields)


def set_row(column: str, value, row: int = 0):
    def change(meta):
        meta["layers"][row][meta["layer_fields"].index(column)] = value
    return change


def seed_cnn_cases():
    return {
        "image_size 400": (set_arch(image_size=400), None, "floats|weights"),
        "image_size 2048": (set_arch(image_size=2048), None, "weights"),
        "num_classes 2e8": (set_arch(num_classes=200_000_000), None, "non-ABC state"),
        "in_channels 1e6": (set_arch(in_channels=1_000_000), None, "non-ABC state"),
        "image_size huge": (set_arch(image_size=10**30), None, "image_size must be an integer"),
        "image_size float": (set_arch(image_size=28.0), None, "image_size must be an integer"),
        "unknown model": (set_arch(name="nosuch"), None, "unknown model"),
        "unknown option": (set_arch(options={"width": 4}), None, "does not take option"),
        "pretrained": (set_arch(name="resnet18", options={"pretrained": True}), None, "pretrained"),
        "extra tensor": (None, lambda t: t.update(junk=torch.zeros(4)), "unexpected tensors"),
        "extra tensor unlisted": (lambda m: m["sha256"].pop("junk"), lambda t: t.update(junk=torch.zeros(4)),
                                  "unexpected tensors"),
        "extra bits": (None, lambda t: t.update(bits=torch.cat([t["bits"], t["bits"][:8]])), "bytes of bits"),
        "extra floats": (None, lambda t: t.update(floats=torch.cat([t["floats"], torch.zeros(3)])), "floats"),
        "extra ints": (None, lambda t: t.update(ints=torch.zeros(5, dtype=torch.int64)), "integers"),
        "float bits": (None, lambda t: t.update(bits=t["bits"].float()), "uint8"),
        "M huge": (set_row("M", 10**9), None, "bytes at offset"),
        "M float": (set_row("M", 2.0), None, "M must be an integer"),
        "M bool": (set_row("M", True), None, "M must be an integer"),
        "N huge": (set_row("N", 2**30), None, "float data too short"),
        "weights huge": (set_row("weights", 2**31 - 1), None, "bytes at offset"),
        "bit offset negative": (set_row("bit_offset", -8), None, "bytes at offset"),
        "bit bytes short": (set_row("bit_bytes", 10), None, "bytes at offset"),
        "scope": (set_row("scope", "per_pixel"), None, "scope"),
        "bias": (set_row("bias", 7), None, "bias must be 0 or 1"),
        "name": (set_row("name", "pool1"), None, "not a Conv2d or Linear"),
        "missing module": (set_row("name", "nope"), None, "not a module"),
        "duplicate name": (lambda m: m["layers"][1].__setitem__(0, m["layers"][0][0]), None, "once"),
        "no layers": (lambda m: m.update(layers=[]), None, "no packed layers"),
        "layer fields": (lambda m: m.update(layer_fields=m["layer_fields"][::-1]), None, "layer_fields"),
        "row length": (lambda m: m["layers"][0].append(1), None, f"list of {len(P.io.LAYER_FIELDS)} fields"),
        "input_offset nan": (set_row("input_offset", float("nan")), None, "input_offset must be a finite number"),
        "input_offset text": (set_row("input_offset", "1.0"), None, "input_offset must be a finite number"),
        "architecture": (lambda m: m.update(architecture=None), None, "architecture must be a dict"),
    }


def _peak_rss_kib() -> int | None:
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:  # Linux: "5" resets the peak RSS
            handle.write("5")
        return True
    except OSError:
        return False


def test_crafted_headers_are_refused_quickly_without_allocation_or_network(tmp_path, models, monkeypatch):
    good = P.save_packed(models[("seed_cnn", 0)], tmp_path / "good.safetensors", architecture=SEED_CNN[1])
    file_bytes = good.stat().st_size
    P.load_packed(good)  # the reference: a valid file loads

    def no_network(*args, **kwargs):
        raise AssertionError("load_packed tried to reach the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    # the module (the package's attribute of that name is the builder function)
    monkeypatch.setattr(sys.modules["abc_experiments.models.resnet18"], "_download_weights", no_network)
    for case, (change_meta, change_tensors, message) in seed_cnn_cases().items():
        path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
        craft(good, path, change_meta, change_tensors)
        measured = _reset_peak_rss()
        rss_before = _peak_rss_kib()
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(P.PackedFormatError, match=message):
            P.load_packed(path)
        seconds = time.perf_counter() - start
        _, python_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # generous bounds (2 shared cores): the bugs took 19 s and GBs; a valid load of this file ~0.1 s
        assert seconds < 10, (case, seconds)
        assert python_peak < 64 * 2**20, (case, python_peak)
        if measured and rss_before is not None:
            grown = (_peak_rss_kib() - rss_before) * 1024
            assert grown < 256 * 2**20 + 20 * file_bytes, (case, grown)


def test_check_packed_header_on_a_valid_file_lists_its_layers(tmp_path, models):
    path = P.save_packed(models[("resnet20", 0)], tmp_path / "r20.safetensors", architecture=RESNET20[1])
    tensors, meta = P.read_packed(path)
    entries = P.check_packed_header(meta, tensors)
    assert [entry["name"] for entry in entries] == [name for name, _ in P.packed_layers(P.load_packed(path))]
    assert entries[0]["batchnorm"] == "layer1.0.bn1"
    # the architecture alone: pretrained=False is harmless, any other value refused
    meta["architecture"]["options"] = {"pretrained": False}
    with pytest.raises(P.PackedFormatError, match="does not take option"):  # resnet20 takes no options
        P.check_packed_header(meta, tensors)
    with pytest.raises(P.PackedFormatError, match="tensors bits, floats"):
        P.check_packed_header(meta, {"bits": tensors["bits"]})


def test_save_packed_writes_pretrained_false(tmp_path, models):
    """A resnet18 run trained from pretrained weights exports a file that loads without them."""
    arch = {**SEED_CNN[1], "options": {"pretrained": True}}
    _, meta = serialize(P.pack_model(models[("seed_cnn", 0)]), arch)
    assert meta["architecture"]["options"] == {"pretrained": False} and arch["options"] == {"pretrained": True}
