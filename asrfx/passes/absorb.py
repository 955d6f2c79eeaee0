"""Where a per-channel gate can fold: the graph walk that reads the rule table.

``plan_producer`` walks back from the gated tensor x to the layers that computed it;
``plan_consumers`` walks forward from the gated tensor to the layers that read it. Both
move the gate only through ops :mod:`asrfx.algebra.rules` says it commutes with, and
return a :class:`Plan`: the layers that absorb it (with which entries of the gate vector
land where), or the reason it cannot fold. Planning changes nothing: detect reports the
plan as the site's fold target, convert applies a producer plan inside BatchNorms while
training, fuse applies it to the parameters. The same walk serves module calls,
functional calls and aten graphs (through :class:`asrfx.graph.layers.Layer`).

A *span* says which gate entries sit where along a tensor's gated axis: entries
``start:stop`` of the vector sit at channels ``offset:offset + stop - start``; the
tensor's other channels are not gated (one input of a concatenation, one piece of a split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx

from ..algebra.rules import ABSORBERS, COMMUTE, Axes, Needs, input_absorbs, output_absorbs, scale_passes, shift_passes
from ..graph.layers import LayerIndex, layer_of
from ..graph.ops import argument, axis_order, data_readers, node_shape, node_shapes, op_of, pad_fill

__all__ = ["Span", "Target", "Plan", "plan_producer", "plan_consumers", "Sign", "label_of"]

# What is known of a gate's sign, for entries start:stop: True (all >= 0), False (some < 0), None (unknown).
Sign = Callable[[int, int], "bool | None"]


@dataclass(frozen=True)
class Span:
    """Which entries of the gate vector sit where along a tensor's gated axis."""

    axis: int  # the gated axis of the tensor
    start: int  # first gate entry carried
    stop: int  # one past the last gate entry carried
    offset: int  # the tensor's channel (along ``axis``) where entry ``start`` sits

    def moved(self, axis: int | None = None, offset: int | None = None) -> Span:
        return Span(self.axis if axis is None else axis, self.start, self.stop,
                    self.offset if offset is None else offset)

    def cut(self, lo: int, hi: int) -> Span | None:
        """The part of the span inside channels lo:hi, re-based at lo (None when they do not meet)."""
        a, b = max(lo, self.offset), min(hi, self.offset + self.stop - self.start)
        if a >= b:
            return None
        start = self.start + a - self.offset
        return Span(self.axis, start, start + b - a, a - lo)


@dataclass(frozen=True)
class Target:
    """One layer (or stored parameter) that absorbs part of a gate."""

    node: fx.Node  # the layer call, or the get_attr of a parameter
    kind: str  # the layer's canonical op ("conv", "batch_norm", ...), or "parameter"
    side: str  # "output": it computed the gated values; "input": it reads them
    span: Span  # the gate entries it takes and where they land along its channel axis (parameter: any axis)
    width: int  # the size of that axis: entries outside the span are left alone
    through: tuple[fx.Node, ...]  # ops the gate moved through to get here
    non_negative: bool  # getting here needs gate entries start:stop >= 0 (it passed ReLU or max pooling)
    parts: tuple[str, ...]  # the layer's own tensors to change ("weight", "bias"); others come as parameters
    shift_into: fx.Node | None = None  # input shift of a layer without bias: the BatchNorm after it takes it


@dataclass(frozen=True)
class Plan:
    """Where a gate folds, or why it cannot."""

    side: str  # "producer" or "consumers"
    targets: tuple[Target, ...]  # empty when it cannot fold
    reason: str  # why it cannot ('' when it folds)

    @property
    def ok(self) -> bool:
        return bool(self.targets) and not self.reason

    def describe(self, modules) -> str:
        """The plan in words, as the sites table and reports print it: "BatchNorm2d 'layer1.0.bn2'
        through ReLU"; consumers are named as such."""
        if not self.ok:
            return self.reason
        names = []
        for t in self.targets:
            name = f"parameter '{t.node.target}'" if t.kind == "parameter" else \
                f"{_kind_of(op_of(t.node, modules))} '{label_of(t.node)}'"
            if name not in names:
                names.append(name)
        via = []
        for t in self.targets:
            for n in t.through:
                kind = _kind_of(op_of(n, modules))
                if kind not in via and op_of(n, modules).name not in ("getitem", "identity", "contiguous"):
                    via.append(kind)
        cond = " (if the gate is non-negative)" if any(t.non_negative for t in self.targets) else ""
        text = ", ".join(names) + (f" through {', '.join(via)}" if via else "") + cond
        return text if self.side == "producer" else f"consumers {text}"


def label_of(node: fx.Node) -> str:
    """A node as a human finds it in the model: the module path it calls, else its fx name."""
    return str(node.target) if node.op == "call_module" else node.name


def _width(node: fx.Node, axis: int) -> int | None:
    shape = node_shape(node)
    return shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None


def _sole_reader(value: Any, node: fx.Node, readers: Callable[[fx.Node], list[fx.Node]]) -> bool:
    """``node`` is the only reader of ``value``'s data, and reads it once."""
    return isinstance(value, fx.Node) and readers(value) == [node] and _reads_once(value, node)


def _reads_once(value: fx.Node, node: fx.Node) -> bool:
    seen = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: seen.append(a) if a is value else None)
    return len(seen) == 1


def _op_args(node: fx.Node, modules) -> dict[str, Any]:
    """The arguments the rule table's conditions read: avg_pool's padding, ceil_mode,
    count_include_pad and divisor_override; pad's mode and value."""
    op = op_of(node, modules)
    if op.name == "avg_pool":
        if op.module is not None:
            return {k: getattr(op.module, k) for k in ("padding", "ceil_mode", "count_include_pad", "divisor_override")
                    if hasattr(op.module, k)}
        return {"padding": argument(node, 3, "padding", 0), "ceil_mode": argument(node, 4, "ceil_mode", False),
                "count_include_pad": argument(node, 5, "count_include_pad", True),
                "divisor_override": argument(node, 6, "divisor_override")}
    if op.name == "pad":
        fill = pad_fill(node, modules)
        if op.module is not None:  # ZeroPad2d, ConstantPad2d(value), ReflectionPad2d ...
            return {"mode": fill, "value": getattr(op.module, "value", 0)}
        if fill is None:  # F.pad(x, pad, mode, value), aten.pad
            return {"mode": argument(node, 2, "mode", "constant"), "value": argument(node, 3, "value")}
        if fill == "constant":  # aten.constant_pad_nd(x, pad, value=0)
            return {"mode": fill, "value": argument(node, 2, "value", 0)}
        return {"mode": fill}  # aten.reflection_pad2d(x, pad) ...
    return {}


class _Walk:
    """One planning walk: the gate's combine op, what is known of its sign, the layers of the graph."""

    def __init__(self, modules: LayerIndex, shift: bool, sign: Sign, optimistic: bool, ignore: frozenset = frozenset()):
        self.modules = modules
        self.shift = shift
        self.sign = sign
        self.optimistic = optimistic  # an unknown sign passes ReLU (recorded on the target as a condition)
        self.readers = _readers_without(modules, ignore)

    # -- rules -------------------------------------------------------------------------------------
    def _passes(self, node: fx.Node, name: str, span: Span) -> tuple[str | None, bool]:
        """(reason it cannot pass ``node``, whether passing needs non-negative entries)."""
        if self.shift:
            return shift_passes(name, _op_args(node, self.modules)), False
        rule = COMMUTE.get(name)
        needs = rule is not None and rule.scale is Needs.NON_NEGATIVE
        known = self.sign(span.start, span.stop) if needs else True
        if known is None and self.optimistic:
            known = True
        return scale_passes(name, known, _op_args(node, self.modules)), needs

    # -- producer side -----------------------------------------------------------------------------
    def back(self, node: fx.Node, span: Span, through: tuple, non_negative: bool) -> list[Target] | str:
        """Targets that absorb ``span`` of the gate carried by ``node`` (whose only reader is the gate)."""
        op = op_of(node, self.modules)
        name = op.name
        if node.op == "get_attr":
            return self._parameter(node, span, through, non_negative)
        if name in ABSORBERS:
            return self._absorb_output(node, name, span, through, non_negative)
        rule = COMMUTE.get(name)
        if rule is None:
            return _why_not(node, _kind_of(op))
        why, needs = self._passes(node, name, span)
        if why:
            return f"'{label_of(node)}': {why}"
        non_negative = non_negative or needs
        through = through + (node,)
        if rule.axes is Axes.DISTRIBUTE:
            return self._back_sum(node, name, span, through, non_negative)
        if rule.axes is Axes.CONCAT:
            return self._back_cat(node, span, through, non_negative)
        if rule.axes is Axes.FACTOR:
            return self._back_product(node, span, through, non_negative)
        src, mapped = _map_back(node, name, span, self.modules, self.readers)
        if src is None:
            return f"'{label_of(node)}' ({name}) {mapped}"
        # a piece of a split maps to the split's input, whose readers _back_from_piece checked
        if src is node.args[0] and not _sole_reader(src, node, self.readers):
            return f"'{label_of(src)}' is also read by others than '{label_of(node)}' ({name})"
        return self.back(src, mapped, through, non_negative)

    def _absorb_output(self, node, name, span, through, non_negative) -> list[Target] | str:
        layer = layer_of(node, self.modules)
        if isinstance(layer, str):
            return layer
        rank = len(node_shape(node) or ())
        width = _width(node, span.axis)
        why = output_absorbs(name, layer, span.axis, rank, width or 0, self.shift)
        if why:
            return f"'{layer.label}' ({_kind(layer)}): {why}"
        if name == "conv_transpose" and layer.computed:
            return f"'{layer.label}' ({_kind(layer)}) computes its weight in the graph"
        parts = ("bias",) if self.shift else ("weight", "bias")
        own = tuple(p for p in parts if p not in layer.computed)
        targets = [Target(node, name, "output", span, width, through, non_negative, own)]
        for part in parts:  # a weight computed from parameters (weight standardization) takes it inside
            if part in layer.computed:
                axis = 0 if name != "conv_transpose" else 1
                inner = self.back(layer.computed[part], span.moved(axis=axis) if part == "weight" else
                                  span.moved(axis=0), through + (node,), non_negative)
                if isinstance(inner, str):
                    return f"'{layer.label}' computes its {part} in the graph, and there: {inner}"
                targets.extend(inner)
        return targets

    def _parameter(self, node, span, through, non_negative) -> list[Target] | str:
        """A stored tensor on the path (a layer scale, a bias added in the graph, a gain inside a
        weight's computation) takes the gate along the axis where it is full-size."""
        if self.modules.reads[str(node.target)] != 1:
            return f"parameter '{node.target}' is read elsewhere too"
        # every way here keeps the gated axis's size (broadcast operands are refused before)
        width = _width(node, span.axis)
        if width is None:
            return f"parameter '{node.target}' has no shape information"
        return [Target(node, "parameter", "output", span, width, through, non_negative, ())]

    def _back_sum(self, node, name, span, through, non_negative) -> list[Target] | str:
        """(a + b) * v == a * v + b * v: every branch takes the scale; (a + b) + c: one branch takes the shift."""
        rank = len(node_shape(node) or ())
        operands = [a for a in node.args[:2]]
        reasons, targets = [], []
        for k, operand in enumerate(operands):
            if not isinstance(operand, fx.Node):
                if self.shift or operand in (0, 0.0):
                    continue  # a number added: it does not change under the shift, and a zero under a scale
                return f"'{label_of(node)}' adds the constant {operand!r}, which a per-channel scale would change"
            if self.shift and (name == "sub" and k == 1):
                continue  # c reaches a - b through a only
            shape = node_shape(operand) or ()
            axis = span.axis - (rank - len(shape))
            if axis < 0 or shape[axis] != _width(node, span.axis):
                if self.shift:
                    continue
                return f"'{label_of(operand)}' is broadcast along the gated axis of '{label_of(node)}'"
            if not _sole_reader(operand, node, self.readers):
                why = f"x is a sum ('{label_of(node)}'), and its branch '{label_of(operand)}' is also read elsewhere"
                if self.shift:
                    reasons.append(why)
                    continue
                return why
            found = self.back(operand, span.moved(axis=axis), through, non_negative)
            if isinstance(found, str):
                if self.shift:
                    reasons.append(found)
                    continue
                return f"x is a sum ('{label_of(node)}') and a branch cannot take it: {found}"
            if self.shift:
                return found
            targets.extend(found)
        if self.shift or not targets:
            return f"no branch of '{label_of(node)}' can take the shift" + (f": {reasons[0]}" if reasons else "")
        return targets

    def _back_cat(self, node, span, through, non_negative) -> list[Target] | str:
        tensors = argument(node, 0, "tensors", [])
        dim = argument(node, 1, "dim", 0)
        rank = len(node_shape(node) or ())
        along = dim % rank == span.axis if rank else False
        targets, lo = [], 0
        for t in tensors:
            if not isinstance(t, fx.Node):
                return f"'{label_of(node)}' concatenates a constant"
            size = _width(t, dim % rank) if along else None
            part = span.cut(lo, lo + size) if along else span
            if along:
                lo += size
            if part is None:
                continue
            if not _sole_reader(t, node, self.readers):
                return f"'{label_of(t)}' is also read by others than the concatenation '{label_of(node)}'"
            found = self.back(t, part, through, non_negative)
            if isinstance(found, str):
                return f"a part of the concatenation '{label_of(node)}' cannot take it: {found}"
            targets.extend(found)
        return targets

    def _back_product(self, node, span, through, non_negative) -> list[Target] | str:
        """(a * b) * v == (a * v) * b: a stored parameter full-size along the axis takes it (layer
        scale), else the factor that carries data (another gate is a constant: it stays as it is)."""
        rank = len(node_shape(node) or ())
        options = []
        for operand in node.args[:2]:
            if not isinstance(operand, fx.Node):
                continue
            shape = node_shape(operand) or ()
            axis = span.axis - (rank - len(shape))
            if axis < 0 or shape[axis] != _width(node, span.axis):
                continue
            options.append((operand.op != "get_attr", operand, axis))
        for _, operand, axis in sorted(options, key=lambda o: o[0]):
            if not _sole_reader(operand, node, self.readers):
                continue
            found = self.back(operand, span.moved(axis=axis), through, non_negative)
            if not isinstance(found, str):
                return found
        return f"no factor of the product '{label_of(node)}' can take the scale"

    # -- consumer side -----------------------------------------------------------------------------
    def forward(self, node: fx.Node, span: Span, through: tuple, non_negative: bool) -> list[Target] | str:
        """Targets among the readers of ``node`` (which carries ``span`` of the gate)."""
        readers = self.readers(node)
        if not readers:
            return f"nothing reads '{label_of(node)}'"
        targets: list[Target] = []
        for reader in readers:
            found = self._reader(node, reader, span, through, non_negative)
            if isinstance(found, str):
                return found
            targets.extend(found)
        return targets

    def _reader(self, src, reader, span, through, non_negative) -> list[Target] | str:
        op = op_of(reader, self.modules)
        name = op.name
        if name in ABSORBERS and reader.args and reader.args[0] is src and _reads_once(src, reader):
            return self._absorb_input(reader, name, span, through, non_negative)
        rule = COMMUTE.get(name)
        if rule is None or rule.axes in (Axes.DISTRIBUTE,) or (rule.axes is Axes.FACTOR and self.shift):
            return f"'{label_of(reader)}' ({_kind_of(op)}) reads the gated tensor and cannot absorb the gate"
        why, needs = self._passes(reader, name, span)
        if why:
            return f"'{label_of(reader)}': {why}"
        non_negative = non_negative or needs
        through = through + (reader,)
        if rule.axes is Axes.CONCAT:
            tensors = argument(reader, 0, "tensors", [])
            dim = argument(reader, 1, "dim", 0)
            rank = len(node_shape(reader) or ())
            if sum(1 for t in tensors if t is src) != 1:
                return f"'{label_of(reader)}' concatenates the gated tensor more than once"
            if dim % rank != span.axis:  # the other inputs' rows or columns carry no gate
                return f"'{label_of(reader)}' concatenates the gated tensor with others along axis {dim % rank}, " \
                       f"not along the gated axis {span.axis}"
            offset = span.offset
            for t in tensors:
                if t is src:
                    break
                offset += _width(t, span.axis) if isinstance(t, fx.Node) else 0
            return self.forward(reader, span.moved(offset=offset), through, non_negative)
        if rule.axes is Axes.FACTOR:  # (x * v) * y == (x * y) * v
            rank = len(node_shape(reader) or ())
            shape = node_shape(src) or ()
            return self.forward(reader, span.moved(axis=span.axis + rank - len(shape)), through, non_negative)
        if name in ("split", "chunk", "tensor_split", "split_with_sizes", "unbind"):
            return self._forward_pieces(src, reader, name, span, through, non_negative)
        mapped = _map_forward(src, reader, name, span)
        if isinstance(mapped, str):
            return f"'{label_of(reader)}' ({name}) {mapped}"
        if mapped is None:
            return []  # this reader sees none of the gated channels
        return self.forward(reader, mapped, through, non_negative)

    def _forward_pieces(self, src, node, name, span, through, non_negative) -> list[Target] | str:
        """split / chunk: each piece read through getitem carries its cut of the span."""
        shapes = node_shapes(node) or ()
        dim = argument(node, 1, "dim", 0) if name == "unbind" else argument(node, 2, "dim", 0)
        rank = len(node_shape(src) or ())
        dim %= rank
        targets: list[Target] = []
        bounds, lo = [], 0
        for shape in shapes:
            size = 1 if name == "unbind" else (shape[dim] if shape is not None else 0)
            bounds.append((lo, lo + size))
            lo += size
        for user in node.users:
            if op_of(user, self.modules).name != "getitem" or not isinstance(user.args[1], int):
                return f"'{label_of(node)}' ({name}) is read other than piece by piece"
            k = user.args[1] % len(bounds)
            if dim == span.axis:
                if name == "unbind":
                    return f"'{label_of(node)}' (unbind) removes the gated axis"
                piece = span.cut(*bounds[k])
            else:
                piece = span.moved(axis=span.axis - (1 if name == "unbind" and dim < span.axis else 0))
            if piece is None:
                continue
            found = self.forward(user, piece, through + (user,), non_negative)
            if isinstance(found, str):
                return found
            targets.extend(found)
        return targets

    def _absorb_input(self, node, name, span, through, non_negative) -> list[Target] | str:
        layer = layer_of(node, self.modules)
        if isinstance(layer, str):
            return layer
        if layer.computed:
            return f"'{layer.label}' ({_kind(layer)}) computes its weight in the graph"
        src = node.args[0]
        rank = len(node_shape(src) or ())
        why = input_absorbs(name, layer, span.axis, rank, self.shift)
        if why:
            return f"'{layer.label}' ({_kind(layer)}): {why}"
        width = _width(src, span.axis)
        parts = ("weight",) if not self.shift else ("bias",)
        if name == "batch_norm":
            parts = ("running_mean", "weight", "bias") if not self.shift else ("bias",)
        shift_into = None
        if self.shift and name in ("conv", "linear") and layer.bias is None:
            shift_into = _batchnorm_after(node, self.modules)  # no bias to create: the next BatchNorm takes it
        return [Target(node, name, "input", span, width, through, non_negative, parts, shift_into)]


def _readers_without(modules, ignore: frozenset) -> Callable[[fx.Node], list[fx.Node]]:
    """Readers of a node's data, leaving out ``ignore`` (the pooling branch convert removes)."""
    return lambda node: [u for u in data_readers(node, modules) if u not in ignore]


def _batchnorm_after(node: fx.Node, modules: LayerIndex) -> fx.Node | None:
    """The eval-mode BatchNorm with running statistics and a bias that alone reads ``node``."""
    readers = data_readers(node, modules)
    if len(readers) != 1 or not readers[0].args or readers[0].args[0] is not node:
        return None
    bn = layer_of(readers[0], modules)
    if isinstance(bn, str) or bn.name != "batch_norm" or bn.bias is None or bn.running_var is None or bn.training:
        return None
    return readers[0]


def _kind(layer) -> str:
    return type(layer.module).__name__ if layer.module is not None else layer.name


def _kind_of(op) -> str:
    return type(op.module).__name__ if op.module is not None else op.name


def _why_not(node: fx.Node, kind: str) -> str:
    if node.op == "placeholder":
        return f"x is the graph input '{node.name}'"
    return f"x comes out of {kind} '{label_of(node)}', which does not commute with a per-channel constant"


# -- axis bookkeeping ------------------------------------------------------------------------------


def _matching_axis(shape: Sequence[int], other: Sequence[int], axis: int) -> int | None:
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


def _index_terms(node: fx.Node, rank: int) -> list[tuple[int | None, Any]] | None:
    """getitem's index as (input axis, what it does) per output axis plus removed axes; None if unknown.

    Returns, for every input axis and inserted axis in order, (input axis or None, term): term is
    a slice (kept), an int (removed) or None (a new size-1 axis)."""
    index = node.args[1]
    if not isinstance(index, tuple):
        index = (index,)
    if any(isinstance(i, fx.Node) or not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
        return None
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list = []
    for i in index:
        expanded.extend([slice(None)] * (rank - used) if i is Ellipsis else [i])
    expanded.extend([slice(None)] * (rank - sum(1 for i in expanded if i is not None)))
    terms, pos = [], 0
    for i in expanded:
        if i is None:
            terms.append((None, None))
        else:
            terms.append((pos, i))
            pos += 1
    return terms


def _slice_bounds(term: slice, size: int) -> tuple[int, int] | None:
    start, stop, step = term.indices(size)
    return (start, max(stop, start)) if step == 1 else None


def _cut_of(node: fx.Node, name: str, rank: int) -> tuple[int, int, int] | None:
    """(axis, start, stop) of narrow / aten.slice along one axis."""
    src = node.args[0]
    if name == "narrow":
        dim, start, length = argument(node, 1, "dim"), argument(node, 2, "start"), argument(node, 3, "length")
        if not all(isinstance(v, int) for v in (dim, start, length)):
            return None
        if start < 0:
            start += node_shape(src)[dim % rank]
        return dim % rank, start, start + length
    dim, start, end, step = (argument(node, 1, "dim", 0), argument(node, 2, "start"),
                             argument(node, 3, "end"), argument(node, 4, "step", 1))
    if not isinstance(dim, int) or step != 1:
        return None
    bounds = _slice_bounds(slice(start, end), node_shape(src)[dim % rank])
    return (dim % rank, *bounds) if bounds else None


def _map_back(node: fx.Node, name: str, span: Span, modules, readers) -> tuple[fx.Node | None, Span | str]:
    """The data input of ``node`` and the span it must carry so that ``node`` carries ``span``."""
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if name == "getitem" and src is not None and node_shapes(src) is not None:  # a piece of split/chunk
        return _back_from_piece(node, src, span, modules, readers)
    if src is None:
        return None, "has no tensor input"
    in_shape, out_shape = node_shape(src), node_shape(node)
    if in_shape is None or out_shape is None:
        return None, "has no shape information"
    rule = COMMUTE[name]
    if rule.axes is Axes.SAME:
        if len(in_shape) != len(out_shape) or in_shape[span.axis] != out_shape[span.axis]:
            return None, "changes the size of the gated axis"
        return src, span
    if rule.axes is Axes.REARRANGE:
        order = axis_order(node, name, len(in_shape))
        axis = order[span.axis] if order is not None else _matching_axis(out_shape, in_shape, span.axis)
        return (src, span.moved(axis=axis)) if axis is not None else (None, "splits or merges the gated axis")
    if rule.axes is Axes.REDUCE:
        dims = argument(node, 1, "dim")
        keep = argument(node, 2, "keepdim", False)
        if dims is None:
            return None, "reduces every axis"
        dims = sorted({int(d) % len(in_shape) for d in (dims if isinstance(dims, (list, tuple)) else (dims,))})
        axis = span.axis
        if not keep:
            for d in dims:
                if d <= axis:
                    axis += 1
        if axis in dims:
            return None, "reduces the gated axis"
        return src, span.moved(axis=axis)
    if name == "getitem":
        terms = _index_terms(node, len(in_shape))
        if terms is None:
            return None, "indexes with tensors or lists"
        kept = [(axis, term) for axis, term in terms if not isinstance(term, int)]
        in_axis, term = kept[span.axis]
        if in_axis is None:
            return None, "creates the gated axis"
        bounds = _slice_bounds(term, in_shape[in_axis]) if isinstance(term, slice) else None
        if bounds is None:
            return None, "steps over the gated axis"
        return src, span.moved(axis=in_axis, offset=span.offset + bounds[0])
    if name in ("narrow", "slice"):
        cut = _cut_of(node, name, len(in_shape))
        if cut is None:
            return None, "cuts with steps or arguments computed at run time"
        dim, start, _ = cut
        return src, span.moved(offset=span.offset + start) if dim == span.axis else span
    return None, "is not understood here"


def _back_from_piece(node: fx.Node, split: fx.Node, span: Span, modules, readers) -> tuple[fx.Node | None, Span | str]:
    """x = split(y)[k]: y carries the span at piece k's place; the other pieces see no gate."""
    name = op_of(split, modules).name
    if name not in ("split", "chunk", "tensor_split", "split_with_sizes"):
        return None, f"is an element of {name}"
    y = split.args[0]
    shapes = node_shapes(split)
    rank = len(node_shape(y) or ())
    dim = argument(split, 2, "dim", 0) % rank
    k = node.args[1] % len(shapes)
    start = sum(s[dim] for s in shapes[:k])
    if not _sole_reader(y, split, readers):
        return None, f"is a piece of '{label_of(y)}', which others read too"
    # folding into y scales the whole of y along the cut axis: along the gated axis only piece k's
    # channels, along another axis every piece, so then no other piece may be read
    others = [u for u in readers(split) if u is not node and (u.users or op_of(u, modules).name != "getitem")]
    if any(op_of(u, modules).name != "getitem" or not isinstance(u.args[1], int) for u in others):
        return None, f"is a piece of '{label_of(split)}', which is also read whole"
    if dim != span.axis and others:
        return None, f"is a piece of '{label_of(split)}' cut along another axis than the gated one, " \
                     "and its other pieces are read too"
    if any(u.args[1] % len(shapes) == k for u in others):
        return None, f"is piece {k} of '{label_of(split)}', which is also read elsewhere"
    return y, span.moved(offset=span.offset + start) if dim == span.axis else span


def _map_forward(src: fx.Node, node: fx.Node, name: str, span: Span) -> Span | None | str:
    """The span ``node`` carries when it reads ``src`` carrying ``span`` (None: none of it)."""
    in_shape, out_shape = node_shape(src), node_shape(node)
    if in_shape is None or out_shape is None:
        return "has no shape information"
    if not node.args or node.args[0] is not src:  # by keyword (input=...), or as another operand
        return "reads the gated tensor in another place than its input"
    rule = COMMUTE[name]
    if rule.axes is Axes.SAME:
        if len(in_shape) != len(out_shape) or in_shape[span.axis] != out_shape[span.axis]:
            return "changes the size of the gated axis"
        return span
    if rule.axes is Axes.REARRANGE:
        order = axis_order(node, name, len(in_shape))
        if order is not None:
            return span.moved(axis=order.index(span.axis))
        axis = _matching_axis(in_shape, out_shape, span.axis)
        return span.moved(axis=axis) if axis is not None else "reduces or splits the gated axis"
    if rule.axes is Axes.REDUCE:
        dims = argument(node, 1, "dim")
        keep = argument(node, 2, "keepdim", False)
        if dims is None:
            return "reduces every axis"
        dims = {int(d) % len(in_shape) for d in (dims if isinstance(dims, (list, tuple)) else (dims,))}
        if span.axis in dims:
            return "reduces the gated axis"
        return span if keep else span.moved(axis=span.axis - sum(1 for d in dims if d < span.axis))
    if name == "getitem":
        terms = _index_terms(node, len(in_shape))
        if terms is None:
            return "indexes with tensors or lists"
        out_axis = 0
        for in_axis, term in terms:
            if in_axis == span.axis:
                if isinstance(term, int):
                    return "picks one channel of the gated axis"
                bounds = _slice_bounds(term, in_shape[in_axis])
                if bounds is None:
                    return "steps over the gated axis"
                cut = span.cut(*bounds)
                return cut.moved(axis=out_axis) if cut is not None else None
            if not isinstance(term, int):
                out_axis += 1
        return "drops the gated axis"
    if name in ("narrow", "slice"):
        cut = _cut_of(node, name, len(in_shape))
        if cut is None:
            return "cuts with steps or arguments computed at run time"
        dim, start, stop = cut
        return span.cut(start, stop) if dim == span.axis else span
    return "is not understood here"


# -- entry points ----------------------------------------------------------------------------------


Axes_ = int | tuple[int, int]  # the gated axis of x, or adjacent axes lo..hi that hold one channel axis


def _lo_hi(axes: Axes_) -> tuple[int, int]:
    return (axes, axes) if isinstance(axes, int) else axes


def _merged(x: fx.Node, lo: int, hi: int, modules, readers) -> list[tuple[fx.Node, Span]] | str:
    """Split attention gates [N, radix, C, 1, 1] over a tensor built from branches: each branch,
    with the gate entries it carries along its one channel axis. ``x`` is a reshape of one channel
    axis (``y.reshape(N, radix, C, H, W)``, ResNeSt) or a stack of branches (SK)."""
    name = op_of(x, modules).name
    out = node_shape(x)
    size = 1
    for s in out[lo:hi + 1]:
        size *= s
    if name == "stack" and hi == lo + 1 and argument(x, 1, "dim", 0) % len(out) == lo:
        branches = argument(x, 0, "tensors", [])
        if not all(_sole_reader(b, x, readers) for b in branches):
            return f"a branch stacked by '{label_of(x)}' is also read elsewhere"
        per = out[hi]
        return [(b, Span(lo, k * per, (k + 1) * per, 0)) for k, b in enumerate(branches)]
    y = x.args[0] if x.args and isinstance(x.args[0], fx.Node) else None
    if name not in ("view", "reshape", "unflatten") or y is None:
        return f"the gate spans axes {lo}..{hi} of '{label_of(x)}', which no reshape or stack made from one channel axis"
    before = 1
    for s in out[:lo]:
        before *= s
    acc = 1
    for k, s in enumerate(node_shape(y) or ()):
        if acc == before and s == size:
            if not _sole_reader(y, x, readers):
                return f"'{label_of(y)}' is also read by others than '{label_of(x)}'"
            return [(y, Span(k, 0, size, 0))]
        acc *= s
    return f"the gate spans axes {lo}..{hi} of '{label_of(x)}', which its reshape did not make from one axis"


def plan_producer(x: fx.Node, combine: fx.Node, axes: Axes_, op: str, sign: Sign, modules: LayerIndex,
                  optimistic: bool = False, ignore: frozenset = frozenset()) -> Plan:
    """Fold ``combine = x (*|+) v`` (v along ``axes`` of x) into the layers that computed x.

    ``sign`` tells what is known of v's sign; ``optimistic``: an unknown sign is assumed
    non-negative where that is needed, and the targets say so (detect's report); ``ignore``:
    readers that do not count (the attention's own pooling, which convert removes)."""
    walk = _Walk(modules, op == "add", sign, optimistic, ignore)
    if not _sole_reader(x, combine, walk.readers):
        others = [u for u in walk.readers(x) if u is not combine]
        who = f"'{label_of(others[0])}'" if others else "the combine twice"
        return Plan("producer", (), f"'{label_of(x)}' is also read unscaled by {who}")
    lo, hi = _lo_hi(axes)
    x_shape, shape = node_shape(x), node_shape(combine)
    if x_shape is not None and shape is not None and len(x_shape) == len(shape) and \
            x_shape[lo:hi + 1] != shape[lo:hi + 1]:
        return Plan("producer", (), f"'{label_of(x)}' is broadcast along the gated axis: one value of it "
                                    "meets several gate entries")
    starts, through = [(x, Span(lo, 0, _width(x, lo), 0))], ()
    if hi > lo:
        starts, through = _merged(x, lo, hi, modules, walk.readers), (x,)
        if isinstance(starts, str):
            return Plan("producer", (), starts)
    targets = []
    for start, span in starts:
        found = walk.back(start, span, through, False)
        if isinstance(found, str):
            return Plan("producer", (), found)
        targets.extend(found)
    return Plan("producer", tuple(targets), "")


def plan_consumers(gated: fx.Node, axes: Axes_, op: str, sign: Sign, modules: LayerIndex,
                   optimistic: bool = False, ignore: frozenset = frozenset()) -> Plan:
    """Fold the gate of ``gated = x (*|+) v`` into the layers that read ``gated``."""
    lo, hi = _lo_hi(axes)
    if hi > lo:
        return Plan("consumers", (), f"the gate spans axes {lo}..{hi}: its readers see no single channel axis")
    walk = _Walk(modules, op == "add", sign, optimistic, ignore)
    found = walk.forward(gated, Span(lo, 0, _width(gated, lo), 0), (), False)
    if isinstance(found, str):
        return Plan("consumers", (), found)
    if not found:
        return Plan("consumers", (), "no layer reads the gated tensor")
    return Plan("consumers", tuple(found), "")


def residual_add(x: fx.Node, combine: fx.Node, modules) -> fx.Node | None:
    """``x + x * g`` (a residual gate, ``x * (1 + g)``): the add, when it alone reads ``x * g``
    and its other operand is x itself."""
    readers = data_readers(combine, modules)
    if op_of(combine, modules).name != "mul" or len(readers) != 1:
        return None
    add = readers[0]
    if op_of(add, modules).name != "add" or len(add.args) < 2 or add.kwargs:
        return None
    return add if {add.args[0], add.args[1]} == {x, combine} else None


def static_sign(gate: fx.Node, modules) -> Sign:
    """What the graph says of a gate's sign: non-negative when its last op is (sigmoid, softmax ...)."""
    from ..algebra.rules import NON_NEGATIVE_OUTPUT

    node = gate
    while op_of(node, modules).name in ("reshape", "view", "expand", "expand_as", "flatten", "unsqueeze",
                                        "squeeze", "contiguous", "permute", "transpose") and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    known = True if op_of(node, modules).name in NON_NEGATIVE_OUTPUT else None
    return lambda start, stop: known


def value_sign(vector) -> Sign:
    """The sign of a gate's known values, entry range by entry range."""
    return lambda start, stop: bool((vector[start:stop] >= 0).all())


__all__ += ["static_sign", "value_sign", "residual_add"]
