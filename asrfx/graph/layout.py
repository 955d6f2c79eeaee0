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
Tags start at the inputs (the layout their first layer reads: ``[N, T, F]`` transposed
before a Conv1d is ``B S C``; ``N, C, *spatial`` when no layer says) and at layers whose
semantics fix the axes (conv ``B C S..``, linear ``B S.. C``, norms, pooling: see the
roles below), which re-anchor the layout after any op the pass cannot follow; tags follow
sizes through reshapes, permutes, reductions, pools and contractions. Padding, cropping
and narrow keep every axis. Sizes alone cannot do this: with a tiny example input a 7x7
map is 1x1, yet it is still spatial.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import fx, nn

from .dataflow import input_dependence
from .ops import (
    BROADCASTS, CONTRACTIONS, PERMUTES, POOLS, REDUCTIONS, RESHAPES, Op, argument, axis_order, module_op, node_shape,
    node_shapes, op_of,
)

__all__ = ["Layout", "infer_layouts", "has_spatial", "is_channel", "is_unknown", "merge_tags", "reshape_tags",
           "unknown_origins"]

Tag = str
Layout = tuple[Tag, ...]


def has_spatial(tag: Tag) -> bool:
    """Whether an axis may still resolve positions (unknown counts, to stay safe)."""
    return "S" in tag or "?" in tag


def is_channel(tag: Tag) -> bool:
    """A channel axis, possibly merged with channel groups (C, or C with O)."""
    return "C" in tag and set(tag) <= {"C", "O"}


def is_unknown(layout) -> bool:
    """Whether a node's layout (a tuple of tags, or a tuple of those) has an axis of unknown meaning."""
    if not isinstance(layout, tuple):
        return False
    if layout and not isinstance(layout[0], str):
        return any(is_unknown(part) for part in layout)
    return any("?" in t for t in layout)


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
    """Layout of a model input no layer reads: N, C, *spatial (the torch convention)."""
    base = ("B", "C") + ("S",) * max(len(shape) - 2, 0)
    return base[: len(shape)] if len(shape) >= 2 else ("C",) * len(shape)


def _const_layout(shape: Sequence[int]) -> Layout:
    """Layout of a parameter or buffer: non-trivial axes are channel-like."""
    return tuple("1" if s == 1 else "C" for s in shape)


# -- anchoring: layers whose semantics fix what their output axes mean ----------------------
#
# Each such layer gives every output axis a *role* (one letter per axis):
#   B  batch: the input's tag if known (a merged batch such as BO), else B
#   C  channels the layer computes: always C
#   K  channels the layer keeps (pooling): the input's tag if known, else C
#   S  positions the layer slides, pools or maps over: the input's tag if known, else S
# so a layer re-establishes the layout after any op the pass could not follow, and keeps
# what it knows (a conv over a pooled 1x1 map stays 1x1, ECA's conv1d slides over C).
# A size-1 broadcast axis that a layer spreads out (padding, a padded conv) becomes G.


def _roles(op: Op, node: fx.Node | None, rank: int) -> str | None:
    """The role of each output axis of a layer (see above), or None if ``op`` fixes no axis."""
    name = op.name
    if name in ("conv", "conv_transpose"):
        d = op.dims or rank - 2
        if rank == d + 2:
            return "BC" + "S" * d
        return "C" + "S" * d if rank == d + 1 and d > 0 else None  # unbatched input
    if name in ("linear", "bilinear", "embedding"):  # features on the last axis
        return "C" if rank == 1 else "B" + "S" * (rank - 2) + "C"
    if name in ("batch_norm", "instance_norm", "group_norm", "local_response_norm",
                "pixel_shuffle", "pixel_unshuffle"):
        return "BC" + "S" * (rank - 2) if rank >= 2 else None
    if name == "layer_norm":  # normalizes the last k axes; the first of them holds the channels
        k = _normalized_rank(node, op)
        if k is None or not 1 <= k < rank:
            return None
        return "B" + "S" * (rank - 1 - k) + "C" + "S" * (k - 1)
    return None


def _normalized_rank(node: fx.Node | None, op: Op) -> int | None:
    shape = op.module.normalized_shape if op.module is not None else \
        (argument(node, 1, "normalized_shape") if node is not None else None)
    if isinstance(shape, int):
        return 1
    return len(shape) if isinstance(shape, (tuple, list)) else None


def _spread(tag: Tag, size: int) -> Tag:
    """A broadcast axis that an op made longer than 1 holds a fixed grid of values."""
    return "G" if tag == "1" and size > 1 else tag


def _apply_roles(roles: str, old: Sequence[Tag] | None, shape: Sequence[int]) -> Layout:
    """Tags of a layer's output from its roles and its input's tags (None: unknown)."""
    tags = []
    for k, role in enumerate(roles):
        tag = old[k] if old is not None and k < len(old) else "?"
        if role == "C":
            tags.append("C")
        elif tag == "?" or (role == "B" and tag == "1"):  # a batch of one from an unknown op
            tags.append("C" if role == "K" else role)
        else:
            tags.append(_spread(tag, shape[k]))
    return tuple(tags)


def _input_channel_axis(op: Op, node: fx.Node, in_rank: int):
    """Which input axis a layer reads as channels: an index, None (it reads none, e.g. an
    embedding's indices), or _NOT_A_LAYER when ``op`` fixes no axis."""
    rank = in_rank + 1 if op.name == "embedding" else in_rank
    roles = _roles(op, node, rank)
    if roles is None:
        return _NOT_A_LAYER
    channel = roles.index("C")
    return channel if channel < in_rank else None


_NOT_A_LAYER = object()


def _last_layer_roles(module: nn.Module | None, rank: int) -> str | None:
    """Roles of an opaque module's output, from the last batched layer it registers (its type)."""
    if module is None:
        return None
    for sub in reversed(list(module.modules())[1:]):
        roles = _roles(module_op(sub), None, rank)
        if roles is not None and roles[0] == "B":
            return roles
    return None


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


_EINSUM_TERM = re.compile(r"[a-zA-Z.]+")


class _Propagator:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.layouts: dict[fx.Node, Layout | tuple[Layout | None, ...] | None] = {}
        self.data = input_dependence(gm)  # depends on a graph input's values (not only its shape)

    def run(self) -> dict[fx.Node, Layout | tuple | None]:
        for node in self.gm.graph.nodes:
            self.layouts[node] = self._layout(node, op_of(node, self.modules))
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
        if node.op == "output":  # what the graph returns: the layouts of those values
            return fx.node.map_arg(node.args[0], self.layouts.get)
        shapes = node_shapes(node)
        if shapes is not None:  # tuple-valued: split, chunk, max(dim), var_mean ...
            return self._tuple_layout(node, op, shapes)
        shape = node_shape(node)
        if shape is None:
            return None
        if node.op == "placeholder":
            return self._input_layout(node, shape)
        if node.op == "get_attr" or not self.data[node]:
            return _const_layout(shape)
        in_shape, in_lay = self._in(node)
        rule = _RULES.get(op.name)
        if rule is not None:
            lay = rule(self, node, op, shape, in_shape, in_lay)
            if lay is not None:
                return lay
        return self._fallback(node, shape)

    def _input_layout(self, node: fx.Node, shape: Sequence[int]) -> Layout:
        """A model input: batch first, channels where its first layer reads them, the rest S.

        Found by following the input through permutes, unsqueezes and shape-keeping ops to
        the first layer that fixes axes: ``[N, T, F] -> transpose(1, 2) -> Conv1d`` makes
        it (B, S, C), ``[N, L] -> Embedding`` (B, S). No such layer: N, C, *spatial.
        """
        if len(shape) < 2:
            return _default_layout(shape)
        origin: dict[fx.Node, list[int | None]] = {node: list(range(len(shape)))}  # axis -> input axis
        for user in self.gm.graph.nodes:
            src = user.args[0] if user.args else None
            if not isinstance(src, fx.Node) or src not in origin:
                continue
            axes, op = origin[src], op_of(user, self.modules)
            channel = _input_channel_axis(op, user, len(axes))
            if channel is not _NOT_A_LAYER:
                tags = ["B"] + ["S"] * (len(shape) - 1)
                if channel is not None and axes[channel] is not None:
                    tags[axes[channel]] = "C"
                return tuple(tags)
            moved = self._moved_axes(user, op, axes)
            if moved is not None:
                origin[user] = moved
        return _default_layout(shape)

    def _moved_axes(self, node: fx.Node, op: Op, axes: list[int | None]) -> list[int | None] | None:
        """Where the axes of ``node``'s first operand end up, for ops that only move, add or
        drop size-1 axes or keep every axis (elementwise, padding, slicing); else None."""
        in_shape, shape = node_shape(node.args[0]), node_shape(node)
        if in_shape is None or shape is None:
            return None
        rank = len(axes)
        if op.name in PERMUTES:
            order = axis_order(node, op.name, rank)
            return [axes[o] for o in order] if order is not None and len(order) == len(shape) else None
        if op.name == "unsqueeze" and len(shape) == rank + 1:
            dim = argument(node, 1, "dim")
            return axes[:dim % len(shape)] + [None] + axes[dim % len(shape):] if isinstance(dim, int) else None
        if op.name == "squeeze":
            kept = [a for a, (d, s) in zip(axes, enumerate(in_shape)) if s != 1 or not self._squeezes(node, d, rank)]
            return kept if len(kept) == len(shape) else None
        if op.name in RESHAPES or op.name in CONTRACTIONS or op.name in REDUCTIONS or op.name == "getitem" \
                and len(shape) != rank:
            return list(axes) if tuple(shape) == tuple(in_shape) else None
        return list(axes) if len(shape) == rank else None

    @staticmethod
    def _squeezes(node: fx.Node, d: int, rank: int) -> bool:
        dims = _norm_dims(argument(node, 1, "dim"), rank)
        return dims is None or d in dims

    def _anchor(self, node, op, shape, in_shape, in_lay) -> Layout | None:
        """A layer that fixes its output axes (conv, linear, norms, embedding): see _roles."""
        roles = _roles(op, node, len(shape))
        if roles is None:
            return None
        fits = in_lay is not None and len(in_lay) == len(shape) - (op.name == "embedding")
        return _apply_roles(roles, in_lay if fits else None, shape)

    def _leaf(self, node, op, shape, in_shape, in_lay) -> Layout | None:
        """An opaque module: the roles of the last layer it holds (a Conv-BN-act block), else its
        shapes (the fallback keeps the tags of a same-rank input)."""
        roles = _last_layer_roles(op.module, len(shape))
        if roles is None:
            return None
        return _apply_roles(roles, in_lay if in_lay is not None and len(in_lay) == len(shape) else None, shape)

    def _keep_axes(self, node, op, shape, in_shape, in_lay) -> Layout | None:
        """Padding, cropping, narrow: every axis keeps its meaning, whatever its new size."""
        if in_lay is None or len(in_lay) != len(shape):
            return None
        return tuple(_spread(t, s) for t, s in zip(in_lay, shape))

    def _unsqueeze(self, node, op, shape, in_shape, in_lay) -> Layout | None:
        if in_lay is None or len(shape) != len(in_lay) + 1:
            return None
        dim = argument(node, 1, "dim") % len(shape)
        return in_lay[:dim] + ("1",) + in_lay[dim:]

    def _squeeze(self, node, op, shape, in_shape, in_lay) -> Layout | None:
        if in_lay is None:
            return None
        dim = argument(node, 1, "dim")
        dims = _norm_dims(dim, len(in_lay)) if dim is not None else None
        if dims is None:
            dims = [d for d, s in enumerate(in_shape) if s == 1]
        tags = tuple(t for d, t in enumerate(in_lay) if not (d in dims and in_shape[d] == 1))
        return tags if len(tags) == len(shape) else reshape_tags(in_shape, in_lay, shape)

    def _reshape(self, node, op, shape, in_shape, in_lay) -> Layout | None:
        return reshape_tags(in_shape, in_lay, shape) if in_lay is not None else None

    def _interpolate(self, node, op, shape, in_shape, in_lay) -> Layout | None:
        if in_lay is None or len(in_lay) != len(shape) or len(shape) < 3:
            return None
        lead = _apply_roles("BK", in_lay[:2], shape[:2])
        return lead + tuple("S" if s > 1 or t == "?" else t for s, t in zip(shape[2:], in_lay[2:]))

    def _expand_as(self, node, op, shape, in_shape, in_lay) -> Layout | None:
        other = node.args[1] if len(node.args) > 1 else None
        other_lay = self.layouts.get(other) if isinstance(other, fx.Node) else None
        if isinstance(other_lay, tuple) and len(other_lay) == len(shape):
            return other_lay
        return self._broadcast_op(node, op, shape, in_shape, in_lay)

    def _broadcast_op(self, node, op, shape, in_shape, in_lay) -> Layout | None:
        if in_lay is not None and len(in_lay) == len(shape):
            return in_lay  # an expanded axis holds one value along it: still a broadcast ("1") axis
        return None

    def _fallback(self, node: fx.Node, shape: Sequence[int]) -> Layout:
        """Elementwise and broadcasting ops keep tags. An op asrfx does not know that keeps the
        rank (a user function, an opaque module) keeps the tags of its same-rank data input,
        whatever the sizes; anything else is unknown."""
        operands = self._tensor_args(node)
        fits = [o for o in operands if len(o[0]) <= len(shape)]
        if not fits:
            return ("?",) * len(shape)
        tags = _broadcast(shape, fits)
        same = next((o for o in fits if o[2] and len(o[0]) == len(shape)), None)
        if same is not None:  # axes no operand has at this size: the same-rank input's, resized
            tags = tuple(_spread(s, size) if size != n and t in ("?", "1") else t
                         for t, s, n, size in zip(tags, same[1], same[0], shape))
        return tags

    def _tuple_layout(self, node: fx.Node, op: Op, shapes):
        in_shape, in_lay = self._in(node)
        if in_lay is None:
            return tuple(("?",) * len(s) if s is not None else None for s in shapes)
        if op.name in REDUCTIONS:  # (values, indices) or (std, mean)
            return tuple(self._reduce(node, op, s, in_shape, in_lay) if s is not None else None
                         for s in shapes)
        if op.name == "unbind":
            dim = argument(node, 1, "dim", 0) % len(in_lay)
            lay = in_lay[:dim] + in_lay[dim + 1:]
            return tuple(lay for _ in shapes)
        # split / chunk / tensor_split keep the meaning of every axis
        return tuple(in_lay if s is not None and len(s) == len(in_lay) else None for s in shapes)

    def _getitem(self, node, op, shape, in_shape, in_lay) -> Layout | None:
        src = self.layouts.get(node.args[0])
        if isinstance(src, tuple) and src and not isinstance(src[0], str):  # element of a tuple value
            index = node.args[1]
            picked = src[index] if isinstance(index, int) and -len(src) <= index < len(src) else None
            return picked if picked is not None and len(picked) == len(shape) else ("?",) * len(shape)
        if in_lay is None:
            return None
        index = node.args[1]
        if not isinstance(index, tuple):
            index = (index,)
        if any(isinstance(i, fx.Node) or not (i is None or i is Ellipsis or isinstance(i, (int, slice)))
               for i in index):
            return None
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

    def _permute(self, node, op, shape, in_shape, in_lay) -> Layout | None:
        if not in_lay:
            return None
        order = axis_order(node, op.name, len(in_lay))
        if order is None or len(order) != len(shape):
            return ("?",) * len(shape)
        return tuple(in_lay[o] for o in order)

    def _reduce(self, node, op, shape, in_shape, in_lay) -> Layout | None:
        if in_lay is None:
            return None
        name, rank = op.name, len(in_lay)
        dim_index = 2 if name in ("norm", "vector_norm") else 1
        dim = argument(node, dim_index, "dim")
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

    def _pool(self, node, op: Op, shape, in_shape, in_lay) -> Layout | None:
        """Pools work on the last k axes (positions); the leading (N, C) keep their meaning."""
        if in_lay is None or len(shape) != len(in_lay):
            return None
        k = min(op.dims or max(len(shape) - 2, 1), len(shape))
        lead_roles = "BK"[-(len(shape) - k):] if 0 < len(shape) - k <= 2 else None
        lead = _apply_roles(lead_roles, in_lay[: len(shape) - k], shape) if lead_roles else in_lay[: len(shape) - k]
        out = []
        adaptive = op.name.startswith("adaptive")
        kernel = (None,) * k
        if not adaptive:
            kernel = op.module.kernel_size if op.module is not None else argument(node, 1, "kernel_size")
            if isinstance(kernel, (int, fx.Node)):
                kernel = (kernel,) * k
            kernel = tuple(kernel) if kernel is not None else (None,) * k
            if len(kernel) < k:
                kernel = kernel + (kernel[-1],) * (k - len(kernel))
        fixed = _adaptive_output_size(node, op, k) if adaptive else None
        for axis in range(k):
            pos = len(shape) - k + axis
            size_in, size_out = in_shape[pos], shape[pos]
            tag = "S" if in_lay[pos] == "?" else in_lay[pos]  # a pool's window moves over positions
            if adaptive and fixed[axis] is None:
                out.append(tag)  # output_size None keeps the axis
            elif size_out == 1 and (adaptive or _covers(kernel[axis], size_in)):
                out.append("1")
            elif adaptive and fixed[axis] is not None:
                out.append("G")  # a fixed grid, whatever the input size (SPA)
            else:
                out.append(tag)  # a sliding window keeps positions
        return lead + tuple(out)

    def _contract(self, node, op, shape, in_shape, in_lay) -> Layout:
        if op.name == "einsum":
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

    def _cat(self, node, op, shape, in_shape, in_lay) -> Layout:
        tensors = node.args[0] if node.args else []
        lays = [self.layouts.get(t) for t in tensors if isinstance(t, fx.Node)]
        lays = [l for l in lays if isinstance(l, tuple) and len(l) == len(shape)]
        if not lays:
            return ("?",) * len(shape)
        return tuple(merge_tags(ts) for ts in zip(*lays))

    def _stack(self, node, op, shape, in_shape, in_lay) -> Layout:
        tensors = node.args[0] if node.args else []
        dim = argument(node, 1, "dim", 0) % len(shape)
        lays = [self.layouts.get(t) for t in tensors if isinstance(t, fx.Node)]
        lays = [l for l in lays if isinstance(l, tuple) and len(l) == len(shape) - 1]
        if not lays:
            return ("?",) * len(shape)
        base = tuple(merge_tags(ts) if len(set(ts)) > 1 else ts[0] for ts in zip(*lays))
        return base[:dim] + ("O",) + base[dim:]


# One rule per op (None from a rule: fall back to the elementwise rule).
_RULES = {
    **{name: _Propagator._anchor for name in (
        "conv", "conv_transpose", "linear", "bilinear", "embedding", "batch_norm", "instance_norm",
        "group_norm", "local_response_norm", "layer_norm", "pixel_shuffle", "pixel_unshuffle")},
    "module": _Propagator._leaf,
    **{name: _Propagator._keep_axes for name in ("pad", "narrow")},
    "unsqueeze": _Propagator._unsqueeze,
    "squeeze": _Propagator._squeeze,
    **{name: _Propagator._reshape for name in RESHAPES - {"squeeze", "unsqueeze"}},
    "getitem": _Propagator._getitem,
    **{name: _Propagator._permute for name in PERMUTES},
    **{name: _Propagator._reduce for name in REDUCTIONS},
    **{name: _Propagator._pool for name in POOLS},
    **{name: _Propagator._contract for name in CONTRACTIONS},
    "interpolate": _Propagator._interpolate,
    "stack": _Propagator._stack,
    "cat": _Propagator._cat,
    "expand_as": _Propagator._expand_as,
    **{name: _Propagator._broadcast_op for name in BROADCASTS - {"expand_as"}},
}


def _covers(kernel, size_in: int) -> bool:
    """A window that spans the whole axis; one computed from x.size() does by construction."""
    return isinstance(kernel, fx.Node) or (isinstance(kernel, int) and kernel == size_in)


def _adaptive_output_size(node: fx.Node, op: Op, k: int):
    size = op.module.output_size if op.module is not None else argument(node, 1, "output_size")
    if isinstance(size, int) or size is None:
        return (size,) * k
    return tuple(size)


def infer_layouts(gm: fx.GraphModule) -> dict[fx.Node, Layout | tuple | None]:
    """Tag every axis of every tensor in ``gm`` (nodes need shape metadata).

    Returns a map node -> layout (a tuple of tags), a tuple of layouts for
    tuple-valued nodes, or None for non-tensor values (sizes, flags).
    """
    return _Propagator(gm).run()


def unknown_origins(gm: fx.GraphModule, layouts) -> dict[fx.Node, fx.Node]:
    """For every value with an axis of unknown meaning, the node where that began: itself if
    none of its inputs had one, else the origin of its first input that had one."""
    origin: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if is_unknown(layouts.get(node)):
            origin[node] = next((origin[i] for i in node.all_input_nodes if i in origin), node)
    return origin
