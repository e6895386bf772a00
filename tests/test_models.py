"""Tests of abc_experiments.models: shapes, structure, and resnet18's pretrained weights offline."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from abc_experiments.models import MODELS, PretrainedWeightsUnavailableError, build_model
from abc_experiments.nn import ABCConv2d, calibrate, convert

CHECKPOINT = "resnet18-f37072fd.pth"


def _first_conv_and_last_linear(model: nn.Module) -> tuple[nn.Conv2d, nn.Linear]:
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return convs[0], linears[-1]


@pytest.mark.parametrize(
    "name, in_channels, image_size, kwargs",
    [
        ("seed_cnn", 1, 8, {}),
        ("seed_cnn", 1, 28, {}),
        ("seed_cnn", 3, 32, {}),
        ("resnet20", 3, 32, {}),
        ("vgg_small", 3, 32, {}),
        ("resnet18", 3, 32, {"stem": "cifar"}),
        ("resnet18", 3, 64, {"stem": "imagenet"}),
    ],
)
def test_forward_and_backward(name, in_channels, image_size, kwargs):
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, image_size=image_size, num_classes=7, **kwargs)
    logits = model(torch.randn(2, in_channels, image_size, image_size))
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(parameter.grad is not None for parameter in model.parameters())

    first_conv, classifier = _first_conv_and_last_linear(model)
    assert type(first_conv) is nn.Conv2d and first_conv.in_channels == in_channels
    assert type(classifier) is nn.Linear and classifier.out_features == 7


def test_resnet20_parameter_count():
    model = build_model("resnet20", in_channels=3, image_size=32, num_classes=10)
    count = sum(parameter.numel() for parameter in model.parameters())
    assert 260_000 <= count <= 290_000


def test_resnet20_projection_shortcuts():
    model = build_model("resnet20", in_channels=3, image_size=32, num_classes=10)
    projections = [name for name, module in model.named_modules() if name.endswith("downsample")]
    assert projections == ["layer2.0.downsample", "layer3.0.downsample"]
    assert isinstance(model.layer3[0].downsample[0], nn.Conv2d)
    assert model.layer3[0].downsample[0].kernel_size == (1, 1)


@pytest.mark.parametrize("in_channels, image_size", [(1, 28), (3, 32)])
def test_seed_cnn_structure(in_channels, image_size):
    model = build_model("seed_cnn", in_channels=in_channels, image_size=image_size, num_classes=10)
    layers = [type(module) for _, module in model.named_children()]
    assert layers == [
        nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU,
        nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU,
        nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear,
    ]
    for conv, (in_ch, out_ch) in ((model.conv1, (in_channels, 32)), (model.conv2, (32, 64))):
        assert (conv.in_channels, conv.out_channels) == (in_ch, out_ch)
        assert conv.kernel_size == (5, 5) and conv.padding == (2, 2) and conv.bias is not None
    assert model.fc1.in_features == 64 * (image_size // 4) ** 2 and model.fc1.out_features == 1024
    assert model.dropout.p == 0.5
    assert model.fc2.out_features == 10


def test_vgg_small_structure():
    model = build_model("vgg_small", in_channels=3, image_size=32, num_classes=10)
    widths = [module.out_channels for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert widths == [128, 128, 256, 256, 512, 512]
    assert sum(isinstance(module, nn.MaxPool2d) for module in model.modules()) == 3
    assert model.classifier.in_features == 512 * 4 * 4


@pytest.mark.parametrize(
    "image_size, stem, kernel, has_maxpool",
    [(32, "auto", 3, False), (224, "auto", 7, True), (32, "imagenet", 7, True), (224, "cifar", 3, False)],
)
def test_resnet18_stem(image_size, stem, kernel, has_maxpool):
    model = build_model("resnet18", in_channels=1, image_size=image_size, num_classes=10, stem=stem)
    assert model.conv1.kernel_size == (kernel, kernel) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.MaxPool2d) == has_maxpool


def test_unknown_model():
    with pytest.raises(ValueError) as error:
        build_model("alexnet", in_channels=3, image_size=32, num_classes=10)
    assert all(name in str(error.value) for name in MODELS)


def test_unknown_resnet18_stem():
    with pytest.raises(ValueError, match="stem"):
        build_model("resnet18", in_channels=3, image_size=32, num_classes=10, stem="tiny")


def test_seed_cnn_rejects_tiny_images():
    with pytest.raises(ValueError, match="image_size"):
        build_model("seed_cnn", in_channels=1, image_size=3, num_classes=10)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """A TORCH_HOME without cached checkpoints, and no network for torch.hub."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (blocked by the test)")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    return tmp_path


def test_resnet18_pretrained_offline(empty_torch_home):
    with pytest.raises(PretrainedWeightsUnavailableError) as error:
        build_model("resnet18", in_channels=3, image_size=224, num_classes=1000, pretrained=True)
    message = str(error.value)
    assert CHECKPOINT in message
    assert os.path.join(str(empty_torch_home), "hub", "checkpoints") in message
    assert "torchvision hub" in message and "offline" in message
    assert "model.options.pretrained=false" in message


def test_resnet18_pretrained_from_cache_replaces_mismatched_layers(empty_torch_home):
    checkpoints = empty_torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    reference = torchvision.models.resnet18().state_dict()
    torch.save(reference, checkpoints / CHECKPOINT)

    with pytest.warns(UserWarning, match=r"conv1\.weight, fc\.bias, fc\.weight"):
        model = build_model("resnet18", in_channels=3, image_size=32, num_classes=10, pretrained=True)
    state = model.state_dict()
    assert torch.equal(state["layer1.0.conv1.weight"], reference["layer1.0.conv1.weight"])
    assert torch.equal(state["bn1.running_var"], reference["bn1.running_var"])
    assert state["conv1.weight"].shape == (64, 3, 3, 3) and state["fc.weight"].shape == (10, 512)


INPUT_SHAPES = {"seed_cnn": (1, 28, 28), "resnet20": (3, 32, 32), "vgg_small": (3, 32, 32), "resnet18": (3, 32, 32)}


@pytest.mark.parametrize("name", MODELS)
def test_each_model_converts_to_abc_and_still_runs(name):
    channels, size, _ = INPUT_SHAPES[name]
    model = build_model(name, in_channels=channels, image_size=size, num_classes=10)
    n_convs = sum(type(m) is nn.Conv2d for m in model.modules())
    report = convert(model, 2, 2)
    assert len(report.converted) == n_convs - 1  # every conv but the first
    assert sum(isinstance(m, ABCConv2d) for m in model.modules()) == n_convs - 1
    x = torch.randn(2, *INPUT_SHAPES[name])
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    calibrate(model, [x])
    assert torch.isfinite(model.eval()(x)).all()
