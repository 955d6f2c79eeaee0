"""Stems and inputs from libraries the zoo does not copy, which used to hide every SE downstream.

Small hand-written models that mimic the third-party patterns: a TF-port EfficientNet whose stem
and strided depthwise convs pad with ``nn.ZeroPad2d`` ("same" padding), a ResNet whose stem is an
untraceable module (kept as an opaque leaf), an audio model taking ``[N, T, F]`` and transposing it
before ``Conv1d -> BN -> ReLU -> 1-d SE``, and a token model taking ``[N, L, C]`` embeddings. For
each: every attention block is found, convert trains every psi, fuse equals the ASR form in
float64 with randomized BatchNorm statistics, and the deployed model is the backbone's size with
no gate left.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asrfx

from helpers import randomize


class SqueezeExcite(nn.Module):
    """EfficientNet's SE: 1x1 convs, SiLU, sigmoid; any number of spatial axes."""

    def __init__(self, c, squeeze, dims=2):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        self.dims = dims
        self.att_reduce, self.att_expand = conv(c, squeeze, 1), conv(squeeze, c, 1)

    def forward(self, x):
        s = x.mean(tuple(range(2, 2 + self.dims)), keepdim=True)
        return x * torch.sigmoid(self.att_expand(F.silu(self.att_reduce(s))))


class SamePadMBConv(nn.Module):
    """TF-port MBConv: ZeroPad2d before a strided depthwise conv with padding 0, then SE."""

    def __init__(self, cin, cout, stride, expand=4):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.pad = nn.ZeroPad2d((0, 1, 0, 1) if stride == 2 else (1, 1, 1, 1))
        self.dw = nn.Conv2d(mid, mid, 3, stride, 0, groups=mid, bias=False)
        self.bn = nn.BatchNorm2d(mid)
        self.se = SqueezeExcite(mid, max(cin // 4, 1))
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(F.silu(self.bn(self.dw(self.pad(self.expand(x)))))))
        return x + y if self.residual else y


class TFEfficientNetTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 16, 3, 2, 0, bias=False),
                                  nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(SamePadMBConv(16, 16, 1), SamePadMBConv(16, 24, 2), SamePadMBConv(24, 24, 1))
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class DynamicPadStem(nn.Module):
    """A stem that pads to a multiple of its stride with Python math on the input size (untraceable:
    torch.fx keeps it as one call), then conv -> BN -> ReLU -> max pool."""

    def __init__(self, cout=16, stride=2):
        super().__init__()
        self.stride = stride
        self.conv, self.bn = nn.Conv2d(3, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        h, w = x.shape[-2:]
        ph, pw = math.ceil(h / self.stride) * self.stride - h, math.ceil(w / self.stride) * self.stride - w
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return F.max_pool2d(F.relu(self.bn(self.conv(x))), 2, ceil_mode=True)


class SEBlock(nn.Module):
    """ResNet basic block with an SE on the residual branch (Linear excitation, view(b, c, 1, 1))."""

    def __init__(self, c, r=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.att_fc1, self.att_fc2 = nn.Linear(c, c // r), nn.Linear(c // r, c)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        b, c, _, _ = y.size()
        g = torch.sigmoid(self.att_fc2(F.relu(self.att_fc1(y.mean((2, 3)))))).view(b, c, 1, 1)
        return F.relu(x + y * g)


class LeafStemResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = DynamicPadStem(16)
        self.layer1 = nn.Sequential(SEBlock(16), SEBlock(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.layer1(self.stem(x)).mean((2, 3)))


class AudioSEBlock(nn.Module):
    """Conv1d -> BN -> ReLU -> 1-d SE over time (mean over T, Linear excitation)."""

    def __init__(self, cin, cout, r=4):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm1d(cout)
        self.att_fc1, self.att_fc2 = nn.Linear(cout, cout // r), nn.Linear(cout // r, cout)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        g = torch.sigmoid(self.att_fc2(F.relu(self.att_fc1(x.mean(-1)))))
        return x * g.unsqueeze(-1)


class AudioSENet(nn.Module):
    """Takes log-mel frames [N, T, F] and transposes them to [N, F, T] inside."""

    def __init__(self, feats=20):
        super().__init__()
        self.blocks = nn.Sequential(AudioSEBlock(feats, 32), AudioSEBlock(32, 32), SqueezeExcite(32, 8, dims=1))
        self.fc = nn.Linear(32, 10)

    def forward(self, frames):
        return self.fc(self.blocks(frames.transpose(1, 2)).mean(-1))


class TokenSE(nn.Module):
    """SE over [N, L, C] tokens: mean over L, gate [N, 1, C]."""

    def __init__(self, c, r=4):
        super().__init__()
        self.att_fc1, self.att_fc2 = nn.Linear(c, c // r), nn.Linear(c // r, c)

    def forward(self, t):
        return t * torch.sigmoid(self.att_fc2(F.relu(self.att_fc1(t.mean(1, keepdim=True)))))


class TokenSENet(nn.Module):
    """Takes [N, L, C] embeddings (text or audio frames): Linear -> LayerNorm -> token SE, twice."""

    def __init__(self, feats=12, width=32):
        super().__init__()
        self.proj, self.norm1, self.se1 = nn.Linear(feats, width), nn.LayerNorm(width), TokenSE(width)
        self.mlp, self.norm2, self.se2 = nn.Linear(width, width), nn.LayerNorm(width), TokenSE(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, t):
        t = self.se1(self.norm1(self.proj(t)))
        t = t + self.se2(self.norm2(F.gelu(self.mlp(t))))
        return self.fc(t.mean(1))


CASES = [
    # (name, model, input shape, [(module path, kind, channels)])
    ("tf_efficientnet_zeropad", TFEfficientNetTiny, (2, 3, 17, 17),
     [("blocks.0.se", "se", 64), ("blocks.1.se", "se", 64), ("blocks.2.se", "se", 96)]),
    ("leaf_stem_resnet", LeafStemResNet, (2, 3, 15, 15), [("layer1.0", "se", 16), ("layer1.1", "se", 16)]),
    ("audio_ntf_conv1d_se", AudioSENet, (2, 50, 20),
     [("blocks.0", "se", 32), ("blocks.1", "se", 32), ("blocks.2", "se", 32)]),
    ("tokens_nlc_linear_se", TokenSENet, (2, 7, 12), [("se1", "se", 32), ("se2", "se", 32)]),
]


@pytest.mark.parametrize("name, build, shape, expected", CASES, ids=[c[0] for c in CASES])
def test_every_block_is_found(name, build, shape, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error", asrfx.AsrfxWarning)  # no lost layout, nothing undecided
        sites = asrfx.find_attention(build().eval(), torch.randn(*shape))
    assert [(s.module_path, s.kind.value, s.channels) for s in sites] == expected, sites.format()
    assert not sites.rejections and not sites.layout_losses
    for site in sites:
        assert site.gate_shape[0] == shape[0] and site.gate_shape[site.channel_dim] == site.channels


def test_the_stem_is_a_leaf_and_says_so():
    sites = asrfx.find_attention(LeafStemResNet().eval(), torch.randn(1, 3, 15, 15))
    assert [leaf.path for leaf in sites.leaves] == ["stem"]


@pytest.mark.parametrize("name, build, shape, expected", CASES, ids=[c[0] for c in CASES])
def test_convert_trains_every_psi_and_fuse_is_the_backbone(name, build, shape, expected):
    """convert -> one training step reaches every psi -> fuse equals the ASR form (float64, 1e-10,
    random BatchNorm statistics) with the backbone's parameter count and no gate left."""
    model = randomize(build().double(), seed=1, scale=0.3, mean_scale=0.5).train()
    gen = torch.Generator().manual_seed(2)  # fixed draws: with unseeded ones a ReLU in an excitation was
    x = torch.randn(*shape, dtype=torch.float64, generator=gen)  # sometimes dead for psi (1 run in 6)
    gm = asrfx.convert(model, x, psi_init=lambda site, s: torch.rand(s, dtype=torch.float64, generator=gen) + 0.5)
    psi = {n: p for n, p in gm.named_parameters() if n.rsplit(".", 1)[-1].startswith("psi")}
    assert len(psi) == len(expected)
    gm(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in psi.values()), sorted(psi)

    gm.eval()
    fused = asrfx.fuse(gm)
    report = asrfx.report_of(fused)
    assert len(report.folds) == len(expected) and not report.kept, str(report)
    with torch.no_grad():
        want, got = gm(x), fused(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the backbone: the model without its excitation parameters (named att_*)
    plain = sum(p.numel() for n, p in model.named_parameters() if "att_" not in n)
    asrfx.verify(fused, gm, x, backbone=plain)
    assert not [n for n, _ in fused.named_parameters() if "psi" in n or "att_" in n]
