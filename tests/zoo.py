"""Reference zoo of channel-attention models (and look-alikes) for detector tests.

Everything here is plain PyTorch: no ``asrfx`` import. The modules are written
the way third-party repositories write them, deliberately in several coding
styles per attention family, so that a structural detector cannot rely on one
spelling:

* pooling: ``nn.AdaptiveAvgPool2d`` / ``F.adaptive_avg_pool2d`` / ``x.mean((2, 3))``
  / ``F.avg_pool2d`` with the full spatial kernel / ``view(N, C, -1).mean(2)``
  / softmax-weighted pooling with ``matmul`` / ``@``;
* excitation: ``nn.Linear`` vs 1x1 ``nn.Conv2d``; ``nn.Sigmoid`` vs
  ``torch.sigmoid`` vs ``.sigmoid()`` vs hard sigmoid;
* reshapes: ``view(b, c)`` with ``b, c, _, _ = x.size()`` (batch-dependent
  shapes), ``flatten``, ``squeeze``/``unsqueeze``, ``[:, :, None, None]``;
* combine: ``x * y``, ``y * x``, ``torch.mul``, ``x * y.expand_as(x)``,
  ``x.mul(y)``, ``x.mul_(y)``, and ``x + y`` (GC add fusion).

Each attention module lives in a small host network (stem, residual blocks,
GAP + Linear classifier) so tests exercise realistic graphs.

Registry: ``POSITIVE_CASES`` (models with channel-attention sites, with the
expected kinds in graph order of their combine node) and ``NEGATIVE_CASES``
(look-alike traps, nothing must be detected). Every case is traceable with
``torch.fx.symbolic_trace`` and runs on its ``input_shape``.

Kind rules the expectations follow (structural): gc = pooling by matmul /
softmax-weighted pooling, or add combine; spa = adaptive pool to a grid > 1;
srm = std/var pooling; cbam_channel = both average and max pooling; eca = the
excitation's learned op is a conv1d across channels; ie = only per-channel
parameters (no channel mixing) in the excitation; se = channel-mixing
Linear / 1x1 conv on average pooling; split = softmax over branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import SqueezeExcitation as TVSqueezeExcitation

__all__ = [
    "ZooCase",
    "POSITIVE_CASES",
    "NEGATIVE_CASES",
    "ALL_CASES",
    "get_case",
]


@dataclass(frozen=True)
class ZooCase:
    """One reference model plus what a correct detector must report on it."""

    name: str
    """Unique; used as the pytest id."""
    build: Callable[[], nn.Module]
    """Returns a fresh model with deterministic init (seeded inside), in train mode."""
    input_shape: tuple[int, ...]
    """Example input shape, batch first."""
    expected_kinds: tuple[str, ...]
    """One kind per attention block, in graph order of the combine node; () for negatives."""
    expected_module_paths: Optional[tuple[str, ...]] = None
    """Module path of each block where it is unambiguous (the block owns the combine)."""
    expected_channels: Optional[tuple[int, ...]] = None
    """C of the gated feature map, per site."""
    expected_gate_shapes: Optional[tuple[Optional[tuple[int, ...]], ...]] = None
    """Shape of the gate before any broadcast (``expand_as`` / ``expand``), batch =
    input_shape[0]: [N, C, 1, 1] for conv features, [N, 1, C] for tokens. A None
    entry means "not checked"."""
    doc: str = ""
    """What the graph looks like; for negatives, which trap it is."""


def _seeded(fn: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return fn()

    build.__name__ = getattr(fn, "__name__", "build")
    return build


# ---------------------------------------------------------------------------
# Host building blocks
# ---------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block; optional attention module applied after bn2, before the
    residual add (the SE-ResNet placement). ``norm2`` may replace bn2 (IE style)."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        attn: Optional[Callable[[int], nn.Module]] = None,
        attn_name: str = "se",
        norm2: Optional[Callable[[int], nn.Module]] = None,
    ):
        super().__init__()
        self.out_channels = planes
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm2(planes) if norm2 is not None else nn.BatchNorm2d(planes)
        self.attn_name = attn_name if attn is not None else None
        if attn is not None:
            self.add_module(attn_name, attn(planes))
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        residual = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.attn_name is not None:
            out = getattr(self, self.attn_name)(out)

        if self.downsample is not None:
            residual = self.downsample(x)

        out += residual
        out = self.relu(out)
        return out


class CifarResNet(nn.Module):
    """conv-BN-ReLU stem, ``layer1..layerK`` of blocks, GAP + Linear classifier.

    ``make_block(stage_index, inplanes, width, stride)`` returns a block with an
    ``out_channels`` attribute.
    """

    def __init__(self, make_block, widths=(16, 32), depths=(1, 1), num_classes=10, stem_width=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = stem_width
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                block = make_block(i, inplanes, width, stride)
                blocks.append(block)
                inplanes = block.out_channels
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


def _resnet_with(attn, attn_name="se", widths=(16, 32), depths=(1, 1), stages=None):
    """CifarResNet of BasicBlocks; attention in every block of the listed stages
    (default: all). ``attn`` may be a list with one factory per stage."""

    def make_block(i, inplanes, width, stride):
        factory = attn[i] if isinstance(attn, (list, tuple)) else attn
        name = attn_name[i] if isinstance(attn_name, (list, tuple)) else attn_name
        if stages is not None and i not in stages:
            factory = None
        return BasicBlock(inplanes, width, stride, attn=factory, attn_name=name)

    return CifarResNet(make_block, widths=widths, depths=depths)


# ---------------------------------------------------------------------------
# SE (Hu et al.) in several styles
# ---------------------------------------------------------------------------


class SELayer(nn.Module):
    """Classic SE: module pooling, ``view(b, c)``, Linear-ReLU-Linear-Sigmoid,
    ``x * y.expand_as(x)``."""

    def __init__(self, channel, reduction=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class SEInplace(nn.Module):
    """SE with functional pooling and an in-place combine ``x.mul_(y)``."""

    def __init__(self, channels, reduction=4):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        y = F.adaptive_avg_pool2d(x, 1).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x.mul_(y)


class SEConv(nn.Module):
    """SE with 1x1 convs, functional relu/sigmoid and ``torch.mul(x, s)``."""

    def __init__(self, channels, rd_ratio=0.25):
        super().__init__()
        rd = max(int(channels * rd_ratio), 4)
        self.fc1 = nn.Conv2d(channels, rd, kernel_size=1, bias=True)
        self.fc2 = nn.Conv2d(rd, channels, kernel_size=1, bias=True)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.fc1(s)
        s = F.relu(s)
        s = self.fc2(s)
        return torch.mul(x, torch.sigmoid(s))


class SEGate(nn.Module):
    """ASR-repo style: the attention module returns only the gate; the host block
    multiplies (``attention_weights * out``)."""

    def __init__(self, planes):
        super().__init__()
        self.fc1 = nn.Linear(in_features=planes, out_features=round(planes / 16))
        self.fc2 = nn.Linear(in_features=round(planes / 16), out_features=planes)
        self.GlobalAvg = nn.AdaptiveAvgPool2d((1, 1))
        self.sigmoid = nn.Sigmoid()
        self.relu = nn.ReLU()

    def forward(self, out):
        out = self.GlobalAvg(out)
        out = torch.flatten(out, 1)
        out = self.fc1(out)
        out = self.relu(out)
        out = self.fc2(out)
        out = self.sigmoid(out)
        return out.view(out.size(0), out.size(1), 1, 1)


class AsrBottleneck(nn.Module):
    """Bottleneck (expansion 4) with ``attention_weights * out`` in the block."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.attention_module = SEGate(planes=planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))

        attention_weights = self.attention_module(out)
        out = attention_weights * out

        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class SqueezeExciteHard(nn.Module):
    """timm/MobileNetV3 style: ``x.mean((2, 3), keepdim=True)``, conv_reduce,
    act, conv_expand, ``x * F.hardsigmoid(x_se)``."""

    def __init__(self, in_chs, rd_channels):
        super().__init__()
        self.conv_reduce = nn.Conv2d(in_chs, rd_channels, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, in_chs, 1, bias=True)

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return x * F.hardsigmoid(x_se)


class InvertedResidual(nn.Module):
    """MobileNetV3-ish block: expand 1x1, depthwise 3x3, SE, project 1x1."""

    def __init__(self, cin, exp, cout, stride, se_layer=None):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        self.expand = nn.Sequential(
            nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp), nn.Hardswish()
        )
        self.dw = nn.Sequential(
            nn.Conv2d(exp, exp, 3, stride, 1, groups=exp, bias=False),
            nn.BatchNorm2d(exp),
            nn.Hardswish(),
        )
        self.se = se_layer(exp) if se_layer is not None else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        result = self.expand(x)
        result = self.dw(result)
        result = self.se(result)
        result = self.project(result)
        if self.use_res_connect:
            result = result + x
        return result


class MobileNetV3Tiny(nn.Module):
    """Stem + two inverted residuals (torchvision SqueezeExcitation with
    Hardsigmoid, then a timm-style hard SE) + conv head + classifier."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()
        )
        self.blocks = nn.Sequential(
            InvertedResidual(
                16, 64, 24, 2,
                se_layer=lambda c: TVSqueezeExcitation(c, 16, scale_activation=nn.Hardsigmoid),
            ),
            InvertedResidual(24, 72, 24, 1, se_layer=lambda c: SqueezeExciteHard(c, 24)),
        )
        self.head = nn.Sequential(nn.Conv2d(24, 96, 1, bias=False), nn.BatchNorm2d(96), nn.Hardswish())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(96, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.blocks(x)
        x = self.head(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class EffSqueezeExcite(nn.Module):
    """EfficientNet style: squeeze(-1) twice, Linear-SiLU-Linear, sigmoid,
    unsqueeze(-1) twice, ``x.mul(s)``."""

    def __init__(self, channels, rd_channels):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Linear(channels, rd_channels)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Linear(rd_channels, channels)

    def forward(self, x):
        s = self.pool(x).squeeze(-1).squeeze(-1)
        s = self.reduce(s)
        s = self.act(s)
        s = self.expand(s)
        s = torch.sigmoid(s).unsqueeze(-1).unsqueeze(-1)
        return x.mul(s)


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand_ratio, stride, se_ratio=0.25):
        super().__init__()
        hidden = cin * expand_ratio
        self.has_skip = stride == 1 and cin == cout
        self.conv_pw = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act1 = nn.SiLU(inplace=True)
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act2 = nn.SiLU(inplace=True)
        self.se = EffSqueezeExcite(hidden, max(1, int(cin * se_ratio)))
        self.conv_pwl = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv_pw(x)))
        x = self.act2(self.bn2(self.conv_dw(x)))
        x = self.se(x)
        x = self.bn3(self.conv_pwl(x))
        if self.has_skip:
            x = x + shortcut
        return x


class EfficientNetTiny(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.SiLU(inplace=True)
        self.blocks = nn.Sequential(MBConv(16, 24, 4, 2), MBConv(24, 24, 4, 1))
        self.conv_head = nn.Conv2d(24, 64, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.act2 = nn.SiLU(inplace=True)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = self.act2(self.bn2(self.conv_head(x)))
        x = x.mean((2, 3))
        return self.classifier(x)


# ---------------------------------------------------------------------------
# ECA (Wang et al.)
# ---------------------------------------------------------------------------


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    t = int(abs((math.log(channels, 2) + b) / gamma))
    return t if t % 2 else t + 1


class ECALayer(nn.Module):
    """Official-repo style ECA: module pooling, squeeze/transpose into a 1-channel
    sequence, Conv1d across channels with adaptive k, ``x * y.expand_as(x)``."""

    def __init__(self, channel, gamma=2, b=1):
        super().__init__()
        k_size = eca_kernel_size(channel, gamma, b)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        y = self.avg_pool(x)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        y = self.sigmoid(y)
        return x * y.expand_as(x)


class EcaModule(nn.Module):
    """timm style ECA: ``x.mean((2, 3)).view(x.shape[0], 1, -1)``, conv1d, sigmoid,
    ``view(x.shape[0], -1, 1, 1)``, ``x * y``."""

    def __init__(self, channels, gamma=2, beta=1):
        super().__init__()
        kernel_size = eca_kernel_size(channels, gamma, beta)
        self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=(kernel_size - 1) // 2, bias=False)

    def forward(self, x):
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = self.conv(y)
        y = y.sigmoid().view(x.shape[0], -1, 1, 1)
        return x * y


# ---------------------------------------------------------------------------
# SRM (Lee et al.): style pooling (mean, std) + channel-wise FC + BN + sigmoid
# ---------------------------------------------------------------------------


class SRMLayer(nn.Module):
    """Official-repo style: ``view(N, C, -1)`` mean/var, cat, per-channel weights
    ``cfc`` of shape [C, 2], sum over style dim, ``[:, :, None, None]``, BN, sigmoid."""

    def __init__(self, channel):
        super().__init__()
        self.cfc = nn.Parameter(torch.Tensor(channel, 2))
        nn.init.normal_(self.cfc, 0.0, 0.5)
        self.bn = nn.BatchNorm2d(channel)
        self.activation = nn.Sigmoid()

    def _style_pooling(self, x, eps=1e-5):
        N, C, _, _ = x.size()
        channel_mean = x.view(N, C, -1).mean(dim=2, keepdim=True)
        channel_var = x.view(N, C, -1).var(dim=2, keepdim=True) + eps
        channel_std = channel_var.sqrt()
        return torch.cat((channel_mean, channel_std), dim=2)

    def _style_integration(self, t):
        z = t * self.cfc[None, :, :]
        z = torch.sum(z, dim=2)[:, :, None, None]
        z_hat = self.bn(z)
        return self.activation(z_hat)

    def forward(self, x):
        t = self._style_pooling(x)
        g = self._style_integration(t)
        return x * g


class SRMConv1d(nn.Module):
    """SRM with ``x.mean``/``x.std`` over (2, 3), ``torch.stack``, a depthwise
    Conv1d(C, C, 2, groups=C) as the channel-wise FC, BatchNorm1d, sigmoid,
    ``unsqueeze(-1)``, ``x * g``."""

    def __init__(self, channels):
        super().__init__()
        self.cfc = nn.Conv1d(channels, channels, kernel_size=2, groups=channels, bias=False)
        self.bn = nn.BatchNorm1d(channels)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        mean = x.mean(dim=(2, 3))
        std = x.std(dim=(2, 3))
        t = torch.stack((mean, std), dim=-1)  # N, C, 2
        z = self.cfc(t)  # N, C, 1
        z = self.bn(z)
        g = self.gate(z).unsqueeze(-1)  # N, C, 1, 1
        return x * g


# ---------------------------------------------------------------------------
# IE (instance enhancement BN, Liang et al.)
# ---------------------------------------------------------------------------


class IEBatchNorm2d(nn.BatchNorm2d):
    """IEBN as a BatchNorm2d subclass: gate = sigmoid(GAP(x) * w + b) with
    per-channel w, b; gates the normalized feature, then the BN affine."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True)
        self.weight_readjust = nn.Parameter(torch.Tensor(1, num_features, 1, 1))
        self.bias_readjust = nn.Parameter(torch.Tensor(1, num_features, 1, 1))
        nn.init.normal_(self.weight_readjust, 0.0, 0.5)
        nn.init.constant_(self.bias_readjust, -1.0)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, input):
        attention = self.sigmoid(self.avg(input) * self.weight_readjust + self.bias_readjust)
        bn_out = F.batch_norm(
            input, self.running_mean, self.running_var, None, None,
            self.training, self.momentum, self.eps,
        )
        out = bn_out * attention
        return out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class InstanceEnhance(nn.Module):
    """IE as a wrapper module: ``x.mean(dim=(2, 3))``, per-channel affine on the
    pooled vector, ``torch.sigmoid``, ``reshape(b, c, 1, 1)``, ``self.bn(x) * g``."""

    def __init__(self, channels):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.alpha = nn.Parameter(torch.randn(channels) * 0.5)
        self.beta = nn.Parameter(torch.full((channels,), -1.0))

    def forward(self, x):
        b, c = x.shape[:2]
        s = x.mean(dim=(2, 3))
        g = torch.sigmoid(s * self.alpha + self.beta).reshape(b, c, 1, 1)
        return self.bn(x) * g


# ---------------------------------------------------------------------------
# SPA (spatial pyramid attention, Guo et al. 2020)
# ---------------------------------------------------------------------------


class SPALayer(nn.Module):
    """Pools to 1x1, 2x2, 4x4 with modules, ``view`` + cat, FC-ReLU-FC-Sigmoid,
    ``x * y.expand_as(x)``."""

    def __init__(self, channel, reduction=16):
        super().__init__()
        self.avg_pool1 = nn.AdaptiveAvgPool2d(1)
        self.avg_pool2 = nn.AdaptiveAvgPool2d(2)
        self.avg_pool4 = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Sequential(
            nn.Linear(channel * 21, channel * 21 // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel * 21 // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        y1 = self.avg_pool1(x).view(b, c)
        y2 = self.avg_pool2(x).view(b, 4 * c)
        y3 = self.avg_pool4(x).view(b, 16 * c)
        y = torch.cat((y1, y2, y3), 1)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class SPAConv(nn.Module):
    """SPA with functional pools in a loop, ``flatten(1)``, cat, unsqueeze,
    1x1 conv excitation, hard sigmoid, ``torch.mul(x, y)``."""

    def __init__(self, channels, reduction=8, sizes=(1, 2, 4)):
        super().__init__()
        self.sizes = sizes
        pooled = channels * sum(s * s for s in sizes)
        self.conv_reduce = nn.Conv2d(pooled, channels // reduction, 1)
        self.act = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        feats = [F.adaptive_avg_pool2d(x, s).flatten(1) for s in self.sizes]
        y = torch.cat(feats, dim=1).unsqueeze(-1).unsqueeze(-1)
        y = self.conv_expand(self.act(self.conv_reduce(y)))
        return torch.mul(x, F.hardsigmoid(y))


# ---------------------------------------------------------------------------
# CBAM (Woo et al.)
# ---------------------------------------------------------------------------


class BasicConv(nn.Module):
    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0, relu=True, bn=True):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class ChannelGate(nn.Module):
    """Official CBAM channel gate: full-kernel ``F.avg_pool2d`` / ``F.max_pool2d``,
    shared MLP, sum, sigmoid, unsqueeze x2, ``expand_as``, ``x * scale``."""

    def __init__(self, gate_channels, reduction_ratio=4, pool_types=("avg", "max")):
        super().__init__()
        self.gate_channels = gate_channels
        self.mlp = nn.Sequential(
            Flatten(),
            nn.Linear(gate_channels, gate_channels // reduction_ratio),
            nn.ReLU(),
            nn.Linear(gate_channels // reduction_ratio, gate_channels),
        )
        self.pool_types = pool_types

    def forward(self, x):
        channel_att_sum = None
        for pool_type in self.pool_types:
            if pool_type == "avg":
                avg_pool = F.avg_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
                channel_att_raw = self.mlp(avg_pool)
            elif pool_type == "max":
                max_pool = F.max_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
                channel_att_raw = self.mlp(max_pool)
            else:
                raise ValueError(pool_type)
            if channel_att_sum is None:
                channel_att_sum = channel_att_raw
            else:
                channel_att_sum = channel_att_sum + channel_att_raw
        scale = torch.sigmoid(channel_att_sum).unsqueeze(2).unsqueeze(3).expand_as(x)
        return x * scale


class ChannelPool(nn.Module):
    def forward(self, x):
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class SpatialGate(nn.Module):
    """CBAM spatial gate: channel max/mean -> 7x7 conv -> sigmoid -> ``x * scale``
    with scale [N, 1, H, W]. Not channel attention."""

    def __init__(self):
        super().__init__()
        kernel_size = 7
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, relu=False)

    def forward(self, x):
        x_compress = self.compress(x)
        x_out = self.spatial(x_compress)
        scale = torch.sigmoid(x_out)
        return x * scale


class CBAM(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=4, pool_types=("avg", "max"), no_spatial=False):
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate()

    def forward(self, x):
        x_out = self.ChannelGate(x)
        if not self.no_spatial:
            x_out = self.SpatialGate(x_out)
        return x_out


class ChannelAttention(nn.Module):
    """Popular re-implementation: AdaptiveAvgPool2d + AdaptiveMaxPool2d, shared
    1x1-conv MLP, ``sigmoid(avg_out + max_out)``; returns only the gate."""

    def __init__(self, in_planes, ratio=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Sequential(
            nn.Conv2d(in_planes, in_planes // ratio, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(in_planes // ratio, in_planes, 1, bias=False),
        )
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        avg_out = self.fc(self.avg_pool(x))
        max_out = self.fc(self.max_pool(x))
        out = avg_out + max_out
        return self.sigmoid(out)


class SpatialAttention(nn.Module):
    """Returns a [N, 1, H, W] gate from channel mean/max."""

    def __init__(self, kernel_size=7):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        avg_out = torch.mean(x, dim=1, keepdim=True)
        max_out, _ = torch.max(x, dim=1, keepdim=True)
        x = torch.cat([avg_out, max_out], dim=1)
        x = self.conv1(x)
        return self.sigmoid(x)


class CaSaBasicBlock(nn.Module):
    """Basic block where the host multiplies: ``out = self.ca(out) * out`` then
    ``out = self.sa(out) * out``."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.out_channels = planes
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.ca = ChannelAttention(planes)
        self.sa = SpatialAttention()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.ca(out) * out
        out = self.sa(out) * out
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


# ---------------------------------------------------------------------------
# GC (GCNet, Cao et al.)
# ---------------------------------------------------------------------------


class ContextBlock(nn.Module):
    """Official-repo style GC block with a single fusion type.

    pooling 'att': 1x1 conv mask -> softmax over HW -> ``torch.matmul`` context;
    pooling 'avg': AdaptiveAvgPool2d. Transform: conv1x1-LayerNorm-ReLU-conv1x1.
    Fusion 'channel_add': ``out + term``; 'channel_mul': ``out * sigmoid(term)``.
    """

    def __init__(self, inplanes, ratio=0.25, pooling_type="att", fusion_types=("channel_add",)):
        super().__init__()
        self.inplanes = inplanes
        self.planes = int(inplanes * ratio)
        self.pooling_type = pooling_type
        self.fusion_types = fusion_types
        if pooling_type == "att":
            self.conv_mask = nn.Conv2d(inplanes, 1, kernel_size=1)
            self.softmax = nn.Softmax(dim=2)
        else:
            self.avg_pool = nn.AdaptiveAvgPool2d(1)
        if "channel_add" in fusion_types:
            self.channel_add_conv = nn.Sequential(
                nn.Conv2d(self.inplanes, self.planes, kernel_size=1),
                nn.LayerNorm([self.planes, 1, 1]),
                nn.ReLU(inplace=True),
                nn.Conv2d(self.planes, self.inplanes, kernel_size=1),
            )
        else:
            self.channel_add_conv = None
        if "channel_mul" in fusion_types:
            self.channel_mul_conv = nn.Sequential(
                nn.Conv2d(self.inplanes, self.planes, kernel_size=1),
                nn.LayerNorm([self.planes, 1, 1]),
                nn.ReLU(inplace=True),
                nn.Conv2d(self.planes, self.inplanes, kernel_size=1),
            )
        else:
            self.channel_mul_conv = None

    def spatial_pool(self, x):
        batch, channel, height, width = x.size()
        if self.pooling_type == "att":
            input_x = x
            input_x = input_x.view(batch, channel, height * width)  # N, C, HW
            input_x = input_x.unsqueeze(1)  # N, 1, C, HW
            context_mask = self.conv_mask(x)  # N, 1, H, W
            context_mask = context_mask.view(batch, 1, height * width)
            context_mask = self.softmax(context_mask)
            context_mask = context_mask.unsqueeze(-1)  # N, 1, HW, 1
            context = torch.matmul(input_x, context_mask)  # N, 1, C, 1
            context = context.view(batch, channel, 1, 1)
        else:
            context = self.avg_pool(x)
        return context

    def forward(self, x):
        context = self.spatial_pool(x)
        out = x
        if self.channel_mul_conv is not None:
            channel_mul_term = torch.sigmoid(self.channel_mul_conv(context))
            out = out * channel_mul_term
        if self.channel_add_conv is not None:
            channel_add_term = self.channel_add_conv(context)
            out = out + channel_add_term
        return out


class GlobalContextScale(nn.Module):
    """timm-ish GC with scale fusion: ``B, C, H, W = x.shape``, ``F.softmax``,
    ``@`` pooling, conv-LN-ReLU-conv, ``x * torch.sigmoid(...)``."""

    def __init__(self, channels, rd_ratio=0.25):
        super().__init__()
        rd = int(channels * rd_ratio)
        self.conv_attn = nn.Conv2d(channels, 1, kernel_size=1, bias=True)
        self.mlp_scale = nn.Sequential(
            nn.Conv2d(channels, rd, 1),
            nn.LayerNorm([rd, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(rd, channels, 1),
        )

    def forward(self, x):
        B, C, H, W = x.shape
        attn = self.conv_attn(x).reshape(B, 1, H * W)  # B, 1, HW
        attn = F.softmax(attn, dim=-1).unsqueeze(3)  # B, 1, HW, 1
        context = x.reshape(B, C, H * W).unsqueeze(1) @ attn  # B, 1, C, 1
        context = context.view(B, C, 1, 1)
        return x * torch.sigmoid(self.mlp_scale(context))


# ---------------------------------------------------------------------------
# Token model: SE over the embedding dim on [N, L, C] tokens
# ---------------------------------------------------------------------------


class TokenSE(nn.Module):
    """Gate [N, 1, C] from the token mean: Linear-ReLU-Linear-sigmoid, ``x * s``."""

    def __init__(self, dim, rd_ratio=0.25):
        super().__init__()
        hidden = int(dim * rd_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        s = x.mean(dim=1, keepdim=True)  # N, 1, C
        s = self.fc2(self.act(self.fc1(s)))
        return x * s.sigmoid()


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TokenSEBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.se = TokenSE(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 2)

    def forward(self, x):
        x = x + self.se(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class PatchSENet(nn.Module):
    """Patch-embedding conv -> tokens [N, L, C] -> blocks (SE on LayerNorm output)
    -> LayerNorm -> token mean -> head."""

    def __init__(self, dim=48, depth=2, patch=4, num_classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.blocks = nn.Sequential(*[TokenSEBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.blocks(x)
        x = self.norm(x).mean(dim=1)
        return self.head(x)


# ===========================================================================
# Negative look-alikes
# ===========================================================================


class CoordAttHSigmoid(nn.Module):
    def __init__(self, inplace=True):
        super().__init__()
        self.relu = nn.ReLU6(inplace=inplace)

    def forward(self, x):
        return self.relu(x + 3) / 6


class CoordAttHSwish(nn.Module):
    def __init__(self, inplace=True):
        super().__init__()
        self.sigmoid = CoordAttHSigmoid(inplace=inplace)

    def forward(self, x):
        return x * self.sigmoid(x)


class CoordAtt(nn.Module):
    """Coordinate attention (Hou et al.): pools along H and along W separately;
    gates are [N, C, H, 1] and [N, C, 1, W]."""

    def __init__(self, inp, oup, reduction=8):
        super().__init__()
        self.pool_h = nn.AdaptiveAvgPool2d((None, 1))
        self.pool_w = nn.AdaptiveAvgPool2d((1, None))
        mip = max(8, inp // reduction)
        self.conv1 = nn.Conv2d(inp, mip, kernel_size=1, stride=1, padding=0)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = CoordAttHSwish()
        self.conv_h = nn.Conv2d(mip, oup, kernel_size=1, stride=1, padding=0)
        self.conv_w = nn.Conv2d(mip, oup, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        identity = x
        n, c, h, w = x.size()
        x_h = self.pool_h(x)
        x_w = self.pool_w(x).permute(0, 1, 3, 2)
        y = torch.cat([x_h, x_w], dim=2)
        y = self.conv1(y)
        y = self.bn1(y)
        y = self.act(y)
        x_h, x_w = torch.split(y, [h, w], dim=2)
        x_w = x_w.permute(0, 1, 3, 2)
        a_h = self.conv_h(x_h).sigmoid()
        a_w = self.conv_w(x_w).sigmoid()
        return identity * a_w * a_h


class Attention(nn.Module):
    """ViT multi-head self-attention: softmax(q k^T * scale) v."""

    def __init__(self, dim, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ViTBlock(nn.Module):
    def __init__(self, dim, num_heads=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 2)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class TinyViT(nn.Module):
    """Patch embed, cls token, learned pos-embed add, self-attention blocks,
    cls-token head."""

    def __init__(self, img_size=32, patch=4, dim=48, depth=2, num_classes=10):
        super().__init__()
        num_patches = (img_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


class XCA(nn.Module):
    """XCiT cross-covariance attention: q, k L2-normalized over tokens,
    attn = softmax(q k^T * temperature) is [B, h, d, d]; output attn @ v."""

    def __init__(self, dim, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)  # B, h, d, N
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = attn.softmax(dim=-1)
        x = (attn @ v).permute(0, 3, 1, 2).reshape(B, N, C)
        return self.proj(x)


class XCABlock(nn.Module):
    """XCiT block with layer scale: ``x + gamma1 * xca(norm1(x))``."""

    def __init__(self, dim, num_heads=4, eta=1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = XCA(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 2)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x):
        x = x + self.gamma1 * self.attn(self.norm1(x))
        x = x + self.gamma2 * self.mlp(self.norm2(x))
        return x


class TinyXCiT(nn.Module):
    def __init__(self, patch=4, dim=48, depth=2, num_classes=10):
        super().__init__()
        self.patch_embed = nn.Sequential(
            nn.Conv2d(3, dim // 2, 3, 2, 1), nn.BatchNorm2d(dim // 2), nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, 2, 1),
        )
        self.blocks = nn.Sequential(*[XCABlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.blocks(x)
        x = self.norm(x).mean(1)
        return self.head(x)


class FilterResponseNormTLU(nn.Module):
    """FRN + TLU: ``x * rsqrt(mean(x^2, (2, 3)) + |eps|)``, affine, ``max(x, tau)``.
    The gate-like factor is per-sample per-channel but has no learned op between
    the reduction and the multiply (eps is a learned *scalar* when learnable)."""

    def __init__(self, num_features, eps=1e-6, learnable_eps=False):
        super().__init__()
        shape = (1, num_features, 1, 1)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.tau = nn.Parameter(torch.zeros(shape))
        self.learnable_eps = learnable_eps
        if learnable_eps:
            self.eps = nn.Parameter(torch.tensor([eps]))
        else:
            self.eps = eps

    def forward(self, x):
        nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
        if self.learnable_eps:
            x = x * torch.rsqrt(nu2 + self.eps.abs())
        else:
            x = x * torch.rsqrt(nu2 + self.eps)
        x = self.weight * x + self.bias
        return torch.max(x, self.tau)


class NormActBlock(nn.Module):
    """Residual block with a pluggable norm+activation layer ``norm_act(C)``."""

    def __init__(self, inplanes, planes, stride, norm_act):
        super().__init__()
        self.out_channels = planes
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.na1 = norm_act(planes)
        self.conv2 = conv3x3(planes, planes)
        self.na2 = norm_act(planes)
        self.shortcut = None
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Conv2d(inplanes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = self.na1(self.conv1(x))
        out = self.na2(self.conv2(out))
        sc = x if self.shortcut is None else self.shortcut(x)
        return out + sc


class NormActNet(nn.Module):
    def __init__(self, stem_norm_act, block_norm_act, widths=(16, 32), num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.stem_norm = stem_norm_act(widths[0])
        blocks = []
        inplanes = widths[0]
        for i, w in enumerate(widths):
            blocks.append(NormActBlock(inplanes, w, 1 if i == 0 else 2, block_norm_act))
            inplanes = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        x = self.blocks(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def group_std(x, groups: int = 8, eps: float = 1e-5):
    B, C, H, W = x.shape
    x = x.reshape(B, groups, C // groups, H, W)
    std = x.var(dim=(2, 3, 4), unbiased=False, keepdim=True).add(eps).sqrt()
    return std.expand(x.shape).reshape(B, C, H, W)


class EvoNorm2dS0(nn.Module):
    """EvoNorm-S0: ``x * sigmoid(v * x) / group_std(x)``, then affine."""

    def __init__(self, num_features, groups=8, eps=1e-5):
        super().__init__()
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features))

    def forward(self, x):
        v_shape = (1, -1, 1, 1)
        v = self.v.view(v_shape)
        x = x * (x * v).sigmoid() / group_std(x, self.groups, self.eps)
        return x * self.weight.view(v_shape) + self.bias.view(v_shape)


class LayerNormChannelsFirst(nn.Module):
    """ConvNeXt's channels-first LayerNorm written out by hand (reduces over C)."""

    def __init__(self, normalized_shape, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GRN(nn.Module):
    """ConvNeXt-V2 global response norm, channels-last [N, H, W, C]."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(1, 1, 1, dim) * 0.1)
        self.beta = nn.Parameter(torch.randn(1, 1, 1, dim) * 0.1)

    def forward(self, x):
        Gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        Nx = Gx / (Gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * Nx) + self.beta + x


class ConvNeXtBlock(nn.Module):
    """dwconv -> permute to NHWC -> LayerNorm -> Linear -> GELU -> [GRN] -> Linear
    -> [layer scale gamma * x] -> permute back -> residual."""

    def __init__(self, dim, use_grn=False, layer_scale_init_value=0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim) if use_grn else None
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim))
            if layer_scale_init_value > 0
            else None
        )

    def forward(self, x):
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        if self.grn is not None:
            x = self.grn(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return input + x


class TinyConvNeXt(nn.Module):
    def __init__(self, dims=(32, 64), use_grn=False, layer_scale_init_value=0.0, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNormChannelsFirst(dims[0])
        )
        self.stage1 = nn.Sequential(
            ConvNeXtBlock(dims[0], use_grn, layer_scale_init_value),
            ConvNeXtBlock(dims[0], use_grn, layer_scale_init_value),
        )
        self.downsample = nn.Sequential(
            LayerNormChannelsFirst(dims[0]), nn.Conv2d(dims[0], dims[1], kernel_size=2, stride=2)
        )
        self.stage2 = nn.Sequential(ConvNeXtBlock(dims[1], use_grn, layer_scale_init_value))
        self.norm = nn.LayerNorm(dims[1], eps=1e-6)
        self.head = nn.Linear(dims[1], num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.stage1(x)
        x = self.downsample(x)
        x = self.stage2(x)
        x = self.norm(x.mean([-2, -1]))
        return self.head(x)


class GlobalResponseNorm2d(nn.Module):
    """timm-style channels-first GRN: ``Gx = x.norm(p=2, dim=(2, 3))``,
    ``Nx = Gx / Gx.mean(1)``, ``x + addcmul(bias, weight, x * Nx)``."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.randn(dim) * 0.1)
        self.bias = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x):
        Gx = x.norm(p=2, dim=(2, 3), keepdim=True)
        Nx = Gx / (Gx.mean(dim=1, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(1, -1, 1, 1), self.weight.view(1, -1, 1, 1), x * Nx)


class GRNBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        hidden = planes * 2
        self.out_channels = planes
        self.conv1 = nn.Conv2d(inplanes, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU(inplace=True)
        self.grn = GlobalResponseNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.shortcut = None
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.grn(out)
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        sc = x if self.shortcut is None else self.shortcut(x)
        return self.act(out + sc)


class CondConv2d(nn.Module):
    """CondConv: routing = sigmoid(Linear(GAP(x))) mixes expert *kernels*
    (``routing @ weight``); per-sample conv via a grouped conv over the batch.
    The feature map is never multiplied by the routing weights."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, num_experts=4):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.num_experts = num_experts
        self.routing_fn = nn.Linear(in_channels, num_experts)
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = nn.Parameter(
            torch.randn(num_experts, out_channels * in_channels * kernel_size * kernel_size)
            / math.sqrt(fan_in)
        )

    def forward(self, x):
        B, C, H, W = x.shape
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        routing_weights = torch.sigmoid(self.routing_fn(pooled))  # B, E
        weight = torch.matmul(routing_weights, self.weight)  # B, Cout*Cin*k*k
        weight = weight.view(B * self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)
        x = x.reshape(1, B * C, H, W)
        out = F.conv2d(x, weight, None, self.stride, self.padding, 1, B)
        return out.view(B, self.out_channels, out.shape[-2], out.shape[-1])


class CondConvBlock(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.out_channels = planes
        self.conv1 = CondConv2d(inplanes, planes, stride=stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = CondConv2d(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = None
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + sc)


class LayerScale2d(nn.Module):
    """``x * self.gamma`` with a learned per-channel gamma of shape [C, 1, 1]."""

    def __init__(self, dim, init_values=1e-1):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim, 1, 1))

    def forward(self, x):
        return x * self.gamma


class ManualInstanceNorm2d(nn.Module):
    """Instance norm by hand with mean/var over (2, 3), then per-channel affine.
    ``use_rsqrt`` spells the normalization as a multiply by rsqrt(var + eps)."""

    def __init__(self, num_features, eps=1e-5, use_rsqrt=True):
        super().__init__()
        self.eps = eps
        self.use_rsqrt = use_rsqrt
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        mean = x.mean(dim=(2, 3), keepdim=True)
        var = x.var(dim=(2, 3), keepdim=True, unbiased=False)
        if self.use_rsqrt:
            x = (x - mean) * torch.rsqrt(var + self.eps)
        else:
            x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class SqueezeNoExcite(nn.Module):
    """Parameter-free gate: ``x * sigmoid(mean(x, (2, 3)))`` -- no learned op."""

    def forward(self, x):
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True))


class ASRTrainGate(nn.Module):
    """ASR training form: the SE excitation is fed a learned constant vector
    instead of GAP(x); the gate [1, C, 1, 1] does not depend on the input."""

    def __init__(self, channels, reduction=4):
        super().__init__()
        self.pseudo_input = nn.Parameter(torch.randn(1, channels) * 0.1)
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x):
        g = self.fc(self.pseudo_input).view(1, -1, 1, 1)
        return x * g


class GatedConv(nn.Module):
    """GLU-style gated conv (full spatial gate) followed by a hand-written swish."""

    def __init__(self, channels):
        super().__init__()
        self.gate_conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        x = x * torch.sigmoid(self.gate_conv(x))
        return x * torch.sigmoid(x)


class SampleScalarGate(nn.Module):
    """Per-sample but not per-channel: GAP -> Linear(C, 1) -> sigmoid gives a
    [N, 1, 1, 1] gate."""

    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Linear(channels, 1)

    def forward(self, x):
        g = torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1)))
        return x * g.view(-1, 1, 1, 1)


# ===========================================================================
# Builders
# ===========================================================================


def _se_resnet_classic():
    return _resnet_with(SELayer, "se", widths=(16, 32), depths=(2, 1))


def _se_resnet_inplace():
    return _resnet_with(SEInplace, "se", widths=(16, 32), depths=(1, 1))


def _se_conv_functional():
    return _resnet_with(SEConv, "attn", widths=(16, 32), depths=(1, 1))


def _se_asr_bottleneck():
    return CifarResNet(
        lambda i, cin, w, s: AsrBottleneck(cin, w, s), widths=(8, 16), depths=(1, 1)
    )


def _eca_official():
    return _resnet_with(ECALayer, "eca", widths=(16, 128), depths=(1, 1))


def _eca_timm():
    return _resnet_with(EcaModule, "eca", widths=(32, 64), depths=(1, 1))


def _srm_official():
    return _resnet_with(SRMLayer, "srm", widths=(16, 32), depths=(1, 1))


def _srm_conv1d():
    return _resnet_with(SRMConv1d, "srm", widths=(16, 32), depths=(1, 1))


def _ie_subclass():
    return CifarResNet(
        lambda i, cin, w, s: BasicBlock(cin, w, s, norm2=IEBatchNorm2d), widths=(16, 32), depths=(1, 1)
    )


def _ie_wrapper():
    return CifarResNet(
        lambda i, cin, w, s: BasicBlock(cin, w, s, norm2=InstanceEnhance), widths=(16, 32), depths=(1, 1)
    )


def _spa_official():
    return _resnet_with(SPALayer, "spa", widths=(16, 32), depths=(1, 1))


def _spa_conv():
    return _resnet_with(SPAConv, "spa", widths=(16, 32), depths=(1, 1), stages=(1,))


def _cbam_official():
    return _resnet_with(CBAM, "cbam", widths=(16, 32), depths=(1, 1))


def _cbam_host_mul():
    return CifarResNet(lambda i, cin, w, s: CaSaBasicBlock(cin, w, s), widths=(16, 32), depths=(1, 1))


def _gc_add():
    return _resnet_with(ContextBlock, "gc", widths=(16, 32), depths=(1, 1))


def _gc_scale():
    return _resnet_with(GlobalContextScale, "gc", widths=(16, 32), depths=(1, 1))


def _gc_avg_add():
    return _resnet_with(
        lambda c: ContextBlock(c, pooling_type="avg", fusion_types=("channel_add",)),
        "gc", widths=(16, 32), depths=(1, 1), stages=(0,),
    )


def _mixed_se_eca_gc():
    return _resnet_with(
        [SELayer, EcaModule, ContextBlock], ["se", "eca", "gc"], widths=(16, 32, 64), depths=(1, 1, 1)
    )


def _mixed_srm_cbam_spa():
    return _resnet_with(
        [SRMLayer, CBAM, SPALayer], ["srm", "cbam", "spa"], widths=(16, 32, 64), depths=(1, 1, 1)
    )


# negatives


def _neg_cbam_spatial():
    return _resnet_with(lambda c: SpatialGate(), "sa", widths=(16, 32), depths=(1, 1))


def _neg_coord_att():
    return _resnet_with(lambda c: CoordAtt(c, c), "ca", widths=(16, 32), depths=(1, 1))


def _neg_frn():
    return NormActNet(
        lambda c: FilterResponseNormTLU(c, learnable_eps=True),
        lambda c: FilterResponseNormTLU(c, learnable_eps=False),
    )


def _neg_evonorm():
    return NormActNet(lambda c: EvoNorm2dS0(c, groups=8), lambda c: EvoNorm2dS0(c, groups=8))


def _neg_manual_in():
    def norm_act(c):
        return nn.Sequential(ManualInstanceNorm2d(c, use_rsqrt=True), nn.ReLU(inplace=True))

    def norm_act_div(c):
        return nn.Sequential(ManualInstanceNorm2d(c, use_rsqrt=False), nn.ReLU(inplace=True))

    return NormActNet(norm_act_div, norm_act)


def _neg_grn_cf():
    return CifarResNet(lambda i, cin, w, s: GRNBottleneck(cin, w, s), widths=(16, 32), depths=(1, 1))


def _neg_condconv():
    return CifarResNet(lambda i, cin, w, s: CondConvBlock(cin, w, s), widths=(16, 32), depths=(1, 1))


def _neg_layer_scale_resnet():
    return _resnet_with(LayerScale2d, "ls", widths=(16, 32), depths=(1, 1))


def _neg_plain():
    return _resnet_with(None, widths=(16, 32), depths=(2, 1))


_IMG = (2, 3, 32, 32)


def _pos(name, fn, kinds, paths=None, channels=None, gates=None, doc="", shape=_IMG):
    return ZooCase(
        name=name,
        build=_seeded(fn),
        input_shape=shape,
        expected_kinds=tuple(kinds),
        expected_module_paths=tuple(paths) if paths is not None else None,
        expected_channels=tuple(channels) if channels is not None else None,
        expected_gate_shapes=tuple(gates) if gates is not None else None,
        doc=doc,
    )


def _neg(name, fn, doc, shape=_IMG):
    return ZooCase(name=name, build=_seeded(fn), input_shape=shape, expected_kinds=(), doc=doc)


POSITIVE_CASES: list[ZooCase] = [
    _pos(
        "se_resnet_classic", _se_resnet_classic, ["se", "se", "se"],
        paths=["layer1.0.se", "layer1.1.se", "layer2.0.se"],
        channels=[16, 16, 32],
        gates=[(2, 16, 1, 1), (2, 16, 1, 1), (2, 32, 1, 1)],
        doc="ResNet (2+1 basic blocks), SE after bn2: AdaptiveAvgPool2d -> view(b, c) -> "
        "Linear-ReLU-Linear-Sigmoid -> view(b, c, 1, 1) -> x * y.expand_as(x).",
    ),
    _pos(
        "se_resnet_inplace_mul", _se_resnet_inplace, ["se", "se"],
        paths=["layer1.0.se", "layer2.0.se"],
        channels=[16, 32],
        gates=[(2, 16, 1, 1), (2, 32, 1, 1)],
        doc="SE with F.adaptive_avg_pool2d and the in-place combine x.mul_(y).",
    ),
    _pos(
        "se_conv1x1_functional", _se_conv_functional, ["se", "se"],
        paths=["layer1.0.attn", "layer2.0.attn"],
        channels=[16, 32],
        gates=[(2, 16, 1, 1), (2, 32, 1, 1)],
        doc="SE with 1x1 convs, F.relu, torch.sigmoid, torch.mul(x, s).",
    ),
    _pos(
        "se_asr_bottleneck_host_mul", _se_asr_bottleneck, ["se", "se"],
        channels=[32, 64],
        gates=[(2, 32, 1, 1), (2, 64, 1, 1)],
        doc="ASR-repo bottleneck: attention module returns the gate (flatten, Linear, "
        "view(N, C, 1, 1)); the block computes attention_weights * out. Module path "
        "left unspecified (excitation and combine live in different modules).",
    ),
    _pos(
        "se_mobilenetv3_tv_and_timm", MobileNetV3Tiny, ["se", "se"],
        paths=["blocks.0.se", "blocks.1.se"],
        channels=[64, 72],
        gates=[(2, 64, 1, 1), (2, 72, 1, 1)],
        doc="Inverted residuals: torchvision.ops.SqueezeExcitation (Hardsigmoid, "
        "scale * input) then a timm-style x.mean((2,3)) conv SE with F.hardsigmoid.",
    ),
    _pos(
        "se_efficientnet_squeeze_swish", EfficientNetTiny, ["se", "se"],
        paths=["blocks.0.se", "blocks.1.se"],
        channels=[64, 96],
        gates=[(2, 64, 1, 1), (2, 96, 1, 1)],
        doc="MBConv with SE: pool -> squeeze(-1) x2 -> Linear-SiLU-Linear -> sigmoid -> "
        "unsqueeze(-1) x2 -> x.mul(s).",
    ),
    _pos(
        "eca_resnet_official", _eca_official, ["eca", "eca"],
        paths=["layer1.0.eca", "layer2.0.eca"],
        channels=[16, 128],
        gates=[(2, 16, 1, 1), (2, 128, 1, 1)],
        doc="ECA: AdaptiveAvgPool2d -> squeeze/transpose -> Conv1d(1, 1, k) across channels "
        "(k=3 for C=16, k=5 for C=128) -> Sigmoid -> x * y.expand_as(x).",
    ),
    _pos(
        "eca_timm_style", _eca_timm, ["eca", "eca"],
        paths=["layer1.0.eca", "layer2.0.eca"],
        channels=[32, 64],
        gates=[(2, 32, 1, 1), (2, 64, 1, 1)],
        doc="ECA: x.mean((2,3)).view(N, 1, -1) -> Conv1d -> sigmoid -> view(N, -1, 1, 1) -> x * y.",
    ),
    _pos(
        "srm_resnet_official", _srm_official, ["srm", "srm"],
        paths=["layer1.0.srm", "layer2.0.srm"],
        channels=[16, 32],
        gates=[(2, 16, 1, 1), (2, 32, 1, 1)],
        doc="SRM: view(N, C, -1).mean/var -> cat -> * cfc[None] -> sum(dim=2)[:, :, None, None] "
        "-> BN -> Sigmoid -> x * g.",
    ),
    _pos(
        "srm_grouped_conv1d", _srm_conv1d, ["srm", "srm"],
        paths=["layer1.0.srm", "layer2.0.srm"],
        channels=[16, 32],
        gates=[(2, 16, 1, 1), (2, 32, 1, 1)],
        doc="SRM: x.mean/x.std over (2,3) -> stack -> depthwise Conv1d(C, C, 2, groups=C) "
        "(channel-wise FC, not across channels) -> BatchNorm1d -> Sigmoid -> unsqueeze -> x * g.",
    ),
    _pos(
        "ie_iebn_subclass", _ie_subclass, ["ie", "ie"],
        paths=["layer1.0.bn2", "layer2.0.bn2"],
        channels=[16, 32],
        gates=[(2, 16, 1, 1), (2, 32, 1, 1)],
        doc="IEBN (BatchNorm2d subclass as bn2): sigmoid(avg(x) * w + b) gates "
        "F.batch_norm(x) (bn_out * attention), then * weight + bias.",
    ),
    _pos(
        "ie_wrapper_module", _ie_wrapper, ["ie", "ie"],
        paths=["layer1.0.bn2", "layer2.0.bn2"],
        channels=[16, 32],
        gates=[(2, 16, 1, 1), (2, 32, 1, 1)],
        doc="IE as a wrapper as bn2: x.mean((2,3)) * alpha + beta -> sigmoid -> "
        "reshape(b, c, 1, 1); returns self.bn(x) * g.",
    ),
    _pos(
        "spa_resnet_official", _spa_official, ["spa", "spa"],
        paths=["layer1.0.spa", "layer2.0.spa"],
        channels=[16, 32],
        gates=[(2, 16, 1, 1), (2, 32, 1, 1)],
        doc="SPA: AdaptiveAvgPool2d(1/2/4) -> view -> cat (21C) -> FC-ReLU-FC-Sigmoid -> "
        "x * y.expand_as(x).",
    ),
    _pos(
        "spa_conv_hardsigmoid", _spa_conv, ["spa"],
        paths=["layer2.0.spa"],
        channels=[32],
        gates=[(2, 32, 1, 1)],
        doc="SPA only in stage 2: F.adaptive_avg_pool2d loop -> flatten -> cat -> unsqueeze x2 "
        "-> 1x1 conv-ReLU-1x1 conv -> F.hardsigmoid -> torch.mul(x, y).",
    ),
    _pos(
        "cbam_official", _cbam_official, ["cbam_channel", "cbam_channel"],
        paths=["layer1.0.cbam.ChannelGate", "layer2.0.cbam.ChannelGate"],
        channels=[16, 32],
        gates=[(2, 16, 1, 1), (2, 32, 1, 1)],
        doc="CBAM: ChannelGate (full-kernel F.avg_pool2d and F.max_pool2d -> shared MLP -> "
        "sum -> sigmoid -> unsqueeze x2 -> expand_as -> x * scale), then SpatialGate "
        "([N,1,H,W] gate; must NOT be reported).",
    ),
    _pos(
        "cbam_channel_host_mul", _cbam_host_mul, ["cbam_channel", "cbam_channel"],
        channels=[16, 32],
        gates=[(2, 16, 1, 1), (2, 32, 1, 1)],
        doc="CBAM re-implementation: ca returns sigmoid(fc(avgpool) + fc(maxpool)) with "
        "shared 1x1 convs; block does out = self.ca(out) * out; out = self.sa(out) * out "
        "(spatial part not reported).",
    ),
    _pos(
        "gc_add_official", _gc_add, ["gc", "gc"],
        paths=["layer1.0.gc", "layer2.0.gc"],
        channels=[16, 32],
        gates=[(2, 16, 1, 1), (2, 32, 1, 1)],
        doc="GCNet: conv_mask -> softmax over HW -> torch.matmul context -> "
        "conv-LayerNorm-ReLU-conv -> out + channel_add_term.",
    ),
    _pos(
        "gc_scale_fusion", _gc_scale, ["gc", "gc"],
        paths=["layer1.0.gc", "layer2.0.gc"],
        channels=[16, 32],
        gates=[(2, 16, 1, 1), (2, 32, 1, 1)],
        doc="GC with scale fusion: F.softmax mask, ``@`` pooling, conv-LN-ReLU-conv, "
        "x * torch.sigmoid(...).",
    ),
    _pos(
        "gc_avgpool_add", _gc_avg_add, ["gc"],
        paths=["layer1.0.gc"],
        channels=[16],
        gates=[(2, 16, 1, 1)],
        doc="GC block with pooling_type='avg' (AdaptiveAvgPool2d) and add fusion; kind gc "
        "by the add-combine rule.",
    ),
    _pos(
        "token_se_patch_model", PatchSENet, ["se", "se"],
        paths=["blocks.0.se", "blocks.1.se"],
        channels=[48, 48],
        gates=[(2, 1, 48), (2, 1, 48)],
        doc="Patch-embed conv -> tokens [N, 64, 48]; per block x + se(norm1(x)) where se is "
        "mean over tokens -> Linear-ReLU-Linear -> sigmoid, gate [N, 1, C].",
    ),
    _pos(
        "mixed_se_eca_gc", _mixed_se_eca_gc, ["se", "eca", "gc"],
        paths=["layer1.0.se", "layer2.0.eca", "layer3.0.gc"],
        channels=[16, 32, 64],
        gates=[(2, 16, 1, 1), (2, 32, 1, 1), (2, 64, 1, 1)],
        doc="Three stages with different attention: SE, timm ECA, GC add.",
    ),
    _pos(
        "mixed_srm_cbam_spa", _mixed_srm_cbam_spa, ["srm", "cbam_channel", "spa"],
        paths=["layer1.0.srm", "layer2.0.cbam.ChannelGate", "layer3.0.spa"],
        channels=[16, 32, 64],
        gates=[(2, 16, 1, 1), (2, 32, 1, 1), (2, 64, 1, 1)],
        doc="Three stages: SRM, CBAM (channel reported, spatial not), SPA (64 ch at 8x8).",
    ),
]


NEGATIVE_CASES: list[ZooCase] = [
    _neg(
        "neg_cbam_spatial_only", _neg_cbam_spatial,
        "CBAM spatial gate alone: channel-wise max/mean -> 7x7 conv -> sigmoid; gate is "
        "[N, 1, H, W] (full spatial, size 1 on channels).",
    ),
    _neg(
        "neg_coordinate_attention", _neg_coord_att,
        "Coordinate attention: pools one spatial axis at a time (AdaptiveAvgPool2d((None, 1)) "
        "/ ((1, None))); gates [N, C, H, 1] and [N, C, 1, W] are not global.",
    ),
    _neg(
        "neg_vit_self_attention", TinyViT,
        "Token self-attention softmax(q k^T * scale) v, plus cls token and learned pos-embed "
        "add ([1, L, C] parameter): no per-sample per-channel gate.",
    ),
    _neg(
        "neg_xcit_channel_attention", TinyXCiT,
        "XCiT cross-covariance attention: tokens reduced by F.normalize and q @ k^T into a "
        "[B, h, d, d] attention applied with matmul (attn @ v), not an elementwise gate; "
        "plus layer-scale gamma * x.",
    ),
    _neg(
        "neg_filter_response_norm", _neg_frn,
        "FRN + TLU: x * rsqrt(mean(x^2, (2,3)) + |eps|) is per-sample per-channel from a "
        "global reduction but has no learned op (eps is a learned scalar / a constant).",
    ),
    _neg(
        "neg_evonorm_s0", _neg_evonorm,
        "EvoNorm-S0: x * sigmoid(v * x) / group_std(x): full-spatial swish, division by an "
        "expanded group std; no learned excitation of a pooled vector.",
    ),
    _neg(
        "neg_grn_convnextv2", lambda: TinyConvNeXt(use_grn=True),
        "ConvNeXt-V2 GRN (channels-last): Gx = norm(x, dims H,W), Nx = Gx / mean_C(Gx), "
        "gamma * (x * Nx) + beta + x: no learned op between reduction and multiply. "
        "Also hand-written channels-first LayerNorm (reduces over C).",
    ),
    _neg(
        "neg_grn_channels_first", _neg_grn_cf,
        "timm-style channels-first GRN: x * (Gx / Gx.mean(1)) with Gx = x.norm(dim=(2,3)); "
        "gate-shaped [N, C, 1, 1] but parameter-free.",
    ),
    _neg(
        "neg_condconv", _neg_condconv,
        "CondConv: GAP -> Linear -> sigmoid routing mixes expert kernels (matmul with the "
        "weight bank); per-sample grouped conv; the feature map is never multiplied by it.",
    ),
    _neg(
        "neg_layer_scale_convnext", lambda: TinyConvNeXt(layer_scale_init_value=1e-1),
        "ConvNeXt-V1 layer scale: self.gamma * x with a learned [C] parameter (not per-sample).",
    ),
    _neg(
        "neg_layer_scale_resnet", _neg_layer_scale_resnet,
        "ResNet block with x * self.gamma, gamma a learned [C, 1, 1] parameter.",
    ),
    _neg(
        "neg_plain_resnet_gap", _neg_plain,
        "Plain ResNet with a GAP + Linear classifier head: a global pool and Linear, but "
        "nothing combines the result back into a feature map.",
    ),
    _neg(
        "neg_manual_instance_norm", _neg_manual_in,
        "Instance norm by hand: (x - mean) * rsqrt(var + eps) and (x - mean) / sqrt(var + eps) "
        "with stats over (2,3), then a per-channel affine: no learned op in the 'gate'.",
    ),
    _neg(
        "neg_squeeze_without_excitation", lambda: _resnet_with(lambda c: SqueezeNoExcite(), "gate"),
        "x * sigmoid(x.mean((2,3), keepdim=True)): global pooling but no learned op.",
    ),
    _neg(
        "neg_asr_constant_input_gate", lambda: _resnet_with(ASRTrainGate, "se"),
        "ASR training form: SE excitation applied to a learned constant vector; gate "
        "[1, C, 1, 1] does not depend on the input (not per-sample).",
    ),
    _neg(
        "neg_gated_conv_glu", lambda: _resnet_with(GatedConv, "glu"),
        "GLU-style x * sigmoid(conv3x3(x)) and a hand-written swish x * sigmoid(x): "
        "full-spatial gates.",
    ),
    _neg(
        "neg_per_sample_scalar_gate", lambda: _resnet_with(SampleScalarGate, "gate"),
        "GAP -> Linear(C, 1) -> sigmoid -> view(-1, 1, 1, 1): per-sample but a single "
        "scalar, not per-channel.",
    ),
]


ALL_CASES: list[ZooCase] = POSITIVE_CASES + NEGATIVE_CASES


def get_case(name: str) -> ZooCase:
    for case in ALL_CASES:
        if case.name == name:
            return case
    raise KeyError(name)


def _check_registry() -> None:
    names = [c.name for c in ALL_CASES]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise AssertionError(f"duplicate zoo case names: {sorted(dupes)}")
    for c in POSITIVE_CASES:
        n = len(c.expected_kinds)
        if n == 0:
            raise AssertionError(f"positive case {c.name} has no expected kinds")
        for field in ("expected_module_paths", "expected_channels", "expected_gate_shapes"):
            v = getattr(c, field)
            if v is not None and len(v) != n:
                raise AssertionError(f"{c.name}.{field} has {len(v)} entries, expected {n}")


_check_registry()
