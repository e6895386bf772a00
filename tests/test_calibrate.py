"""Calibration in one forward pass against the layer-by-layer loop it replaces by default."""

import copy
import importlib

import pytest
import torch
from torch import nn

from abc_experiments.models.registry import build_model
from abc_experiments.nn import abc_layers, calibrate, convert

calibrate_module = importlib.import_module("abc_experiments.nn.calibrate")  # the package exports the function


def settled_resnet20(image_size=16):
    """A ResNet-20 whose BatchNorms hold converged statistics of its input distribution, as a
    trained model's do (random weights: the test is about calibration, not accuracy)."""
    torch.manual_seed(0)
    model = build_model("resnet20", 3, image_size, 10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model.train()
        for _ in range(4):
            model(torch.randn(32, 3, image_size, image_size))
    return model.eval()


def batches(count=4, size=16, image_size=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, image_size, image_size, generator=generator) for _ in range(count)]


def output_error(model, reference, x):
    with torch.no_grad():
        expected = reference(x)
        return ((model(x) - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("M,N", [pytest.param(3, 3, marks=pytest.mark.slow), (1, 1)])
def test_one_pass_calibration_is_as_good_as_the_layerwise_loop(M, N):
    """Without re-estimating the BatchNorms in the pass, the one pass fits each layer on the same
    inputs as the loop it replaces (time growing with depth squared): with every input value used
    (no sampling), its output error against the FP model on a fixed small model is the loop's."""
    original = settled_resnet20()
    x = batches(1, 64, seed=2)[0]
    errors, order = {}, {}
    for method in ("layerwise", "one_pass"):
        model = copy.deepcopy(original)
        convert(model, M, N)
        order[method] = list(calibrate(model, batches(), method=method, max_samples=1 << 20,
                                       batchnorm_in_pass=False))
        errors[method] = output_error(model, original, x)
    assert sorted(order["one_pass"]) == sorted(name for name, _ in abc_layers(model))  # every layer...
    assert order["one_pass"] == order["layerwise"]  # ...in forward order (a downsample before conv1)
    assert errors["one_pass"] <= errors["layerwise"] * (1 + 1e-3), errors


def test_without_batchnorm_one_pass_fits_the_same_bases_as_the_loop():
    """Both fit each layer on its inputs through the already calibrated layers before it: with the
    BatchNorms left alone and every input value used (no sampling), they fit the same bases."""
    original = settled_resnet20(image_size=8)
    fitted = {}
    for method in ("layerwise", "one_pass"):
        model = copy.deepcopy(original)
        convert(model, 2, 3)
        calibrate(model, batches(2, 4, image_size=8), method=method, batchnorm=False, max_samples=1 << 20)
        fitted[method] = model
    pairs = zip(abc_layers(fitted["layerwise"]), abc_layers(fitted["one_pass"]), strict=True)
    for (name, loop), (_, one) in pairs:
        for key in ("shifts", "betas"):
            torch.testing.assert_close(getattr(one.activation_binarizer, key),
                                       getattr(loop.activation_binarizer, key), atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(one.bias, loop.bias, atol=1e-4, rtol=1e-4, msg=name)


def test_batchnorm_in_pass_reestimates_like_a_separate_pass():
    """After the pass, each BatchNorm holds the statistics of its input in the calibrated network:
    a separate re-estimation on the same inputs changes them only by float rounding."""
    model = settled_resnet20()
    convert(model, 3, 3)
    inputs = batches()
    calibrate(model, inputs, method="one_pass", batchnorm_in_pass=True)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    after_pass = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    calibrate_module.recalibrate_batchnorm(model, [torch.cat(inputs)])
    for (mean, var), norm in zip(after_pass, norms, strict=True):
        torch.testing.assert_close(mean, norm.running_mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(var, norm.running_var, atol=1e-5, rtol=1e-4)
    assert not any(m.training for m in model.modules())


def test_auto_runs_one_pass_unless_the_inputs_are_large(monkeypatch):
    seen = []
    for name in ("_one_pass", "_layerwise"):
        monkeypatch.setattr(calibrate_module, name, lambda *args, name=name, **kwargs: seen.append(name) or {})
    model = settled_resnet20(image_size=8)
    convert(model, 1, 1)
    calibrate(model, batches(2, 4, image_size=8))
    monkeypatch.setattr(calibrate_module, "ONE_PASS_INPUT_BYTES", 2 * 4 * 3 * 8 * 8 * 4 - 1)
    calibrate(model, batches(2, 4, image_size=8))
    assert seen == ["_one_pass", "_layerwise"]


def test_unknown_method_is_refused():
    model = settled_resnet20(image_size=8)
    convert(model, 1, 1)
    with pytest.raises(ValueError, match="method must be one of auto, one_pass, layerwise"):
        calibrate(model, batches(1, 2, image_size=8), method="fast")


@pytest.mark.parametrize("M,N", [pytest.param(3, 3, marks=pytest.mark.slow), (1, 1)])
def test_the_exact_input_offset_brings_the_model_closer_than_folding_it_into_the_bias(M, N):
    """Calibration's input offset c corrected exactly at zero-padded borders, against the state a
    checkpoint from before that correction loads into (c·ΣŴ folded into the bias only, offset 0):
    on a small-map ResNet-20, where a third of the positions are borders, the output is closer to
    the FP model's."""
    original = settled_resnet20()
    model = copy.deepcopy(original)
    convert(model, M, N)
    calibrate(model, batches())
    x = batches(1, 64, seed=2)[0]
    exact = output_error(model, original, x)
    folded_only = {key: torch.zeros_like(value) if key.endswith("input_offset") else value
                   for key, value in model.state_dict().items()}
    assert sum(1 for key in folded_only if key.endswith("input_offset")) == len(abc_layers(model))
    model.load_state_dict(folded_only)
    assert exact < 0.9 * output_error(model, original, x)


@pytest.mark.parametrize("method", ["one_pass", pytest.param("layerwise", marks=pytest.mark.slow)])
def test_batchnorm_relative_to_the_fp_model(method):
    """With the FP model as reference, each BatchNorm ends at its training-time statistics moved by
    the shift conversion causes on the calibration batches: mean0 + (mu_abc - mu_fp), var0 * var_abc
    / var_fp, each (mu, var) re-estimated the same way on the same images (computed here by hand)."""
    fp = settled_resnet20()
    inputs = batches()
    model = copy.deepcopy(fp)
    convert(model, 2, 2)
    abc_reference = copy.deepcopy(model)  # the same conversion, calibrated without the reference
    calibrate(abc_reference, inputs, method=method)
    calibrate(model, inputs, method=method, reference=fp)

    fp_twin = copy.deepcopy(fp)
    one_batch = [torch.cat(inputs)] if method == "one_pass" else inputs  # as each method re-estimates
    calibrate_module.recalibrate_batchnorm(fp_twin, one_batch)
    norms = [name for name, m in fp.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 21  # 19 + 2 downsample BatchNorms
    for name in norms:
        original, fp_now, abc_now, got = (m.get_submodule(name) for m in (fp, fp_twin, abc_reference, model))
        torch.testing.assert_close(got.running_mean,
                                   original.running_mean + abc_now.running_mean - fp_now.running_mean)
        torch.testing.assert_close(got.running_var,
                                   original.running_var * abc_now.running_var / fp_now.running_var)
    for name, layer in abc_layers(model):  # the fits themselves are those of the plain calibration
        torch.testing.assert_close(layer.activation_binarizer.shifts,
                                   abc_reference.get_submodule(name).activation_binarizer.shifts)
    for p, q in zip(fp.state_dict().values(), settled_resnet20().state_dict().values(), strict=True):
        assert torch.equal(p, q)  # the reference is not changed


def test_batchnorm_relative_keeps_an_unconverted_models_statistics():
    """Nothing converted: the shift is zero, so the training-time statistics stay (re-estimating
    them from scratch on four small batches replaces them)."""
    fp = settled_resnet20()
    replaced, kept = copy.deepcopy(fp), copy.deepcopy(fp)
    calibrate(replaced, batches())
    calibrate(kept, batches(), reference=fp)
    bn = "layer2.1.bn1"
    original = fp.get_submodule(bn).running_var
    torch.testing.assert_close(kept.get_submodule(bn).running_var, original)
    assert not torch.allclose(replaced.get_submodule(bn).running_var, original, rtol=1e-3)


def test_batchnorm_relative_refuses_a_reference_of_another_model():
    """A reference whose BatchNorms are not the converted model's would leave statistics silently
    uncorrected: refused, naming what differs."""
    model = settled_resnet20()
    convert(model, 2, 2)
    other = build_model("vgg_small", 3, 16, 10).eval()
    with pytest.raises(ValueError, match="not the converted model's"):
        calibrate(model, batches(), reference=other)
