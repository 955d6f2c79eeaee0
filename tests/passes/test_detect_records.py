"""The AttentionSite record: which nodes, which axis, what absorbs the gate; and refusals with reasons."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asrfx
from asrfx import Combine, SiteKind


def _find(model, *shape):
    return asrfx.find_attention(model.eval(), torch.randn(*shape))


class SEAfterBN(nn.Module):
    """conv -> bn -> [SE: avgpool -> fc1 -> relu -> fc2 -> sigmoid] -> x * g"""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        x = self.bn(self.conv(x))
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * g


def test_se_record_names_every_node():
    """
    x=bn ──> pool ──> fc1 ─> relu ─> fc2 ─> sigmoid=gate
     └──────────────────────────────────────────────┴─> mul=combine
    """
    (site,) = _find(SEAfterBN(), 2, 3, 6, 6)
    names = lambda nodes: [n.name for n in nodes]
    assert site.kind is SiteKind.SE
    assert site.x.name == "bn" and site.combine.name == "mul" and site.gate.name == "sigmoid"
    assert names(site.pools) == ["pool"]
    assert names(site.excitation) == ["fc1", "relu", "fc2", "sigmoid"]
    assert site.channel_dim == 1 and site.channels == 8 and site.gate_shape == (2, 8, 1, 1)
    assert site.uses[0].op is Combine.MUL
    assert site.absorbable and site.absorption.target.name == "bn"
    assert site.module_path == ""  # the SE code lives in the top-level forward
    assert "BatchNorm2d 'bn'" in site.absorption.reason


@pytest.mark.parametrize("spelling", ["operator", "torch", "method", "inplace", "reversed", "expand_as"])
def test_every_spelling_of_multiply(spelling):
    """x * g written six ways is the same site."""

    class Spelled(SEAfterBN):
        def forward(self, x):
            x = self.bn(self.conv(x))
            g = torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
            return {
                "operator": lambda: operator.mul(x, g),
                "torch": lambda: torch.mul(x, g),
                "method": lambda: x.mul(g),
                "inplace": lambda: x.mul_(g),
                "reversed": lambda: g * x,
                "expand_as": lambda: x * g.expand_as(x),
            }[spelling]()

    (site,) = _find(Spelled(), 2, 3, 5, 5)
    assert site.gate.name == "sigmoid" and site.x.name == "bn"


class TokenSE(nn.Module):
    """tokens [N, L, C] -> LayerNorm -> mean over L -> Linear -> sigmoid -> [N, 1, C] gate"""

    def __init__(self, c=12):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 4, 4)
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        return t * torch.sigmoid(self.fc(t.mean(1, keepdim=True)))


def test_token_gate_scales_the_last_axis_and_folds_into_layer_norm():
    (site,) = _find(TokenSE(), 2, 3, 16, 16)
    assert site.channel_dim == 2 and site.channels == 12 and site.gate_shape == (2, 1, 12)
    assert site.absorption.target.name == "norm"


class SplitAttention(nn.Module):
    """a, b -> (a + b).mean -> fc -> view(N, 2, C) -> softmax over branches -> a*w0 + b*w1"""

    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 5, padding=2)
        self.fc = nn.Linear(c, 2 * c)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        w = self.fc((a + b).mean((2, 3))).view(x.size(0), 2, -1).softmax(1)
        return a * w[:, 0, :, None, None] + b * w[:, 1, :, None, None]


def test_split_attention_is_one_site_with_a_use_per_branch():
    """Two muls share one excitation: one site of kind split with two uses."""
    (site,) = _find(SplitAttention(), 2, 8, 6, 6)
    assert site.kind is SiteKind.SPLIT
    assert [u.x.name for u in site.uses] == ["a", "b"]


class GCAdd(nn.Module):
    """x -> conv_mask -> softmax over HW; context = x @ mask; x + transform(context)"""

    def __init__(self, c=8):
        super().__init__()
        self.mask = nn.Conv2d(c, 1, 1)
        self.transform = nn.Sequential(nn.Conv2d(c, 2, 1), nn.ReLU(), nn.Conv2d(2, c, 1))

    def forward(self, x):
        n, c, h, w = x.shape
        attn = self.mask(x).view(n, 1, h * w).softmax(-1).unsqueeze(-1)
        context = (x.view(n, c, h * w).unsqueeze(1) @ attn).view(n, c, 1, 1)
        return x + self.transform(context)


def test_gc_add_record():
    """The pool is the matmul; the combine is an add; x is the graph input, which nothing produced."""
    (site,) = _find(GCAdd(), 2, 8, 5, 5)
    assert site.kind is SiteKind.GC and site.uses[0].op is Combine.ADD
    assert [p.name for p in site.pools] == ["matmul"]
    assert not site.absorbable and "graph input" in site.absorption.reason


class ChainedMean(SEAfterBN):
    """x.mean(-1).mean(-1): two partial reductions make one global pool."""

    def forward(self, x):
        x = self.bn(self.conv(x))
        u = x.mean(-1).mean(-1)[:, :, None, None]
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(u))))


def test_chained_partial_reductions_are_a_global_pool():
    (site,) = _find(ChainedMean(), 2, 3, 6, 4)
    assert [p.name for p in site.pools] == ["mean_1"]
    assert site.kind is SiteKind.SE


class Producers(SEAfterBN):
    """What produced x decides where a per-channel scale can go."""

    def __init__(self, tail):
        super().__init__()
        self.tail = tail

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.tail == "relu":
            y = F.relu(y)
        elif self.tail == "relu6":
            y = F.relu6(y)
        elif self.tail == "residual":
            y = y + self.conv(x)
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(y)))))
        out = y * g
        if self.tail == "shared":
            out = out + F.relu(y)  # y is read unscaled too
        elif self.tail == "residual_gate":
            out = out + y  # y * g + y == y * (1 + g): one scale, folded into bn
        return out


@pytest.mark.parametrize(
    "tail, target, reason",
    [
        ("relu", "bn", "through relu"),
        ("relu6", None, "relu6"),
        ("residual", None, "x is a sum"),
        ("shared", None, "also read unscaled"),
        ("residual_gate", "bn", "BatchNorm2d 'bn'"),
    ],
)
def test_absorption_looks_through_relu_and_refuses_with_a_reason(tail, target, reason):
    (site,) = _find(Producers(tail), 2, 3, 6, 6)
    got = site.absorption.target.name if site.absorption.target is not None else None
    assert got == target
    assert reason in site.absorption.reason


class FRN(nn.Module):
    """x * rsqrt(mean(x^2) + |eps|): a pooled per-channel gate with no learned op: a normalization."""

    def __init__(self, c=8):
        super().__init__()
        self.eps = nn.Parameter(torch.full((1, c, 1, 1), 1e-3))
        self.conv = nn.Conv2d(3, c, 1)

    def forward(self, x):
        x = self.conv(x)
        return x * torch.rsqrt(x.pow(2).mean((2, 3), keepdim=True) + self.eps.abs())


class ScalarGate(FRN):
    """GAP -> Linear(C, 1) -> sigmoid: per sample but not per channel."""

    def __init__(self, c=8):
        super().__init__(c)
        self.fc = nn.Linear(c, 1)

    def forward(self, x):
        x = self.conv(x)
        return x * torch.sigmoid(self.fc(x.mean((2, 3))))[:, :, None, None]


@pytest.mark.parametrize("model, reason", [(FRN(), "normalization"), (ScalarGate(), "channel axis")])
def test_near_misses_are_refused_with_a_reason(model, reason):
    """Nothing is reported as a site; the refusal is kept and printed."""
    sites = _find(model, 2, 3, 6, 6)
    assert len(sites) == 0
    (rejection,) = sites.rejections
    assert reason in rejection.reason
    assert reason in str(sites)


def test_layer_scale_and_spatial_gates_are_not_even_candidates():
    """x * gamma (no data) and x * sigmoid(conv(x)) (not pooled) are silently not attention."""

    class Decoys(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(1, 8, 1, 1))
            self.conv = nn.Conv2d(3, 8, 1)
            self.gate = nn.Conv2d(8, 1, 3, padding=1)

        def forward(self, x):
            x = self.conv(x) * self.gamma
            return x * torch.sigmoid(self.gate(x))

    sites = _find(Decoys(), 2, 3, 6, 6)
    assert len(sites) == 0 and len(sites.rejections) == 0
