"""Eval-mode converted models through the standard exporters: torch.export (dynamic batch),
torch.onnx (dynamo, run in onnxruntime) and torch.jit.trace + save/load, each against eager."""

import io

import pytest
import torch
from helpers import RunIf
from torch.export import Dim

from abc_experiments.models import build_model
from abc_experiments.nn import abc_layers, convert

TOLERANCE = 1e-5


def converted(name, N):
    torch.manual_seed(0)
    if name == "seed_cnn":
        model, shape = build_model("seed_cnn", 1, 28, 10), (1, 28, 28)
        convert(model, 3, N, linear=True)
    else:
        model, shape = build_model("resnet20", in_channels=3, image_size=32, num_classes=10), (3, 32, 32)
        convert(model, 3, N)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in abc_layers(model):  # non-default shifts and betas
            if layer.N:
                act = layer.activation_binarizer
                act.shifts.add_(torch.rand(act.shifts.shape, generator=generator) * 0.4 - 0.2)
                act.betas.mul_(torch.rand(act.betas.shape, generator=generator) + 0.5)
        model(torch.randn(8, *shape, generator=generator))  # train-mode pass: BN statistics, alphas
    return model.eval(), shape


def inputs(shape, batch, seed=2):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected):
    error = (torch.as_tensor(actual) - expected).abs().max().item()
    assert error <= TOLERANCE, error


# resnet20 runs the same layer code as seed_cnn through each exporter, at several times the cost: slow
CASES = [("seed_cnn", 2), ("seed_cnn", 0), pytest.param("resnet20", 2, marks=pytest.mark.slow, id="resnet20-2")]


@pytest.mark.parametrize("name,N", CASES)
def test_torch_export_with_a_dynamic_batch(name, N):
    model, shape = converted(name, N)
    program = torch.export.export(model, (inputs(shape, 4),), dynamic_shapes=({0: Dim("batch")},))
    exported = program.module()
    with torch.no_grad():
        for batch in (3, 7):
            x = inputs(shape, batch, seed=batch)
            assert_close(exported(x), model(x))


@pytest.mark.parametrize("name,N", [CASES[0], pytest.param(*CASES[1], marks=pytest.mark.slow), CASES[2]])
@RunIf(onnx=True)
def test_onnx_dynamo_export_runs_in_onnxruntime(name, N, tmp_path):
    import onnxruntime

    model, shape = converted(name, N)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (inputs(shape, 4),), str(path), dynamo=True, input_names=["x"],
                      dynamic_shapes=({0: Dim("batch")},))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for batch in (3, 7):
            x = inputs(shape, batch, seed=batch)
            (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            assert_close(torch.from_numpy(output), model(x))


@pytest.mark.parametrize("name,N", CASES)
def test_jit_trace_save_and_load(name, N):
    model, shape = converted(name, N)
    with torch.no_grad():
        traced = torch.jit.trace(model, inputs(shape, 4))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        x = inputs(shape, 4, seed=5)
        assert_close(loaded(x), model(x))


def test_exported_graph_has_no_dead_tensors():
    """No straight-through leftovers: neither W − W.detach() (an all-zero weight-sized tensor),
    nor a detach, nor zeros/autograd-Function nodes; every node's value reaches the output."""
    model, shape = converted("seed_cnn", 2)
    program = torch.export.export(model, (inputs(shape, 4),), dynamic_shapes=({0: Dim("batch")},))
    graph = program.run_decompositions().graph
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    for bad in ("detach", "zeros", "zeros_like", "autograd_function", "_StaircaseSTE"):
        assert not any(bad in target for target in targets), (bad, targets)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.sub.Tensor:
            assert node.args[0] is not node.args[1]  # W − W
    computed = {node for node in graph.nodes if node.op == "call_function"}
    unused = {node for node in computed if not node.users and not str(node.target).startswith("aten._assert")}
    assert unused == set(), unused  # every computed value reaches the output

    traced = torch.jit.trace(model, inputs(shape, 4))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "prim::PythonOp" not in kinds and "aten::detach" not in kinds, kinds


def test_training_still_gets_straight_through_gradients_after_export():
    model, shape = converted("seed_cnn", 2)
    torch.export.export(model, (inputs(shape, 4),))
    model.train()
    model(inputs(shape, 4)).pow(2).sum().backward()
    for _, layer in abc_layers(model):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        assert layer.activation_binarizer.shifts.grad.abs().sum() > 0
