"""The gate algebra, written once: how a per-channel gate meets each op and each layer.

A gate is a per-channel vector v applied to a feature map x as a *scale* (``x * v``,
SE-style) or a *shift* (``x + v``, GC-style). Folding it means moving it, through ops it
commutes with, to a layer whose parameters absorb it:

* on the *producer* side, back from x to the layer that computed it
  (``relu(bn(y)) * v == relu(bn'(y))`` with bn's affine scaled, for v >= 0);
* on the *consumer* side, forward to the layers that read the gated tensor
  (``conv(x * v) == conv'(x)`` with the conv's input columns scaled).

This module is the table of those facts, and nothing else: which ops commute with a
scale or a shift (always, only for a non-negative gate, never), how the gated axis maps
through them, and which layers absorb a scale or a shift on which side. It holds no
graph code; detect (the fold target it reports), convert (applying gates inside a
BatchNorm while training), fuse (module, functional and aten graphs alike) and the
dynamo backend read it through :mod:`asrfx.passes.absorb`.

Op names are the canonical names of :func:`asrfx.graph.ops.op_of`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "Needs", "Axes", "Commute", "COMMUTE", "commute_rule", "Absorber", "ABSORBERS", "NON_NEGATIVE_OUTPUT",
    "scale_passes", "shift_passes", "output_absorbs", "input_absorbs",
]


class Needs(StrEnum):
    """When an identity ``op(x) (*|+) v == op(x (*|+) v)`` holds."""

    ANY = "any"  # for every gate value
    NON_NEGATIVE = "non-negative"  # only when every gate entry is >= 0 (relu(a) * v == relu(a * v))
    NEVER = "never"


class Axes(StrEnum):
    """How the gated axis of an op's input relates to its output."""

    SAME = "same"  # the output has the input's axes (elementwise ops, pooling windows, padding)
    REARRANGE = "rearrange"  # reshape / permute family: the axis follows sizes or the permutation
    SLICE = "slice"  # getitem, narrow, split, chunk: the gated axis may be cut, and the vector with it
    REDUCE = "reduce"  # mean over other axes (global pooling before a classifier)
    DISTRIBUTE = "distribute"  # a sum of branches: a scale goes to every branch, a shift to one of them
    CONCAT = "concat"  # cat: along the gated axis the vector splits into one part per input
    FACTOR = "factor"  # a product: a scale moves into one of the factors


@dataclass(frozen=True)
class Commute:
    """How a per-channel scale and shift pass through one op."""

    scale: Needs  # op(x * v) == op(x) * v
    shift: Needs  # op(x + v) == op(x) + v
    axes: Axes  # how the gated axis maps from input to output


_ANY_BOTH_SAME = Commute(Needs.ANY, Needs.ANY, Axes.SAME)
_REARRANGE = Commute(Needs.ANY, Needs.ANY, Axes.REARRANGE)
_SLICE = Commute(Needs.ANY, Needs.ANY, Axes.SLICE)

COMMUTE: dict[str, Commute] = {
    # copies of the values
    "identity": _ANY_BOTH_SAME, "dropout": _ANY_BOTH_SAME, "contiguous": _ANY_BOTH_SAME, "clone": _ANY_BOTH_SAME,
    "to": _ANY_BOTH_SAME, "type_as": _ANY_BOTH_SAME, "float": _ANY_BOTH_SAME, "detach": _ANY_BOTH_SAME,
    # positively homogeneous activations: relu(a * v) == relu(a) * v for v >= 0; a shift changes where they cut
    "relu": Commute(Needs.NON_NEGATIVE, Needs.NEVER, Axes.SAME),
    "leaky_relu": Commute(Needs.NON_NEGATIVE, Needs.NEVER, Axes.SAME),
    # pooling windows: an average is linear (a constant shift survives only where every window holds
    # exactly its own inputs, see _avg_pool_shift); a maximum commutes with v >= 0 and with any shift
    "avg_pool": Commute(Needs.ANY, Needs.ANY, Axes.SAME),
    "adaptive_avg_pool": Commute(Needs.ANY, Needs.ANY, Axes.SAME),
    "max_pool": Commute(Needs.NON_NEGATIVE, Needs.ANY, Axes.SAME),
    "adaptive_max_pool": Commute(Needs.NON_NEGATIVE, Needs.ANY, Axes.SAME),
    # resampling: each output is a convex combination (weights summing to 1) of inputs of the same channel
    "interpolate": Commute(Needs.ANY, Needs.ANY, Axes.SAME),
    # padding: zeros stay zeros under a scale (other constants do not, _pad_scale); a shift survives
    # only padding that copies values (_pad_shift)
    "pad": Commute(Needs.ANY, Needs.ANY, Axes.SAME),
    # re-arrangements
    **{name: _REARRANGE for name in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                                     "permute", "transpose", "view_as", "reshape_as")},
    # cuts
    **{name: _SLICE for name in ("getitem", "narrow", "slice", "split", "chunk", "tensor_split",
                                 "split_with_sizes", "unbind")},
    # reductions over other axes: a scale of the kept axis survives; a shift survives a mean, not a sum
    "mean": Commute(Needs.ANY, Needs.ANY, Axes.REDUCE),
    "sum": Commute(Needs.ANY, Needs.NEVER, Axes.REDUCE),
    # sums of branches: (a + b) * v == a * v + b * v; (a + b) + c == (a + c) + b
    "add": Commute(Needs.ANY, Needs.ANY, Axes.DISTRIBUTE),
    "sub": Commute(Needs.ANY, Needs.ANY, Axes.DISTRIBUTE),
    # concatenation: each input gets its part of the vector
    "cat": Commute(Needs.ANY, Needs.ANY, Axes.CONCAT),
    # a product: (a * b) * v == (a * v) * b, so a scale moves into one factor; a shift does not
    "mul": Commute(Needs.ANY, Needs.NEVER, Axes.FACTOR),
}


def _avg_pool_shift(args: Mapping[str, Any]) -> str | None:
    """An average of a shifted window is shifted, unless padded zeros or a clipped window take part."""
    padding = args.get("padding", 0)
    padded = any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))
    if padded and args.get("count_include_pad", True):
        return "averages padded zeros"
    if args.get("ceil_mode", False):
        return "uses ceil_mode (windows running past the border)"
    if args.get("divisor_override"):
        return "divides by a fixed divisor, not by the window's size"
    return None


def _pad_shift(args: Mapping[str, Any]) -> str | None:
    """Reflect / replicate / circular padding copies shifted values; constant padding adds unshifted ones."""
    mode = args.get("mode", "constant")
    return "pads with constants that are not shifted" if mode == "constant" else None


def _pad_scale(args: Mapping[str, Any]) -> str | None:
    """Padding with zeros (or copies of values) keeps a scale; a nonzero constant is not scaled with them."""
    value = args.get("value")
    if args.get("mode", "constant") == "constant" and value not in (None, 0, 0.0):
        return f"pads with the constant {value!r}, which a per-channel scale would not scale"
    return None


# Conditions on an op's arguments, for the entries above whose identity depends on them.
_SCALE_CONDITIONS = {"pad": _pad_scale}
_SHIFT_CONDITIONS = {"avg_pool": _avg_pool_shift, "pad": _pad_shift}


def commute_rule(name: str) -> Commute | None:
    """The rule for op ``name``, or None when a gate cannot pass through it."""
    return COMMUTE.get(name)


def scale_passes(name: str, non_negative: bool | None, args: Mapping[str, Any] | None = None) -> str | None:
    """None when ``op(x * v) == op(x) * v`` for this op with these arguments; else the reason.
    ``non_negative``: what is known of v (None: unknown, which passes only ops that commute with any scale)."""
    rule = COMMUTE.get(name)
    if rule is None or rule.scale is Needs.NEVER:
        return f"{name} does not commute with a per-channel scale"
    if rule.scale is Needs.NON_NEGATIVE and not non_negative:
        return (f"{name} commutes with a non-negative scale only, and the gate "
                + ("has negative entries" if non_negative is False else "may be negative"))
    condition = _SCALE_CONDITIONS.get(name)
    why = condition(args or {}) if condition is not None else None
    return f"{name} {why}" if why else None


def shift_passes(name: str, args: Mapping[str, Any] | None = None) -> str | None:
    """None when ``op(x + c) == op(x) + c`` for this op with these arguments; else the reason."""
    rule = COMMUTE.get(name)
    if rule is None or rule.shift is Needs.NEVER:
        return f"{name} does not commute with a per-channel shift"
    condition = _SHIFT_CONDITIONS.get(name)
    why = condition(args or {}) if condition is not None else None
    return f"{name} {why}" if why else None


# Gate activations whose output is never negative: a gate made by one of them folds through ReLU.
NON_NEGATIVE_OUTPUT = frozenset({"sigmoid", "hardsigmoid", "softmax", "relu", "relu6", "exp", "softplus", "abs"})


@dataclass(frozen=True)
class Absorber:
    """How a layer kind absorbs a per-channel scale or shift."""

    channels_last: bool  # the channel axis is the last one (linear, layer_norm), else axis 1
    output_scale: bool  # y * v folds into the layer's output rows and bias (paper eqs. 6, 7)
    output_shift: str  # y + c goes into the bias: "create" (made if missing), "existing" only, or "never"
    input_scale: bool  # layer(x * v) folds into the layer (weight columns; a BatchNorm's mean and weight)
    input_shift: str  # layer(x + c): "always", "unpadded" (convs whose windows never see padding), "never"
    input_needs_eval: bool  # the input side holds only with fixed statistics (BatchNorm in eval mode)


ABSORBERS: dict[str, Absorber] = {
    "conv": Absorber(False, True, "create", True, "unpadded", False),
    "conv_transpose": Absorber(False, True, "create", True, "never", False),
    "linear": Absorber(True, True, "create", True, "always", False),
    "batch_norm": Absorber(False, True, "existing", True, "always", True),
    "group_norm": Absorber(False, True, "existing", False, "never", False),
    "instance_norm": Absorber(False, True, "existing", False, "never", False),
    "layer_norm": Absorber(True, True, "existing", False, "never", False),
}


def _channel_axis(absorber: Absorber, rank: int) -> int:
    return rank - 1 if absorber.channels_last else 1


def output_absorbs(name: str, layer: Any, axis: int, rank: int, channels: int, shift: bool) -> str | None:
    """None when layer ``name`` can absorb a scale (or a shift) of its output along ``axis``.

    ``layer`` is read duck-typed: ``has_weight``/``has_bias`` and ``normalized_shape``;
    ``channels`` is the size of the gated axis.
    """
    absorber = ABSORBERS.get(name)
    if absorber is None or not absorber.output_scale:
        return f"{name} cannot absorb a per-channel constant"
    if axis != _channel_axis(absorber, rank):
        where = "the last axis" if absorber.channels_last else "axis 1"
        return f"it has its channels on {where}, the gate is on axis {axis}"
    if name == "layer_norm" and tuple(layer.normalized_shape or ()) != (channels,):
        return f"it normalizes {tuple(layer.normalized_shape or ())}, not the gated axis alone"
    if shift:
        if absorber.output_shift == "never" or (absorber.output_shift == "existing" and not layer.has_bias):
            return "it has no bias for the shift"
        return None
    if name in ("batch_norm", "group_norm", "instance_norm", "layer_norm") and not layer.has_weight:
        return "it has no affine weight to absorb a scale"
    return None


def input_absorbs(name: str, layer: Any, axis: int, rank: int, shift: bool) -> str | None:
    """None when layer ``name`` can absorb a scale (or a shift) of its input along ``axis``.

    ``layer`` also gives ``padded``, ``running_var`` and ``training`` (batch statistics in use).
    """
    absorber = ABSORBERS.get(name)
    if absorber is None or not absorber.input_scale:
        return f"{name} cannot absorb a per-channel constant of its input"
    if axis != _channel_axis(absorber, rank):
        return f"it reads channels on another axis ({_channel_axis(absorber, rank)}) than the gate's ({axis})"
    if absorber.input_needs_eval and (layer.training or layer.running_var is None):
        return "it normalizes with batch statistics, which a constant scale or shift does not pass"
    if name == "batch_norm" and not shift and not layer.has_weight:
        return "it has no affine weight to absorb a scale"
    if shift:
        if absorber.input_shift == "never":
            return "a shift of its input cannot fold into it"
        if absorber.input_shift == "unpadded" and layer.padded:
            return "it pads its input, and the padded zeros would not be shifted"
        if name == "batch_norm" and not layer.has_bias:
            return "it has no bias for the shift"
    return None
