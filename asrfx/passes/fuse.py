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

from ..errors import AsrfxError
from ..algebra.fold import (
    embed,
    fold_conv_transpose_input_scale,
    fold_conv_transpose_output_affine,
    fold_input_scale,
    fold_input_shift,
    fold_output_affine,
    fold_scale_into_batchnorm_input,
    fold_shift_through_batchnorm,
    scale_along,
    shift_along,
)
from ..graph.dataflow import ancestors, input_dependence
from ..graph.edit import copy_meta, finish, rewire_inplace, unique_attr_name
from ..graph.layers import LayerIndex, layer_of, set_parameter
from .absorb import Plan, label_of, plan_consumers, plan_producer, residual_add, value_sign
from ..nn.gated_layers import WeightGated
from ..nn.gated_norm import GatedBatchNorm
from ..graph.ops import argument, is_shape_query, module_path_of, node_shape, op_of
from .contract import ASR_META, ConstantGate, Role, constant_gates, mark, psi_dependent, role_of, site_of

__all__ = ["Fold", "FuseReport", "fuse_graph", "ConstantEvaluator", "drop_unused_attributes", "fold_psi_remainders"]


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

    def verdict(self, parameters: int, backbone: int | None) -> str:
        """Whether the deployed model is the plain backbone: equal parameter counts and no gate op
        left (fuse checks that nothing but the kept gates remains); otherwise what differs."""
        same = backbone is None or parameters == backbone
        if same and not self.kept:
            return "the plain backbone: " + ("equal parameters, " if backbone is not None else "") + "no gate op left"
        parts = [] if same else [f"{parameters:,} parameters, the backbone has {backbone:,}"]
        if self.kept:
            parts.append(f"{len(self.kept)} gate(s) kept as a constant multiply (first: {self.kept[0].site or '(top level)'}: "
                         f"{self.kept[0].reason})")
        return "not the plain backbone: " + "; ".join(parts)

    def __str__(self) -> str:
        folded = len(self.folds) - len(self.kept)
        lines = [f"asrfx.fuse: {folded} gate(s) folded, {len(self.kept)} kept"]
        for f in self.folds:
            target = ", ".join(f.into) if f.into else "-"
            lines.append(f"  {f.site or '(top level)'} [{f.op}] {f.where}: {target}; {f.reason}")
        return "\n".join(lines)


# -- constants ------------------------------------------------------------------------------


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
        """x.size(), x.size(i), x.shape, x.dtype, x.device from metadata: the input is not needed."""
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        shape = node_shape(src) if src is not None else None
        if shape is None:
            raise AsrfxError(f"'{n.name}' reads the shape of '{src}', which has no shape metadata")
        size = torch.Size(shape)
        if n.op == "call_function" and n.target is getattr:
            attr = n.args[1]
            if attr == "dtype":
                return src.meta["tensor_meta"].dtype
            if attr == "device":
                if "device" not in src.meta:
                    raise AsrfxError(f"'{n.name}' reads the device of '{src}', which has no device metadata")
                return src.meta["device"]
            if attr == "ndim":
                return len(size)
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


# -- folding into layers ------------------------------------------------------------------------


def _gate_axes(value: torch.Tensor, x_shape: tuple[int, ...]) -> tuple[torch.Tensor | None, tuple[int, int], str]:
    """The gate as one vector over x's axes lo..hi (one axis, or adjacent axes that a reshape made
    from one channel axis, as split attention's [N, radix, C, 1, 1]), or a reason it is not one."""
    if value.dim() > len(x_shape):
        return None, (0, 0), f"gate {tuple(value.shape)} has more axes than x {x_shape}"
    full = (1,) * (len(x_shape) - value.dim()) + tuple(value.shape)
    axes = [d for d, s in enumerate(full) if s != 1]
    if not axes:
        return None, (0, 0), f"gate {tuple(value.shape)} is one number, not a per-channel vector"
    lo, hi = axes[0], axes[-1]
    if axes != list(range(lo, hi + 1)) or any(full[d] != x_shape[d] for d in axes) or lo == 0:
        return None, (0, 0), f"gate {tuple(value.shape)} does not run along a channel axis of x {x_shape}"
    return value.reshape(-1), (lo, hi), ""


def _apply(plan: Plan, v: torch.Tensor, op: str, modules: LayerIndex) -> list[str]:
    """Rewrite: every target of the plan absorbs its part of ``v`` (the plan was checked whole)."""
    into: list[str] = []
    neutral = 1.0 if op == "mul" else 0.0
    for t in plan.targets:
        vec = embed(v[t.span.start:t.span.stop], t.span.offset, t.width, neutral)
        if t.kind == "parameter":
            owner, attr = _owner(t.node.graph.owning_module, str(t.node.target))
            tensor = getattr(owner, attr)
            fold = scale_along if op == "mul" else shift_along
            set_parameter(owner, attr, fold(tensor, vec.to(tensor.dtype), t.span.axis))
            into.append(str(t.node.target))
            continue
        layer = layer_of(t.node, modules)
        into.append(layer.label)
        if t.side == "output":
            scale, shift = (vec, None) if op == "mul" else (None, vec)
            if layer.name == "conv_transpose":
                w, b = fold_conv_transpose_output_affine(layer.weight, layer.bias, layer.groups, scale, shift)
            else:
                w, b = fold_output_affine(layer.weight, layer.bias, scale, shift)
            for part, value in (("weight", w), ("bias", b)):
                if part in t.parts and value is not None:
                    layer.set(part, value)
        elif layer.name == "batch_norm":
            if op == "mul":
                mean, w, b = fold_scale_into_batchnorm_input(layer.running_mean, layer.weight, layer.bias,
                                                             layer.running_var, layer.eps, vec)
                for part, value in (("running_mean", mean), ("weight", w), ("bias", b)):
                    layer.set(part, value)
            else:
                layer.set("bias", fold_shift_through_batchnorm(layer.bias, layer.weight, layer.running_var,
                                                               layer.eps, vec))
        elif op == "mul":
            layer.set("weight", fold_conv_transpose_input_scale(layer.weight, vec) if layer.name == "conv_transpose"
                      else fold_input_scale(layer.weight, vec, layer.groups))
        else:
            shift = fold_input_shift(layer.weight, None, vec, layer.groups)
            if layer.bias is None and t.shift_into is not None:  # no bias to create: the BatchNorm after takes it
                norm = layer_of(t.shift_into, modules)
                norm.set("bias", fold_shift_through_batchnorm(norm.bias, norm.weight, norm.running_var, norm.eps,
                                                              shift))
                into.append(norm.qualified_bias or norm.label)
            else:
                layer.set("bias", shift if layer.bias is None else layer.bias + shift)
    return into


def _owner(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    path, _, attr = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), attr


def _plans(g: ConstantGate, v: torch.Tensor, axes: tuple[int, int], modules: LayerIndex) -> tuple[Plan, Plan | None]:
    """The producer plan, and the consumers plan when the producer cannot take the gate."""
    sign = value_sign(v)
    producer = plan_producer(g.x, g.combine, axes, g.op, sign, modules)
    if producer.ok:
        return producer, None
    return producer, plan_consumers(g.combine, axes, g.op, sign, modules)


# -- the pass --------------------------------------------------------------------------------------


def _site_of(g: ConstantGate) -> str:
    return site_of(g.gate) or module_path_of(g.combine) or ""


def _fold_gated_layers(gm: fx.GraphModule, evaluator: ConstantEvaluator, report: FuseReport) -> None:
    """Layers convert made apply a constant gate while training become plain layers with the gate in
    their parameters: GatedBatchNorm(y, v) a BatchNorm with gamma*v, beta*v (producer side); a gated
    conv or linear layer (:mod:`asrfx.nn.gated_layers`) the plain layer with its input-channel
    weights scaled (consumer side). One Fold per gate, naming every layer that took a share of it
    (branches of a sum, parts of a cat, the readers of the gated tensor)."""
    modules = dict(gm.named_modules())
    gates: dict[tuple[fx.Node, str], tuple[str, list[str], set[str]]] = {}  # (vector, side) -> (site, layers, kinds)
    for node in list(gm.graph.nodes):
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, (GatedBatchNorm, WeightGated)) or len(node.args) < 2:
            continue
        path = str(node.target)
        vectors = [n for n in ancestors(node.args[1]) if role_of(n) == Role.GATE_VECTOR] or \
            [next(n for n in ancestors(node.args[1]) if role_of(n) or n.op != "call_function")]
        v = _finite(evaluator.value(node.args[1]), site_of(vectors[0]) or path).reshape(-1)
        if isinstance(module, WeightGated):
            plain, side = module.folded(v), "consumers" if module.gate_side == "input" else "producer"
        else:
            plain, side = _plain_batchnorm(module, v, len(node_shape(node) or (0, 0, 0, 0))), "producer"
        parent, _, attr = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, plain)
        for vector in vectors:  # a layer that applied two gates (repeats) took a share of each
            entry = gates.setdefault((vector, side), (site_of(vector) or path, [], set()))
            entry[1].append(path)
            entry[2].add("norm" if isinstance(module, GatedBatchNorm) else "weight")
        node.args = (node.args[0],)
    for (_, side), (site, paths, kinds) in gates.items():
        if kinds == {"norm"}:  # GatedBatchNorm and its synchronized twin
            report.folds.append(Fold(site, "gated_bn", tuple(paths), "producer", "folded into the BatchNorm affine"))
        else:
            what = "input-channel weights" if side == "consumers" else "affine parameters (output channels)"
            report.folds.append(Fold(site, "mul", tuple(paths), side,
                                     f"folded into the {what} of the layers that applied it while training"))


def _plain_batchnorm(module: GatedBatchNorm, v: torch.Tensor, rank: int) -> nn.Module:
    """The BatchNorm computing ``GatedBatchNorm(y, v)`` for a constant v (paper eq. 7)."""
    bn_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    like = next(iter(module.state_dict().values()), v)
    bn = bn_cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                device=v.device, dtype=v.dtype if v.is_floating_point() else like.dtype)
    bn.load_state_dict(module.state_dict())
    w, b = fold_output_affine(module.weight, module.bias, v)
    if module.weight is not None:
        set_parameter(bn, "weight", w)
    set_parameter(bn, "bias", b)
    bn.train(module.training)
    return bn


def fold_psi_remainders(gm: fx.GraphModule, report: FuseReport) -> None:
    """What is left of a psi branch after the gates folded: each psi-derived value that a
    data-reading call consumes (a gate convert applied inside a layer reaches the call as
    ``weight * gate``: inlined by Dynamo or torch.export, or a functional call's weight) is
    evaluated once. It goes into the parameter it was computed from when there is one such
    parameter of its shape that nothing else reads (the parameter keeps its name: the graph
    reads ``conv.weight`` again, as the backbone does); otherwise it becomes one stored constant."""
    dependent = psi_dependent(gm)
    if not dependent:
        return
    # shape reads count as data here: a psi value shaped by the batch (view(g, x.size(0), ...))
    # must not be frozen at the example's batch size
    reads_data = input_dependence(gm, shape_reads=True)
    evaluator = ConstantEvaluator(gm)
    modules = dict(gm.named_modules())
    absorbed: dict[tuple[str, str, str], None] = {}  # (site, call, kind) in order, each reported once
    bias_too: set[tuple[str, str, str]] = set()  # calls whose bias took the gate as well (output side)
    for node in list(gm.graph.nodes):
        if node not in dependent or reads_data[node] or node.op == "get_attr":
            continue
        users = [u for u in node.users if u not in dependent or reads_data[u]]
        if not users:
            continue
        value = evaluator.value(node)
        if not isinstance(value, torch.Tensor):
            continue
        const = _into_source_parameter(gm, node, value, dependent) or _stored_constant(gm, node, value)
        site = _psi_site(node)
        for user in users:
            if argument(user, 2, "bias") is node:  # the gate reached the call's bias: its output side
                bias_too.add((site, user.name, "bias"))
            user.replace_input_with(node, const)
            absorbed[(site, user.name, op_of(user, modules).name)] = None
    for site, call, kind in absorbed:
        if kind in ("conv", "linear", "conv_transpose") and (site, call, "bias") not in bias_too:
            report.folds.append(Fold(site, "mul", (call,), "consumers",
                                     "folded into the weight of the call that applied the gate"))
        else:
            report.folds.append(Fold(site, "gated_bn" if kind == "batch_norm" else "mul", (call,), "producer",
                                     "folded into the affine parameters of the call that applied the gate"))
    finish(gm)
    drop_unused_attributes(gm)


# Ops on the way from a layer's parameter to ``parameter * gate`` (a GatedBatchNorm or a gated conv
# inlined by Dynamo or torch.export, convert's functional-call weights): the walk looks for the
# parameter through these only, so the excitation's own parameters behind the gate are not taken.
_ON_WEIGHT_PATH = frozenset({"mul", "reshape", "view", "flatten", "unsqueeze", "squeeze", "expand", "contiguous",
                             "getitem", "pad", "clone", "to"})


def _into_source_parameter(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor,
                           dependent: set[fx.Node]) -> fx.Node | None:
    """``node`` (``weight * gate``) computed from exactly one stored tensor of its shape, read nowhere
    else: that tensor takes the value, and its get_attr stands for ``node``."""
    sources, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n not in dependent:  # the parameter side: a stored tensor of the value's shape in there
            sources.extend(a for a in ancestors(n) if a.op == "get_attr" and a not in sources
                           and tuple(getattr(_attribute(gm, str(a.target)), "shape", ())) == tuple(value.shape))
        elif n is node or op_of(n, {}).name in _ON_WEIGHT_PATH:
            stack.extend(n.all_input_nodes)
    if len(sources) != 1:
        return None
    source = sources[0]
    inside = set(ancestors(node))
    if len(gm.graph.find_nodes(op="get_attr", target=source.target)) != 1 or \
            any(u not in inside for u in source.users):
        return None
    owner, _, attr = str(source.target).rpartition(".")
    set_parameter(gm.get_submodule(owner) if owner else gm, attr, value)
    return source


def _stored_constant(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> fx.Node:
    attr = unique_attr_name(gm, "asr_constant")
    # it stands for parameters (a BatchNorm's weight times the gate): it stays one
    gm.register_parameter(attr, nn.Parameter(value.detach().clone(), requires_grad=False))
    with gm.graph.inserting_before(node):
        const = gm.graph.get_attr(attr)
    copy_meta(node, const)
    const.meta.pop(ASR_META, None)  # a constant now, not a psi
    return const


def _attribute(gm: fx.GraphModule, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr, None)


def _psi_site(node: fx.Node) -> str:
    """The attention block of the psi a node is computed from."""
    return next((site_of(n) for n in ancestors(node) if role_of(n) == Role.PSI), "") or ""


def _finite(value: Any, site: str) -> Any:
    """Refuse a gate that is NaN or infinite (a diverged run): folded, it would make every output NaN."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise AsrfxError(f"the gate of '{site or '(top level)'}' has {bad} NaN or infinite value(s) of "
                         f"{value.numel()}: fuse would write them into the deployed weights. Check the trained "
                         "psi and excitation parameters (a diverged run?) and fuse a finite checkpoint")
    return value


def _keep_constant(gm: fx.GraphModule, g: ConstantGate, value: torch.Tensor) -> None:
    """The gate stays as one stored constant (a buffer); its psi branch goes away."""
    name, i = "asr_gate", 0
    while hasattr(gm, f"{name}_{i}"):
        i += 1
    gm.register_buffer(f"{name}_{i}", value.detach().clone())
    with gm.graph.inserting_before(g.combine):
        const = gm.graph.get_attr(f"{name}_{i}")
    g.combine.replace_input_with(g.operand, const)


def _residual_gates_to_scales(gm: fx.GraphModule) -> None:
    """``x + x * g`` becomes ``x * (1 + g)``: one per-channel scale, which folds like any other."""
    modules = dict(gm.named_modules())
    for g in constant_gates(gm):
        add = residual_add(g.x, g.combine, modules) if g.op == "mul" else None
        if add is None:
            continue
        with gm.graph.inserting_before(g.combine):
            one_plus = gm.graph.call_function(torch.add, (g.operand, 1.0))
            scaled = gm.graph.call_function(torch.mul, (g.x, one_plus))
        if site_of(g.gate):
            mark(one_plus, Role.GATE, site_of(g.gate))
        scaled.meta.update({k: v for k, v in add.meta.items() if k != ASR_META})
        add.replace_all_uses_with(scaled)
        gm.graph.erase_node(add)
        gm.graph.erase_node(g.combine)


PLACEMENTS = ("producer", "balanced")


def fuse_graph(gm: fx.GraphModule, placement: str = "producer") -> tuple[fx.GraphModule, FuseReport]:
    """Fold every constant gate of ``gm`` (eval mode, nodes with shapes) in place.

    ``placement="balanced"``: after folding, each gate folded into one producer layer is shared
    with the layers that read it (:func:`balance_folds`), for INT8 with per-tensor weight scales."""
    if placement not in PLACEMENTS:
        raise ValueError(f"fuse(placement=...) takes one of {PLACEMENTS}, got {placement!r}")
    report = FuseReport()
    rewire_inplace(gm)  # a GraphModule asrfx did not trace may read a tensor after writing into it
    _residual_gates_to_scales(gm)
    evaluator = ConstantEvaluator(gm)
    _fold_gated_layers(gm, evaluator, report)
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
        v, axes, why = _gate_axes(value, x_shape) if x_shape is not None else (None, (0, 0), "no shape for x")
        if v is None:
            _keep_constant(gm, g, value)
            report.folds.append(Fold(site, g.op, (), "kept", why))
            continue
        producer, consumers = _plans(g, v, axes, modules)
        plan = producer if consumers is None else consumers
        if not plan.ok:
            _keep_constant(gm, g, value)
            report.folds.append(Fold(site, g.op, (), "kept",
                                     f"producer: {producer.reason}; consumers: {consumers.reason}"))
            continue
        into = _apply(plan, v, g.op, modules)
        g.combine.replace_all_uses_with(g.x)
        replaced[g.combine] = g.x
        gm.graph.erase_node(g.combine)
        note = f" ({producer.reason})" if consumers is not None else ""
        report.folds.append(Fold(site, g.op, tuple(into), plan.side, f"folded into the {plan.side}{note}"))
    finish(gm)
    drop_unused_attributes(gm)
    fold_psi_remainders(gm, report)
    if placement == "balanced":
        balance_folds(gm, report)
    return gm, report


def balance_folds(gm: fx.GraphModule, report: FuseReport) -> None:
    """Share each producer-side fold with the layers that read the producer (cross-layer equalization).

    A gate folded into a producer scales its output channels by v, which widens the spread of
    its per-channel weight ranges: a per-tensor INT8 weight scale then fits the largest channels
    and rounds the small ones coarsely (what hurt re-parameterized networks such as RepVGG).
    Here each producer channel i is divided by ``s_i = sqrt(r_p_i / r_c_i)`` and every consumer's
    input channel i multiplied by it (``r_p``: the range of the producer's channel, including a
    conv right before a BatchNorm; ``r_c``: the largest range of the consumers' input columns),
    so both become ``sqrt(r_p_i r_c_i)``. Exact: s > 0 passes ReLU and max pooling. Applies
    where the gate went into one BatchNorm, conv or linear layer on axis 1 and the consumers
    plan reaches only convs (groups 1) and linear layers; other folds stay as they are."""
    modules = LayerIndex(gm)
    calls = {label_of(n): n for n in gm.graph.nodes if n.op in ("call_module", "call_function")}
    for k, fold in enumerate(report.folds):
        node = calls.get(fold.into[0]) if fold.where == "producer" and len(fold.into) == 1 else None
        producer = layer_of(node, modules) if node is not None else None
        if producer is None or isinstance(producer, str) or producer.weight is None or producer.computed:
            continue
        r_p = _producer_ranges(node, producer, modules)
        plan = plan_consumers(node, 1, "mul", lambda start, stop: True, modules)
        if r_p is None or not plan.ok:
            continue
        r_c = torch.zeros_like(r_p)
        layers = []
        for t in plan.targets:
            layer = layer_of(t.node, modules)
            if t.side != "input" or isinstance(layer, str) or layer.name not in ("conv", "linear") \
                    or layer.groups != 1 or layer.weight is None or layer.computed:
                break
            columns = layer.weight.detach().abs().transpose(0, 1).flatten(1).amax(1)
            part = columns[t.span.offset: t.span.offset + t.span.stop - t.span.start]
            r_c[t.span.start:t.span.stop] = torch.maximum(r_c[t.span.start:t.span.stop], part.to(r_c.dtype))
            layers.append((t, layer))
        else:
            ok = (r_p > 0) & (r_c > 0)
            scale = torch.where(ok, torch.sqrt(r_p / torch.where(ok, r_c, torch.ones_like(r_c))), torch.ones_like(r_p))
            w, b = fold_output_affine(producer.weight, producer.bias, 1 / scale)
            producer.set("weight", w)
            if b is not None:
                producer.set("bias", b)
            for t, layer in layers:
                part = embed(scale[t.span.start:t.span.stop], t.span.offset, t.width, 1.0)
                layer.set("weight", fold_input_scale(layer.weight, part.to(layer.weight.dtype), layer.groups))
            report.folds[k] = dataclasses.replace(
                fold, into=fold.into + tuple(layer.label for _, layer in layers),
                reason=fold.reason + "; balanced with its consumers (equal per-channel weight ranges, for INT8)")


def _producer_ranges(node: fx.Node, layer, modules: LayerIndex) -> torch.Tensor | None:
    """Per output channel, the largest |weight| the producer applies (a BatchNorm: its scale times the
    rows of the conv or linear layer it alone normalizes); None when it has no such channels."""
    with torch.no_grad():
        if layer.name in ("conv", "linear"):
            return layer.weight.detach().abs().flatten(1).amax(1)
        if layer.name != "batch_norm" or layer.running_var is None:
            return None
        scale = layer.weight.detach().abs() / torch.sqrt(layer.running_var + layer.eps)
        src = node.args[0] if node.args else None
        before = layer_of(src, modules) if isinstance(src, fx.Node) and src.op != "placeholder" else None
        if before is not None and not isinstance(before, str) and before.name in ("conv", "linear") \
                and before.weight is not None and len(src.users) == 1:
            return scale * before.weight.detach().abs().flatten(1).amax(1)
        return scale


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
