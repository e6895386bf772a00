"""Fusing the float layers that follow a packed conv into it, for inference speed.

In a converted ResNet, each packed conv is followed by a BatchNorm2d and often a ReLU: two more
passes over the output in PyTorch, and at batch 1 two more module calls, which cost as much as the
binary convolution itself. :func:`fuse_batchnorm_relu` folds such a BatchNorm into the conv's
coefficients and border term and does the residual addition and the ReLU in the kernel's store.

The fused model equals the packed one up to float rounding, not bit for bit (PyTorch's BatchNorm
rounds its own way), so an activation within rounding of a threshold can binarize the other way
later on; ``abc-export`` and the packed file keep the unfused form, and this is a run-time step.
"""

from __future__ import annotations

import copy
import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layers import PackedABCConv2d, PackedABCLayer

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


def fuse_batchnorm_relu(model: nn.Module) -> nn.Module:
    """An inference copy of a packed model (:func:`~abc_experiments.packed.pack_model`) in which
    every eval-mode BatchNorm2d whose only input is a packed conv's output, and that output's only
    user, is folded into the conv (:meth:`PackedABCConv2d.fold_batchnorm`); a residual addition that
    then takes the conv's output (``bn2(conv2(h)) + shortcut`` in a ResNet block) is done in the
    kernel's store, and so is a ReLU that then follows. Returns a ``torch.fx.GraphModule``; a model
    that ``torch.fx`` cannot trace comes back as an unchanged copy (logged)."""
    model = copy.deepcopy(model).eval()
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # data-dependent control flow, unsupported Python, ...
        log.info("fuse_batchnorm_relu: torch.fx cannot trace %s (%s); nothing fused",
                 type(model).__name__, error)
        return model
    gm = fx.GraphModule(model, graph, class_name=f"Fused{type(model).__name__}")
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    folded = added = fused = 0
    for node in list(gm.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, PackedABCConv2d) or calls[node.target] != 1:
            continue  # a module called twice would change both calls
        users = list(node.users)
        bn = modules.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        if not (type(bn) is nn.BatchNorm2d and not bn.training and bn.running_mean is not None
                and calls[users[0].target] == 1 and users[0].args == (node,) and not users[0].kwargs):
            continue
        conv.fold_batchnorm(bn)
        users[0].replace_all_uses_with(node)
        gm.graph.erase_node(users[0])
        folded += 1
        users = list(node.users)
        residual = _residual_of(users[0], node, order) if len(users) == 1 else None
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
    return gm


def _residual_of(user: fx.Node, node: fx.Node, order: dict[fx.Node, int]) -> fx.Node | None:
    """The other operand when ``user`` is ``node + other`` (or ``other + node``) of two tensors and
    ``other`` is computed before ``node`` (so it can be passed to the conv); else None."""
    plain_add = (user.op == "call_function" and user.target in (operator.add, operator.iadd, torch.add)) or \
        (user.op == "call_method" and user.target in ("add", "add_"))
    if not plain_add or user.kwargs or len(user.args) != 2 or user.args.count(node) != 1:
        return None
    other = user.args[1] if user.args[0] is node else user.args[0]
    return other if isinstance(other, fx.Node) and order[other] < order[node] else None
