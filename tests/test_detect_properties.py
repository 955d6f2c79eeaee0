"""Property tests: detection on random architectures.

A random network is a stack of stages ``conv -> norm -> act -> plug-in (-> + residual)``
where each plug-in is nothing, a channel-attention module of a random kind and coding
style, or a decoy that must not be reported (layer scale, spatial attention, coordinate
attention, FRN, GRN, instance norm, a pooled gate without excitation, a GLU gate, a
per-sample scalar gate, a constant-input gate). Shapes, batch size (1 included),
resolution (down to 1x1 maps), parameters and BatchNorm running statistics are random.

Property: the sites found are exactly the attention modules inserted, in order, with
their kind, module path and channel count; and batch size does not change the answer.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import asrfx

import zoo
from helpers import randomize

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
def networks(draw):
    """A random network and the (path, kind, channels) of every attention module in it."""
    depth = draw(st.integers(1, 4))
    width = draw(st.sampled_from([16, 32]))
    stages, expected = [], []
    cin = width
    for i in range(depth):
        cout = draw(st.sampled_from([16, 32]))
        slot = draw(st.sampled_from(["none", "attention", "attention", "decoy"]))
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


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(), st.integers(1, 3), st.integers(1, 12))
def test_random_networks(net_expected, batch, resolution):
    """Sites == inserted attention modules, in order, whatever the decoys, batch and resolution."""
    net, expected = net_expected
    sites = asrfx.find_attention(net, torch.randn(batch, 3, resolution, resolution))
    got = [(s.module_path, s.kind.value, s.channels) for s in sites]
    assert got == expected, sites.format()
    for site in sites:
        assert site.gate_shape[0] == batch
        assert site.gate_shape[site.channel_dim] == site.channels


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(), st.integers(2, 4), st.integers(1, 9))
def test_batch_size_does_not_change_detection(net_expected, batch, resolution):
    """A batch of one cannot tell per-sample gates by size; detection relies on dataflow instead."""
    net, _ = net_expected
    one = asrfx.find_attention(net, torch.randn(1, 3, resolution, resolution))
    many = asrfx.find_attention(net, torch.randn(batch, 3, resolution, resolution))
    assert [(s.module_path, s.kind) for s in one] == [(s.module_path, s.kind) for s in many]
