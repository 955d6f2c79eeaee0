"""Detection pass: find channel-attention sites in a traced graph by structure.

A site is a feature map x combined (mul, or add for GC-style fusion) with a gate g
such that

1. g depends on the input data only through *global reductions* of feature maps:
   reductions that leave no spatial/token axis (average/max/std pooling, adaptive
   pooling to a fixed grid, softmax-weighted pooling by matmul);
2. a *learned* op lies between those reductions and g (Linear, conv, a parameter
   multiply ...): without one, a pooled gate is a normalization (FRN, GRN,
   instance norm), not attention;
3. g is per-sample and per-channel: size 1 on every spatial axis of x, full size
   on x's channel axis.

The pass runs in three steps, as inductor's folding passes do: the *pattern*
(every mul/add with a data operand), the *legality check* (returns a reason, never
raises) and the *record* (an :class:`AttentionSite`). Refused near-misses are kept
with their reason.
"""

from __future__ import annotations


from dataclasses import dataclass, field

from networkx.utils import UnionFind
from torch import fx, nn

from ..graph.layout import has_spatial, infer_layouts, is_channel
from ..graph.ops import (
    BROADCASTS, COMBINE_ADD, COMBINE_MUL, CONTRACTIONS, POOLS, REDUCTIONS, Op, data_inputs,
    is_shape_query, node_shape, op_of,
)
from ..graph.layers import LayerIndex
from ..graph.ops import module_path_of  # noqa: F401 (re-exported: detect.module_path_of)
from .absorb import plan_consumers, plan_producer, residual_add, static_sign
from .site import Absorption, AttentionSite, Combine, GateUse, Rejection, SiteKind

__all__ = ["Flow", "Detection", "analyse_flow", "detect", "module_path_of", "pool_branch"]


@dataclass(frozen=True)
class Flow:
    """How a value depends on the model's input data."""

    spatial: bool = False  # depends on input data through a path with no global reduction
    pools: frozenset[fx.Node] = frozenset()  # the global reductions it depends on data through
    learned: bool = False  # a learned op lies between those reductions and this value
    params: bool = False  # depends on parameters (constants of the graph)

    @property
    def pooled(self) -> bool:
        """Depends on data, and only through global reductions."""
        return not self.spatial and bool(self.pools)


CONST = Flow()
SPATIAL = Flow(spatial=True)

_AVG_POOLS = frozenset({"mean", "sum", "nansum", "nanmean", "adaptive_avg_pool", "avg_pool"})
_MAX_POOLS = frozenset({"amax", "amin", "max", "min", "adaptive_max_pool", "max_pool"})
_MOMENT_POOLS = frozenset({"std", "var", "std_mean", "var_mean", "norm", "vector_norm"})
# Ops with a learned operand that transform a pooled statistic (the attention network F).
_LEARNED_FUNCTIONS = frozenset(
    {"linear", "conv", "conv_transpose", "bilinear", "mul", "matmul", "bmm", "mm", "einsum",
     "addmm", "baddbmm", "addcmul"}
)
_LEARNED_MODULES = frozenset({"linear", "conv", "conv_transpose", "bilinear", "module"})


def _common_path(paths: list[str]) -> str:
    if not paths:
        return ""
    parts = [p.split(".") if p else [] for p in paths]
    prefix = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return ".".join(prefix)


# -- dataflow -------------------------------------------------------------------------


def _is_reduction(op: Op) -> bool:
    return op.name in REDUCTIONS or op.name in POOLS or op.name in CONTRACTIONS


def _removes_space(node: fx.Node, op: Op, layouts) -> bool:
    """Whether a reduction consumed every spatial axis of its data input."""
    out = layouts.get(node)
    if out is None:
        return False
    outs = out if out and not isinstance(out[0], str) else (out,)
    if any(o is None or any(has_spatial(t) for t in o) for o in outs):
        return False
    if op.name in CONTRACTIONS:
        return _contracts_space(node, op, layouts)
    src = node.args[0] if node.args else None
    lay = layouts.get(src) if isinstance(src, fx.Node) else None
    return isinstance(lay, tuple) and any("S" in t for t in lay if isinstance(t, str))


def _contracts_space(node: fx.Node, op: Op, layouts) -> bool:
    """A matmul/einsum pools only if the axis it sums over is purely spatial."""
    if op.name == "einsum":
        eq = node.args[0] if node.args and isinstance(node.args[0], str) else ""
        if "->" not in eq:
            return False
        lhs, rhs = eq.replace(" ", "").split("->")
        operands = list(node.args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        summed = set(lhs.replace(",", "")) - set(rhs)
        for term, arg in zip(lhs.split(","), operands):
            lay = layouts.get(arg) if isinstance(arg, fx.Node) else None
            if not isinstance(lay, tuple) or len(lay) != len(term):
                return False
            if any(ch in summed and lay[i] != "S" for i, ch in enumerate(term)):
                return False
        return bool(summed)
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
    la = layouts.get(a) if isinstance(a, fx.Node) else None
    lb = layouts.get(b) if isinstance(b, fx.Node) else None
    if not (isinstance(la, tuple) and isinstance(lb, tuple)) or len(la) < 2 or len(lb) < 2:
        return False
    return la[-1] == "S" and lb[-2] == "S"


def _has_params(node: fx.Node, op: Op) -> bool:
    return op.module is not None and any(True for _ in op.module.parameters())


def analyse_flow(gm: fx.GraphModule, layouts, modules: dict[str, nn.Module]) -> dict[fx.Node, Flow]:
    """Forward dataflow: for every node, what input data it depends on, and how."""
    flows: dict[fx.Node, Flow] = {}
    for node in gm.graph.nodes:
        op = op_of(node, modules)
        if node.op == "placeholder":
            flows[node] = SPATIAL
            continue
        if node.op == "get_attr":
            flows[node] = Flow(params=isinstance(_get_attr(gm, node), nn.Parameter))
            continue
        if is_shape_query(node, op):
            flows[node] = CONST  # shapes carry no data of the tensor
            continue
        ins = [flows[i] for i in data_inputs(node, op) if i in flows]
        if any(f.spatial for f in ins):
            if _is_reduction(op) and _removes_space(node, op, layouts):
                flows[node] = Flow(pools=frozenset([node]))
            else:
                flows[node] = SPATIAL
            continue
        pools = frozenset().union(*(f.pools for f in ins)) if ins else frozenset()
        params = any(f.params for f in ins) or _has_params(node, op)
        learned = any(f.learned for f in ins if f.pools)
        if pools and not learned:
            learned = _is_learned(node, op, ins)
        flows[node] = Flow(False, pools, learned, params)
    return flows


def _get_attr(gm: fx.GraphModule, node: fx.Node):
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj


def _is_learned(node: fx.Node, op: Op, ins: list[Flow]) -> bool:
    if node.op == "call_module":
        return op.name in _LEARNED_MODULES and _has_params(node, op)
    return op.name in _LEARNED_FUNCTIONS and any(f.params and not f.pools for f in ins)


# -- the pass ------------------------------------------------------------------------


@dataclass
class Detection:
    """What the detection pass found in one graph."""

    sites: list[AttentionSite] = field(default_factory=list)  # in graph order of the first combine
    rejections: list[Rejection] = field(default_factory=list)  # near-misses, with reasons
    flows: dict[fx.Node, Flow] = field(default_factory=dict, repr=False)  # dataflow of every node


@dataclass(frozen=True)
class _Match:
    use: GateUse
    channel_dim: int


def _operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    a = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        return a, b
    return None


def _strip_broadcast(node: fx.Node, modules) -> fx.Node:
    """The gate before broadcast-only ops (expand_as, expand, contiguous ...)."""
    while op_of(node, modules).name in BROADCASTS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _check_gate(x: fx.Node, g: fx.Node, combine: fx.Node, layouts) -> tuple[int | None, str]:
    """Legality of g as a per-sample, per-channel gate on x; returns (channel_dim, reason)."""
    xs, gs, out = node_shape(x), node_shape(g), node_shape(combine)
    xl, gl = layouts.get(x), layouts.get(g)
    if xs is None or gs is None or not isinstance(xl, tuple) or not isinstance(gl, tuple):
        return None, "no shape information for the operands"
    if out != xs or len(gs) > len(xs):
        return None, f"the gate {tuple(gs)} does not broadcast into the feature map {tuple(xs)}"
    if len(xs) < 2:
        return None, "the feature map has no channel axis"
    offset = len(xs) - len(gs)
    gsize = [1] * offset + list(gs)
    gtags = ["1"] * offset + list(gl)
    if xs[0] > 1 and gsize[0] == 1:
        return None, "the gate is shared by every sample (pooled over the batch)"
    if any("?" in t for t in xl):  # unknown layout: per-channel means one full-size axis
        full = [d for d in range(1, len(xs)) if gsize[d] == xs[d] and xs[d] > 1]
        rest = [d for d in range(1, len(xs)) if d not in full and gsize[d] != 1]
        if len(full) == 1 and not rest and len(xs) >= 3:
            return full[0], ""
        return None, f"cannot tell the channel axis of {tuple(xs)} for gate {tuple(gs)}"
    channel = None
    for d in range(1, len(xs)):
        tag = xl[d]
        if is_channel(tag) and gsize[d] == xs[d]:
            channel = d
        elif is_channel(tag) or tag == "O":
            continue
        elif gsize[d] != 1 or has_spatial(gtags[d]) or "G" in gtags[d]:
            return None, f"the gate varies along axis {d} of x (tagged {tag}): not a per-channel gate"
    if channel is None:
        return None, f"the gate {tuple(gs)} has no full-size channel axis of x {tuple(xs)}"
    if not any(has_spatial(xl[d]) for d in range(1, len(xs)) if d != channel):
        return None, "the feature map has no spatial or token axis to pool over"
    return channel, ""


def _match_combine(node: fx.Node, op: Op, flows, layouts, modules) -> tuple[list[_Match], list[str]]:
    pair = _operands(node)
    if pair is None:
        return [], []
    matches, reasons = [], []
    for x, operand in (pair, pair[::-1]):
        fx_, fg = flows.get(x, CONST), flows.get(operand, CONST)
        if not fx_.spatial or not fg.pooled:
            continue
        gate = _strip_broadcast(operand, modules)
        if not fg.learned:
            reasons.append("the gate is computed from pooled statistics with no learned op in "
                           "between: a normalization (FRN, GRN, instance norm), not attention")
            continue
        channel, why = _check_gate(x, gate, node, layouts)
        if channel is None:
            reasons.append(why)
            continue
        kind = Combine.MUL if op.name in COMBINE_MUL else Combine.ADD
        matches.append(_Match(GateUse(x, gate, operand, node, kind), channel))
        break
    return matches, reasons


def detect(gm: fx.GraphModule, layouts=None) -> Detection:
    """Find every channel-attention site of ``gm`` (whose nodes carry shape metadata)."""
    modules = LayerIndex(gm)
    if layouts is None:
        layouts = infer_layouts(gm)
    flows = analyse_flow(gm, layouts, modules)
    result = Detection(flows=flows)
    matches: list[_Match] = []
    for node in gm.graph.nodes:
        op = op_of(node, modules)
        if op.name not in COMBINE_MUL and op.name not in COMBINE_ADD:
            continue
        found, reasons = _match_combine(node, op, flows, layouts, modules)
        matches.extend(found)
        if not found and reasons:
            result.rejections.append(Rejection(node, module_path_of(node) or "", reasons[0]))
    # Gates computed from the same pooled statistics belong to one block (split attention).
    groups = UnionFind()
    for m in matches:
        pools = sorted(flows[m.use.gate].pools, key=lambda n: n.name)
        groups.union(m.use.combine, *pools)
    by_root: dict[fx.Node, list[_Match]] = {}
    for m in matches:
        by_root.setdefault(groups[m.use.combine], []).append(m)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for group in by_root.values():
        result.sites.append(_record(group, flows, layouts, modules, order))
    result.sites.sort(key=lambda s: order[s.combine])
    return result


# -- records ---------------------------------------------------------------------------


def _record(group: list[_Match], flows, layouts, modules, order) -> AttentionSite:
    uses = tuple(m.use for m in group)
    pools = frozenset().union(*(flows[u.gate].pools for u in uses))
    excitation = _excitation(uses, pools, flows)
    first = group[0]
    x_shape = node_shape(first.use.x)
    branch = pool_branch(uses, pools)
    internal = set(excitation) | set(pools) | branch | {u.combine for u in uses}
    kind = _classify(uses, pools, excitation, layouts, modules)
    paths = [p for n in sorted(pools | set(excitation), key=order.get) if (p := module_path_of(n))]
    all_paths = {p for n in list(pools) + list(excitation) + [u.combine for u in uses]
                 if (p := module_path_of(n))}
    return AttentionSite(
        kind=kind,
        uses=uses,
        pools=tuple(sorted(pools, key=order.get)),
        excitation=tuple(sorted(excitation, key=order.get)),
        channel_dim=first.channel_dim,
        channels=x_shape[first.channel_dim],
        gate_shape=node_shape(first.use.gate),
        absorption=_absorption(first.use, first.channel_dim, internal, modules),
        module_path=_common_path(paths),
        module_paths=tuple(sorted(all_paths)),
    )


def _excitation(uses: tuple[GateUse, ...], pools: frozenset[fx.Node], flows) -> list[fx.Node]:
    """Data nodes on paths from the pools to the combines (gate and broadcasts included)."""
    seen: set[fx.Node] = set()
    stack = [u.operand for u in uses]
    while stack:
        node = stack.pop()
        if node in seen or node in pools:
            continue
        flow = flows.get(node, CONST)
        if not (flow.pools & pools):
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return list(seen)


def pool_branch(uses: tuple[GateUse, ...], pools: frozenset[fx.Node]) -> set[fx.Node]:
    """Nodes between x and the pools (GC's mask conv and softmax, SRM's view)."""
    xs = {u.x for u in uses}
    branch: set[fx.Node] = set()
    stack = list(pools)
    while stack:
        node = stack.pop()
        for i in node.all_input_nodes:
            if i in branch or i in xs:
                continue
            # stay below x: only nodes that x reaches
            if _reaches_from(xs, i):
                branch.add(i)
                stack.append(i)
    return branch


def _reaches_from(sources: set[fx.Node], node: fx.Node, limit: int = 64) -> bool:
    stack, seen = [node], set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in sources:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _classify(uses, pools, excitation, layouts, modules) -> SiteKind:
    pool_ops = {op_of(p, modules).name for p in pools}
    ex_ops = [(n, op_of(n, modules)) for n in excitation]
    names = {op.name for _, op in ex_ops}
    if "softmax" in names and (len(uses) > 1 or _gates_over_groups(uses[0], layouts)):
        return SiteKind.SPLIT
    if pool_ops & CONTRACTIONS or any(u.op is Combine.ADD for u in uses):
        return SiteKind.GC
    if any(op_of(p, modules).name.startswith("adaptive") and _grid(p) > 1 for p in pools):
        return SiteKind.SPA
    if pool_ops & _MOMENT_POOLS:
        return SiteKind.SRM
    if pool_ops & _AVG_POOLS and pool_ops & _MAX_POOLS:
        return SiteKind.CBAM_CHANNEL
    mixers = [op for n, op in ex_ops if op.name in ("linear", "conv", "conv_transpose", "matmul", "mm",
                                                   "bmm", "einsum", "addmm", "module", "bilinear")]
    if mixers and all(op.name == "conv" and op.dims == 1 for op in mixers):
        return SiteKind.ECA
    if not mixers:
        return SiteKind.IE
    if pool_ops <= _AVG_POOLS:
        return SiteKind.SE
    return SiteKind.OTHER


def _gates_over_groups(use: GateUse, layouts) -> bool:
    xl, gs = layouts.get(use.x), node_shape(use.gate)
    if not isinstance(xl, tuple) or gs is None:
        return False
    offset = len(xl) - len(gs)
    return any(xl[d] == "O" and gs[d - offset] > 1 for d in range(max(offset, 0), len(xl)))


def _grid(pool: fx.Node) -> int:
    shape = node_shape(pool) or ()
    size = 1
    for s in shape[2:]:
        size *= s
    return size


def _absorption(use: GateUse, channel_dim: int, internal: set[fx.Node], modules: LayerIndex) -> Absorption:
    """Where the gate will fold: the plan fuse follows (producer first, then consumers), read
    from the rule table. The gate's values are unknown here: its sign comes from its last op
    (a sigmoid gate is non-negative), and a fold that needs a sign it cannot know says so."""
    axes = _gate_axes(use, channel_dim)
    sign = static_sign(use.gate, modules)
    combine, ignore = use.combine, frozenset(internal - {use.combine})
    residual = residual_add(use.x, use.combine, modules) if use.op is Combine.MUL else None
    if residual is not None:  # x + x * g: fuse folds the scale 1 + g
        combine, ignore = residual, ignore | {use.combine}
    producer = plan_producer(use.x, combine, axes, use.op.value, sign, modules, optimistic=True, ignore=ignore)
    plan = producer
    if not producer.ok:
        plan = plan_consumers(combine, axes, use.op.value, sign, modules, optimistic=True, ignore=ignore)
    if not plan.ok:
        return Absorption(use.x, "kept", (), (), f"stays a multiply: producer: {producer.reason}; "
                                                  f"consumers: {plan.reason}")
    through = tuple(dict.fromkeys(n for t in plan.targets for n in t.through))
    text = plan.describe(modules)
    if plan is not producer:
        text += f" (producer: {producer.reason})"
    return Absorption(use.x, plan.side, tuple(t.node for t in plan.targets), through, text)


def _gate_axes(use: GateUse, channel_dim: int) -> tuple[int, int]:
    """The axes of x the gate runs along: the channel axis, or adjacent axes (split attention)."""
    xs, gs = node_shape(use.x), node_shape(use.gate)
    if xs is None or gs is None:
        return channel_dim, channel_dim
    full = (1,) * (len(xs) - len(gs)) + tuple(gs)
    axes = [d for d in range(1, len(xs)) if full[d] != 1 and full[d] == xs[d]]
    if axes and axes == list(range(axes[0], axes[-1] + 1)) and channel_dim in axes:
        return axes[0], axes[-1]
    return channel_dim, channel_dim
