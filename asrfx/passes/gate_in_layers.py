"""Gates applied inside layers while training, so the ASR form trains at the backbone's speed.

After convert, each gate is computed from psi once per step (batch 1) and multiplies a whole
feature map, forward and backward. Where the gate's producer plan (:mod:`asrfx.passes.absorb`,
the rule table fuse reads too) ends only in BatchNorm modules, each BatchNorm applies its share
of the gate inside its affine instead (``GatedBatchNorm``, paper eq. 7, exact in training mode):
no extra pass over the feature map. Fuse later folds the constant gate into the same layers.
"""

from __future__ import annotations

import operator

import torch.nn.functional as F
from torch import fx, nn

from ..graph.dataflow import ancestors
from ..graph.edit import copy_meta, finish, set_module
from ..graph.layers import LayerIndex
from ..graph.ops import node_shape, op_of
from ..nn.gated_norm import GatedBatchNorm
from .absorb import plan_producer, static_sign
from .contract import Role, mark, site_of
from .convert import ConvertedSite, ConvertReport

__all__ = ["move_gates_into_batchnorm"]


def move_gates_into_batchnorm(gm: fx.GraphModule, report: ConvertReport) -> fx.GraphModule:
    """Training fast path: ``BN(y) * v`` with v from psi becomes ``GatedBatchNorm(y, v)``.

    Applies where the gate's producer plan (:mod:`asrfx.passes.absorb`, the rule table fuse
    reads too) ends only in torch BatchNorm modules: through ReLU for a non-negative gate,
    dropout, pooling, reshapes, into every branch of a sum, into each part of a concatenation.
    Each BatchNorm then applies its part of the gate inside its affine (paper eq. 7, while
    training): no extra pass over the feature map.
    """
    modules = LayerIndex(gm)
    gated_at: dict[str, str] = {}
    for site_path, x, gate, combine in report.applications:
        if getattr(combine, "_erased", False) or getattr(x, "_erased", False):
            continue  # erased by an earlier rewrite
        hit = _gate_into_bn(gm, combine, x, gate, modules)
        if hit:
            gated_at[site_path] = hit
    report.sites = [
        ConvertedSite(s.module_path, s.kind, s.mode, s.psi, s.frozen_norms, gated_at.get(s.module_path))
        for s in report.sites
    ]
    return finish(gm)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _gate_into_bn(gm, combine: fx.Node, x: fx.Node, gate: fx.Node, modules: LayerIndex) -> str | None:
    """Rewrite ``BN(y) [-> ops the gate commutes with] * v`` as ``GatedBatchNorm(y, v) [-> ...]``."""
    if op_of(combine, modules).name != "mul":
        return None
    gate_shape, x_shape = node_shape(gate), node_shape(x)
    if gate_shape is None or x_shape is None or node_shape(combine) != x_shape:
        return None
    if len(gate_shape) != len(x_shape) or gate_shape[0] != 1 or any(s != 1 for s in gate_shape[2:]) \
            or gate_shape[1] != x_shape[1]:
        return None
    plan = plan_producer(x, combine, 1, "mul", static_sign(gate, modules), modules)
    if not plan.ok or any(t.kind != "batch_norm" or t.node.op != "call_module"
                          or type(modules.get(str(t.node.target))) not in _BATCH_NORMS
                          or not modules[str(t.node.target)].affine for t in plan.targets):
        return None
    if not _hoist_before(gate, min(t.node for t in plan.targets)):
        return None
    vector = _graph_vector(gm, gate, min(t.node for t in plan.targets))
    paths, new_of = [], {}
    for t in plan.targets:
        path = str(t.node.target)
        set_module(gm, path, GatedBatchNorm(modules[path]))
        with gm.graph.inserting_before(t.node):
            part = vector
            if (t.span.start, t.span.stop, t.span.offset, t.width) != (0, x_shape[1], 0, x_shape[1]):
                # one branch's share of the gate (a part of a concatenation, a piece of a split)
                part = gm.graph.call_function(operator.getitem, (vector, slice(t.span.start, t.span.stop)))
                before, after = t.span.offset, t.width - t.span.offset - (t.span.stop - t.span.start)
                part = gm.graph.call_function(F.pad, (part, (before, after)), {"value": 1.0})
            new = gm.graph.call_module(path, (t.node.args[0], part))
        copy_meta(t.node, new)
        t.node.replace_all_uses_with(new)
        gm.graph.erase_node(t.node)
        new_of[t.node] = new
        paths.append(path)
    combine.replace_all_uses_with(new_of.get(x, x))  # x now carries the gate
    gm.graph.erase_node(combine)
    return ", ".join(paths)


def _graph_vector(gm: fx.GraphModule, gate: fx.Node, anchor: fx.Node) -> fx.Node:
    """The gate as a flat vector, computed before ``anchor``."""
    with gm.graph.inserting_before(anchor):
        vector = gm.graph.call_method("reshape", (gate, -1))
    mark(vector, Role.GATE_VECTOR, site_of(gate) or "")
    return vector


def _hoist_before(gate: fx.Node, anchor: fx.Node) -> bool:
    """Move the gate's parameter-only subgraph in front of ``anchor``; False if it reads data."""
    subgraph = set(ancestors(gate))
    if any(n.op == "placeholder" for n in subgraph):
        return False
    for node in sorted(subgraph):  # fx nodes compare by their place in the graph
        if node > anchor:
            anchor.prepend(node)
    return True
