"""Fuse pass: fold every constant gate into the backbone (paper sec. 3.2, "Inference phase").

After training, an ASR gate is a constant: a per-channel vector computed from
parameters only. Fuse evaluates it once and folds it away:

1. into the *producer* of x (paper eqs. 6, 7): BatchNorm (module or functional),
   Conv / ConvTranspose (any groups), Linear (token gates), GroupNorm / LayerNorm affine,
   looking through ops that commute with the scale (ReLU and LeakyReLU for a
   non-negative gate, max/avg pooling, dropout in eval, identity); an additive gate goes
   into the bias, created if missing;
2. else into the *consumers* of the gated tensor where exact: input-channel slices of
   conv/linear weights for a scale; for a shift, only linear layers and convs without
   padding (padding would see unshifted zeros);
3. else one constant multiply stays, and the report says why.

Pattern, legality check (returns a reason), rewrite, as in the other passes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .convert import ASR_META
from .detect import module_path_of
from ..errors import AsrfxError
from ..algebra.fold import (
    fold_conv_transpose_output_affine,
    fold_input_scale,
    fold_input_shift,
    fold_output_affine,
    fold_shift_through_batchnorm,
)
from ..graph.edit import ancestors, finish
from ..graph.layers import Layer, LayerIndex, layer_of, set_parameter
from ..nn.gated_norm import GatedBatchNorm
from ..graph.ops import SHAPE_ONLY_OPERAND, data_readers, is_shape_query, node_shape, op_of
from ..graph.capture import as_input_tuple, propagate_shapes

__all__ = ["Fold", "FuseReport", "fuse_graph", "constant_gates", "ConstantEvaluator", "drop_unused_attributes"]


@dataclass(frozen=True)
class Fold:
    """What fuse did with one constant gate."""

    site: str  # the attention block it came from (module path), or where the multiply was
    op: str  # "mul" (scale), "add" (shift) or "gated_bn" (a GatedBatchNorm's gate)
    into: tuple[str, ...]  # layers whose parameters absorbed it; empty when kept
    where: str  # "producer", "consumers" or "kept"
    reason: str  # what was done, or why it was kept


@dataclass
class FuseReport:
    """Every constant gate of the graph: folded (where) or kept (why)."""

    folds: list[Fold] = field(default_factory=list)

    @property
    def kept(self) -> list[Fold]:
        return [f for f in self.folds if f.where == "kept"]

    def __str__(self) -> str:
        folded = len(self.folds) - len(self.kept)
        lines = [f"asrfx.fuse: {folded} gate(s) folded, {len(self.kept)} kept"]
        for f in self.folds:
            target = ", ".join(f.into) if f.into else "-"
            lines.append(f"  {f.site or '(top level)'} [{f.op}] {f.where}: {target}; {f.reason}")
        return "\n".join(lines)


# -- constants ------------------------------------------------------------------------------


def _input_dependence(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """For every node, whether its value depends on a graph input (one pass in graph order).

    Shape reads (x.size(), x.shape, y.expand_as(x)'s x) do not count: they carry no data.
    """
    reads: dict[fx.Node, bool] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            reads[n] = True
            continue
        op = op_of(n, {})
        if is_shape_query(n, op):
            reads[n] = False
            continue
        ins = n.all_input_nodes
        if op.name in SHAPE_ONLY_OPERAND and n.args:
            ins = [n.args[0]] if isinstance(n.args[0], fx.Node) else []
        reads[n] = any(reads.get(i, False) for i in ins)
    return reads


def _computed(node: fx.Node) -> bool:
    """A constant computed from parameters (an ASR gate), not a stored one (layer scale)."""
    if node.meta.get(ASR_META, {}).get("role") == "gate":
        return True
    return any(n.op == "call_module" or op_of(n, {}).name in _COMPUTING for n in ancestors(node))


_COMPUTING = frozenset({"linear", "conv", "sigmoid", "hardsigmoid", "softmax", "relu", "matmul", "mm", "addmm",
                        "einsum", "tanh", "silu"})  # ops that make a constant "computed", not stored


class ConstantEvaluator(fx.Interpreter):
    """Evaluates parameter-only nodes of a graph, caching values."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}

    @torch.no_grad()
    def value(self, node: fx.Node) -> Any:
        needed, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in needed or n in self.env:
                continue
            needed.add(n)
            if not is_shape_query(n, op_of(n, {})):
                stack.extend(n.all_input_nodes)
        for n in sorted(needed, key=self.order.get):
            self.env[n] = self._shape(n) if is_shape_query(n, op_of(n, {})) else self.run_node(n)
        return self.env[node]

    def _shape(self, n: fx.Node) -> Any:
        """x.size(), x.size(i), x.shape from shape metadata: the input is not needed."""
        shape = node_shape(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if shape is None:
            raise AsrfxError(f"'{n.name}' reads the shape of '{n.args[0]}', which has no shape metadata")
        size = torch.Size(shape)
        if n.op == "call_method" and n.target == "size" and (len(n.args) > 1 or "dim" in n.kwargs):
            return size[n.args[1] if len(n.args) > 1 else n.kwargs["dim"]]
        if n.op == "call_function" and op_of(n, {}).name == "sym_size":  # aten.sym_size.int(x, dim)
            return size[n.args[1]]
        if n.op == "call_function" and op_of(n, {}).name == "sym_numel":
            return size.numel()
        if n.op == "call_method" and n.target in ("dim", "ndimension"):
            return len(size)
        if n.op == "call_method" and n.target == "numel":
            return size.numel()
        return size


@dataclass(frozen=True)
class _Gate:
    combine: fx.Node  # the mul/add node
    x: fx.Node  # the data operand
    operand: fx.Node  # the constant operand as the combine reads it (maybe g.expand_as(x))
    gate: fx.Node  # the constant before broadcasting: what is evaluated and folded
    op: str  # "mul" or "add"


def _strip_broadcast(node: fx.Node, modules) -> fx.Node:
    """The gate before expand_as / expand / broadcast_to: the combine broadcasts anyway."""
    while op_of(node, modules).name in ("expand", "expand_as", "broadcast_to", "contiguous") and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def constant_gates(gm: fx.GraphModule) -> list[_Gate]:
    """Pattern: mul/add of a data tensor and a computed per-channel constant."""
    modules = dict(gm.named_modules())
    reads = _input_dependence(gm)
    found = []
    for node in gm.graph.nodes:
        name = op_of(node, modules).name
        if name not in ("mul", "add") or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        for x, g in ((a, b), (b, a)):
            if reads[x] and not reads[g] and _computed(g):
                found.append(_Gate(node, x, g, _strip_broadcast(g, modules), name))
                break
    return found


# -- folding into layers ------------------------------------------------------------------------


def _vector(value: torch.Tensor, x_shape: tuple[int, ...]) -> tuple[torch.Tensor | None, int | None, str]:
    """The gate as a length-C vector and x's channel axis, or a reason it is not one."""
    v = value
    if v.dim() > len(x_shape):
        return None, None, f"gate {tuple(v.shape)} has more axes than x {x_shape}"
    full = (1,) * (len(x_shape) - v.dim()) + tuple(v.shape)
    axes = [d for d, s in enumerate(full) if s != 1]
    if len(axes) != 1:
        return None, None, f"gate {tuple(v.shape)} is not one per-channel vector for x {x_shape}"
    axis = axes[0]
    if axis == 0 or full[axis] != x_shape[axis]:
        return None, None, f"gate {tuple(v.shape)} does not run along a channel axis of x {x_shape}"
    return v.reshape(-1), axis, ""


def _fold_into_layer(gm, node: fx.Node, v, axis: int, op: str, rank: int, modules: LayerIndex) -> str | None:
    """Legality check + rewrite of one absorbing layer; returns a reason if it cannot."""
    scale, shift = (v, None) if op == "mul" else (None, v)
    layer = layer_of(node, modules)
    if isinstance(layer, str):
        return layer
    if isinstance(layer.module, GatedBatchNorm):
        return f"'{layer.label}' still holds a gate"
    channels_first = layer.name in ("conv", "conv_transpose", "batch_norm", "group_norm")
    if channels_first and axis != 1:
        return f"'{layer.label}' has channels on axis 1, the gate is on axis {axis}"
    if not channels_first and axis != rank - 1:
        return f"'{layer.label}' has features on the last axis, the gate is on axis {axis}"
    if layer.name == "conv_transpose":
        w, b = fold_conv_transpose_output_affine(layer.weight, layer.bias, layer.groups, scale, shift)
    else:
        if layer.name in ("batch_norm", "group_norm", "layer_norm") and layer.weight is None:
            return f"'{layer.label}' has no affine parameters to absorb it"
        if layer.name == "layer_norm" and layer.normalized_shape != (v.numel(),):
            return f"'{layer.label}' normalizes {layer.normalized_shape}, not the gated axis alone"
        if layer.name in ("batch_norm", "group_norm", "layer_norm") and layer.bias is None and shift is not None:
            return f"'{layer.label}' has no bias for the shift"
        w, b = fold_output_affine(layer.weight, layer.bias, scale, shift)
    layer.set("weight", w)
    if b is not None:
        layer.set("bias", b)
    return None


_THROUGH_SCALE = {"identity": "any", "dropout": "any", "avg_pool": "any", "adaptive_avg_pool": "any",
                  "relu": "non-negative", "leaky_relu": "non-negative", "max_pool": "non-negative",
                  "adaptive_max_pool": "non-negative"}
_THROUGH_SHIFT = {"identity", "dropout", "max_pool", "adaptive_max_pool", "adaptive_avg_pool"}


_REARRANGE = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                        "permute", "transpose", "contiguous"})


def _axis_before(node: fx.Node, axis: int, name: str) -> int | None:
    """The axis of ``node``'s input that becomes ``axis`` of its output, if it stays whole."""
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    in_shape, out_shape = node_shape(src) if src is not None else None, node_shape(node)
    if in_shape is None or out_shape is None:
        return None
    if name in ("permute", "transpose"):
        rank = len(in_shape)
        if name == "permute":
            order = node.args[1:] if len(node.args) > 2 else node.args[1]
            order = [int(d) % rank for d in order]
        else:
            a, b = int(node.args[1]) % rank, int(node.args[2]) % rank
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
        return order[axis]
    if name == "contiguous":
        return axis
    return _matching_axis(out_shape, in_shape, axis)


def _matching_axis(shape: tuple[int, ...], other: tuple[int, ...], axis: int) -> int | None:
    """The axis of ``other`` (a reshape of ``shape``) that holds ``shape``'s ``axis`` whole: the
    same size, with the same number of elements before it."""
    before = 1
    for s in shape[:axis]:
        before *= s
    acc = 1
    for k, s in enumerate(other):
        if acc == before and s == shape[axis]:
            return k
        acc *= s
    return None


def _producer(gm, g: _Gate, v, axis, modules) -> tuple[list[str], str | None]:
    """Fold into the layer that produced x, looking through commuting ops."""
    node, rank = g.x, len(node_shape(g.x) or ())
    if data_readers(node, modules) != [g.combine]:
        others = [u.name for u in data_readers(node, modules) if u is not g.combine]
        return [], f"x is also read unscaled by '{others[0]}'"
    while True:
        name = op_of(node, modules).name
        if name in _REARRANGE:  # tokens: x = conv(img).flatten(2).transpose(1, 2), the gate on C
            axis = _axis_before(node, axis, name)
            if axis is None:
                return [], f"'{node.name}' ({name}) splits or merges the gated axis"
            rank = len(node_shape(node.args[0]) or ())
        elif name in _THROUGH_SCALE and g.op == "mul":
            if _THROUGH_SCALE[name] == "non-negative" and bool((v < 0).any()):
                return [], f"a negative gate does not commute with {name} '{node.name}'"
        elif name in _THROUGH_SHIFT and g.op == "add":
            pass
        else:
            reason = _fold_into_layer(gm, node, v, axis, g.op, rank, modules)
            if reason:
                return [], reason
            return [str(node.target) if node.op == "call_module" else node.name], None
        nxt = node.args[0] if node.args else None
        if not isinstance(nxt, fx.Node) or data_readers(nxt, modules) != [node]:
            return [], f"'{node.name}' ({name}) reads a tensor that others read too"
        node = nxt


def _consumers(gm, g: _Gate, v, axis, modules: LayerIndex) -> tuple[list[str], str | None]:
    """Fold into every reader of the gated tensor (conv/linear input slices)."""
    readers = data_readers(g.combine, modules)
    plans = []
    for r in readers:
        reached = _reader_layer(g.combine, r, axis, g.op, modules)
        if isinstance(reached, str):
            return [], reached
        layer, at_axis, rank = reached
        if (layer.name == "conv" and at_axis != 1) or (layer.name == "linear" and at_axis != rank - 1):
            return [], f"'{layer.label}' reads channels on another axis than the gate's"
        if g.op == "add" and (layer.padded or layer.groups != 1):
            return [], f"'{layer.label}' pads its input (or is grouped): a shift cannot fold into it exactly"
        plans.append(layer)
    if not plans:
        return [], "nothing reads the gated tensor"
    into = []
    for layer in plans:
        into.append(layer.label)
        if g.op == "mul":
            layer.set("weight", fold_input_scale(layer.weight, v, layer.groups))
            continue
        shift = fold_input_shift(layer.weight, None, v)
        norm = _batchnorm_after(layer.node, modules) if layer.bias is None else None
        if norm is None:  # a bias is created if the layer has none
            layer.set("bias", shift if layer.bias is None else layer.bias + shift)
        else:  # no bias to create: the BatchNorm after the layer takes the shift
            norm.set("bias", fold_shift_through_batchnorm(norm.bias, norm.weight, norm.running_var, norm.eps, shift))
            into.append(norm.qualified_bias)
    return into, None


# Ops a per-channel scale passes through on its way to a consumer: pool(x * v) == pool(x) * v.
_FORWARD_SCALE = frozenset({"identity", "dropout", "avg_pool", "adaptive_avg_pool", "mean"}) | _REARRANGE


def _reader_layer(src: fx.Node, reader: fx.Node, axis: int, op: str, modules: LayerIndex):
    """The conv/linear layer that reads ``src`` through ``reader`` (for a scale: through global
    or average pooling and flatten, as before a classifier head), with the gated axis and the
    rank of its input there; or the reason there is none."""
    node, rank = reader, len(node_shape(src) or ())
    while True:
        layer = layer_of(node, modules)
        if not isinstance(layer, str) and layer.name in ("conv", "linear") and node.args and node.args[0] is src:
            return layer, axis, rank
        name = op_of(node, modules).name
        if op != "mul" or name not in _FORWARD_SCALE or not node.args or node.args[0] is not src:
            return f"'{node.name}' ({name}) reads the gated tensor and cannot absorb the gate"
        axis = _axis_after(node, axis, name)
        nxt = data_readers(node, modules)
        if axis is None:
            return f"'{node.name}' ({name}) reduces or splits the gated axis"
        if len(nxt) != 1:
            return f"'{node.name}' ({name}) is read by {len(nxt)} ops, not one layer"
        src, node, rank = node, nxt[0], len(node_shape(node) or ())


def _axis_after(node: fx.Node, axis: int, name: str) -> int | None:
    """Where ``axis`` of ``node``'s input ends up in its output, if it stays whole."""
    in_shape, out_shape = node_shape(node.args[0]), node_shape(node)
    if in_shape is None or out_shape is None:
        return None
    if name in ("identity", "dropout", "contiguous", "avg_pool", "adaptive_avg_pool"):
        return axis if axis < len(out_shape) and (name not in ("avg_pool", "adaptive_avg_pool") or axis == 1) \
            else None
    if name == "mean":
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dims is None:
            return None
        dims = {int(d) % len(in_shape) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if axis in dims:
            return None
        return axis if keep else axis - sum(1 for d in dims if d < axis)
    if name in ("permute", "transpose"):
        for out_axis in range(len(out_shape)):
            if _axis_before(node, out_axis, name) == axis:
                return out_axis
        return None
    return _matching_axis(in_shape, out_shape, axis)


def _batchnorm_after(node: fx.Node, modules: LayerIndex) -> Layer | None:
    """The eval-mode BatchNorm with running statistics and a bias that alone reads ``node``."""
    readers = data_readers(node, modules)
    if len(readers) != 1 or readers[0].args[0] is not node:
        return None
    bn = layer_of(readers[0], modules)
    if isinstance(bn, str) or bn.name != "batch_norm" or bn.bias is None or bn.running_var is None:
        return None
    if bn.module is not None and type(bn.module) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return None
    return bn


# -- the pass --------------------------------------------------------------------------------------


def _site_of(g: _Gate) -> str:
    meta = g.gate.meta.get(ASR_META) or {}
    return meta.get("site") or module_path_of(g.combine) or ""


def _fold_gated_batchnorms(gm: fx.GraphModule, evaluator: ConstantEvaluator, report: FuseReport) -> None:
    """GatedBatchNorm(y, v) with a constant v becomes a plain BatchNorm with gamma*v, beta*v."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, GatedBatchNorm) or len(node.args) < 2:
            continue
        v = _finite(evaluator.value(node.args[1]), (node.args[1].meta.get(ASR_META) or {}).get("site") or
                    str(node.target)).reshape(-1)
        bn_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[
            len(node_shape(node) or (0, 0, 0, 0))]
        like = next(iter(module.state_dict().values()), v)
        bn = bn_cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                    device=v.device, dtype=v.dtype if v.is_floating_point() else like.dtype)
        bn.load_state_dict(module.state_dict())
        w, b = fold_output_affine(module.weight, module.bias, v)
        if module.weight is not None:
            set_parameter(bn, "weight", w)
        set_parameter(bn, "bias", b)
        bn.train(module.training)
        path = str(node.target)
        parent, _, attr = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, bn)
        site = (node.args[1].meta.get(ASR_META) or {}).get("site") or path
        node.args = (node.args[0],)
        report.folds.append(Fold(site, "gated_bn", (path,), "producer", "folded into the BatchNorm affine"))


def _finite(value: Any, site: str) -> Any:
    """Refuse a gate that is NaN or infinite (a diverged run): folded, it would make every output NaN."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise AsrfxError(f"the gate of '{site or '(top level)'}' has {bad} NaN or infinite value(s) of "
                         f"{value.numel()}: fuse would write them into the deployed weights. Check the trained "
                         "psi and excitation parameters (a diverged run?) and fuse a finite checkpoint")
    return value


def _keep_constant(gm: fx.GraphModule, g: _Gate, value: torch.Tensor) -> None:
    """The gate stays as one stored constant (a buffer); its psi branch goes away."""
    name, i = "asr_gate", 0
    while hasattr(gm, f"{name}_{i}"):
        i += 1
    gm.register_buffer(f"{name}_{i}", value.detach().clone())
    with gm.graph.inserting_before(g.combine):
        const = gm.graph.get_attr(f"{name}_{i}")
    g.combine.replace_input_with(g.operand, const)


def fuse_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, FuseReport]:
    """Fold every constant gate of ``gm`` (eval mode, nodes with shapes) in place."""
    report = FuseReport()
    evaluator = ConstantEvaluator(gm)
    _fold_gated_batchnorms(gm, evaluator, report)
    replaced: dict[fx.Node, fx.Node] = {}  # a folded combine -> the node that now stands for it
    modules = LayerIndex(gm)  # folding changes parameters, never which modules the graph calls
    for g in constant_gates(gm):
        x = g.x
        while x in replaced:  # a gate on a tensor an earlier gate was folded from (repeats)
            x = replaced[x]
        g = dataclasses.replace(g, x=x)
        site = _site_of(g)
        x_shape = node_shape(g.x)
        value = _finite(evaluator.value(g.gate), site)
        v, axis, why = _vector(value, x_shape) if x_shape is not None else (None, None, "no shape for x")
        if v is None:
            _keep_constant(gm, g, value)
            report.folds.append(Fold(site, g.op, (), "kept", why))
            continue
        into, why_producer = _producer(gm, g, v, axis, modules)
        where = "producer"
        if why_producer:
            into, why_consumers = _consumers(gm, g, v, axis, modules)
            where = "consumers"
            if why_consumers:
                _keep_constant(gm, g, value)
                report.folds.append(Fold(site, g.op, (), "kept",
                                         f"producer: {why_producer}; consumers: {why_consumers}"))
                continue
        g.combine.replace_all_uses_with(g.x)
        replaced[g.combine] = g.x
        gm.graph.erase_node(g.combine)
        report.folds.append(Fold(site, g.op, tuple(into), where,
                                 f"folded into the {where}" + (f" ({why_producer})" if where == "consumers" else "")))
    finish(gm)
    drop_unused_attributes(gm)
    return gm, report


def drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Parameters and buffers nothing reads any more (psi registered on a live module)."""
    used_modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    used_attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        owner_path, _, attr = name.rpartition(".")
        parts = owner_path.split(".") if owner_path else []
        inside_used = any(".".join(parts[: i + 1]) in used_modules for i in range(len(parts)))
        if name in used_attrs or inside_used:
            continue
        owner = gm.get_submodule(owner_path) if owner_path else gm
        delattr(owner, attr)
