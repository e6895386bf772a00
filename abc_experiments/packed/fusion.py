"""Fusing the float layers that follow a packed conv into it, for inference speed.

In a converted ResNet, each packed conv is followed by a BatchNorm2d and often a ReLU: two more
passes over the output in PyTorch, and at batch 1 two more module calls, which cost as much as the
binary convolution itself. :func:`fuse_batchnorm_relu` folds such a BatchNorm into the conv's
coefficients and border term and does the ReLU in the kernel's store.

The fused model equals the packed one up to float rounding, not bit for bit (PyTorch's BatchNorm
rounds its own way), so an activation within rounding of a threshold can binarize the other way
later on; ``abc-export`` and the packed file keep the unfused form, and this is a run-time step.
"""

from __future__ import annotations

import copy
import logging

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
    user, is folded into the conv (:meth:`PackedABCConv2d.fold_batchnorm`), and a ReLU that is then
    the conv's only user is done in the kernel. Returns a ``torch.fx.GraphModule``; a model that
    ``torch.fx`` cannot trace comes back as an unchanged copy (logged)."""
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
    folded = fused = 0
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
        if len(users) == 1 and _is_relu(users[0], modules) and users[0].args[:1] == (node,):
            conv.relu = True
            users[0].replace_all_uses_with(node)
            gm.graph.erase_node(users[0])
            fused += 1
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    log.info("fuse_batchnorm_relu: %d BatchNorm folded, %d ReLU fused", folded, fused)
    return gm
