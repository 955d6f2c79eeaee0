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
from ..graph.dataflow import ancestors
from ..graph.edit import finish, rewire_inplace
from ..graph.layers import LayerIndex, layer_of, set_parameter
from .absorb import Plan, plan_consumers, plan_producer, residual_add, value_sign
from ..nn.gated_norm import GatedBatchNorm
from ..graph.ops import is_shape_query, module_path_of, node_shape, op_of
from .contract import ASR_META, ConstantGate, Role, constant_gates, mark, role_of, site_of

__all__ = ["Fold", "FuseReport", "fuse_graph", "ConstantEvaluator", "drop_unused_attributes"]


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


def _fold_gated_batchnorms(gm: fx.GraphModule, evaluator: ConstantEvaluator, report: FuseReport) -> None:
    """GatedBatchNorm(y, v) with a constant v becomes a plain BatchNorm with gamma*v, beta*v; one
    Fold per gate, naming every BatchNorm that took a share of it (branches of a sum, parts of a cat)."""
    modules = dict(gm.named_modules())
    gates: dict[fx.Node, tuple[str, list[str]]] = {}  # the gate's vector -> (site, BatchNorms)
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
            set_parameter(bn, "weight", w)
        set_parameter(bn, "bias", b)
        bn.train(module.training)
        path = str(node.target)
        parent, _, attr = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, bn)
        vector = next(n for n in ancestors(node.args[1]) if role_of(n) or n.op != "call_function")
        site = site_of(vector) or path
        gates.setdefault(vector, (site, []))[1].append(path)
        node.args = (node.args[0],)
    for site, paths in gates.values():
        report.folds.append(Fold(site, "gated_bn", tuple(paths), "producer", "folded into the BatchNorm affine"))


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


def fuse_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, FuseReport]:
    """Fold every constant gate of ``gm`` (eval mode, nodes with shapes) in place."""
    report = FuseReport()
    rewire_inplace(gm)  # a GraphModule asrfx did not trace may read a tensor after writing into it
    _residual_gates_to_scales(gm)
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
        value = evaluator.value(g.gate)
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
