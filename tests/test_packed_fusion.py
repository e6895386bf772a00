"""Folding BatchNorms into packed convs (pack_model's fold_batchnorms) and fusing residual additions
and ReLUs into them (fuse_batchnorm_relu): the folded layer equals conv → BatchNorm → ReLU on every
kernel path, a converted ResNet-20 loses its BatchNorm passes and keeps its predictions (the fusion of
a pack_model result bit for bit), consecutive packed convs chain into one call, and what torch.fx
cannot trace comes back unchanged."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from helpers import RunIf, rel_err
from torch import fx, nn

from abc_experiments import packed as P
from abc_experiments.models import build_model
from abc_experiments.nn import ABCConv2d, calibrate, convert
from abc_experiments.packed import _ext
from abc_experiments.packed.fusion import _LeafTracer


def paths():
    native = _ext.runnable_isas() if P.extension_available() else ()
    return (*native, "reference")


def random_batchnorm(channels: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) * 2 + 0.2)
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
    return bn.eval()


@pytest.mark.parametrize("relu", [False, True])
def test_folded_layer_equals_conv_batchnorm_relu_on_every_path(relu):
    g = torch.Generator().manual_seed(0)
    layer = ABCConv2d.from_conv(nn.Conv2d(20, 19, 3, stride=2, padding=1), 2, 3).eval()
    with torch.no_grad():
        layer.activation_binarizer.shifts.copy_(torch.tensor([0.25, -0.125, 0.0]))
    packed, bn = P.PackedABCConv2d.from_abc(layer), random_batchnorm(19, 1)
    fused = copy.deepcopy(packed)
    fused.fold_batchnorm(bn)
    fused.relu = relu
    x = torch.randn(2, 20, 9, 8, generator=g)
    for isa in paths():
        with torch.no_grad(), P.use_isa(isa):
            ref = bn(packed(x))
            ref = torch.relu(ref) if relu else ref
            out = fused(x)
        assert rel_err(out, ref) <= 1e-5, isa
        if relu:
            assert (out >= 0).all() and (out == 0).any()
    assert "batchnorm folded" in repr(fused)


def test_residual_then_relu_in_the_store_equals_adding_after():
    g = torch.Generator().manual_seed(2)
    layer = ABCConv2d.from_conv(nn.Conv2d(16, 24, 3, padding=1), 1, 2).eval()
    packed, bn = P.PackedABCConv2d.from_abc(layer), random_batchnorm(24, 3)
    fused = copy.deepcopy(packed)
    fused.fold_batchnorm(bn)
    fused.relu = True
    x = torch.randn(2, 16, 7, 10, generator=g)
    for residual in (torch.randn(2, 24, 7, 10, generator=g), torch.randn(1, 24, 1, 1, generator=g)):  # broadcast
        for isa in paths():
            with torch.no_grad(), P.use_isa(isa):
                ref = torch.relu(bn(packed(x)) + residual)
                out = fused(x, residual)
            assert rel_err(out, ref) <= 1e-5, (isa, residual.shape)


def test_fold_refuses_a_training_batchnorm_or_a_wrong_width():
    packed = P.PackedABCConv2d.from_abc(ABCConv2d.from_conv(nn.Conv2d(4, 8, 3), 1, 1).eval())
    with pytest.raises(ValueError, match="eval-mode BatchNorm2d"):
        packed.fold_batchnorm(nn.BatchNorm2d(8).train())
    with pytest.raises(ValueError, match="8 output channels"):
        packed.fold_batchnorm(nn.BatchNorm2d(5).eval())


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    """A converted ResNet-20 (ABC(2, 2), per channel), calibrated on random data (small samples:
    seconds), with random BatchNorm statistics, in eval mode; shared, so tests must not change it
    (pack_model and the fusion work on copies)."""
    torch.manual_seed(0)
    model = build_model("resnet20", 3, 32, 10)
    convert(model, 2, 2, scope="per_channel")
    calibrate(model, [torch.randn(4, 3, 32, 32)], max_samples=4096, iterations=5)
    for i, bn in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.load_state_dict(random_batchnorm(bn.num_features, i).state_dict())
    return model.eval()


def test_fused_resnet20_has_no_batchnorm_after_packed_convs_and_the_same_predictions(resnet20):
    model = resnet20
    packed = P.pack_model(model, fold_batchnorm=False)  # the BatchNorms left for the fusion to fold
    assert len([m for m in packed.modules() if isinstance(m, nn.BatchNorm2d)]) == 21
    fused = P.fuse_batchnorm_relu(packed, chain=False)
    assert isinstance(fused, fx.GraphModule)
    convs = [m for m in fused.modules() if isinstance(m, P.PackedABCConv2d)]
    assert len(convs) == 20 and all(m.post_scale is not None for m in convs)  # 18 3×3, 2 shortcut 1×1
    assert sum(m.relu for m in convs) == 18  # relu1 after conv1 → bn1, relu2 after conv2 → bn2 + shortcut
    additions = [n for n in fused.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert not additions and sum(len(n.args) == 2 for n in fused.graph.nodes if n.op == "call_module") == 9
    assert len([m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]) == 1  # after the float first conv
    assert all(m.post_scale is None for m in packed.modules() if isinstance(m, P.PackedABCConv2d))  # a copy
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = packed(x), fused(x)
    per_image = (out - ref).abs().amax(1) / ref.abs().amax(1)
    # equal up to rounding; an activation within rounding of a threshold may binarize otherwise
    assert (per_image <= 1e-5).float().mean() >= 0.75
    assert torch.equal(out.argmax(1), ref.argmax(1))
    # pack_model's own fold (the default) leaves Identity modules, which the fusion skips: the same
    # fused structure, with the BatchNorms folded once
    folded_first = P.fuse_batchnorm_relu(P.pack_model(model), chain=False)
    convs_again = [m for m in folded_first.modules() if isinstance(m, P.PackedABCConv2d)]
    assert [m.relu for m in convs_again] == [m.relu for m in convs]
    assert all(m.folded_batchnorm for m in convs_again) and not any(m.folded_batchnorm for m in convs)
    assert not any(isinstance(m, nn.Identity) for m in folded_first.modules())
    assert sum(len(n.args) == 2 for n in folded_first.graph.nodes if n.op == "call_module") == 9
    with torch.no_grad():
        again = folded_first(x)
    assert ((again - ref).abs().amax(1) / ref.abs().amax(1) <= 1e-5).float().mean() >= 0.75
    assert torch.equal(again.argmax(1), ref.argmax(1))


def test_pack_model_folds_the_batchnorms_and_the_fusion_then_changes_no_numbers(resnet20):
    """pack_model folds each BatchNorm after a packed conv (rounded to float32, as the file stores
    it); what fuse_batchnorm_relu then does (residual additions and ReLUs in the kernel's store, the
    chain) gives the packed model's numbers bit for bit, on every path."""
    model = resnet20
    packed = P.pack_model(model)
    convs = [m for m in packed.modules() if isinstance(m, P.PackedABCConv2d)]
    assert len(convs) == 20 and all(m.folded_batchnorm for m in convs)
    assert all(torch.equal(m.post_scale, m.post_scale.float().double()) for m in convs)  # float32 values
    assert [type(m) for m in packed.modules()].count(nn.BatchNorm2d) == 1  # after the float first conv
    assert all(isinstance(packed.get_submodule(m.folded_batchnorm), nn.Identity) for m in convs)
    assert "batchnorm layer1.0.bn1 folded" in repr(packed.layer1[0].conv1)
    fused, chained = P.fuse_batchnorm_relu(packed, chain=False), P.fuse_batchnorm_relu(packed)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for isa in paths():
        with torch.no_grad(), P.use_isa(isa):
            ref = packed(x)
            assert torch.equal(fused(x), ref) and torch.equal(chained(x), ref), isa
    # each folded conv equals the float conv followed by its BatchNorm, up to rounding
    unpacked = P.pack_model(model, fold_batchnorm=False)
    layer_in = torch.relu(torch.randn(2, 16, 32, 32))
    with torch.no_grad():
        want = model.layer1[0].bn1(unpacked.layer1[0].conv1(layer_in))
        assert rel_err(packed.layer1[0].conv1(layer_in), want) <= 1e-5
    with pytest.raises(ValueError, match="already folded"):
        convs[0].fold_batchnorm(random_batchnorm(convs[0].out_channels, 0), name="again")


def test_chained_resnet20_runs_its_body_in_one_call_bit_for_bit_on_every_path(resnet20):
    unchained = P.fuse_batchnorm_relu(P.pack_model(resnet20), chain=False)
    chained = P.chain_packed_convs(copy.deepcopy(unchained))
    chains = [m for m in chained.modules() if isinstance(m, P.PackedConvChain)]
    assert len(chains) == 1 and len(chains[0].steps) == 20  # the whole body: 18 3×3 convs, 2 shortcut 1×1
    assert chains[0].n_inputs == 1 and len(chains[0].outputs) == 1
    assert sum(r >= 0 for _, r in chains[0].steps) == 9  # the residual additions, as in the unchained graph
    assert not any(n.op == "call_module" and isinstance(chained.get_submodule(n.target), P.PackedABCConv2d)
                   for n in chained.graph.nodes)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for isa in paths():
        with torch.no_grad(), P.use_isa(isa):
            assert torch.equal(chained(x), unchained(x)), isa
    assert P.fuse_batchnorm_relu(unchained).packed_chain0.steps == chains[0].steps  # chain=True by default


class TwoBranches(nn.Module):
    """Two inputs, a residual from an input, an output used twice: a chain with several values."""

    def __init__(self):
        super().__init__()
        convs = [nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 6, 1, stride=2)]
        for i, conv in enumerate(convs):
            layer = ABCConv2d.from_conv(conv, 2, 2).eval()
            with torch.no_grad():
                layer.activation_binarizer.shifts.copy_(torch.tensor([0.1 * i, -0.2]))
            setattr(self, f"c{i}", P.PackedABCConv2d.from_abc(layer))

    def forward(self, x, r):
        a = self.c0(x)
        b = self.c1(a, r)
        c = self.c2(b)
        return a.sum((2, 3)), b, c * 2


def traced(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, _LeafTracer().trace(model))  # the packed layers as calls


def test_a_chain_with_several_inputs_and_outputs_equals_the_layers_and_falls_back_where_it_must():
    model = TwoBranches().eval()
    chained = P.chain_packed_convs(traced(model))
    chain = chained.packed_chain0
    assert chain.n_inputs == 2 and chain.steps == [(0, -1), (2, 1), (3, -1)] and chain.outputs == [2, 3, 4]
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(2, 8, 9, 7, generator=g), torch.randn(2, 8, 9, 7, generator=g)
    for isa in paths():
        with torch.no_grad(), P.use_isa(isa):
            for got, want in zip(chained(x, r), model(x, r)):
                assert torch.equal(got, want), isa
            # a channels_last input: the operator's outputs are contiguous, the NCHW model's bits (the
            # model itself, on it, sums a channels_last `a` in another order); the reference path runs
            # the layers, as the model does
            channels_last = x.contiguous(memory_format=torch.channels_last)
            native = isa != "reference"
            for got, want in zip(chained(channels_last, r), model(x if native else channels_last, r)):
                assert torch.equal(got, want) and (got.is_contiguous() or not native), isa
            # a broadcast residual: the operator cannot take it, the layers run one by one
            for got, want in zip(chained(x, r[:1, :, :1, :1]), model(x, r[:1, :, :1, :1])):
                assert torch.equal(got, want), isa
    if "avx2" in paths() or "portable" in paths():
        assert any(p is None for p in chain._programs.values())  # the broadcast case
        chained.float()  # .to() and friends replace the layers' tensors: the programs are rebuilt
        assert not chain._programs
        with torch.no_grad():
            assert torch.equal(chained(x, r)[1], model(x, r)[1])


@RunIf(packed_kernels=True)
def test_the_chain_operator_refuses_a_step_reading_a_later_value_or_none():
    chained = P.chain_packed_convs(traced(TwoBranches().eval()))
    x, r = torch.randn(1, 8, 5, 5), torch.randn(1, 8, 5, 5)
    tensors, ints, isa = chained.packed_chain0._program(("avx2",), (x, r), _ext.get_isa())
    bad = list(ints)
    bad[5 + 13 + 10] = 4  # step 1 (13 ints per step) reads value 4, step 2's output
    with pytest.raises(RuntimeError, match="not computed before it"):
        torch.ops.abc_packed.conv2d_chain([x, r], tensors, bad, isa)
    bad[5 + 13 + 10] = -1  # step 1 without an input
    with pytest.raises(RuntimeError, match="has no input value"):
        torch.ops.abc_packed.conv2d_chain([x, r], tensors, bad, isa)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = P.PackedABCConv2d.from_abc(ABCConv2d.from_conv(nn.Conv2d(3, 4, 3), 1, 1).eval())
        self.bn = nn.BatchNorm2d(4).eval()

    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace this
            x = -x
        return self.bn(self.conv(x))


def test_an_untraceable_model_comes_back_unchanged():
    model = DataDependent()
    fused = P.fuse_batchnorm_relu(model)
    assert type(fused) is DataDependent and fused is not model
    assert fused.conv.post_scale is None
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


def test_fold_batchnorms_leaves_an_untraceable_model_as_it_is():
    model = DataDependent()
    assert P.fold_batchnorms(model) == {} and isinstance(model.bn, nn.BatchNorm2d)
    assert model.conv.post_scale is None and model.conv.folded_batchnorm is None


def abc_conv(channels: int = 4) -> ABCConv2d:
    return ABCConv2d.from_conv(nn.Conv2d(channels, channels, 3, padding=1), 1, 1)


class Tricky(nn.Module):
    """What the fold and the fusion must leave alone, next to what they may change."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(abc_conv() for _ in range(7))
        self.bns = nn.ModuleList(random_batchnorm(4, i) for i in range(3))
        self.alias = self.bns[0]  # a second name: the model's forward uses it, the graph the first
        self.through = nn.Identity()

    def forward(self, x):
        c = self.convs
        a = self.alias(c[0](x))  # reachable by two names: not folded by pack_model
        b = self.bns[1](c[1](a)) * self.bns[1].weight.view(1, -1, 1, 1)  # its weight read: not folded
        d = self.bns[2](self.through(c[2](b)))  # through an Identity: folded
        e = torch.relu(c[3](d)) + d  # ReLU fused, then no residual into the ReLU'd conv
        n = e.size(1)
        f = c[4](e) + n  # a number, not a tensor: the layer adds it as the graph did
        s = f * 2
        s.add_(c[5](f))  # modifies s: not moved into the conv
        r = s * 1
        y = c[6](s)
        r.relu_()  # r modified between the conv and the addition: not moved either
        return y + r


def test_fold_and_fusion_leave_aliases_attribute_reads_numbers_and_in_place_operations_alone(tmp_path):
    torch.manual_seed(0)
    model = Tricky().eval()
    packed = P.pack_model(model)
    assert [m.folded_batchnorm for m in packed.convs[:3]] == [None, None, "bns.2"]
    assert isinstance(packed.bns[2], nn.Identity) and isinstance(packed.bns[0], nn.BatchNorm2d)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    unfolded = P.pack_model(model, fold_batchnorm=False)
    with torch.no_grad():
        ref = packed(x)
        assert rel_err(ref, unfolded(x)) <= 1e-5
    fused = P.fuse_batchnorm_relu(packed, chain=False)
    assert [fused.get_submodule(f"convs.{i}").relu for i in range(7)] == [False] * 3 + [True] + [False] * 3
    assert [n.target for n in fused.graph.nodes if n.op == "call_module" and len(n.args) == 2] == ["convs.4"]
    twice = P.fuse_batchnorm_relu(fused, chain=False)  # nothing more to fuse: same graph, same numbers
    for isa in paths():
        with torch.no_grad(), P.use_isa(isa):
            for candidate in (fused, twice, P.fuse_batchnorm_relu(packed)):
                assert torch.equal(candidate(x), packed(x)), isa
    with pytest.raises(ValueError, match="chained packed convs"):
        P.save_packed(P.fuse_batchnorm_relu(packed), tmp_path / "chained.safetensors",
                      architecture={"name": "seed_cnn", "in_channels": 4, "image_size": 6, "num_classes": 4})
