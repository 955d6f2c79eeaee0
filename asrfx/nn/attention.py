"""The channel-attention modules the ASR paper uses, written after their original papers.

Each is an ordinary ``nn.Module`` computing ``x * gate(pool(x))`` (GC: ``x + ...``); nothing in
asrfx special-cases them: :func:`asrfx.find_attention` detects them by structure like any
third-party module, and :func:`asrfx.insert` places them into plain backbones.

Shapes: feature maps ``[N, C, *spatial]`` with ``dims`` spatial axes (default 2), or
tokens ``[N, L, C]`` with ``tokens=True`` (the gate then scales the embedding dim, as for
the paper's ViT results). Both are fixed at construction: torch.fx cannot branch on
``x.dim()`` while tracing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SE", "ECA", "SRM", "IE", "SPA", "CBAMChannel", "GC", "ATTENTION"]


class _ChannelGate(nn.Module):
    """Shared plumbing: pooling over spatial axes (or tokens) and reshaping the gate."""

    def __init__(self, channels: int, tokens: bool = False, dims: int = 2):
        super().__init__()
        self.channels, self.tokens, self.dims = channels, tokens, dims

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] averaged over spatial axes (maps) or tokens."""
        return x.mean(1) if self.tokens else x.flatten(2).mean(2)

    def _gated(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x * gate, with gate [N, C] broadcast over spatial axes or tokens."""
        if self.tokens:
            return x * gate.unsqueeze(1)
        return x * gate.view((gate.shape[0], self.channels) + (1,) * self.dims)


class SE(_ChannelGate):
    """Squeeze-and-Excitation (Hu et al., CVPR 2018).

    gate = sigmoid(W2 relu(W1 GAP(x))), W1: C -> C/r, W2: C/r -> C. Default r = 16.
    """

    def __init__(self, channels: int, reduction: int = 16, tokens: bool = False, dims: int = 2):
        super().__init__(channels, tokens, dims)
        hidden = max(channels // reduction, 1)
        self.fc1, self.fc2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)

    def forward(self, x):
        return self._gated(x, torch.sigmoid(self.fc2(F.relu(self.fc1(self._pooled(x))))))


class ECA(_ChannelGate):
    """Efficient Channel Attention (Wang et al., CVPR 2020).

    gate = sigmoid(conv1d_k(GAP(x))) across channels, no reduction; the kernel size adapts
    to C: k = |log2(C) / gamma + b / gamma|, rounded to odd (gamma = 2, b = 1).
    """

    def __init__(self, channels: int, gamma: int = 2, b: int = 1, tokens: bool = False, dims: int = 2):
        super().__init__(channels, tokens, dims)
        k = int(abs(math.log2(channels) / gamma + b / gamma))
        k = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x):
        u = self._pooled(x).unsqueeze(1)  # [N, 1, C]: the conv slides across channels
        return self._gated(x, torch.sigmoid(self.conv(u).squeeze(1)))


class SRM(_ChannelGate):
    """Style-based Recalibration Module (Lee et al., ICCV 2019).

    Style pooling: per-channel mean and standard deviation; style integration: a
    channel-wise fully connected layer (C x 2 weights, each channel mixes its own two
    statistics), BatchNorm, sigmoid.
    """

    def __init__(self, channels: int, tokens: bool = False, dims: int = 2):
        super().__init__(channels, tokens, dims)
        self.cfc = nn.Parameter(torch.zeros(channels, 2))
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x):
        flat = x.transpose(1, 2) if self.tokens else x.flatten(2)  # [N, C, positions]
        style = torch.stack((flat.mean(2), flat.std(2)), dim=2)  # [N, C, 2]
        z = (style * self.cfc).sum(2)
        return self._gated(x, torch.sigmoid(self.bn(z)))


class IE(_ChannelGate):
    """Instance Enhancement (Liang et al., AAAI 2020, "Instance Enhancement Batch Normalization").

    gate = sigmoid(u * w + b) with per-channel w, b and u = GAP(x): a per-channel affine of
    the pooled statistic, no channel mixing. Initialised as in IEBN: w = 0, b = -1.
    """

    def __init__(self, channels: int, tokens: bool = False, dims: int = 2):
        super().__init__(channels, tokens, dims)
        self.weight = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.full((channels,), -1.0))

    def forward(self, x):
        return self._gated(x, torch.sigmoid(self._pooled(x) * self.weight + self.bias))


class SPA(_ChannelGate):
    """Spatial Pyramid Attention (Guo et al., ICME 2020).

    Adaptive average pooling to 1x1, 2x2 and 4x4, flattened and concatenated (21 C values),
    then FC (21C -> C/r) - ReLU - FC (-> C) - sigmoid. Default r = 16. Feature maps only.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__(channels, tokens=False)
        hidden = max(channels // reduction, 1)
        self.fc1, self.fc2 = nn.Linear(21 * channels, hidden), nn.Linear(hidden, channels)

    def forward(self, x):
        pyramid = [F.adaptive_avg_pool2d(x, size).flatten(1) for size in (1, 2, 4)]
        return self._gated(x, torch.sigmoid(self.fc2(F.relu(self.fc1(torch.cat(pyramid, 1))))))


class CBAMChannel(_ChannelGate):
    """The channel attention of CBAM (Woo et al., ECCV 2018).

    gate = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))), one MLP C -> C/r -> C shared by both.
    """

    def __init__(self, channels: int, reduction: int = 16, tokens: bool = False, dims: int = 2):
        super().__init__(channels, tokens, dims)
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, x):
        peak = x.amax(1) if self.tokens else x.flatten(2).amax(2)
        return self._gated(x, torch.sigmoid(self.mlp(self._pooled(x)) + self.mlp(peak)))


class GC(nn.Module):
    """Global Context block (Cao et al., ICCVW 2019, GCNet), add fusion.

    context = sum_j softmax(W_k x)_j x_j (attention pooling over positions), then
    transform: 1x1 conv C -> C/r, LayerNorm, ReLU, 1x1 conv -> C; output x + transform.
    Default r = 16. Feature maps only.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mask = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.LayerNorm([hidden, 1, 1]),
                                       nn.ReLU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, x):
        weights = self.mask(x).flatten(2).softmax(-1)  # [N, 1, HW]
        context = torch.matmul(x.flatten(2), weights.transpose(1, 2))  # [N, C, 1]
        return x + self.transform(context.unsqueeze(-1))


# name -> class, for asrfx.insert(attention="se")
ATTENTION = {"se": SE, "eca": ECA, "srm": SRM, "ie": IE, "spa": SPA, "cbam_channel": CBAMChannel, "gc": GC}
