"""Folding the float layers that follow a packed conv into it, for inference speed and file size.

In a converted ResNet, each packed conv is followed by a BatchNorm2d and often a residual addition
and a ReLU: more passes over the output in PyTorch, and at batch 1 more module calls, which cost as
much as the binary convolution itself.

* :func:`fold_batchnorms` (done by ``pack_model``) folds each BatchNorm that directly follows a
  packed conv into the conv's coefficients and border term, rounded to float32 so that the packed
  file stores the folded affine (2 floats per channel instead of BatchNorm's 4) and the loaded model
  is the same bit for bit. It equals the BatchNorm applied after up to float rounding, not bit for
  bit, like the packed conv itself against the float one.
* :func:`fuse_batchnorm_relu` (a run-time step) folds what is left, does the residual addition and
  the ReLU in the kernel's store, and then runs each run of consecutive packed convs (a ResNet's
  whole body) as ONE operator call, :class:`PackedConvChain`: the same kernels with the same
  arguments, bit for bit, without the module call, Python and dispatcher work around every layer.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import _ext
from .layers import CACHE_ENTRIES, PackedABCConv2d, PackedABCLayer

log = logging.getLogger(__name__)


class _LeafTracer(fx.Tracer):
    """Symbolic tracing that keeps the packed layers (shape-dependent Python inside) as calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PackedABCLayer) or super().is_leaf_module(m, qualname)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":  # in place or not: the conv's output has no other user
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _batchnorm_after(node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> fx.Node | None:
    """The node of an eval-mode BatchNorm2d whose only input is ``node``'s output, a packed conv called
    once, and that output's only user; else None."""
    conv = modules.get(node.target) if node.op == "call_module" else None
    if (not isinstance(conv, PackedABCConv2d) or calls[node.target] != 1 or conv.relu or len(node.args) != 1
            or node.kwargs):
        return None  # a module called twice would change both calls; BN(conv + r) is not BN(conv) + r
    users = list(node.users)
    bn = modules.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
    if (type(bn) is nn.BatchNorm2d and not bn.training and bn.running_mean is not None
            and bn.num_features == conv.out_channels and calls[users[0].target] == 1
            and users[0].args == (node,) and not users[0].kwargs):
        return users[0]
    return None


def _trace(model: nn.Module, caller: str) -> fx.Graph | None:
    try:
        return _LeafTracer().trace(model)
    except Exception as error:  # data-dependent control flow, unsupported Python, ...
        log.info("%s: torch.fx cannot trace %s (%s); nothing folded", caller, type(model).__name__, error)
        return None


def _drop_identities(graph: fx.Graph, modules: dict[str, nn.Module]) -> None:
    """Remove the calls of ``nn.Identity`` modules from ``graph`` (those pack_model leaves where it
    folded a BatchNorm, and any other), so that conv → Identity → BatchNorm is seen as conv → BatchNorm."""
    for node in list(graph.nodes):
        if (node.op == "call_module" and type(modules.get(node.target)) is nn.Identity and len(node.args) == 1
                and not node.kwargs):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> dict[str, str]:
    """In place: fold every eval-mode BatchNorm2d whose only input is a packed conv's output, and that
    output's only user, into the conv (:meth:`PackedABCConv2d.fold_batchnorm` with its name: stored
    with the layer, rounded to float32), and replace the BatchNorm by ``nn.Identity``. Returns
    ``{conv name: BatchNorm name}``; a model that ``torch.fx`` cannot trace is left as it is (logged)."""
    graph = _trace(copy.deepcopy(model), "fold_batchnorms")  # a copy: tracing runs forward's Python
    if graph is None:
        return {}
    modules, calls = dict(model.named_modules()), _module_calls(graph)
    _drop_identities(graph, modules)
    # the model's own forward keeps running (not the graph): a BatchNorm that it can reach by another
    # name, or whose attributes it reads, must stay where it is
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    read = {node.target.rpartition(".")[0] for node in graph.nodes if node.op == "get_attr"}  # their modules
    folded = {}
    for node in graph.nodes:
        bn_node = _batchnorm_after(node, modules, calls)
        if (bn_node is not None and names[id(modules[bn_node.target])] == 1
                and bn_node.target not in read):
            modules[node.target].fold_batchnorm(modules[bn_node.target], name=bn_node.target)
            model.set_submodule(bn_node.target, nn.Identity())
            folded[node.target] = bn_node.target
    if folded:
        log.info("fold_batchnorms: %d BatchNorm folded into packed convs", len(folded))
    return folded


def fuse_batchnorm_relu(model: nn.Module, *, chain: bool = True) -> nn.Module:
    """An inference copy of a packed model (:func:`~abc_experiments.packed.pack_model`) in which
    every eval-mode BatchNorm2d whose only input is a packed conv's output, and that output's only
    user, is folded into the conv (:meth:`PackedABCConv2d.fold_batchnorm`; ``pack_model`` has already
    folded those of the models here); a residual addition that then takes the conv's output
    (``bn2(conv2(h)) + shortcut`` in a ResNet block) is done in the kernel's store, and so is a ReLU
    that then follows. With ``chain``, consecutive packed convs then run as one operator call
    (:func:`chain_packed_convs`; forward hooks on those layers no longer fire). Returns a
    ``torch.fx.GraphModule``; a model that ``torch.fx`` cannot trace comes back as an unchanged copy
    (logged)."""
    model = copy.deepcopy(model).eval()
    graph = _trace(model, "fuse_batchnorm_relu")
    if graph is None:
        return model
    gm = fx.GraphModule(model, graph, class_name=f"Fused{type(model).__name__}")
    modules, calls = dict(gm.named_modules()), _module_calls(gm.graph)
    _drop_identities(gm.graph, modules)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    folded = added = fused = 0
    for node in list(gm.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, PackedABCConv2d) or calls[node.target] != 1:
            continue  # a module called twice would change both calls
        bn_node = _batchnorm_after(node, modules, calls)
        if bn_node is not None:
            conv.fold_batchnorm(modules[bn_node.target])
            bn_node.replace_all_uses_with(node)
            gm.graph.erase_node(bn_node)
            folded += 1
        users = list(node.users)
        residual = _residual_of(users[0], node, order, modules) if len(users) == 1 and not conv.relu else None
        if residual is not None and len(node.args) == 1 and not node.kwargs:  # conv(x) + r: conv(x, r)
            node.args = (node.args[0], residual)
            users[0].replace_all_uses_with(node)
            gm.graph.erase_node(users[0])
            added += 1
            users = list(node.users)
        if len(users) == 1 and _is_relu(users[0], modules) and users[0].args[:1] == (node,):
            conv.relu = True
            users[0].replace_all_uses_with(node)
            gm.graph.erase_node(users[0])
            fused += 1
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    log.info("fuse_batchnorm_relu: %d BatchNorm folded, %d residual additions and %d ReLU fused", folded, added,
             fused)
    return chain_packed_convs(gm) if chain else gm


class PackedConvChain(nn.Module):
    """Consecutive packed convs of a graph, run by ONE call of the ``abc_packed::conv2d_chain``
    operator: each step is exactly the layer's own ``conv2d`` call (same kernel, same arguments, the
    same numbers bit for bit), without the module call, Python and dispatcher work around it, which
    at batch 1 cost as much as a small layer's kernel. Values: the inputs, then each step's output;
    step i reads ``steps[i] = (input value, residual value or -1)``; the chain returns the values in
    ``outputs``, as a tuple (the operator runs every step channels-last, which needs no transposes
    in the kernels' stores and packing, and returns its outputs contiguous). Where the operator
    cannot run (the reference path, an input that is not float32 on the CPU, a broadcast
    residual), the layers are called one by one instead."""

    def __init__(self, layers: list[PackedABCConv2d], names: list[str], n_inputs: int,
                 steps: list[tuple[int, int]], outputs: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.names, self.n_inputs, self.steps, self.outputs = list(names), int(n_inputs), list(steps), list(outputs)
        self._programs: dict[tuple, tuple | None] = {}  # per input shapes and path: (tensors, program, isa code)

    def forward(self, *inputs):
        """The chain on its inputs: one operator call where every step's input fits its layer (its
        channel count, size, float32 on the CPU, a non-empty batch); else layer by layer, where each
        layer checks its input and raises or converts as it does on its own."""
        isa = _ext.get_isa()
        if isa != "reference" and all(isinstance(t, torch.Tensor) and t.dtype == torch.float32
                                      and t.device.type == "cpu" and t.dim() == 4 and t.shape[0] > 0
                                      for t in inputs):
            # a layer's state version changes when load_state_dict, .to() or a fold replace its tensors
            key = (isa, *(t.shape for t in inputs), *(layer.state_version for layer in self.layers))
            program = self._programs[key] if key in self._programs else self._program(key, inputs, isa)
            if program is not None:
                return tuple(torch.ops.abc_packed.conv2d_chain.default(list(inputs), *program))
        return self._run_layers(inputs)

    def _run_layers(self, inputs) -> tuple:
        values = list(inputs)
        for layer, (i, r) in zip(self.layers, self.steps):
            values.append(layer(values[i]) if r < 0 else layer(values[i], values[r]))
        return tuple(values[o] for o in self.outputs)

    def _program(self, key: tuple, inputs, isa: str) -> tuple | None:
        """The operator's tensors and program for these input shapes (None: run layer by layer)."""
        shapes = [tuple(t.shape) for t in inputs]
        tensors, ints = [], [len(self.steps), len(self.outputs), *self.outputs]
        program = None
        for layer, (i, r) in zip(self.layers, self.steps):
            if not layer.native or layer.weight_bits.device.type != "cpu":
                break
            try:
                layer._check_shape(shapes[i])
            except ValueError:
                break  # the layer, called on its own, raises with its name and what it expects
            B, C, H, W = shapes[i]
            # the operator runs every step channels-last: the border term in that layout
            _, args = layer._operator_args(H, W, isa, channels_last=True)
            wk, coef, bterm, shifts, out_channels, kernel, stride, padding, dilation = args[:9]
            out_shape = (B, out_channels, *bterm.shape[1:])
            if r >= 0 and shapes[r] != out_shape:  # a broadcast addition: the layer handles it
                break
            tensors += [wk, coef, bterm, shifts]
            ints += [out_channels, *kernel, *stride, *padding, *dilation, int(layer.relu), i, r, layer.in_channels]
            shapes.append(out_shape)
        else:
            program = (tensors, ints, _ext.ISA_CODES[isa])
        if len(self._programs) >= CACHE_ENTRIES:
            self._programs.clear()
        self._programs[key] = program
        return program

    def _apply(self, fn, recurse=True):
        self._programs.clear()  # they hold the layers' tensors, which .to() and friends replace
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{len(self.steps)} packed convs: {', '.join(self.names)}"


def chain_packed_convs(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each run of two or more consecutive packed-conv calls in ``gm``'s graph (each layer
    called once, with its input and optional residual as its only arguments) by one
    :class:`PackedConvChain` call; in place, and returned. Nodes are in a valid order, so such a run
    is self-contained: whatever it reads comes before it and whatever reads it comes after it."""
    modules, calls = dict(gm.named_modules()), _module_calls(gm.graph)

    def chainable(node: fx.Node) -> bool:
        layer = modules.get(node.target) if node.op == "call_module" else None
        return (isinstance(layer, PackedABCConv2d) and layer.native and calls[node.target] == 1
                and not node.kwargs and len(node.args) in (1, 2) and all(isinstance(a, fx.Node) for a in node.args))

    runs, current = [], []
    for node in gm.graph.nodes:
        if chainable(node):
            current.append(node)
            continue
        if len(current) >= 2:
            runs.append(current)
        current = []
    for k, run in enumerate(runs):
        members = set(run)
        inputs = list(dict.fromkeys(a for node in run for a in node.args if a not in members))
        number = {node: i for i, node in enumerate(inputs)}
        number.update({node: len(inputs) + i for i, node in enumerate(run)})
        steps = [(number[n.args[0]], number[n.args[1]] if len(n.args) == 2 else -1) for n in run]
        outputs = [n for n in run if any(user not in members for user in n.users)]
        name = f"packed_chain{k}"
        gm.add_submodule(name, PackedConvChain([modules[n.target] for n in run], [n.target for n in run],
                                               len(inputs), steps, [number[n] for n in outputs]))
        with gm.graph.inserting_after(run[-1]):
            chain_node = gm.graph.call_module(name, tuple(inputs))
        with gm.graph.inserting_after(chain_node):
            for j, out in enumerate(reversed(outputs)):  # each inserted right after the chain call
                item = gm.graph.call_function(operator.getitem, (chain_node, len(outputs) - 1 - j))
                out.replace_all_uses_with(item, delete_user_cb=lambda user, members=members: user not in members)
        for node in reversed(run):
            gm.graph.erase_node(node)
    if runs:
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        log.info("chain_packed_convs: %s", ", ".join(f"{len(run)} packed convs in one call" for run in runs))
    return gm


def _module_calls(graph: fx.Graph) -> dict[str, int]:
    """How many times the graph calls each submodule (a layer called twice cannot be changed for one call)."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` may modify a tensor in place (relu_, add_, +=, a module with inplace=True)."""
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        return getattr(node.target, "__name__", "").endswith("_") or node.target in _IN_PLACE_OPERATORS
    return node.op == "call_module" and getattr(modules.get(node.target), "inplace", False) is True


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _residual_of(user: fx.Node, node: fx.Node, order: dict[fx.Node, int],
                 modules: dict[str, nn.Module]) -> fx.Node | None:
    """The other operand when ``user`` is ``node + other`` (or ``other + node``) and ``other`` is
    computed before ``node`` (so it can be passed to the conv), unless moving the addition to the
    conv could change what it reads or writes: ``other += node`` (modifies ``other``), or an in-place
    operation between the conv and the addition; else None."""
    in_place = (user.op == "call_function" and user.target is operator.iadd) or \
        (user.op == "call_method" and user.target == "add_")
    plain_add = in_place or (user.op == "call_function" and user.target in (operator.add, torch.add)) or \
        (user.op == "call_method" and user.target == "add")
    if not plain_add or user.kwargs or len(user.args) != 2 or user.args.count(node) != 1:
        return None
    if in_place and user.args[0] is not node:
        return None
    other = user.args[1] if user.args[0] is node else user.args[0]
    if not isinstance(other, fx.Node) or order[other] >= order[node]:
        return None
    between = node.next
    while between is not user:
        if _in_place(between, modules):
            return None
        between = between.next
    return other
