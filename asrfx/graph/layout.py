"""Layout analysis: which axis of every tensor is batch, channel or space.

Each dimension of a tensor-valued node gets a tag:

====  =========================================================================
B     batch (samples)
C     channels (what a per-channel gate scales)
O     other channel-derived groups: heads, branches, radix (outer part of a split C)
S     spatial positions or tokens (what a global pooling removes)
G     a fixed grid produced by adaptive pooling (SPA's 2x2, 4x4): not input-sized
1     a size-1 / broadcast axis
?     unknown
====  =========================================================================

A merged axis (``flatten`` of C and S) carries both letters, e.g. ``"CS"``.
Only reductions, reshapes to size 1 and parameters create ``1`` tags: a spatial
axis that is 1 pixel wide in the example is still ``S``.
Tags start at the inputs (``N, C, *spatial``) and at layers that define a layout
(conv: ``B C S..``; linear: last axis is C), and follow sizes through reshapes,
permutes, reductions, pools and contractions. Sizes alone cannot do this: with a
tiny example input a 7x7 map is 1x1, yet it is still spatial.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import fx, nn

from .ops import (
    BROADCASTS, CONTRACTIONS, POOLS, REDUCTIONS, RESHAPES, Op, node_shape, node_shapes, op_of,
)

__all__ = ["Layout", "infer_layouts", "has_spatial", "is_channel", "merge_tags", "reshape_tags"]

Tag = str
Layout = tuple[Tag, ...]


def has_spatial(tag: Tag) -> bool:
    """Whether an axis may still resolve positions (unknown counts, to stay safe)."""
    return "S" in tag or "?" in tag


def is_channel(tag: Tag) -> bool:
    """A channel axis, possibly merged with channel groups (C, or C with O)."""
    return "C" in tag and set(tag) <= {"C", "O"}


def merge_tags(tags: Sequence[Tag]) -> Tag:
    """Tag of an axis built from several axes (a flatten), ignoring size-1 parts."""
    letters = sorted({ch for t in tags for ch in t} - {"1"})
    return "".join(letters) if letters else "1"


def reshape_tags(in_shape: Sequence[int], in_tags: Layout, out_shape: Sequence[int]) -> Layout:
    """Tags after a reshape, matched by cumulative products of sizes.

    Axes that survive keep their tag; merged axes union their tags; a split C axis
    becomes (O.., C): the outer parts are groups (heads, radix), the inner part the
    channels each group holds. Size-1 axes lie in the gaps between matched groups
    and keep the tags of the size-1 axes in the same gap (a 1x1 map stays spatial).
    """
    ins = [k for k, s in enumerate(in_shape) if s != 1]
    outs = [k for k, s in enumerate(out_shape) if s != 1]
    unknown = ("?",) * len(out_shape)
    groups: list[tuple[list[int], list[int]]] = []  # (input axes, output axes) of equal size
    i = j = 0
    while i < len(ins) and j < len(outs):
        group_in, group_out = [ins[i]], [outs[j]]
        prod_in, prod_out = in_shape[ins[i]], out_shape[outs[j]]
        i += 1
        j += 1
        while prod_in != prod_out:
            if prod_in < prod_out:
                if i >= len(ins):
                    return unknown
                prod_in *= in_shape[ins[i]]
                group_in.append(ins[i])
                i += 1
            else:
                if j >= len(outs):
                    return unknown
                prod_out *= out_shape[outs[j]]
                group_out.append(outs[j])
                j += 1
        groups.append((group_in, group_out))
    if i < len(ins) or j < len(outs):
        return unknown
    tags = ["1"] * len(out_shape)
    for group_in, group_out in groups:
        merged = merge_tags([in_tags[k] for k in group_in])
        for pos, k in enumerate(group_out):
            split_outer = merged == "C" and len(group_out) > 1 and pos < len(group_out) - 1
            tags[k] = "O" if split_outer else merged
    for g in range(len(groups) + 1):  # the size-1 axes between group g-1 and group g
        in_lo = groups[g - 1][0][-1] + 1 if g else 0
        in_hi = groups[g][0][0] if g < len(groups) else len(in_shape)
        out_lo = groups[g - 1][1][-1] + 1 if g else 0
        out_hi = groups[g][1][0] if g < len(groups) else len(out_shape)
        gap = [in_tags[k] for k in range(in_lo, in_hi)]
        if g == 0 and gap and out_hi > 0:  # the batch axis stays the batch axis
            tags[0] = gap[0]
            tags[1:out_hi] = _align_unit_axes(gap[1:], out_hi - 1)
        else:
            tags[out_lo:out_hi] = _align_unit_axes(gap, out_hi - out_lo)
    return tuple(tags)


def _align_unit_axes(tags: list[Tag], count: int) -> list[Tag]:
    """Tags of ``count`` size-1 axes made from size-1 axes with ``tags``.

    Sizes cannot tell which went where, so read it the way reshapes are written:
    trailing axes merge (a flatten) or trailing size-1 axes are added (view(b, c, 1, 1)).
    """
    if count == 0:
        return []
    if len(tags) >= count:
        return tags[: count - 1] + [merge_tags(tags[count - 1:])]
    return tags + ["1"] * (count - len(tags))


def _default_layout(shape: Sequence[int]) -> Layout:
    """Layout of a model input: N, C, *spatial (the torch convention)."""
    base = ("B", "C") + ("S",) * max(len(shape) - 2, 0)
    return base[: len(shape)] if len(shape) >= 2 else ("C",) * len(shape)


def _const_layout(shape: Sequence[int]) -> Layout:
    """Layout of a parameter or buffer: non-trivial axes are channel-like."""
    return tuple("1" if s == 1 else "C" for s in shape)


def _broadcast(out_shape: Sequence[int], operands: list[tuple[Sequence[int], Layout, bool]]) -> Layout:
    """Elementwise result: each axis takes the tags of operands that are full-size there.

    ``operands`` are (shape, layout, is_data); data operands win over constants.
    """
    rank = len(out_shape)
    # An operand shaped like the result decides: the others are broadcast into it.
    exact = [o for o in operands if tuple(o[0]) == tuple(out_shape)]
    exact = [o for o in exact if o[2]] or exact  # data over constants
    exact = [o for o in exact if any("S" in t for t in o[1])] or exact  # a feature map over a pooled gate
    if exact:
        return tuple(merge_tags(ts) if len(set(ts)) > 1 else ts[0] for ts in zip(*(o[1] for o in exact)))
    tags: list[Tag] = []
    for k in range(rank):
        size = out_shape[k]
        found_data, found_const = [], []
        for shape, layout, is_data in operands:
            pos = k - (rank - len(shape))
            if pos < 0 or shape[pos] != size:
                continue
            (found_data if is_data else found_const).append(layout[pos])
        found = found_data or found_const
        if not found:
            tags.append("1" if size == 1 else "?")
        else:
            tags.append(merge_tags(found) if len(found) > 1 else found[0])
    return tuple(tags)


def _norm_dims(dim, rank: int) -> list[int] | None:
    if dim is None:
        return None
    if isinstance(dim, int):
        dim = [dim]
    if not isinstance(dim, (list, tuple)) or not all(isinstance(d, int) for d in dim):
        return None
    return sorted({d % rank for d in dim}) if rank else []


def _arg(node: fx.Node, index: int, name: str, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


_EINSUM_TERM = re.compile(r"[a-zA-Z.]+")


class _Propagator:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.layouts: dict[fx.Node, Layout | tuple[Layout | None, ...] | None] = {}
        self.data: dict[fx.Node, bool] = {}  # depends on a graph input (vs parameters only)

    def run(self) -> dict[fx.Node, Layout | tuple | None]:
        for node in self.gm.graph.nodes:
            op = op_of(node, self.modules)
            ins = node.all_input_nodes
            self.data[node] = node.op == "placeholder" or any(self.data.get(i, False) for i in ins)
            self.layouts[node] = self._layout(node, op)
        return self.layouts

    # -- helpers -----------------------------------------------------------------
    def _tensor_args(self, node: fx.Node) -> list[tuple[Sequence[int], Layout, bool]]:
        out = []
        for i in node.all_input_nodes:
            lay, shape = self.layouts.get(i), node_shape(i)
            if shape is not None and isinstance(lay, tuple) and all(isinstance(t, str) for t in lay):
                out.append((shape, lay, self.data.get(i, False)))
        return out

    def _in(self, node: fx.Node, index: int = 0) -> tuple[Sequence[int] | None, Layout | None]:
        arg = node.args[index] if len(node.args) > index else None
        if not isinstance(arg, fx.Node):
            return None, None
        lay = self.layouts.get(arg)
        if not (isinstance(lay, tuple) and all(isinstance(t, str) for t in lay)):
            lay = None
        return node_shape(arg), lay

    # -- the rules -----------------------------------------------------------------
    def _layout(self, node: fx.Node, op: Op):
        shapes = node_shapes(node)
        if shapes is not None:  # tuple-valued: split, chunk, max(dim), var_mean ...
            return self._tuple_layout(node, op, shapes)
        shape = node_shape(node)
        if shape is None:
            return None
        if node.op == "placeholder":
            return _default_layout(shape)
        if node.op == "get_attr" or not self.data[node]:
            return _const_layout(shape)
        if node.op == "call_module" and op.name == "module":
            return self._fallback(node, shape)
        name = op.name
        in_shape, in_lay = self._in(node)
        if node.op == "call_module":  # the module's input is its first argument
            in_shape, in_lay = self._in(node, 0)
        if name in ("conv", "conv_transpose") and in_lay is not None:
            lay = list(in_lay[: len(shape)])
            if len(shape) == op.dims + 2:
                lay[0], lay[1] = in_lay[0], "C"
            else:  # unbatched input
                lay[0] = "C"
            return tuple(lay)
        if name in ("linear", "bilinear") and in_lay is not None and len(in_lay) == len(shape):
            return in_lay[:-1] + ("C",)
        if name == "unsqueeze" and in_lay is not None and len(shape) == len(in_lay) + 1:
            dim = _arg(node, 1, "dim") % len(shape)
            return in_lay[:dim] + ("1",) + in_lay[dim:]
        if name == "squeeze" and in_lay is not None:
            return self._squeeze(node, in_shape, in_lay, shape)
        if name in RESHAPES and in_lay is not None:
            return reshape_tags(in_shape, in_lay, shape)
        if name == "getitem":
            src = self.layouts.get(node.args[0])
            if isinstance(src, tuple) and src and not isinstance(src[0], str):  # element of a tuple value
                index = node.args[1]
                picked = src[index] if isinstance(index, int) and -len(src) <= index < len(src) else None
                return picked if picked is not None and len(picked) == len(shape) else ("?",) * len(shape)
            if in_lay is not None:
                return self._getitem(node, in_shape, in_lay, shape)
        if name in ("permute", "transpose", "movedim", "t", "getattr_T", "getattr_mT", "numpy_T") and in_lay:
            return self._permute(node, name, in_lay, shape)
        if name in REDUCTIONS and in_lay is not None:
            return self._reduce(node, name, in_shape, in_lay, shape)
        if name in POOLS and in_lay is not None:
            return self._pool(node, op, in_shape, in_lay, shape)
        if name in CONTRACTIONS:
            return self._contract(node, name, shape)
        if name == "interpolate" and in_lay is not None:
            return in_lay[:2] + tuple("S" if s > 1 else t for s, t in zip(shape[2:], in_lay[2:]))
        if name == "stack":
            return self._stack(node, shape)
        if name == "cat":
            return self._cat(node, shape)
        if name == "expand_as":
            other = node.args[1] if len(node.args) > 1 else None
            other_lay = self.layouts.get(other) if isinstance(other, fx.Node) else None
            if isinstance(other_lay, tuple) and len(other_lay) == len(shape):
                return other_lay
        if name in BROADCASTS and in_lay is not None and len(in_lay) == len(shape):
            return in_lay  # an expanded axis holds one value along it: still a broadcast ("1") axis
        return self._fallback(node, shape)

    def _squeeze(self, node, in_shape, in_lay, shape) -> Layout:
        dim = _arg(node, 1, "dim")
        dims = _norm_dims(dim, len(in_lay)) if dim is not None else None
        if dims is None:
            dims = [d for d, s in enumerate(in_shape) if s == 1]
        tags = tuple(t for d, t in enumerate(in_lay) if not (d in dims and in_shape[d] == 1))
        return tags if len(tags) == len(shape) else reshape_tags(in_shape, in_lay, shape)

    def _fallback(self, node: fx.Node, shape: Sequence[int]) -> Layout:
        """Shape-preserving or broadcasting ops keep tags; anything else is unknown."""
        operands = self._tensor_args(node)
        if any(len(s) <= len(shape) for s, _, _ in operands):
            fits = [o for o in operands if len(o[0]) <= len(shape)]
            return _broadcast(shape, fits)
        return ("?",) * len(shape)

    def _tuple_layout(self, node: fx.Node, op: Op, shapes):
        in_shape, in_lay = self._in(node)
        if in_lay is None:
            return tuple(("?",) * len(s) if s is not None else None for s in shapes)
        if op.name in REDUCTIONS:  # (values, indices) or (std, mean)
            return tuple(self._reduce(node, op.name, in_shape, in_lay, s) if s is not None else None
                         for s in shapes)
        if op.name == "unbind":
            dim = _arg(node, 1, "dim", 0) % len(in_lay)
            lay = in_lay[:dim] + in_lay[dim + 1:]
            return tuple(lay for _ in shapes)
        # split / chunk / tensor_split keep the meaning of every axis
        return tuple(in_lay if s is not None and len(s) == len(in_lay) else None for s in shapes)

    def _getitem(self, node, in_shape, in_lay, shape) -> Layout:
        index = node.args[1]
        if not isinstance(index, tuple):
            index = (index,)
        if any(isinstance(i, fx.Node) or not (i is None or i is Ellipsis or isinstance(i, (int, slice)))
               for i in index):
            return self._fallback(node, shape)
        # expand Ellipsis
        used = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: list = []
        for i in index:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (len(in_lay) - used))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (len(in_lay) - sum(1 for i in expanded if i is not None)))
        tags, pos = [], 0
        for i in expanded:
            if i is None:
                tags.append("1")
            elif isinstance(i, int):
                pos += 1
            else:
                tags.append(in_lay[pos] if pos < len(in_lay) else "?")
                pos += 1
        if len(tags) != len(shape):
            return ("?",) * len(shape)
        return tuple(tags)

    def _permute(self, node, name, in_lay, shape) -> Layout:
        rank = len(in_lay)
        if name == "permute":
            order = node.args[1:] if len(node.args) > 2 or isinstance(_arg(node, 1, "dims"), int) \
                else _arg(node, 1, "dims")
            order = [int(d) % rank for d in order]
        elif name == "transpose":
            a, b = int(_arg(node, 1, "dim0")) % rank, int(_arg(node, 2, "dim1")) % rank
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
        elif name == "movedim":
            src, dst = _arg(node, 1, "source"), _arg(node, 2, "destination")
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src, dst = [s % rank for s in src], [d % rank for d in dst]
            rest = [d for d in range(rank) if d not in src]
            order = [None] * rank
            for s, d in zip(src, dst):
                order[d] = s
            it = iter(rest)
            order = [o if o is not None else next(it) for o in order]
        else:  # .t(), .T, .mT: reverse the last two
            order = list(range(rank))
            if rank >= 2:
                order[-1], order[-2] = order[-2], order[-1]
        if len(order) != len(shape):
            return ("?",) * len(shape)
        return tuple(in_lay[o] for o in order)

    def _reduce(self, node, name, in_shape, in_lay, shape) -> Layout:
        rank = len(in_lay)
        dim_index = 2 if name in ("norm", "vector_norm") else 1
        dim = _arg(node, dim_index, "dim")
        if isinstance(dim, bool):  # old std/var spelling: std(x, unbiased)
            dim = None
        if name in ("amax", "amin") and dim in ((), []):
            dim = None
        if name in ("max", "min") and isinstance(dim, fx.Node):  # elementwise max(a, b)
            return self._fallback(node, shape)
        dims = _norm_dims(dim, rank)
        if dims is None:
            if dim is not None:  # a dim we cannot read (computed at run time)
                return ("?",) * len(shape)
            dims = list(range(rank))
        keep = len(shape) == rank
        tags = []
        for d in range(rank):
            if d in dims:
                if keep:
                    tags.append("1")
            else:
                tags.append(in_lay[d])
        if len(tags) != len(shape):
            return ("?",) * len(shape)
        return tuple(tags)

    def _pool(self, node, op: Op, in_shape, in_lay, shape) -> Layout:
        k = op.dims or max(len(shape) - 2, 1)
        if len(shape) != len(in_lay):
            return ("?",) * len(shape)
        lead = in_lay[: len(shape) - k]
        out = []
        adaptive = op.name.startswith("adaptive")
        kernel = (None,) * k
        if not adaptive:
            kernel = op.module.kernel_size if op.module is not None else _arg(node, 1, "kernel_size")
            if isinstance(kernel, (int, fx.Node)):
                kernel = (kernel,) * k
            kernel = tuple(kernel) if kernel is not None else (None,) * k
            if len(kernel) < k:
                kernel = kernel + (kernel[-1],) * (k - len(kernel))
        fixed = _adaptive_output_size(node, op, k) if adaptive else None
        for axis in range(k):
            pos = len(shape) - k + axis
            size_in, size_out, tag = in_shape[pos], shape[pos], in_lay[pos]
            if adaptive and fixed[axis] is None:
                out.append(tag)  # output_size None keeps the axis
            elif size_out == 1 and (adaptive or _covers(kernel[axis], size_in)):
                out.append("1")
            elif adaptive and fixed[axis] is not None:
                out.append("G")  # a fixed grid, whatever the input size (SPA)
            else:
                out.append(tag)  # a sliding window keeps positions
        return lead + tuple(out)

    def _contract(self, node, name, shape) -> Layout:
        if name == "einsum":
            return self._einsum(node, shape)
        operands = self._tensor_args(node)
        if len(operands) != 2 or len(shape) < 2:
            return ("?",) * len(shape)
        (sa, la, _), (sb, lb, _) = operands
        if len(la) < 2 or len(lb) < 2:
            return ("?",) * len(shape)
        batch = _broadcast(shape[:-2], [(sa[:-2], la[:-2], True), (sb[:-2], lb[:-2], True)])
        return batch + (la[-2], lb[-1])

    def _einsum(self, node, shape) -> Layout:
        eq = node.args[0] if node.args and isinstance(node.args[0], str) else None
        operands = [a for a in node.args[1:]]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        if eq is None or "->" not in eq or "." in eq:
            return ("?",) * len(shape)
        lhs, rhs = eq.replace(" ", "").split("->")
        terms = lhs.split(",")
        letter_tags: dict[str, list[str]] = {}
        for term, arg in zip(terms, operands):
            lay = self.layouts.get(arg) if isinstance(arg, fx.Node) else None
            if not (isinstance(lay, tuple) and len(lay) == len(term)):
                return ("?",) * len(shape)
            for ch, t in zip(term, lay):
                letter_tags.setdefault(ch, []).append(t)
        if len(rhs) != len(shape):
            return ("?",) * len(shape)
        return tuple(merge_tags(letter_tags.get(ch, ["?"])) for ch in rhs)

    def _cat(self, node, shape) -> Layout:
        tensors = node.args[0] if node.args else []
        lays = [self.layouts.get(t) for t in tensors if isinstance(t, fx.Node)]
        lays = [l for l in lays if isinstance(l, tuple) and len(l) == len(shape)]
        if not lays:
            return ("?",) * len(shape)
        return tuple(merge_tags(ts) for ts in zip(*lays))

    def _stack(self, node, shape) -> Layout:
        tensors = node.args[0] if node.args else []
        dim = _arg(node, 1, "dim", 0) % len(shape)
        lays = [self.layouts.get(t) for t in tensors if isinstance(t, fx.Node)]
        lays = [l for l in lays if isinstance(l, tuple) and len(l) == len(shape) - 1]
        if not lays:
            return ("?",) * len(shape)
        base = tuple(merge_tags(ts) if len(set(ts)) > 1 else ts[0] for ts in zip(*lays))
        return base[:dim] + ("O",) + base[dim:]


def _covers(kernel, size_in: int) -> bool:
    """A window that spans the whole axis; one computed from x.size() does by construction."""
    return isinstance(kernel, fx.Node) or (isinstance(kernel, int) and kernel == size_in)


def _adaptive_output_size(node: fx.Node, op: Op, k: int):
    size = op.module.output_size if op.module is not None else _arg(node, 1, "output_size")
    if isinstance(size, int) or size is None:
        return (size,) * k
    return tuple(size)


def infer_layouts(gm: fx.GraphModule) -> dict[fx.Node, Layout | tuple | None]:
    """Tag every axis of every tensor in ``gm`` (nodes need shape metadata).

    Returns a map node -> layout (a tuple of tags), a tuple of layouts for
    tuple-valued nodes, or None for non-tensor values (sizes, flags).
    """
    return _Propagator(gm).run()
