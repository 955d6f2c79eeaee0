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

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .convert import ASR_META
from .detect import module_path_of
from .errors import AsrfxError
from .fold import (
    fold_conv_transpose_output_affine,
    fold_input_scale,
    fold_input_shift,
    fold_output_affine,
    fold_shift_through_batchnorm,
)
from .graph import finish
from .modules import GatedBatchNorm
from .ops import SHAPE_ONLY_OPERAND, data_readers, is_shape_query, node_shape, op_of
from .tracing import as_input_tuple, propagate_shapes

__all__ = ["Fold", "FuseReport", "fuse_graph", "constant_gates"]


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
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        name = op_of(n, {}).name
        if n.op == "call_module" or name in ("linear", "conv", "sigmoid", "hardsigmoid", "softmax",
                                             "relu", "matmul", "mm", "addmm", "einsum", "tanh", "silu"):
            return True
        stack.extend(n.all_input_nodes)
    return False


class _Evaluator(fx.Interpreter):
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


def _set_param(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        return
    old = getattr(module, name, None)
    requires_grad = old.requires_grad if isinstance(old, torch.Tensor) else True
    setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=requires_grad))


class _Modules(dict):
    """``dict(gm.named_modules())`` plus how often the graph calls each module path."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm.named_modules())
        self.calls = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")


def _calls(modules: _Modules, target: str) -> int:
    return modules.calls[target]


def _fold_into_layer(gm, node: fx.Node, v, axis: int, op: str, rank: int, modules) -> str | None:
    """Legality check + rewrite of one absorbing layer; returns a reason if it cannot."""
    scale, shift = (v, None) if op == "mul" else (None, v)
    name = op_of(node, modules).name
    if node.op == "call_module":
        module = modules[str(node.target)]
        if _calls(modules, str(node.target)) != 1:
            return f"'{node.target}' is called more than once (shared weights)"
        if isinstance(module, GatedBatchNorm):
            return f"'{node.target}' still holds a gate"
        if name in ("conv", "batch_norm", "group_norm") and axis != 1:
            return f"'{node.target}' has channels on axis 1, the gate is on axis {axis}"
        if name in ("linear", "layer_norm") and axis != rank - 1:
            return f"'{node.target}' has features on the last axis, the gate is on axis {axis}"
        if name == "conv":
            w, b = fold_output_affine(module.weight, module.bias, scale, shift)
        elif name == "conv_transpose":
            if axis != 1:
                return f"'{node.target}' has channels on axis 1, the gate is on axis {axis}"
            w, b = fold_conv_transpose_output_affine(module.weight, module.bias, module.groups, scale, shift)
        elif name == "linear":
            w, b = fold_output_affine(module.weight, module.bias, scale, shift)
        elif name in ("batch_norm", "group_norm", "layer_norm"):
            affine = getattr(module, "affine", getattr(module, "elementwise_affine", False))
            if not affine or module.weight is None:
                return f"'{node.target}' ({type(module).__name__}) has no affine parameters to absorb it"
            if name == "layer_norm" and tuple(module.normalized_shape) != (v.numel(),):
                return f"'{node.target}' normalizes {tuple(module.normalized_shape)}, not the gated axis alone"
            if module.bias is None and shift is not None:
                return f"'{node.target}' has no bias for the shift"
            w, b = fold_output_affine(module.weight, module.bias, scale, shift)
        else:
            return f"'{node.target}' ({type(module).__name__}) cannot absorb a per-channel constant"
        _set_param(module, "weight", w)
        _set_param(module, "bias", b)
        return None
    if name == "batch_norm" and node.op == "call_function":  # functional, e.g. timm's BatchNormAct2d
        args = list(node.args) + [None] * (5 - len(node.args))
        weight, bias = node.kwargs.get("weight", args[3]), node.kwargs.get("bias", args[4])
        if axis != 1 or not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            return f"'{node.name}' (functional batch_norm) has no weight parameter to scale"
        if not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            return f"'{node.name}' (functional batch_norm) has no bias parameter"
        owners = []
        for attr in (weight, bias):
            path, _, pname = str(attr.target).rpartition(".")
            owners.append((gm.get_submodule(path) if path else gm, pname))
        w, b = fold_output_affine(getattr(*owners[0]), getattr(*owners[1]), scale, shift)
        _set_param(owners[0][0], owners[0][1], w)
        _set_param(owners[1][0], owners[1][1], b)
        return None
    return f"'{node.name}' ({name}) cannot absorb a per-channel constant"


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
    # a reshape keeps an axis if an input axis has its size and the same number of elements before it
    before = 1
    for s in out_shape[:axis]:
        before *= s
    acc = 1
    for k, s in enumerate(in_shape):
        if acc == before and s == out_shape[axis]:
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


def _consumers(gm, g: _Gate, v, axis, modules) -> tuple[list[str], str | None]:
    """Fold into every reader of the gated tensor (conv/linear input slices)."""
    readers = data_readers(g.combine, modules)
    rank = len(node_shape(g.combine) or ())
    plans = []
    for r in readers:
        name = op_of(r, modules).name
        if r.op != "call_module" or name not in ("conv", "linear") or r.args[0] is not g.combine:
            return [], f"'{r.name}' ({name}) reads the gated tensor and cannot absorb the gate"
        module = modules[str(r.target)]
        if _calls(modules, str(r.target)) != 1:
            return [], f"'{r.target}' is called more than once (shared weights)"
        if (name == "conv" and axis != 1) or (name == "linear" and axis != rank - 1):
            return [], f"'{r.target}' reads channels on another axis than the gate's"
        if g.op == "add":
            padded = name == "conv" and (module.padding == "same" or any(p != 0 for p in (
                module.padding if isinstance(module.padding, tuple) else (module.padding,))))
            if padded or (name == "conv" and module.groups != 1):
                return [], (f"'{r.target}' pads its input (or is grouped): a shift cannot fold into it exactly")
        plans.append((r, module, name))
    if not plans:
        return [], "nothing reads the gated tensor"
    into = []
    for r, module, name in plans:
        into.append(str(r.target))
        if g.op == "mul":
            groups = module.groups if name == "conv" else 1
            _set_param(module, "weight", fold_input_scale(module.weight, v, groups))
            continue
        shift = fold_input_shift(module.weight, None, v)
        norm = _batchnorm_after(gm, r, modules) if module.bias is None else None
        if norm is None:  # a bias is created if the layer has none
            _set_param(module, "bias", shift if module.bias is None else module.bias + shift)
        else:  # no bias to create: the BatchNorm after the layer takes the shift
            owner, bias_name, qualified, weight, var, eps = norm
            _set_param(owner, bias_name, fold_shift_through_batchnorm(getattr(owner, bias_name), weight, var, eps,
                                                                     shift))
            into.append(qualified)
    return into, None


def _batchnorm_after(gm, node: fx.Node, modules):
    """The eval-mode BatchNorm that alone reads ``node``:
    (owner module, bias attribute, bias qualified name, weight, running var, eps)."""
    readers = data_readers(node, modules)
    if len(readers) != 1:
        return None
    bn = readers[0]
    if op_of(bn, modules).name != "batch_norm" or bn.args[0] is not node:
        return None
    if bn.op == "call_module":
        module = modules[str(bn.target)]
        if type(module) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) or module.bias is None \
                or module.running_var is None or _calls(modules, str(bn.target)) != 1:
            return None
        return module, "bias", f"{bn.target}.bias", module.weight, module.running_var, module.eps
    args = list(bn.args) + [None] * (8 - len(bn.args))
    get = lambda key, i: bn.kwargs.get(key, args[i])
    bias, weight, var, eps = get("bias", 4), get("weight", 3), get("running_var", 2), get("eps", 7)
    if not (isinstance(bias, fx.Node) and bias.op == "get_attr" and isinstance(var, fx.Node)
            and var.op == "get_attr"):
        return None
    fetch = lambda n: gm.get_submodule(str(n.target).rpartition(".")[0]) if "." in str(n.target) else gm
    owner = fetch(bias)
    weight_value = getattr(fetch(weight), str(weight.target).rpartition(".")[2]) \
        if isinstance(weight, fx.Node) else None
    var_value = getattr(fetch(var), str(var.target).rpartition(".")[2])
    return (owner, str(bias.target).rpartition(".")[2], str(bias.target), weight_value, var_value,
            1e-5 if eps is None else eps)


# -- the pass --------------------------------------------------------------------------------------


def _site_of(g: _Gate) -> str:
    meta = g.gate.meta.get(ASR_META) or {}
    return meta.get("site") or module_path_of(g.combine) or ""


def _fold_gated_batchnorms(gm: fx.GraphModule, evaluator: _Evaluator, report: FuseReport) -> None:
    """GatedBatchNorm(y, v) with a constant v becomes a plain BatchNorm with gamma*v, beta*v."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, GatedBatchNorm) or len(node.args) < 2:
            continue
        v = evaluator.value(node.args[1]).reshape(-1)
        bn_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[
            len(node_shape(node) or (0, 0, 0, 0))]
        like = next(iter(module.state_dict().values()), v)
        bn = bn_cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                    device=v.device, dtype=v.dtype if v.is_floating_point() else like.dtype)
        bn.load_state_dict(module.state_dict())
        w, b = fold_output_affine(module.weight, module.bias, v)
        if module.weight is not None:
            _set_param(bn, "weight", w)
        _set_param(bn, "bias", b)
        bn.train(module.training)
        path = str(node.target)
        parent, _, attr = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, bn)
        site = (node.args[1].meta.get(ASR_META) or {}).get("site") or path
        node.args = (node.args[0],)
        report.folds.append(Fold(site, "gated_bn", (path,), "producer", "folded into the BatchNorm affine"))


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
    evaluator = _Evaluator(gm)
    _fold_gated_batchnorms(gm, evaluator, report)
    replaced: dict[fx.Node, fx.Node] = {}  # a folded combine -> the node that now stands for it
    modules = _Modules(gm)  # folding changes parameters, never which modules the graph calls
    for g in constant_gates(gm):
        x = g.x
        while x in replaced:  # a gate on a tensor an earlier gate was folded from (repeats)
            x = replaced[x]
        g = dataclasses.replace(g, x=x)
        site = _site_of(g)
        x_shape = node_shape(g.x)
        value = evaluator.value(g.gate)
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
    _drop_unused_attributes(gm)
    return gm, report


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
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
