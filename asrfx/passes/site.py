"""Typed records for what detection finds (one frozen dataclass per match)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from torch import fx

from ..graph.capture import LeafRecord  # a capture record; re-exported here with the other records

__all__ = ["SiteKind", "Combine", "GateUse", "Absorption", "AttentionSite", "Verdict", "Rejection", "LayoutLoss",
           "LeafRecord"]


class SiteKind(StrEnum):
    """Structural family of a channel-attention site (see docs/architecture.md)."""

    SE = "se"  # average pooling, channel-mixing excitation (Linear / 1x1 conv)
    ECA = "eca"  # excitation is a conv1d sliding across channels
    SRM = "srm"  # style pooling: a std/var statistic among the pooled inputs
    CBAM_CHANNEL = "cbam_channel"  # average and max pooling feeding one gate
    GC = "gc"  # softmax-weighted (attention) pooling, or an additive gate
    SPA = "spa"  # adaptive pooling to a grid larger than 1x1 (pyramid)
    IE = "ie"  # only per-channel parameters in the excitation, no channel mixing
    SPLIT = "split"  # softmax over branches of a per-channel gate (SK, ResNeSt)
    OTHER = "other"  # a per-channel pooled gate that fits none of the above


class Combine(StrEnum):
    """How the gate meets the feature map."""

    MUL = "mul"  # x * g (SE family)
    ADD = "add"  # x + g (GC-style fusion)


@dataclass(frozen=True)
class GateUse:
    """One application of a gate to a feature map."""

    x: fx.Node  # the feature map that is gated, [N, C, *spatial] or [N, L, C]
    gate: fx.Node  # the per-channel gate before any broadcast (expand_as etc.)
    operand: fx.Node  # the gate as the combine node sees it (gate or its broadcast)
    combine: fx.Node  # the mul/add node that produces the gated feature map
    op: Combine  # multiply or add


@dataclass(frozen=True)
class Absorption:
    """Where the gate folds, as fuse will fold it (both read the rule table, asrfx.algebra.rules)."""

    producer: fx.Node  # x, the gated feature map
    side: str  # "producer" (the layers that computed x), "consumers" (those that read the gated map), "kept"
    targets: tuple[fx.Node, ...]  # the layers (or parameters) that absorb it; empty when kept
    through: tuple[fx.Node, ...]  # ops the gate moves through on the way (ReLU, pooling, reshapes ...)
    reason: str  # the fold target in words, or why the gate would stay a multiply

    @property
    def target(self) -> fx.Node | None:
        """The first layer that absorbs the gate on the producer side (None otherwise)."""
        return self.targets[0] if self.side == "producer" and self.targets else None


@dataclass(frozen=True)
class AttentionSite:
    """A channel-attention block found in a traced graph."""

    kind: SiteKind  # structural family
    uses: tuple[GateUse, ...]  # gate applications; more than one when branches share an excitation
    pools: tuple[fx.Node, ...]  # global reductions of the input: avg/max/std pools, matmul pooling
    excitation: tuple[fx.Node, ...]  # nodes between the pools and the gates (data path, graph order)
    channel_dim: int  # axis of x that the gate scales
    channels: int  # size of that axis
    gate_shape: tuple[int, ...]  # shape of the (first) gate before broadcasting
    absorption: Absorption  # what the producer of x can absorb (for fuse)
    module_path: str  # the attention block in the original model, e.g. "layer1.0.se"
    module_paths: tuple[str, ...]  # every module path the site's nodes come from

    @property
    def x(self) -> fx.Node:
        """The gated feature map of the first use."""
        return self.uses[0].x

    @property
    def gate(self) -> fx.Node:
        """The gate of the first use."""
        return self.uses[0].gate

    @property
    def combine(self) -> fx.Node:
        """The combine node of the first use."""
        return self.uses[0].combine

    @property
    def absorbable(self) -> bool:
        """Whether the layers that computed x can absorb the gate."""
        return self.absorption.side == "producer"

    @property
    def foldable(self) -> bool:
        """Whether the gate folds away (producer or consumer side) rather than staying a multiply."""
        return self.absorption.side != "kept"


class Verdict(StrEnum):
    """How sure a refusal is (see docs/architecture.md, "Never a silent miss")."""

    NOT_ATTENTION = "not attention"  # a pooled gate without the attention pattern: a normalization (FRN, GRN)
    NOT_CHANNEL = "not channel attention"  # attention-like, but its gate is not per sample and per channel
    UNDECIDED = "undecided"  # attention-like, and asrfx could not tell (layout lost, an op it does not read)


@dataclass(frozen=True)
class Rejection:
    """A combine that looked like attention but is not reported as a site, and why."""

    combine: fx.Node  # the node examined (x * g, x + g, or another op joining x and a gate)
    module_path: str  # where it lives in the original model
    reason: str  # why it is not a channel-attention site
    verdict: Verdict = Verdict.NOT_ATTENTION  # UNDECIDED ones are possible misses: find_attention warns


@dataclass(frozen=True)
class LayoutLoss:
    """Where the axis layout became unknown: detection cannot read pooling downstream of it."""

    node: fx.Node  # the first node whose value has an axis of unknown meaning
    module_path: str  # where it lives in the original model
    op: str  # what it computes: the canonical op name, or the module's class
    tensors: int  # how many values, from this node on, have an axis of unknown meaning


