"""Model conversion, calibration and the layer summary."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abc_experiments.nn import ABCConv2d, ABCLinear, abc_layers, calibrate, convert, summary
from abc_experiments.nn.activations import staircase
from abc_experiments.nn.weights import combine


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    ).eval()


def abc_by_hand(layer, x):
    """One ABC layer computed from its stored parameters, independent of its forward."""
    wb, ab = layer.weight_binarizer, layer.activation_binarizer
    weight = combine(wb.alphas, wb.compute_bases(layer.weight))
    bias = layer.bias
    if layer.N:  # R ≈ c + ΣβA; c·ΣŴ is folded into the bias
        c = float(layer.input_offset)
        x = staircase(x, ab.shifts, ab.betas) + c
        bias = None if bias is None else bias - c * weight.flatten(1).sum(1)
    if isinstance(layer, ABCLinear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def test_default_conversion_keeps_first_conv_and_classifier():
    model = small_cnn()
    report = convert(model, 3, 3)
    assert report.converted == ["3", "7"]
    assert report.kept == {"0": "first conv (keep_first)", "11": "linear layer (linear=False)",
                           "13": "final classifier (keep_last)"}
    assert isinstance(model[3], ABCConv2d) and type(model[0]) is nn.Conv2d and type(model[13]) is nn.Linear
    assert "ABC  3" in str(report)


def test_options_convert_every_layer_or_exclude_by_name():
    model = small_cnn()
    assert len(convert(model, 2, 2, keep_first=False, keep_last=False, linear=True).converted) == 5
    assert isinstance(model[11], ABCLinear) and isinstance(model[0], ABCConv2d)
    model = small_cnn()
    report = convert(model, 2, 2, exclude=["7"])
    assert report.converted == ["3"] and report.kept["7"] == "excluded by pattern"


def test_converted_model_equals_the_layer_by_layer_abc_computation():
    original = small_cnn()
    model = copy.deepcopy(original)
    convert(model, 3, 2, scope="per_channel", linear=True)
    calibrate(model, [torch.randn(16, 1, 8, 8) for _ in range(2)])
    x = torch.randn(4, 1, 8, 8)
    expected = x
    for module in model:
        expected = abc_by_hand(module, expected) if isinstance(module, (ABCConv2d, ABCLinear)) else module(expected)
    torch.testing.assert_close(model(x), expected)


def test_weight_only_error_shrinks_as_M_grows():
    # Trained weights are close to Gaussian, the case the paper's shift grid is built for; PyTorch's
    # uniform initialisation gains almost nothing from M = 1 to M = 2 (0.49 -> 0.47 weight error).
    original = small_cnn()
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5)
    x = torch.randn(32, 1, 8, 8)
    reference = original(x)
    errors = []
    for M in range(1, 6):
        model = copy.deepcopy(original)
        convert(model, M, 0, keep_first=False, keep_last=False, linear=True)
        errors.append(((model(x) - reference).norm() / reference.norm()).item())
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.7 * errors[0]


def test_calibration_brings_the_converted_model_closer_to_the_original():
    original = small_cnn()
    with torch.no_grad():  # give the BatchNorms converged statistics of the input distribution
        for m in original.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        original.train()
        for _ in range(5):
            original(torch.randn(64, 1, 8, 8))
        original.eval()
    x = torch.randn(64, 1, 8, 8)
    reference = original(x)
    model = copy.deepcopy(original)
    convert(model, 3, 3)
    before = ((model(x) - reference).norm() / reference.norm()).item()
    errors = calibrate(model, [(torch.randn(64, 1, 8, 8), None) for _ in range(4)])
    after = ((model(x) - reference).norm() / reference.norm()).item()
    assert set(errors) == {"3", "7"} and all(0 < e < 1 for e in errors.values())
    assert after < before
    assert not model.training


@pytest.mark.parametrize("padding,padding_mode", [(0, "zeros"), (1, "zeros"), ("same", "zeros"), (1, "reflect")])
@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_the_input_offset_is_exact_at_zero_padded_borders(padding, padding_mode, impl):
    """R ≈ c + ΣβA: the layer computes conv(c + ΣβA, Ŵ) with the padding of the original conv, so a
    zero-padded border sees 0, not c (folding c·ΣŴ into the bias alone was off there by c times the
    out-of-image weights)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=padding, padding_mode=padding_mode, bias=True)
    layer = ABCConv2d.from_conv(conv, 2, 2, impl=impl).eval()
    x = torch.rand(2, 3, 6, 6)
    act = staircase(x, layer.activation_binarizer.shifts, layer.activation_binarizer.betas)
    reference = nn.Conv2d(3, 4, 3, padding=padding, padding_mode=padding_mode).eval()
    with torch.no_grad():
        reference.weight.copy_(layer.approximated_weight())
        reference.bias.copy_(conv.bias)
    expected = reference(act + 0.7)
    layer.set_input_offset(0.3)
    layer.set_input_offset(0.7)  # calibrating again replaces the offset
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias, conv.bias + 0.7 * layer.approximated_weight().sum((1, 2, 3)))


def test_a_checkpoint_from_before_the_input_offset_loads_with_offset_zero():
    layer = ABCConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), 2, 2).eval()
    layer.set_input_offset(0.5)
    old = {key: value for key, value in layer.state_dict().items() if key != "input_offset"}
    fresh = ABCConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), 2, 2).eval()
    fresh.set_input_offset(0.25)
    fresh.load_state_dict(old)
    assert float(fresh.input_offset) == 0.0 and not fresh._offset_reaches_borders()
    layer_back = ABCConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), 2, 2).eval()
    layer_back.load_state_dict(layer.state_dict())
    assert float(layer_back.input_offset) == 0.5 and layer_back._offset_reaches_borders()


def test_the_bias_calibration_adds_is_declared_and_left_out_of_the_original_size():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, bias=False), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    fp_params = sum(p.numel() for p in model.parameters())
    convert(model, 2, 2)
    layer = model[2]
    assert layer.bias is None and not layer.bias_from_calibration
    calibrate(model, [torch.randn(4, 1, 8, 8)])
    assert layer.bias_from_calibration and layer.bias.shape == (4,) and layer.bias.abs().sum() > 0
    assert summary(model).fp_kb == pytest.approx(fp_params * 4 / 1000)  # the new bias is ABC's alone
    # a model rebuilt from its architecture makes room for the bias, then loads the calibrated state
    rebuilt = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, bias=False), nn.Flatten(),
                            nn.Linear(4 * 4 * 4, 3))
    convert(rebuilt, 2, 2)
    new_bias = rebuilt[2].add_calibration_bias()
    assert rebuilt[2].bias_from_calibration and torch.equal(new_bias, torch.zeros(4))
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
    # a layer that had a bias keeps it: nothing is declared
    with_bias = ABCConv2d.from_conv(nn.Conv2d(3, 4, 3), 1, 1)
    bias = with_bias.bias
    assert with_bias.add_calibration_bias() is bias and not with_bias.bias_from_calibration


def test_summary_counts_bits_macs_and_size():
    model = small_cnn()
    convert(model, 3, 2)
    calibrate(model, [torch.randn(8, 1, 8, 8)])
    table = summary(model, torch.randn(2, 1, 8, 8))
    by_name = {s.name: s for s in table.layers}
    layer = by_name["3"]
    assert layer.binary_weights == 16 * 8 * 9
    assert layer.bits == 3 * 16 * 8 * 9 + 32 * 3
    assert layer.macs == 8 * 8 * 16 * 8 * 9
    assert layer.binary_macs == 3 * 2 * layer.macs
    assert 0 < layer.weight_error < 1 and 0 < layer.activation_error < 1
    fp_params = sum(p.numel() for p in small_cnn().parameters())
    assert table.fp_kb == pytest.approx(fp_params * 4 / 1000)
    assert table.abc_kb < table.fp_kb and table.compression == pytest.approx(table.fp_kb / table.abc_kb)
    assert 0 < table.binary_mac_share < 1
    assert "compression" in str(table) and "3" in str(table)
    assert len(abc_layers(model)) == 2


def test_nothing_to_convert_and_bad_counts_are_value_errors():
    with pytest.raises(ValueError, match="nothing to convert"):
        convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), 2, 2)
    with pytest.raises(ValueError, match="nothing to convert"):
        convert(nn.Sequential(nn.ReLU()), 2, 2)
    with pytest.raises(ValueError, match="M must be an integer"):
        convert(small_cnn(), 2.5, 2)
    with pytest.raises(ValueError, match="N must be ≥ 0"):
        convert(small_cnn(), 2, -1)
    with pytest.raises(ValueError, match="unknown scope"):
        convert(small_cnn(), 2, 2, scope="per_pixel")


def test_a_run_that_barely_compresses_says_which_layer_and_which_override():
    from abc_experiments.models import build_model
    from abc_experiments.pipeline import compression_hint

    model = build_model("seed_cnn", 1, 8, 10)
    report = convert(model, 3, 3)
    hint = compression_hint(model, report.kept, 1.17)
    assert hint.startswith("compression is only 1.17x: fc1 (") and "abc.linear=true converts it" in hint
    assert compression_hint(model, report.kept, 4.0) is None  # compresses well: nothing to say
    model = build_model("seed_cnn", 1, 8, 10)
    report = convert(model, 3, 3, linear=True)
    assert "fc1" in report.converted and compression_hint(model, report.kept, 1.9) is None
