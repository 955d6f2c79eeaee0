"""asrfx.attention: each module against a hand computation, and found by find_attention like any module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asrfx
from asrfx.attention import ATTENTION, ECA, GC, IE, SE, SPA, SRM, CBAMChannel


def _rand(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module.eval()


X = torch.randn(2, 8, 5, 4)


def test_se():
    m = _rand(SE(8, reduction=4))
    u = X.mean((2, 3))
    g = torch.sigmoid(m.fc2(F.relu(m.fc1(u))))
    torch.testing.assert_close(m(X), X * g[:, :, None, None])


@pytest.mark.parametrize("channels, k", [(8, 3), (64, 3), (256, 5), (512, 5)])
def test_eca_kernel_size_follows_the_paper(channels, k):
    assert ECA(channels).conv.kernel_size == (k,)


def test_eca():
    m = _rand(ECA(8))
    u = X.mean((2, 3))
    g = torch.sigmoid(F.conv1d(u[:, None], m.conv.weight, padding=1)[:, 0])
    torch.testing.assert_close(m(X), X * g[:, :, None, None])


def test_srm():
    m = _rand(SRM(8))
    flat = X.flatten(2)
    z = flat.mean(2) * m.cfc[:, 0] + flat.std(2) * m.cfc[:, 1]
    bn = m.bn
    z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(m(X), X * torch.sigmoid(z)[:, :, None, None])


def test_ie_starts_as_iebn_does():
    m = IE(8)
    assert torch.equal(m.weight, torch.zeros(8)) and torch.equal(m.bias, torch.full((8,), -1.0))
    m = _rand(m)
    g = torch.sigmoid(X.mean((2, 3)) * m.weight + m.bias)
    torch.testing.assert_close(m(X), X * g[:, :, None, None])


def test_spa_pyramid():
    m = _rand(SPA(8, reduction=2))
    assert m.fc1.in_features == 21 * 8
    y = torch.cat([F.adaptive_avg_pool2d(X, s).flatten(1) for s in (1, 2, 4)], 1)
    g = torch.sigmoid(m.fc2(F.relu(m.fc1(y))))
    torch.testing.assert_close(m(X), X * g[:, :, None, None])


def test_cbam_channel():
    m = _rand(CBAMChannel(8, reduction=2))
    g = torch.sigmoid(m.mlp(X.mean((2, 3))) + m.mlp(X.amax((2, 3))))
    torch.testing.assert_close(m(X), X * g[:, :, None, None])


def test_gc():
    m = _rand(GC(8, reduction=2))
    n, c, h, w = X.shape
    weights = torch.softmax(m.mask(X).view(n, h * w), dim=1)
    context = torch.einsum("nck,nk->nc", X.view(n, c, h * w), weights)[:, :, None, None]
    torch.testing.assert_close(m(X), X + m.transform(context))


def test_tokens_gate_the_embedding_dim():
    t = torch.randn(2, 7, 8)
    m = _rand(SE(8, reduction=4, tokens=True))
    g = torch.sigmoid(m.fc2(F.relu(m.fc1(t.mean(1)))))
    torch.testing.assert_close(m(t), t * g[:, None, :])


class _Host(nn.Module):
    def __init__(self, attention: nn.Module, tokens: bool):
        super().__init__()
        self.tokens = tokens
        self.embed = nn.Conv2d(3, 16, 2, 2)
        self.norm = nn.LayerNorm(16) if tokens else nn.BatchNorm2d(16)
        self.attention = attention

    def forward(self, x):
        y = self.embed(x)
        y = self.norm(y.flatten(2).transpose(1, 2) if self.tokens else y)
        return self.attention(y)


@pytest.mark.parametrize("name", sorted(ATTENTION))
@pytest.mark.parametrize("tokens", [False, True])
def test_found_by_structure_with_their_kind(name, tokens):
    """No special casing: find_attention sees these modules like any third-party code."""
    if tokens and name in ("spa", "gc"):
        pytest.skip("feature maps only")
    module = ATTENTION[name](16, tokens=True) if tokens else ATTENTION[name](16)
    (site,) = asrfx.find_attention(_Host(module, tokens).eval(), torch.randn(2, 3, 8, 8))
    assert site.kind == name and site.module_path == "attention"
    assert site.channel_dim == (2 if tokens else 1) and site.absorption.target.name == "norm"
