"""ABC layers: the fused single convolution equals the M·N binary convolutions, forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from helpers import forward_backward, random_conv_case, rel_err
from torch import nn

from abc_experiments.nn import ABCConv2d, ABCLinear
from abc_experiments.nn.activations import staircase
from abc_experiments.nn.weights import combine


@pytest.mark.parametrize("seed", range(24))
def test_fused_equals_naive_conv_forward_and_backward(seed):
    torch.manual_seed(seed)
    conv, x, options = random_conv_case(seed)
    fused = ABCConv2d.from_conv(conv, impl="fused", **options)
    naive = ABCConv2d.from_conv(conv, impl="naive", **options)
    out_f, grads_f = forward_backward(fused, x)
    out_n, grads_n = forward_backward(naive, x)
    assert rel_err(out_f, out_n) <= 1e-5, options
    assert grads_f.keys() == grads_n.keys()
    for name in grads_f:
        assert rel_err(grads_f[name], grads_n[name]) <= 1e-5, (name, options)


@pytest.mark.parametrize("M,N,scope", [(1, 1, "per_layer"), (3, 0, "per_channel"), (4, 3, "per_channel")])
def test_fused_equals_naive_linear(M, N, scope):
    linear = nn.Linear(12, 7)
    x = torch.rand(5, 12) * 2 - 0.5
    out_f, grads_f = forward_backward(ABCLinear.from_linear(linear, M, N, scope=scope), x)
    out_n, grads_n = forward_backward(ABCLinear.from_linear(linear, M, N, scope=scope, impl="naive"), x)
    assert rel_err(out_f, out_n) <= 1e-5
    for name in grads_f:
        assert rel_err(grads_f[name], grads_n[name]) <= 1e-5, name


def test_forward_is_one_conv_of_the_combined_tensors_plus_the_bias_once():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.bias.fill_(100.0)
    layer = ABCConv2d.from_conv(conv, 3, 2).eval()
    x = torch.rand(2, 3, 6, 6)
    weight = combine(layer.weight_binarizer.alphas, layer.weight_binarizer.compute_bases(layer.weight))
    act = staircase(x, layer.activation_binarizer.shifts, layer.activation_binarizer.betas)
    expected = F.conv2d(act, weight, padding=1) + 100.0
    torch.testing.assert_close(layer(x), expected)


def test_from_conv_keeps_weights_and_hyper_parameters():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1, groups=2, bias=False, padding_mode="reflect")
    layer = ABCConv2d.from_conv(conv, 2, 2, scope="per_channel")
    assert torch.equal(layer.weight, conv.weight) and layer.bias is None
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(layer, attr) == getattr(conv, attr)
    assert layer.weight_binarizer.alphas.shape == (2, 8)
    assert layer(torch.rand(1, 4, 9, 9)).shape == conv(torch.rand(1, 4, 9, 9)).shape


def test_weights_keep_learning_through_the_straight_through_estimator():
    layer = ABCConv2d.from_conv(nn.Conv2d(3, 4, 3), 2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    layer(torch.rand(2, 3, 5, 5)).pow(2).mean().backward()
    optimizer.step()
    for name, p in layer.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not learn"


def test_eval_freezes_alphas_fitted_to_the_final_weight():
    layer = ABCConv2d.from_conv(nn.Conv2d(3, 4, 3), 3, 1)
    with torch.no_grad():
        layer.weight.mul_(2)
    layer.eval()
    frozen = layer.weight_binarizer.alphas.clone()
    with torch.no_grad():
        layer.weight.mul_(5)
    layer(torch.rand(1, 3, 5, 5))
    assert torch.equal(layer.weight_binarizer.alphas, frozen)


def test_bad_layer_options_are_value_errors():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="M must be"):
        ABCConv2d.from_conv(conv, 0, 1)
    with pytest.raises(ValueError, match="N must be"):
        ABCConv2d.from_conv(conv, 1, -1)
    with pytest.raises(ValueError, match="unknown impl"):
        ABCConv2d.from_conv(conv, 1, 1, impl="fast")
    with pytest.raises(ValueError, match="unknown scope"):
        ABCConv2d.from_conv(conv, 1, 1, scope="global")
