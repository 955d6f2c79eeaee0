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

from ..graph.layout import has_spatial, infer_layouts, is_channel, is_unknown, unknown_origins
from ..graph.ops import (
    BROADCASTS, COMBINE_ADD, COMBINE_MUL, CONTRACTIONS, POOLS, REDUCTIONS, RESHAPES, Op, data_inputs,
    is_shape_query, node_shape, op_of,
)
from ..graph.layers import LayerIndex
from ..graph.ops import module_path_of  # noqa: F401 (re-exported: detect.module_path_of)
from .absorb import label_of, plan_consumers, plan_producer, residual_add, static_sign
from .site import Absorption, AttentionSite, Combine, GateUse, LayoutLoss, Rejection, SiteKind, Verdict

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
    if not (isinstance(lay, tuple) and all(isinstance(t, str) for t in lay)):
        return False
    if op.name in POOLS:  # a pool works on its last k axes, positions by definition, even if unknown
        pooled = lay[-(op.dims or max(len(lay) - 2, 1)):]
        return any("S" in t or "?" in t for t in pooled)
    return any("S" in t for t in lay)


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
    rejections: list[Rejection] = field(default_factory=list)  # near-misses and attention-like refusals, with reasons
    layout_losses: list[LayoutLoss] = field(default_factory=list)  # where the axis layout became unknown
    flows: dict[fx.Node, Flow] = field(default_factory=dict, repr=False)  # dataflow of every node


@dataclass(frozen=True)
class _Match:
    use: GateUse  # the gate application found
    channel_dim: int  # the axis of x it scales


@dataclass(frozen=True)
class _Refusal:
    reason: str  # why a pooled gate is not a per-sample, per-channel gate on x
    undecided: bool = False  # the layout or shapes were not known well enough to tell


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


def _check_gate(x: fx.Node, g: fx.Node, combine: fx.Node, layouts) -> tuple[int | None, _Refusal | None]:
    """Legality of g as a per-sample, per-channel gate on x; returns (channel_dim, refusal)."""
    xs, gs, out = node_shape(x), node_shape(g), node_shape(combine)
    xl, gl = layouts.get(x), layouts.get(g)
    if xs is None or gs is None or not isinstance(xl, tuple) or not isinstance(gl, tuple):
        return None, _Refusal("no shape information for the operands", undecided=True)
    if out != xs or len(gs) > len(xs):
        return None, _Refusal(f"the gate {tuple(gs)} does not broadcast into the feature map {tuple(xs)}")
    if len(xs) < 2:
        return None, _Refusal("the feature map has no channel axis")
    offset = len(xs) - len(gs)
    gsize = [1] * offset + list(gs)
    gtags = ["1"] * offset + list(gl)
    if xs[0] > 1 and gsize[0] == 1:
        return None, _Refusal("the gate is shared by every sample (pooled over the batch)")
    if any("?" in t for t in xl):  # unknown layout: per-channel means one full-size axis
        full = [d for d in range(1, len(xs)) if gsize[d] == xs[d] and xs[d] > 1]
        rest = [d for d in range(1, len(xs)) if d not in full and gsize[d] != 1]
        if len(full) == 1 and not rest and len(xs) >= 3:
            return full[0], None
        return None, _Refusal(f"cannot tell the channel axis of {tuple(xs)} (axes tagged {_tags(xl)}) "
                              f"for gate {tuple(gs)}", undecided=True)
    channel = None
    for d in range(1, len(xs)):
        tag = xl[d]
        if is_channel(tag) and gsize[d] == xs[d]:
            channel = d
        elif is_channel(tag) or tag == "O":
            continue
        elif gsize[d] != 1 or has_spatial(gtags[d]) or "G" in gtags[d]:
            return None, _Refusal(f"the gate varies along axis {d} of x (tagged {tag}): not a per-channel gate")
    if channel is None:
        return None, _Refusal(f"the gate {tuple(gs)} has no full-size channel axis of x {tuple(xs)}")
    if not any(has_spatial(xl[d]) for d in range(1, len(xs)) if d != channel):
        return None, _Refusal("the feature map has no spatial or token axis to pool over")
    return channel, None


def _match_combine(node: fx.Node, op: Op, flows, layouts, modules) -> tuple[list[_Match], list[_Refusal]]:
    pair = _operands(node)
    if pair is None:
        return [], []
    matches, refusals = [], []
    for x, operand in (pair, pair[::-1]):
        fx_, fg = flows.get(x, CONST), flows.get(operand, CONST)
        if not fx_.spatial or not fg.pooled:
            continue
        gate = _strip_broadcast(operand, modules)
        if not fg.learned:
            refusals.append(_Refusal("the gate is computed from pooled statistics with no learned op in "
                                     "between: a normalization (FRN, GRN, instance norm), not attention"))
            continue
        channel, refusal = _check_gate(x, gate, node, layouts)
        if channel is None:
            refusals.append(refusal)
            continue
        kind = Combine.MUL if op.name in COMBINE_MUL else Combine.ADD
        matches.append(_Match(GateUse(x, gate, operand, node, kind), channel))
        break
    return matches, refusals


# -- never a silent miss ---------------------------------------------------------------
#
# A combine is *attention-like* when one operand g is a gate-like activation (sigmoid,
# hard sigmoid, softmax, tanh, relu6/hardtanh of a hand-written hard sigmoid; reached
# through broadcasts, reshapes, casts, arithmetic with non-feature-map values and ops asrfx
# has no name for) of values computed by at least one learned op from a reduction that
# leaves no spatial axis (by the layout), and that reduction reads x or a tensor computed
# from x (or one x is computed from a few ops later). Every attention-like combine that is
# not a site is kept as a Rejection (docs/architecture.md, "Never a silent miss").

# Activations that squash a value into a gate.
_GATE_ACTIVATIONS = frozenset({"sigmoid", "hardsigmoid", "softmax", "tanh", "relu6", "hardtanh"})
# Ops between a gate activation and the combine that keep it a gate.
_GATE_CARRIERS = BROADCASTS | RESHAPES | frozenset(
    {"getitem", "permute", "transpose", "to", "type_as", "float", "half", "dropout", "identity",
     "mul", "div", "add", "sub"})
# Elementwise ops other than mul/add that may join a feature map and a gate.
_OTHER_COMBINES = frozenset({"div", "sub", "einsum"})
_WALK_LIMIT = 64  # nodes examined behind a gate: an excitation is small


@dataclass(frozen=True)
class _Pattern:
    x: fx.Node  # the feature map the gate meets
    pool: fx.Node  # the reduction the gate is computed from
    activation: fx.Node  # the gate-like activation
    nodes: frozenset[fx.Node]  # nodes between the combine and the reduction (activation included)


def _reads_data(flow: Flow) -> bool:
    return flow.spatial or bool(flow.pools)


def _gate_activation(g: fx.Node, x: fx.Node, flows, modules, limit: int = 8) -> tuple[fx.Node | None, tuple]:
    """The gate-like activation that ``g`` carries (through broadcasts, reshapes, casts,
    arithmetic and ops asrfx has no name for), and the nodes on the way to it."""
    stack, seen = [(g, ())], set()
    while stack and len(seen) < _WALK_LIMIT:
        node, path = stack.pop()
        if node in seen or len(path) > limit:
            continue
        seen.add(node)
        op = op_of(node, modules)
        if op.name in _GATE_ACTIVATIONS:
            return node, path
        data = [i for i in data_inputs(node, op) if _reads_data(flows.get(i, CONST))]
        if op.name in ("function", "module"):  # an op asrfx does not read: any input may carry the gate
            stack.extend((i, path + (node,)) for i in data if i is not x)
        elif op.name in _GATE_CARRIERS and (len(data) == 1 or not any(flows.get(i, CONST).spatial for i in data)):
            # a gate times a feature map is a gated feature map, not a gate (x + x * g is no gate)
            stack.extend((i, path + (node,)) for i in data if i is not x)
    return None, ()


def _looks_global(node: fx.Node, layouts) -> bool:
    """A reduction whose result has no spatial axis left, by the layout."""
    out = layouts.get(node)
    if not isinstance(out, tuple):
        return False
    parts = out if out and not isinstance(out[0], str) else (out,)
    return all(p is not None and not any("S" in t for t in p) for p in parts)


def _attention_like(x: fx.Node, g: fx.Node, flows, layouts, modules) -> _Pattern | None:
    if not _reads_data(flows.get(x, CONST)) or not _reads_data(flows.get(g, CONST)):
        return None
    act, carriers = _gate_activation(g, x, flows, modules)
    if act is None:
        return None
    walked: set[fx.Node] = set()
    pools: list[fx.Node] = []
    stack = [act]
    while stack and len(walked) < _WALK_LIMIT:
        n = stack.pop()
        if n in walked or n is x:
            continue
        op = op_of(n, modules)
        if n is not act and (op.name in REDUCTIONS or op.name in POOLS or op.name in CONTRACTIONS) \
                and _looks_global(n, layouts):
            pools.append(n)  # not past it: behind a pooling lies the feature map
            continue
        walked.add(n)
        stack.extend(i for i in data_inputs(n, op) if _reads_data(flows.get(i, CONST)))
    for pool in pools:
        src = pool.args[0] if pool.args and isinstance(pool.args[0], fx.Node) else None
        if src is None or not (src is x or _reaches_from({x}, src) or _reaches_from({src}, x, limit=8)):
            continue
        if any(_learned_node(n, flows, modules) and _reaches_from({pool}, n) for n in walked):
            return _Pattern(x, pool, act, frozenset(walked) | frozenset(carriers))
    return None


def _learned_node(node: fx.Node, flows, modules) -> bool:
    op = op_of(node, modules)
    return _is_learned(node, op, [flows.get(i, CONST) for i in data_inputs(node, op)])


def _combine_pairs(node: fx.Node, op: Op) -> list[tuple[fx.Node, fx.Node]]:
    """(x, g) candidates of a combine, both orders."""
    if op.name == "einsum":  # elementwise only: every summed-over letter would mix values
        eq = node.args[0] if node.args and isinstance(node.args[0], str) else ""
        ops = [a for a in node.args[1:] if isinstance(a, fx.Node)]
        lhs, _, rhs = eq.replace(" ", "").partition("->")
        if len(ops) != 2 or not rhs or set(lhs) - {","} - set(rhs):
            return []
        return [(ops[0], ops[1]), (ops[1], ops[0])]
    pair = _operands(node)
    return [pair, pair[::-1]] if pair is not None else []


def _refuse(node: fx.Node, op: Op, refusals: list[_Refusal], flows, layouts, modules, origins,
            order) -> Rejection | None:
    """The rejection of a combine that is not a site: a near-miss or an attention-like pattern."""
    pattern = next((p for x, g in _combine_pairs(node, op)
                    if (p := _attention_like(x, g, flows, layouts, modules)) is not None), None)
    where = module_path_of(node) or ""
    if refusals:
        first = refusals[0]
        verdict = Verdict.NOT_ATTENTION if pattern is None else \
            Verdict.UNDECIDED if first.undecided else Verdict.NOT_CHANNEL
        return Rejection(node, where, first.reason, verdict)
    if pattern is None:
        return None
    if op.name in _OTHER_COMBINES:
        reason = (f"the gate '{_place(pattern.activation)}' meets the feature map through {op.name}, not a "
                  "multiply or an add: asrfx converts x * g and x + g only; write it as one to have it converted")
        return Rejection(node, where, reason, Verdict.UNDECIDED)
    reason, verdict = _why_missed(pattern, flows, layouts, modules, origins, order)
    return Rejection(node, where, reason, verdict)


def _place(node: fx.Node) -> str:
    """A node as a human finds it in the model: the module it calls, else its module path and name."""
    path = module_path_of(node)
    return f"{path}:{node.name}" if path and node.op != "call_module" else label_of(node)


def _label(op: Op) -> str:
    return type(op.module).__name__ if op.module is not None else op.name


def _tags(layout) -> str:
    return "(" + ", ".join(layout) + ")" if isinstance(layout, tuple) else "(none)"


def _why_missed(p: _Pattern, flows, layouts, modules, origins, order) -> tuple[str, Verdict]:
    """Why the dataflow did not read an attention-like pattern as a pooled gate, and whether
    that is a definite verdict (the gate also varies with position) or asrfx could not tell."""
    if not flows.get(p.x, CONST).spatial:
        pools = ", ".join(sorted(f"'{_place(n)}'" for n in flows[p.x].pools))
        return (f"'{_place(p.x)}' depends on the input only through global reductions ({pools}), so it does "
                "not read as a feature map"), Verdict.UNDECIDED
    pool_op = _label(op_of(p.pool, modules))
    if flows.get(p.pool, CONST).spatial:  # the pooling was not read as a global reduction
        src = p.pool.args[0]
        lay = layouts.get(src)
        if is_unknown(lay):
            lost = origins.get(src, src)
            return (f"'{_place(p.pool)}' ({pool_op}) pools a tensor whose axes asrfx cannot tell apart "
                    f"{_tags(lay)}, the layout being unknown from '{_place(lost)}' "
                    f"({_label(op_of(lost, modules))}) on: it is not read as a global pooling"), Verdict.UNDECIDED
        return (f"'{_place(p.pool)}' ({pool_op}) reduces a tensor tagged {_tags(lay)} to {_tags(layouts.get(p.pool))}: "
                "by the layout no spatial axis is pooled, so it is not read as a global pooling"), Verdict.UNDECIDED
    spatial = [n for n in sorted(p.nodes, key=order.get) if flows.get(n, CONST).spatial]
    opaque = [n for n in spatial if op_of(n, modules).name in ("function", "module")]
    if opaque:
        return (f"the gate also reads the feature map through '{_place(opaque[0])}' "
                f"({_label(op_of(opaque[0], modules))}), which asrfx does not read"), Verdict.UNDECIDED
    if spatial:  # a gate computed per position as well (BAM: channel gate times a spatial map)
        return (f"the gate also varies with position: it reads the feature map through '{_place(spatial[0])}' "
                f"({_label(op_of(spatial[0], modules))}) besides the global pooling"), Verdict.NOT_CHANNEL
    return "the gate does not depend on the input through global reductions alone", Verdict.UNDECIDED


def _layout_losses(gm: fx.GraphModule, origins, modules) -> list[LayoutLoss]:
    counts: dict[fx.Node, int] = {}
    for origin in origins.values():
        counts[origin] = counts.get(origin, 0) + 1
    return [LayoutLoss(n, module_path_of(n) or "", _label(op_of(n, modules)), k) for n, k in counts.items()]


def detect(gm: fx.GraphModule, layouts=None) -> Detection:
    """Find every channel-attention site of ``gm`` (whose nodes carry shape metadata)."""
    modules = LayerIndex(gm)
    if layouts is None:
        layouts = infer_layouts(gm)
    flows = analyse_flow(gm, layouts, modules)
    origins = unknown_origins(gm, layouts)
    result = Detection(flows=flows, layout_losses=_layout_losses(gm, origins, modules))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    matches: list[_Match] = []
    for node in gm.graph.nodes:
        op = op_of(node, modules)
        found, refusals = [], []
        if op.name in COMBINE_MUL or op.name in COMBINE_ADD:
            found, refusals = _match_combine(node, op, flows, layouts, modules)
        elif op.name not in _OTHER_COMBINES:
            continue
        matches.extend(found)
        if not found and (rejection := _refuse(node, op, refusals, flows, layouts, modules, origins, order)):
            result.rejections.append(rejection)
    # Gates computed from the same pooled statistics belong to one block (split attention).
    groups = UnionFind()
    for m in matches:
        pools = sorted(flows[m.use.gate].pools, key=lambda n: n.name)
        groups.union(m.use.combine, *pools)
    by_root: dict[fx.Node, list[_Match]] = {}
    for m in matches:
        by_root.setdefault(groups[m.use.combine], []).append(m)
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
    mixers = [(n, op) for n, op in ex_ops if op.name in ("linear", "conv", "conv_transpose", "matmul", "mm",
                                                         "bmm", "einsum", "addmm", "module", "bilinear")]
    if mixers and all(op.name == "conv" and _slides_over_channels(n, layouts) for n, op in mixers):
        return SiteKind.ECA
    if not mixers:
        return SiteKind.IE
    if pool_ops <= _AVG_POOLS:
        return SiteKind.SE
    return SiteKind.OTHER


def _slides_over_channels(conv: fx.Node, layouts) -> bool:
    """ECA's conv1d: its window moves along the channels (a 1-d SE's 1x1 Conv1d mixes them instead)."""
    src = conv.args[0] if conv.args else None
    lay = layouts.get(src) if isinstance(src, fx.Node) else None
    return isinstance(lay, tuple) and any(is_channel(t) for t in lay[2:] if isinstance(t, str))


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
