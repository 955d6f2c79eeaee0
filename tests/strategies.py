"""Hypothesis strategies shared by the property tests: random networks with attention and decoys
(detection, convert, fuse, capture, the dynamo backend), and random structures around one gate
(the gate algebra: folding, the training fast path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import zoo
from helpers import randomize

__all__ = ["ATTENTION", "DECOYS", "NORMS", "ACTS", "Stage", "RandomNet", "networks", "Around", "structures"]

ATTENTION = {
    "se": [zoo.SELayer, zoo.SEInplace, zoo.SEConv],
    "eca": [zoo.ECALayer, zoo.EcaModule],
    "srm": [zoo.SRMLayer, zoo.SRMConv1d],
    "ie": [zoo.InstanceEnhance],
    "spa": [lambda c: zoo.SPALayer(c, reduction=4), zoo.SPAConv],
    "cbam_channel": [zoo.ChannelGate],
    "gc": [zoo.ContextBlock, zoo.GlobalContextScale],
}
DECOYS = {
    "layer_scale": zoo.LayerScale2d,
    "cbam_spatial": lambda c: zoo.SpatialGate(),
    "coordinate": lambda c: zoo.CoordAtt(c, c),
    "frn": zoo.FilterResponseNormTLU,
    "grn": zoo.GlobalResponseNorm2d,
    "instance_norm": zoo.ManualInstanceNorm2d,
    "squeeze_no_excite": lambda c: zoo.SqueezeNoExcite(),
    "glu": zoo.GatedConv,
    "scalar_gate": zoo.SampleScalarGate,
    "constant_input": zoo.ASRTrainGate,
}
NORMS = {
    "bn": nn.BatchNorm2d,
    "gn": lambda c: nn.GroupNorm(4, c),
    "none": lambda c: nn.Identity(),
}
ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU, "none": nn.Identity}


class Stage(nn.Module):
    def __init__(self, cin, cout, kernel, stride, depthwise, norm, act, plug, residual):
        super().__init__()
        groups = cin if depthwise and cin == cout else 1
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=norm == "none")
        self.norm = NORMS[norm](cout)
        self.act = ACTS[act]()
        self.plug = plug if plug is not None else nn.Identity()
        self.residual = residual and cin == cout and stride == 1

    def forward(self, x):
        out = self.plug(self.act(self.norm(self.conv(x))))
        return out + x if self.residual else out


class RandomNet(nn.Module):
    def __init__(self, stages):
        super().__init__()
        self.stem = nn.Conv2d(3, stages[0].conv.in_channels, 3, 1, 1)
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(stages[-1].conv.out_channels, 5)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@st.composite
def networks(draw, with_attention: bool = False):
    """A random network and the (path, kind, channels) of every attention module in it.
    ``with_attention``: at least one stage holds attention (the passes after detection have
    nothing to test on a draw without any)."""
    depth = draw(st.integers(1, 4))
    width = draw(st.sampled_from([16, 32]))
    slots = [draw(st.sampled_from(["none", "attention", "attention", "decoy"])) for _ in range(depth)]
    if with_attention and "attention" not in slots:
        slots[draw(st.integers(0, depth - 1))] = "attention"
    stages, expected = [], []
    cin = width
    for i, slot in enumerate(slots):
        cout = draw(st.sampled_from([16, 32]))
        plug = None
        if slot == "attention":
            kind = draw(st.sampled_from(sorted(ATTENTION)))
            plug = draw(st.sampled_from(ATTENTION[kind]))(cout)
            expected.append((f"stages.{i}.plug", kind, cout))
        elif slot == "decoy":
            plug = DECOYS[draw(st.sampled_from(sorted(DECOYS)))](cout)
        stages.append(Stage(
            cin, cout,
            kernel=draw(st.sampled_from([1, 3])),
            stride=draw(st.sampled_from([1, 1, 2])),
            depthwise=draw(st.booleans()),
            norm=draw(st.sampled_from(sorted(NORMS))),
            act=draw(st.sampled_from(sorted(ACTS))),
            plug=plug,
            residual=draw(st.booleans()),
        ))
        cin = cout
    net = RandomNet(stages)
    seed = draw(st.integers(0, 2**16))
    randomize(net, seed, scale=0.5, mean_scale=1.0)
    return net.eval(), expected


# -- around one gate ------------------------------------------------------------------------------


class Around(nn.Module):
    def __init__(self, before, branches, act, after, gate, c, pieces):
        super().__init__()
        self.before, self.act, self.after, self.gate, self.pieces = before, act, after, gate, pieces
        self.branch_kinds = branches
        width = c if before == "sum" else None
        self.branches = nn.ModuleList()
        for kind in branches:
            out = width if width is not None else 2 + len(self.branches)
            if kind == "conv_bn":
                self.branches.append(nn.Sequential(nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out)))
            elif kind == "conv":
                self.branches.append(nn.Conv2d(c, out, 1))
            elif kind == "bn":
                self.branches.append(nn.BatchNorm2d(c))
            else:
                self.branches.append(nn.Identity())
        w = c if before == "sum" else sum(2 + k if kind in ("conv_bn", "conv") else c
                                          for k, kind in enumerate(branches))
        self.w = w
        self.fc1, self.fc2 = nn.Conv2d(w, max(w // 2, 1), 1), nn.Conv2d(max(w // 2, 1), w, 1)
        if after == "conv":
            self.head = nn.Conv2d(w, 3, 3, padding=1)
        elif after == "split":
            pieces = min(pieces, w)
            sizes = [w // pieces] * (pieces - 1)
            self.sizes = sizes + [w - sum(sizes)]
            self.heads = nn.ModuleList([nn.Conv2d(s, 2, 1 + 2 * (k % 2), padding=k % 2)
                                        for k, s in enumerate(self.sizes)])
        elif after == "bn_conv":
            self.bn = nn.BatchNorm2d(w)
            self.head = nn.Conv2d(w, 3, 1)
        elif after == "pool_linear":
            self.head = nn.Linear(w, 3)
        else:  # grouped conv
            groups = next(g for g in (3, 2, 1) if w % g == 0)
            self.head = nn.Conv2d(w, w, 1, groups=groups)

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        y = sum(outs[1:], outs[0]) if self.before == "sum" else torch.cat(outs, dim=1)
        y = {"relu": F.relu, "silu": F.silu, "none": lambda t: t}[self.act](y)
        e = self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True))))
        y = y * torch.sigmoid(e) if self.gate == "sigmoid" else y * torch.tanh(e) if self.gate == "tanh" else y + e
        if self.after == "split":
            parts = torch.split(y, self.sizes, dim=1)
            return torch.cat([head(parts[k]) for k, head in enumerate(self.heads)], dim=1)
        if self.after == "bn_conv":
            return self.head(self.bn(y))
        if self.after == "pool_linear":
            return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))
        return self.head(y)


@st.composite
def structures(draw):
    before = draw(st.sampled_from(["sum", "cat"]))
    kinds = ["conv_bn", "conv", "bn", "identity"]
    branches = draw(st.lists(st.sampled_from(kinds), min_size=1 if before == "cat" else 2, max_size=3))
    return dict(before=before, branches=tuple(branches), act=draw(st.sampled_from(["relu", "silu", "none"])),
                after=draw(st.sampled_from(["conv", "split", "bn_conv", "pool_linear", "grouped"])),
                gate=draw(st.sampled_from(["sigmoid", "tanh", "add"])), c=draw(st.integers(2, 5)),
                pieces=draw(st.integers(2, 3)))
