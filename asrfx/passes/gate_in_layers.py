"""Gates applied inside layers while training, so the ASR form trains at the backbone's speed.

After convert, each gate is computed from psi once per step (batch 1) and multiplies a whole
feature map, forward and backward. The planner (:mod:`asrfx.passes.absorb`, the rule table fuse
reads too) says which layers can take the gate instead; while training they apply it:

* **producer side**, where the gate's producer plan folds (the same layers fuse will fold it
  into): each BatchNorm applies its share of the gate inside its affine (``GatedBatchNorm``,
  paper eq. 7), each conv or linear layer to its output rows and bias;
* **consumer side**, where the producer cannot take it (x comes out of SiLU, Hardswish ...) and
  the consumers plan ends only in convs and linear layers (read directly or through ops that
  keep the channel axis: pooling, reshapes, concatenations, splits, ReLU for a non-negative
  gate): each multiplies its weight's input-channel slices by its share of the gate.

Convs and linear layers called as modules become :mod:`asrfx.nn.gated_layers` twins sharing
their parameters; functional calls read their weight (and bias) through the gate
(``fold_input_scale(weight, v, groups)``, ``scale_along(weight, v, 0)``). Either way a
weight-sized multiply replaces the feature-map-sized one, forward and backward, and the graph
computes exactly what it did, in train and in eval mode. Fuse later folds the constant gate
into the same layers (gated modules become plain ones; a functional call's ``weight * gate``
folds into its weight: :func:`asrfx.passes.fuse.fold_psi_remainders`).
"""

from __future__ import annotations

import operator

import torch.nn.functional as F
from torch import fx, nn

from ..algebra.fold import fold_input_scale, scale_along
from ..graph.dataflow import ancestors
from ..graph.edit import copy_meta, finish, set_module
from ..graph.layers import Layer, LayerIndex, layer_of
from ..graph.ops import node_shape, op_of
from ..nn.gated_layers import GATED, gated_layer
from ..nn.gated_norm import GatedBatchNorm
from .absorb import Target, plan_consumers, plan_producer, static_sign
from .contract import Role, mark, site_of
from .convert import ConvertedSite, ConvertReport

__all__ = ["move_gates_into_layers", "move_gates_into_batchnorm"]


def move_gates_into_layers(gm: fx.GraphModule, report: ConvertReport, *, producers: bool = True,
                           consumers: bool = True) -> fx.GraphModule:
    """Training fast path: every gate that the layers before it (``producers``) or, failing them, the
    convs and linear layers after it (``consumers``) can apply, they apply; the feature-map multiply
    goes. The report's sites say where (``gated_norm``, ``gated_producers``, ``gated_consumers``)."""
    modules = LayerIndex(gm)
    at: dict[str, dict[str, list[str]]] = {}  # site -> "norm" / "producers" / "consumers" -> layers
    replaced: dict[fx.Node, fx.Node] = {}  # an erased combine -> the node that stands for it now (repeats)
    for site_path, x, gate, combine in report.applications:
        while x in replaced:
            x = replaced[x]
        if getattr(combine, "_erased", False) or getattr(x, "_erased", False):
            continue  # erased by an earlier rewrite
        axis = _gate_axis(gate, x, combine)
        if op_of(combine, modules).name != "mul" or axis is None or _reads_data(gate):
            continue
        sign = static_sign(gate, modules)
        producer = plan_producer(x, combine, axis, "mul", sign, modules)
        found = None
        if producer.ok:
            found = _gate_into_producers(gm, producer.targets, combine, x, gate, axis, modules) if producers else None
        elif consumers:
            plan = plan_consumers(combine, axis, "mul", sign, modules)
            found = _gate_into_consumers(gm, plan.targets, combine, x, gate, modules) if plan.ok else None
        if found:
            replaced[combine] = found.pop("x")
            for kind, layers in found.items():
                at.setdefault(site_path, {}).setdefault(kind, []).extend(layers)
    joined = lambda path, kind: ", ".join(at[path][kind]) if at.get(path, {}).get(kind) else None
    report.sites = [
        ConvertedSite(s.module_path, s.kind, s.mode, s.psi, s.frozen_norms, joined(s.module_path, "norm"),
                      joined(s.module_path, "consumers"), joined(s.module_path, "producers"))
        for s in report.sites
    ]
    return finish(gm)


def move_gates_into_batchnorm(gm: fx.GraphModule, report: ConvertReport) -> fx.GraphModule:
    """The producer side alone (BatchNorms, convs, linear layers before the gate)."""
    return move_gates_into_layers(gm, report, producers=True, consumers=False)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _reads_data(gate: fx.Node) -> bool:
    return any(n.op == "placeholder" for n in ancestors(gate))


def _gate_axis(gate: fx.Node, x: fx.Node, combine: fx.Node) -> int | None:
    """The one axis of x a batch-1 gate runs along (None: not a per-channel gate of x)."""
    gate_shape, x_shape = node_shape(gate), node_shape(x)
    if gate_shape is None or x_shape is None or node_shape(combine) != x_shape or len(gate_shape) > len(x_shape):
        return None
    full = (1,) * (len(x_shape) - len(gate_shape)) + tuple(gate_shape)
    axes = [d for d, s in enumerate(full) if s != 1]
    if len(axes) != 1 or axes[0] == 0 or full[axes[0]] != x_shape[axes[0]]:
        return None
    return axes[0]


def _gate_into_producers(gm, targets: tuple[Target, ...], combine: fx.Node, x: fx.Node, gate: fx.Node, axis: int,
                         modules: LayerIndex) -> dict | None:
    """Rewrite ``layer(y) [-> ops the gate commutes with] * v``: BatchNorms become
    ``GatedBatchNorm(y, v)``, convs and linear layers scale their output rows and bias."""
    layers, norms = {}, {}
    for t in targets:
        module = modules.get(str(t.node.target)) if t.node.op == "call_module" else None
        if t.kind == "batch_norm" and module is not None:
            if isinstance(module, GatedBatchNorm) and t.span.axis == 1 and len(t.node.args) == 2:
                norms[t.node] = module  # gated already (two gates on one tensor): the gates multiply
                continue
            if type(module) not in _BATCH_NORMS or not module.affine or t.span.axis != 1:
                return None
            if modules.calls[str(t.node.target)] > 1:
                return None  # a shared BatchNorm: its other calls take no gate, the multiply stays
            norms[t.node] = module
            continue
        layer = layer_of(t.node, modules)
        if t.side != "output" or isinstance(layer, str) or not _weight_gatable(t, layer, "output"):
            return None
        layers[t.node] = layer
    anchor = min(t.node for t in targets)
    if not _hoist_before(gate, anchor):
        return None
    entries = node_shape(x)[axis]
    vector = _graph_vector(gm, gate, anchor)
    found, new_of = {"norm": [], "producers": []}, {}
    for t in targets:
        if t.node in layers:
            _gate_layer(gm, t, layers[t.node], _share_before(gm, vector, t, entries), "output", modules)
            found["norm" if t.kind == "batch_norm" else "producers"].append(layers[t.node].label)
            continue
        path = str(t.node.target)
        if isinstance(norms[t.node], GatedBatchNorm):
            with gm.graph.inserting_before(t.node):
                both = gm.graph.call_function(operator.mul, (t.node.args[1], _share(gm, vector, t, entries)))
            t.node.args = (t.node.args[0], both)
            found["norm"].append(path)
            continue
        gated = GatedBatchNorm(norms[t.node])
        set_module(gm, path, gated)
        modules[path] = gated  # the index stays live: a later gate on this norm sees it gated
        with gm.graph.inserting_before(t.node):
            new = gm.graph.call_module(path, (t.node.args[0], _share(gm, vector, t, entries)))
        copy_meta(t.node, new)
        t.node.replace_all_uses_with(new)
        gm.graph.erase_node(t.node)
        new_of[t.node] = new
        found["norm"].append(path)
    x = new_of.get(x, x)
    combine.replace_all_uses_with(x)  # x now carries the gate
    gm.graph.erase_node(combine)
    return {"x": x, **found}


def _gate_into_consumers(gm, targets: tuple[Target, ...], combine: fx.Node, x: fx.Node, gate: fx.Node,
                         modules: LayerIndex) -> dict | None:
    """Rewrite ``x * v -> [ops that keep the channel axis] -> conv/linear`` so that each conv or
    linear layer applies its share of v to its weight's input channels; the multiply goes."""
    layers = {}
    for t in targets:
        layer = layer_of(t.node, modules)
        if t.side != "input" or isinstance(layer, str) or not _weight_gatable(t, layer, "input"):
            return None
        layers[t.node] = layer
    entries = node_shape(x)[_gate_axis(gate, x, combine)]
    vector = _graph_vector(gm, gate, min(layers))
    for t in targets:
        _gate_layer(gm, t, layers[t.node], _share_before(gm, vector, t, entries), "input", modules)
    combine.replace_all_uses_with(x)  # the layers now apply the gate
    gm.graph.erase_node(combine)
    return {"x": x, "consumers": [layers[t.node].label for t in targets]}


def _weight_gatable(t: Target, layer: Layer, side: str) -> bool:
    """A layer whose own stored weight can take the gate on ``side``: a conv or linear module of a
    class with a gated twin (not gated yet, or gated on the same side), or a functional conv,
    linear or (output side) batch_norm call reading its weight as a stored tensor."""
    if layer.computed or layer.weight is None:
        return False
    if layer.module is None:
        kinds = ("conv", "linear", "batch_norm") if side == "output" else ("conv", "linear")
        return t.node.op == "call_function" and t.kind in kinds
    module = layer.module
    return t.kind in ("conv", "linear") and (
        type(module) in GATED or (type(module) in GATED.values() and module.gate_side == side))


def _gate_layer(gm, t: Target, layer: Layer, part: fx.Node, side: str, modules: LayerIndex) -> None:
    """``layer(x)`` -> ``gated(x, part)``; a layer already gated (repeats, two gated inputs of one
    concatenation) multiplies its gates. A functional call reads ``weight * part`` (and, on the
    output side, ``bias * part``)."""
    node = t.node
    with gm.graph.inserting_before(node):
        if layer.module is None:
            weight = layer.argument("weight")
            layer.pass_argument("weight", gm.graph.call_function(fold_input_scale, (weight, part, layer.groups))
                                if side == "input" else gm.graph.call_function(scale_along, (weight, part, 0)))
            bias = layer.argument("bias")
            if side == "output" and isinstance(bias, fx.Node):
                layer.pass_argument("bias", gm.graph.call_function(scale_along, (bias, part, 0)))
            return
        path = str(node.target)
        if type(layer.module) in GATED:
            gated = gated_layer(layer.module, side)
            set_module(gm, path, gated)
            modules[path] = gated
            node.args = (node.args[0], part)
        else:
            node.args = (node.args[0], gm.graph.call_function(operator.mul, (node.args[1], part)))


def _share_before(gm: fx.GraphModule, vector: fx.Node, t: Target, entries: int) -> fx.Node:
    with gm.graph.inserting_before(t.node):
        return _share(gm, vector, t, entries)


def _share(gm: fx.GraphModule, vector: fx.Node, t: Target, entries: int) -> fx.Node:
    """The gate entries a target takes, at its channels (1 elsewhere): one branch's share of the gate
    (a part of a concatenation, a piece of a split); the whole vector (``entries`` long) when it
    takes all of it at the same places."""
    if (t.span.start, t.span.stop, t.span.offset, t.width) == (0, entries, 0, entries):
        return vector
    part = gm.graph.call_function(operator.getitem, (vector, slice(t.span.start, t.span.stop)))
    before, after = t.span.offset, t.width - t.span.offset - (t.span.stop - t.span.start)
    return gm.graph.call_function(F.pad, (part, (before, after)), {"value": 1.0})


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
