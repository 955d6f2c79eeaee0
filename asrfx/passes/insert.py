"""Insertion of attention modules into a plain backbone (the paper's main use, Tables 2-3).

Default placement, after the paper and its official code: after the last normalization
layer of each residual branch, before the residual add (ResNet: after bn3 of a bottleneck;
pre-norm ViT blocks: after the block's LayerNorm, on [N, L, D] tokens). A backbone with no
residual adds (VGG, ShuffleNetV2) gets one after every BatchNorm. A predicate
``where(path, module) -> bool`` picks normalization (or any) modules instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import fx, nn

from ..errors import AsrfxError
from ..graph.edit import unique_attr_name
from ..graph.layout import is_channel
from ..graph.ops import module_path_of, node_shape, op_of


__all__ = ["InsertionPoint", "insertion_points", "insert_modules"]

_NORMS = frozenset({"batch_norm", "layer_norm", "group_norm"})


@dataclass(frozen=True)
class InsertionPoint:
    """Where one attention module goes."""

    node: fx.Node  # the output it gates (a normalization layer's, by default)
    path: str  # the module that produced it, e.g. "layer1.0.bn3"
    channels: int  # size of the channel axis
    tokens: bool  # [N, L, C] tokens (channel axis last) rather than [N, C, *spatial]
    dims: int  # number of spatial axes for feature maps


def _depths(gm: fx.GraphModule) -> dict[fx.Node, int]:
    depth: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        depth[n] = 1 + max((depth[i] for i in n.all_input_nodes), default=-1)
    return depth


def _norm_path(node: fx.Node, modules) -> str | None:
    """The module path of a normalization layer's call: a module call, or a functional call
    (export-route graphs) made by a module."""
    if op_of(node, modules).name not in _NORMS:
        return None
    return str(node.target) if node.op == "call_module" else module_path_of(node)


def _last_norm(node: fx.Node, modules, limit: int = 32) -> fx.Node | None:
    """Walk back along first inputs to the nearest normalization layer."""
    for _ in range(limit):
        if _norm_path(node, modules):
            return node
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def _point(node: fx.Node, layouts, modules) -> InsertionPoint | str:
    """Where attention can go after ``node``, or why it cannot."""
    shape, lay, path = node_shape(node), layouts.get(node), _called_path(node, modules)
    if not path:
        return "it is not the output of a module"
    if shape is None:
        return "its output is not a single tensor with a known shape"
    if not isinstance(lay, tuple) or len(shape) < 2:
        return f"the axes of its output {list(shape)} are unknown"
    if len(shape) == 3 and is_channel(lay[2]) and "S" in lay[1]:
        return InsertionPoint(node, path, shape[2], True, 0)
    if is_channel(lay[1]) and len(shape) > 2:
        return InsertionPoint(node, path, shape[1], False, len(shape) - 2)
    if is_channel(lay[1]):
        return (f"its output {list(shape)} has no spatial or token axis (channel attention pools over "
                "positions: it needs a feature map [N, C, *spatial] or tokens [N, L, C])")
    return f"its output {list(shape)} has no channel axis"


def _called_path(node: fx.Node, modules) -> str | None:
    """The module a node calls: a call_module's target, or the module whose forward made a functional
    layer call (export-route graphs call ``aten.batch_norm`` inside ``layer1.0.bn3``)."""
    if node.op == "call_module":
        return str(node.target)
    return _norm_path(node, modules) if node.op == "call_function" else None


def insertion_points(gm: fx.GraphModule, layouts, where: Callable[[str, nn.Module], bool] | None,
                     model: nn.Module | None = None):
    """The outputs to gate, in graph order. ``model``: the captured model, whose modules ``where``
    is given when the graph calls them as functions (export route)."""
    modules = dict(gm.named_modules())
    chosen: list[fx.Node] = []
    if where is not None:
        for n in gm.graph.nodes:
            path = _called_path(n, modules)
            module = modules.get(path) if n.op == "call_module" else _submodule(model, path)
            if path and module is not None and where(path, module):
                chosen.append(n)
    else:
        depth = _depths(gm)
        for n in gm.graph.nodes:
            if op_of(n, modules).name != "add" or len(n.args) < 2:
                continue
            a, b = n.args[0], n.args[1]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or node_shape(a) != node_shape(b) \
                    or node_shape(a) is None:
                continue
            branch = a if depth[a] >= depth[b] else b  # the residual branch is the deeper operand
            norm = _last_norm(branch, modules)
            if norm is not None and norm not in chosen:
                chosen.append(norm)
        if not chosen:  # no residual blocks: after every BatchNorm
            chosen = [n for n in gm.graph.nodes if op_of(n, modules).name == "batch_norm" and _norm_path(n, modules)]
    found = [(n, _point(n, layouts, modules)) for n in chosen]
    refused = [(n, why) for n, why in found if isinstance(why, str)]
    if where is not None and refused:
        lines = "\n".join(f"    '{_called_path(n, modules) or n.name}' ({_kind(n, modules)}): {why}"
                           for n, why in refused[:8])
        more = f"\n    ... and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise AsrfxError(f"asrfx.insert: where= chose {len(refused)} place(s) where attention cannot go:\n"
                         f"{lines}{more}\n  What to do: make where= return True only for layers whose output is a "
                         "feature map or a token sequence, e.g. where=lambda path, m: isinstance(m, nn.BatchNorm2d)")
    points = [p for _, p in found if not isinstance(p, str)]
    if not points:
        raise AsrfxError("asrfx.insert found no place to insert attention: no residual block ends in a "
                         "normalization layer and no BatchNorm was found; pass where=lambda path, module: ...")
    return points


def _kind(node: fx.Node, modules) -> str:
    op = op_of(node, modules)
    return type(op.module).__name__ if op.module is not None else op.name


def _submodule(model: nn.Module | None, path: str | None) -> nn.Module | None:
    if model is None or not path:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def insert_modules(gm: fx.GraphModule, points: list[InsertionPoint], factory, repeats: int) -> list[str]:
    """Insert ``repeats`` modules after each point, inlined as their traced graphs.

    Inlining (rather than one call_module node) lets detection and convert see inside
    them without re-tracing the whole model; targets and module paths get the module's
    path as prefix, so parameters read ``layer1.0.asr.fc1.weight``.
    """
    paths = []
    for point in points:
        parent_path, _, _ = point.path.rpartition(".")
        parent = gm.get_submodule(parent_path) if parent_path else gm
        x = point.node
        for _ in range(repeats):
            name = unique_attr_name(parent, "asr")
            module = factory(point)
            path = f"{parent_path}.{name}" if parent_path else name
            gm.add_submodule(path, module)
            gated = _inline(gm, module, path, x)
            x.replace_all_uses_with(gated, delete_user_cb=lambda user, g=gated: user is not g and not _inside(user, path))
            x = gated
            paths.append(path)
    gm.graph.lint()
    gm.recompile()
    return paths


def _inside(node: fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return path in stack


def _inline(gm: fx.GraphModule, module: nn.Module, path: str, x: fx.Node) -> fx.Node:
    """Copy ``module``'s traced graph after ``x``; returns the node holding its output."""
    sub = fx.symbolic_trace(module)
    anchor = x.next
    env: dict[fx.Node, fx.Node] = {}
    result = None
    with gm.graph.inserting_before(anchor):
        for node in sub.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
                continue
            if node.op == "output":
                result = env[node.args[0]]
                continue
            new = gm.graph.node_copy(node, lambda a: env[a])
            stack = {path: (path, type(module))}
            if node.op in ("call_module", "get_attr"):
                new.target = f"{path}.{node.target}"
                if node.op == "call_module":
                    stack[str(new.target)] = (str(new.target), type(gm.get_submodule(str(new.target))))
            new.meta["nn_module_stack"] = stack
            env[node] = new
    return result
