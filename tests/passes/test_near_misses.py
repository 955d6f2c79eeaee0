"""Never a silent miss: what looks like channel attention is a site, or a rejection saying why.

*Attention-like* (docs/architecture.md, Detection): a combine of a feature map x with a gate-like
activation (sigmoid, hard sigmoid, softmax, tanh, relu6) of values a learned op computes from a
reduction that leaves no spatial axis and reads x (or what x is computed from). Such a combine
that is not a site is a ``Rejection`` with a ``Verdict``: ``undecided`` when asrfx could not tell
(the layout was lost, the gate goes through an op asrfx does not read, an unsupported combine),
and find_attention / convert warn; ``not channel attention`` for definite verdicts (a per-sample
scalar gate). Where the axis layout is lost, a ``LayoutLoss`` names the node, and both warn.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import asrfx
from asrfx import AsrfxWarning, Verdict

from helpers import examples, randomize


@fx.wrap
def tokens_to_map(t, h):
    """A user function torch.fx keeps as one call: [N, L, C] -> [N, C, h, L/h]."""
    n, length, c = t.shape
    return t.transpose(1, 2).reshape(n, c, h, length // h)


@fx.wrap
def same_dtype(g, x):
    """A user function torch.fx keeps as one call: reads x (its dtype) as well as the gate."""
    return g.to(x.dtype)


class Excitation(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, max(c // 2, 1)), nn.Linear(max(c // 2, 1), c)

    def forward(self, u):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(u))))


class SEBlind(nn.Module):
    """An SE that detection cannot read, in one of three ways (``blind``), or a readable one."""

    def __init__(self, c, blind):
        super().__init__()
        self.blind, self.ex, self.conv = blind, Excitation(c), nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = self.conv(x)
        if self.blind == "lost_layout":  # a map whose axes asrfx cannot tell apart
            x = tokens_to_map(x.flatten(2).transpose(1, 2), x.shape[2])
        g = self.ex(x.mean((2, 3)))
        if self.blind == "opaque_gate":
            return x * same_dtype(g[:, :, None, None], x)
        if self.blind == "einsum":
            return torch.einsum("bchw,bc->bchw", x, g)
        return x * g[:, :, None, None]


class Chain(nn.Module):
    def __init__(self, blinds, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[SEBlind(c, b) for b in blinds])

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


def _find(model, *shape):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sites = asrfx.find_attention(model.eval(), torch.randn(*shape))
    return sites, [str(w.message) for w in caught if issubclass(w.category, AsrfxWarning)]


def test_lost_layout_is_a_rejection_a_table_line_and_a_warning():
    sites, warned = _find(Chain(["lost_layout"]), 2, 3, 4, 4)
    assert len(sites) == 0
    (loss,) = sites.layout_losses
    assert loss.node.name == "tokens_to_map" and loss.op == "function" and loss.tensors >= 2
    (rej,) = sites.rejections
    assert rej.verdict is Verdict.UNDECIDED and rej.module_path == "blocks.0"
    assert "cannot tell apart" in rej.reason and "tokens_to_map" in rej.reason
    text = str(sites)
    assert "layout unknown from 'blocks.0' [tokens_to_map] (function)" in text
    assert "undecided" in text
    assert any("layout is unknown from 'blocks.0' [tokens_to_map]" in w for w in warned), warned
    assert any("no channel-attention site found, but 1 pattern(s) look like channel attention" in w
               for w in warned), warned
    assert sites.notes == warned


def test_gate_through_an_op_asrfx_does_not_read():
    sites, warned = _find(Chain(["opaque_gate"]), 2, 3, 4, 4)
    (rej,) = sites.rejections
    assert rej.verdict is Verdict.UNDECIDED
    assert "reads the feature map through 'blocks.0:same_dtype' (function), which asrfx does not read" in rej.reason
    assert not sites.layout_losses and len(warned) == 1


def test_a_gate_combined_by_einsum_is_named():
    sites, warned = _find(Chain(["einsum"]), 2, 3, 4, 4)
    (rej,) = sites.rejections
    assert rej.verdict is Verdict.UNDECIDED and rej.combine.name == "einsum"
    assert "through einsum, not a multiply or an add" in rej.reason
    assert len(warned) == 1


def test_found_sites_and_an_undecided_one_still_warn():
    sites, warned = _find(Chain(["none", "opaque_gate", "none"]), 2, 3, 4, 4)
    assert [s.module_path for s in sites] == ["blocks.0", "blocks.2"]
    assert [r.module_path for r in sites.rejections] == ["blocks.1"]
    assert len(warned) == 1 and warned[0].startswith("1 pattern(s) look like channel attention")


def test_convert_reports_and_warns():
    with pytest.warns(AsrfxWarning) as caught:
        gm = asrfx.convert(Chain(["none", "lost_layout"]), torch.randn(2, 3, 4, 4))
    report = str(asrfx.report_of(gm))
    assert "layout is unknown from 'blocks.1' [tokens_to_map]" in report
    assert "1 pattern(s) look like channel attention" in report
    messages = [str(w.message) for w in caught]
    assert any("tokens_to_map" in m for m in messages)
    assert len(asrfx.report_of(gm).sites) == 1


class ScalarGate(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, c, 1), nn.Linear(c, 1)

    def forward(self, x):
        x = self.conv(x)
        return x * torch.sigmoid(self.fc(x.mean((2, 3))))[:, :, None, None]


class FRN(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 1)

    def forward(self, x):
        x = self.conv(x)
        return x * torch.rsqrt(x.pow(2).mean((2, 3), keepdim=True) + 1e-6)


def test_verdicts_of_definite_refusals():
    """A scalar gate is attention-like but not channel attention: one warning when nothing is
    found; a normalization is not attention-like: kept in rejections, no warning."""
    sites, warned = _find(ScalarGate(), 2, 3, 4, 4)
    assert [r.verdict for r in sites.rejections] == [Verdict.NOT_CHANNEL]
    assert len(warned) == 1 and "not channel attention" in warned[0]
    sites, warned = _find(FRN(), 2, 3, 4, 4)
    assert [r.verdict for r in sites.rejections] == [Verdict.NOT_ATTENTION]
    assert warned == []


class ResidualSE(nn.Module):
    """x + se(x): the residual add reads a gated map, not a gate: no rejection for it."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.ex = nn.Conv2d(3, c, 1), Excitation(c)

    def forward(self, x):
        x = self.conv(x)
        y = x * self.ex(x.mean((2, 3)))[:, :, None, None]
        return x + y, y + y * 2


def test_sums_of_gated_maps_are_not_attention_like():
    sites, warned = _find(ResidualSE(), 2, 3, 4, 4)
    assert len(sites) == 1 and not sites.rejections and warned == []


# -- property: every SE is a site or an undecided rejection, never silent --------------------


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["none", "lost_layout", "opaque_gate", "einsum"]), min_size=1, max_size=4),
       st.integers(1, 3), st.sampled_from([2, 4, 6]), st.integers(0, 2**16))
@example(["lost_layout", "none"], 1, 2, 0)  # batch 1, 2x2 maps
def test_every_se_is_a_site_or_an_undecided_rejection(blinds, batch, size, seed):
    model = randomize(Chain(blinds), seed)
    sites, warned = _find(model, batch, 3, size, size)
    want_sites = [f"blocks.{i}" for i, b in enumerate(blinds) if b == "none"]
    want_rejected = [f"blocks.{i}" for i, b in enumerate(blinds) if b != "none"]
    assert [s.module_path for s in sites] == want_sites, str(sites)
    assert [r.module_path for r in sites.rejections] == want_rejected, str(sites)
    assert all(r.verdict is Verdict.UNDECIDED for r in sites.rejections)
    assert bool(warned) == bool(want_rejected)
    assert bool(sites.layout_losses) == ("lost_layout" in blinds)


class BAM(nn.Module):
    """pytorchcv's BAM: x * (1 + sigmoid(channel gate * spatial map)): the outer gate varies with
    position through a learned conv, a definite verdict, not a possible miss."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 1)
        self.ch = nn.Sequential(nn.Linear(c, c // 2), nn.ReLU(), nn.Linear(c // 2, c))
        self.sp = nn.Sequential(nn.Conv2d(c, 2, 1), nn.ReLU(), nn.Conv2d(2, 1, 1))

    def forward(self, x):
        x = self.conv(x)
        ch = self.ch(x.mean((2, 3))).unsqueeze(2).unsqueeze(3).expand_as(x)
        return x * (1 + torch.sigmoid(ch * self.sp(x).expand_as(x)))


def test_a_gate_that_also_varies_with_position_is_not_channel_attention():
    sites, warned = _find(BAM(), 2, 3, 5, 5)
    outer = [r for r in sites.rejections if r.combine.name == "mul_1"]
    assert [r.verdict for r in outer] == [Verdict.NOT_CHANNEL], str(sites)
    assert "varies with position" in outer[0].reason and "'sp.0'" in outer[0].reason
    assert not [w for w in warned if "look like channel attention" in w]
