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

from helpers import examples, randomize

from strategies import ACTS, networks


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(), st.integers(1, 3), st.integers(1, 12))
def test_random_networks(net_expected, batch, resolution):
    """Sites == inserted attention modules, in order, whatever the decoys, batch and resolution."""
    net, expected = net_expected
    sites = asrfx.find_attention(net, torch.randn(batch, 3, resolution, resolution))
    got = [(s.module_path, s.kind.value, s.channels) for s in sites]
    assert got == expected, sites.format()
    assert not sites.layout_losses and not [r for r in sites.rejections if r.verdict == "undecided"], sites.format()
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


# -- stems that used to lose the layout: padding, opaque leaves, channels-last inputs; 1-d/2-d/3-d ----------
#
# Networks over 1-d, 2-d or 3-d feature maps whose stem pads (a padding module of any kind, or
# F.pad), runs an untraceable block (kept as an opaque leaf: a conv block, or a parameter-free
# crop), a user function torch.fx cannot see into, and whose input may arrive channels-last
# ([N, T, F] for audio, [N, H, W, C]) and be moved to [N, C, *spatial] inside the model.
# Attention and decoys are written for any number of spatial axes.

from dataclasses import dataclass  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from hypothesis import example  # noqa: E402
from torch import fx  # noqa: E402

from asrfx import Verdict  # noqa: E402

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_PADS = {
    "zero": {1: nn.ZeroPad1d, 2: nn.ZeroPad2d, 3: nn.ZeroPad3d},
    "constant": {1: lambda p: nn.ConstantPad1d(p, 0.5), 2: lambda p: nn.ConstantPad2d(p, 0.5),
                 3: lambda p: nn.ConstantPad3d(p, 0.5)},
    "reflection": {1: nn.ReflectionPad1d, 2: nn.ReflectionPad2d, 3: nn.ReflectionPad3d},
    "replication": {1: nn.ReplicationPad1d, 2: nn.ReplicationPad2d, 3: nn.ReplicationPad3d},
    "circular": {1: nn.CircularPad1d, 2: nn.CircularPad2d, 3: nn.CircularPad3d},
}


def _space(d):
    return tuple(range(2, 2 + d))


def _unsqueeze_space(g, d):
    return g.view(g.shape[0], g.shape[1], *([1] * d))


class SEn(nn.Module):
    """mean over space -> Linear -> ReLU -> Linear -> sigmoid."""

    def __init__(self, c, d):
        super().__init__()
        self.d, self.fc1, self.fc2 = d, nn.Linear(c, max(c // 4, 1)), nn.Linear(max(c // 4, 1), c)

    def forward(self, x):
        return x * _unsqueeze_space(torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(_space(self.d)))))), self.d)


class SEConvN(nn.Module):
    """adaptive average pool -> 1x1 conv -> ReLU -> 1x1 conv -> hard sigmoid, expand_as."""

    def __init__(self, c, d):
        super().__init__()
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[d]
        self.pool, self.fc1, self.fc2 = pool(1), _CONV[d](c, 8, 1), _CONV[d](8, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(self.pool(x))))).expand_as(x)


class ECAn(nn.Module):
    """mean over space -> conv1d across channels -> sigmoid."""

    def __init__(self, c, d):
        super().__init__()
        self.d, self.conv = d, nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x.mean(_space(self.d)).unsqueeze(1)).squeeze(1)
        return x * _unsqueeze_space(torch.sigmoid(y), self.d)


class CBAMChannelN(nn.Module):
    """average and max over space through one MLP, summed, sigmoid."""

    def __init__(self, c, d):
        super().__init__()
        self.d = d
        self.mlp = nn.Sequential(nn.Linear(c, max(c // 4, 1)), nn.ReLU(), nn.Linear(max(c // 4, 1), c))

    def forward(self, x):
        flat = x.flatten(2)
        g = torch.sigmoid(self.mlp(flat.mean(2)) + self.mlp(flat.amax(2)))
        return x * _unsqueeze_space(g, self.d)


class SRMn(nn.Module):
    """mean and std over space -> grouped conv1d -> BatchNorm1d -> sigmoid."""

    def __init__(self, c, d):
        super().__init__()
        self.d, self.cfc, self.bn = d, nn.Conv1d(c, c, 2, groups=c, bias=False), nn.BatchNorm1d(c)

    def forward(self, x):
        flat = x.flatten(2)
        t = torch.stack([flat.mean(2), flat.std(2, unbiased=False)], dim=2)
        return x * _unsqueeze_space(torch.sigmoid(self.bn(self.cfc(t)).squeeze(-1)), self.d)


class GCn(nn.Module):
    """softmax-weighted pooling by matmul -> Linear -> ReLU -> Linear -> sigmoid (scale fusion)."""

    def __init__(self, c, d):
        super().__init__()
        self.d, self.mask = d, _CONV[d](c, 1, 1)
        self.fc1, self.fc2 = nn.Linear(c, max(c // 4, 1)), nn.Linear(max(c // 4, 1), c)

    def forward(self, x):
        weights = torch.softmax(self.mask(x).flatten(2), dim=-1)  # [N, 1, L]
        context = torch.matmul(x.flatten(2), weights.transpose(1, 2)).squeeze(-1)  # [N, C]
        return x * _unsqueeze_space(torch.sigmoid(self.fc2(F.relu(self.fc1(context)))), self.d)


ATTENTION_N = {"se": [SEn, SEConvN], "eca": [ECAn], "cbam_channel": [CBAMChannelN], "srm": [SRMn], "gc": [GCn]}


class LayerScaleN(nn.Module):
    def __init__(self, c, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, c, *([1] * d)))

    def forward(self, x):
        return x * self.gamma


class SpatialGateN(nn.Module):
    def __init__(self, c, d):
        super().__init__()
        self.conv = _CONV[d](1, 1, 3, padding=1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x.mean(1, keepdim=True)))


class FRNn(nn.Module):
    def __init__(self, c, d):
        super().__init__()
        self.d = d

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(_space(self.d), keepdim=True) + 1e-6)


class ScalarGateN(nn.Module):
    def __init__(self, c, d):
        super().__init__()
        self.d, self.fc = d, nn.Linear(c, 1)

    def forward(self, x):
        return x * _unsqueeze_space(torch.sigmoid(self.fc(x.mean(_space(self.d)))), self.d)


class GLUn(nn.Module):
    def __init__(self, c, d):
        super().__init__()
        self.conv = _CONV[d](c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


class SqueezeNoExciteN(nn.Module):
    def __init__(self, c, d):
        super().__init__()
        self.d = d

    def forward(self, x):
        return x * torch.sigmoid(x.mean(_space(self.d), keepdim=True))


DECOYS_N = {"layer_scale": LayerScaleN, "spatial": SpatialGateN, "frn": FRNn, "scalar": ScalarGateN, "glu": GLUn,
            "squeeze_no_excite": SqueezeNoExciteN}


class OpaqueConvBlock(nn.Module):
    """A stem block torch.fx cannot trace (control flow on data): kept as a leaf; conv -> BN."""

    def __init__(self, cin, cout, d):
        super().__init__()
        self.conv, self.bn = _CONV[d](cin, cout, 3, padding=1), _BN[d](cout)

    def forward(self, x):
        if x.sum() >= 0:
            return self.bn(self.conv(x))
        return self.bn(self.conv(x.neg()))


class OpaqueCrop(nn.Module):
    """A parameter-free stem op torch.fx cannot trace: crops the last pixel of every spatial axis."""

    def forward(self, x):
        crop = (slice(None), slice(None)) + (slice(0, -1) if x.sum() >= 0 else slice(1, None),) * (x.dim() - 2)
        return x[crop]


@fx.wrap
def user_shift(x):
    """A user function torch.fx keeps as one call: its output has x's shape."""
    return torch.roll(x, 1, dims=-1)


@dataclass(frozen=True)
class StageSpec:
    cout: int  # output channels
    stride: int  # of the stage's conv
    norm: str  # "bn", "gn" or "none"
    act: str  # key of ACTS
    plug: str  # "none", an attention kind of ATTENTION_N, or "decoy:<name>" of DECOYS_N
    style: int  # which coding style of that attention kind
    residual: bool  # add the stage's input when shapes allow


@dataclass(frozen=True)
class StemNetSpec:
    dims: int  # spatial axes: 1, 2 or 3
    channels_last: bool  # the input arrives as [N, *spatial, C] and is moved to [N, C, *spatial] inside
    stem: tuple[str, ...]  # ops before the first conv: pad:<kind>, f_pad, leaf, crop_leaf, user_fn
    width: int  # channels after the stem
    stages: tuple[StageSpec, ...]  # the body
    seed: int  # parameters and BatchNorm statistics


class StemNet(nn.Module):
    def __init__(self, spec: StemNetSpec, cin: int = 3):
        super().__init__()
        self.spec = spec
        d = spec.dims
        stem = []
        for i, name in enumerate(spec.stem):
            if name.startswith("pad:"):
                stem.append(_PADS[name[4:]][d](1))
            elif name == "leaf":
                stem.append(OpaqueConvBlock(cin, cin, d))
            elif name == "crop_leaf":
                stem.append(OpaqueCrop())
            else:
                stem.append(nn.Identity())  # f_pad and user_fn are applied in forward
        self.stem_ops = nn.ModuleList(stem)
        self.stem = _CONV[d](cin, spec.width, 3, padding=1)
        stages, cin = [], spec.width
        for s in spec.stages:
            stages.append(StageN(cin, s, d))
            cin = s.cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, 5)

    def forward(self, x):
        if self.spec.channels_last:
            x = x.transpose(1, 2) if self.spec.dims == 1 else x.movedim(-1, 1)
        for name, op in zip(self.spec.stem, self.stem_ops):
            if name == "f_pad":
                x = F.pad(x, (1, 0) * self.spec.dims)
            elif name == "user_fn":
                x = user_shift(x)
            else:
                x = op(x)
        x = self.stages(self.stem(x))
        return self.head(x.flatten(2).mean(2))


class StageN(nn.Module):
    def __init__(self, cin, s: StageSpec, d):
        super().__init__()
        self.conv = _CONV[d](cin, s.cout, 3, s.stride, 1, bias=s.norm == "none")
        self.norm = {"bn": lambda: _BN[d](s.cout), "gn": lambda: nn.GroupNorm(4, s.cout),
                     "none": nn.Identity}[s.norm]()
        self.act = ACTS[s.act]()
        if s.plug == "none":
            self.plug = nn.Identity()
        elif s.plug.startswith("decoy:"):
            self.plug = DECOYS_N[s.plug[6:]](s.cout, d)
        else:
            choices = ATTENTION_N[s.plug]
            self.plug = choices[s.style % len(choices)](s.cout, d)
        self.residual = s.residual and cin == s.cout and s.stride == 1

    def forward(self, x):
        out = self.plug(self.act(self.norm(self.conv(x))))
        return out + x if self.residual else out


def build_stem_net(spec: StemNetSpec):
    """The network of ``spec`` and its attention modules: (path, kind, channels) in graph order."""
    net = StemNet(spec)
    randomize(net, spec.seed, scale=0.5, mean_scale=1.0)
    expected = [(f"stages.{i}.plug", s.plug, s.cout) for i, s in enumerate(spec.stages) if s.plug in ATTENTION_N]
    return net.eval(), expected


@st.composite
def stem_specs(draw):
    stem_ops = ["f_pad", "leaf", "crop_leaf", "user_fn"] + [f"pad:{k}" for k in sorted(_PADS)]
    plugs = ["none"] + sorted(ATTENTION_N) * 2 + [f"decoy:{k}" for k in sorted(DECOYS_N)]
    stages = tuple(
        StageSpec(
            cout=draw(st.sampled_from([8, 16])),
            stride=draw(st.sampled_from([1, 1, 2])),
            norm=draw(st.sampled_from(["bn", "gn", "none"])),
            act=draw(st.sampled_from(sorted(ACTS))),
            plug=draw(st.sampled_from(plugs)),
            style=draw(st.integers(0, 1)),
            residual=draw(st.booleans()),
        )
        for _ in range(draw(st.integers(1, 3)))
    )
    return StemNetSpec(
        dims=draw(st.integers(1, 3)),
        channels_last=draw(st.booleans()),
        stem=tuple(draw(st.lists(st.sampled_from(stem_ops), min_size=1, max_size=2))),
        width=draw(st.sampled_from([8, 16])),
        stages=stages,
        seed=draw(st.integers(0, 2**16)),
    )


def _stem_input(spec: StemNetSpec, batch: int, size: int) -> torch.Tensor:
    spatial = [size] * spec.dims
    return torch.randn(batch, *spatial, 3) if spec.channels_last else torch.randn(batch, 3, *spatial)


_AUDIO = StemNetSpec(1, True, ("pad:zero",), 8, (StageSpec(16, 1, "bn", "relu", "se", 0, False),), 0)


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stem_specs(), st.integers(1, 3), st.integers(3, 7))
@example(_AUDIO, 2, 5)  # [N, T, F] -> transpose -> pad -> Conv1d -> BN -> ReLU -> 1-d SE
@example(StemNetSpec(2, False, ("leaf", "pad:reflection"), 8, (StageSpec(8, 1, "bn", "relu", "se", 0, True),), 0),
         1, 3)  # x + x * g after the SE is a gated map, not an attention-like gate
@example(StemNetSpec(3, True, ("crop_leaf", "user_fn"), 8, (StageSpec(8, 2, "gn", "silu", "eca", 0, False),), 0),
         1, 3)  # channels-last 3-d input, opaque crop, user function, ECA on a 1x1x1 map
def test_stems_never_hide_attention(spec, batch, size):
    """Sites == inserted attention modules whatever the stem; decoys give none; no layout is lost
    and no attention-like pattern is left undecided."""
    net, expected = build_stem_net(spec)
    sites = asrfx.find_attention(net, _stem_input(spec, batch, size))
    got = [(s.module_path, s.kind.value, s.channels) for s in sites]
    assert got == expected, sites.format()
    assert not sites.layout_losses, sites.format()
    assert not [r for r in sites.rejections if r.verdict is Verdict.UNDECIDED], sites.format()
    for site in sites:
        assert site.gate_shape[0] == batch
        assert site.gate_shape[site.channel_dim] == site.channels
        assert site.channel_dim == 1
