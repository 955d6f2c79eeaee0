"""The gate algebra's folds beyond one producer: sums of branches, concatenations, splits, a
following BatchNorm, weight-standardized convs, in-place psi branches, broadcast by repeat,
grouped consumers, negative gates. Each: the fused model equals the ASR form (float64, 1e-10,
randomized BatchNorm statistics), no gate multiply is left, and the report says where it went."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asrfx
from asrfx.graph.ops import op_of
from helpers import randomize


def _fused(model, x, psi=None, seed=0):
    """convert (psi random, or given), fuse in float64; returns (asr form, fused, report). The gates
    stay multiplies in the ASR form (no training fast path, tests/passes/test_gate_in_layers.py): what is
    tested here is where fuse's planner folds them."""
    model = randomize(model, seed).double().eval()
    x = x.double()
    gen = torch.Generator().manual_seed(seed)
    init = psi if psi is not None else (lambda site, shape: torch.randn(shape, generator=gen, dtype=torch.float64))
    gm = asrfx.convert(model, x, psi_init=init, gate_in_consumers=False).eval()
    fused = asrfx.fuse(gm)
    with torch.no_grad():
        want, got = gm(x), fused(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * max(want.abs().max().item(), 1.0))
    return gm, fused, asrfx.report_of(fused)


def _muls(gm) -> int:
    return sum(op_of(n, dict(gm.named_modules())).name == "mul" for n in gm.graph.nodes)


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


class SE(nn.Module):
    def __init__(self, c, act=torch.sigmoid):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Conv2d(c, max(c // 2, 1), 1), nn.Conv2d(max(c // 2, 1), c, 1), act

    def forward(self, x):
        return x * self.act(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class RepBlock(nn.Module):
    """RepVGG/MobileOne-style: 3x3 conv-BN + 1x1 conv-BN + identity BN, summed, then SE."""

    def __init__(self, c=6):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.idn = nn.BatchNorm2d(c)
        self.se = SE(c)

    def forward(self, x):
        return F.relu(self.se(self.k3(x) + self.k1(x) + self.idn(x)))


def test_a_gate_on_a_sum_of_branches_folds_into_every_branch():
    gm, fused, report = _fused(RepBlock(), torch.randn(3, 6, 7, 7))
    (fold,) = report.folds
    assert fold.where == "producer" and set(fold.into) == {"k3.1", "k1.1", "idn"}, str(report)
    assert _muls(fused) == 0
    assert "gate applied inside" in str(asrfx.report_of(gm))  # and while training: inside the three BatchNorms


def test_a_sum_with_an_identity_branch_says_why_and_folds_into_consumers():
    class Residual(RepBlock):
        def forward(self, x):
            return self.head(self.se(self.k3(x) + x))

    model = Residual()
    model.head = nn.Conv2d(6, 4, 1)
    _, fused, report = _fused(model, torch.randn(2, 6, 5, 5))
    (fold,) = report.folds
    assert fold.where == "consumers" and fold.into == ("head",)
    assert "x is a sum ('add')" in fold.reason and "branch 'x'" in fold.reason  # the identity branch
    assert _muls(fused) == 0


class CatBlock(nn.Module):
    """x = cat([BN(conv(a)), conv(a)]) gated: each part folds into its own branch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Conv2d(3, 5, 1)
        self.se = SE(9)

    def forward(self, x):
        return self.se(torch.cat([self.a(x), self.b(x)], dim=1))


def test_a_gate_on_a_concatenation_folds_part_by_part():
    _, fused, report = _fused(CatBlock(), torch.randn(2, 3, 6, 6),
                              psi=lambda site, shape: torch.rand(shape, dtype=torch.float64))
    (fold,) = report.folds
    assert fold.where == "producer" and set(fold.into) == {"a.1", "b"}, str(report)
    assert _muls(fused) == 0


class MixedConv(nn.Module):
    """MixNet-style: SiLU -> SE -> split into channel groups -> a conv per group -> cat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.se = SE(8)
        self.convs = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(5, 4, 5, padding=2)])

    def forward(self, x):
        x = self.se(self.stem(x))
        parts = torch.split(x, [3, 5], dim=1)
        return torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], dim=1)


def test_a_split_gated_tensor_folds_into_each_pieces_consumer():
    _, fused, report = _fused(MixedConv(), torch.randn(2, 3, 6, 6))
    (fold,) = report.folds
    assert fold.where == "consumers" and set(fold.into) == {"convs.0", "convs.1"}, str(report)
    assert _muls(fused) == 0


class GatedPiece(nn.Module):
    """Res2Net/GhostNet-style: one conv-BN, split into two pieces, SE on the second piece only;
    ``cut`` 1 splits channels (the other piece sees no gate), 2 splits rows (so the gate cannot
    fold back into the conv: the first piece would be scaled too)."""

    def __init__(self, cut=1):
        super().__init__()
        self.conv, self.bn, self.cut = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), cut
        self.se = SE(5 if cut == 1 else 8)
        self.head = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        a, b = torch.split(self.bn(self.conv(x)), [3, 5] if self.cut == 1 else [2, 4], dim=self.cut)
        return self.head(F.relu(torch.cat([a, self.se(b)], dim=self.cut)))


@pytest.mark.parametrize("cut", [1, 2])
def test_a_gate_on_one_piece_of_a_split_folds_into_that_pieces_channels_of_the_producer(cut):
    _, fused, report = _fused(GatedPiece(cut), torch.randn(2, 3, 6, 6))
    (fold,) = report.folds
    if cut == 1:
        assert fold.where == "producer" and fold.into == ("bn",), str(report)
        assert _muls(fused) == 0
    else:  # rows: neither the producer (the other rows would be scaled) nor the head (idem) can take it
        assert not fold.into and "other pieces are read too" in fold.reason, str(report)
        assert "along axis 2, not along the gated axis 1" in fold.reason, str(report)


class PaddedGate(nn.Module):
    """conv-BN padded with a constant, SE, then a conv reading it padded with the same constant."""

    def __init__(self, value):
        super().__init__()
        self.conv, self.bn, self.value = nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), value
        self.se, self.head = SE(6), nn.Conv2d(6, 4, 3)

    def forward(self, x):
        y = self.se(F.pad(self.bn(self.conv(x)), (1, 1, 1, 1), value=self.value))
        return self.head(F.pad(y, (1, 1, 1, 1), value=self.value))


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_a_gate_folds_through_zero_padding_and_not_through_another_constant(value):
    _, fused, report = _fused(PaddedGate(value), torch.randn(2, 3, 7, 7))
    (fold,) = report.folds
    if value == 0.0:
        assert fold.where == "producer" and fold.into == ("bn",) and _muls(fused) == 0, str(report)
    else:  # the padded ones would be scaled too, on either side: the gate stays
        assert not fold.into and fold.reason.count("pads with the constant 1.0") == 2, str(report)


class ChunkThenBN(nn.Module):
    """SiLU -> SE -> chunk: one half to a BatchNorm (eval: absorbs a scale in its mean and weight),
    the other half through a permute to a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU())
        self.se = SE(8)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a, b = self.se(self.stem(x)).chunk(2, dim=1)
        return self.bn(a).sum() + self.fc(b.permute(0, 2, 3, 1)).sum()


def test_a_gate_folds_into_a_following_batchnorm_and_through_chunk_and_permute():
    _, fused, report = _fused(ChunkThenBN(), torch.randn(2, 3, 5, 5))
    (fold,) = report.folds
    assert fold.where == "consumers" and set(fold.into) == {"bn", "fc"}, str(report)
    assert _muls(fused) == 0


def test_a_zero_gate_entry_folds_into_a_following_batchnorm():
    """v == 0 on a channel: BN(x * 0) is the constant bias - mean * weight / std."""
    model = ChunkThenBN()
    psi = lambda site, shape: torch.full(shape, -40.0, dtype=torch.float64)  # sigmoid underflows to ~0
    _fused(model, torch.randn(2, 3, 5, 5), psi=psi)


class StdConvBlock(nn.Module):
    """timm's ScaledStdConv2d (weight standardized in the graph, a learned gain) then SE."""

    def __init__(self):
        super().__init__()
        from timm.layers import ScaledStdConv2d

        self.conv = ScaledStdConv2d(3, 6, 3, padding=1)
        self.se = SE(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.se(self.conv(x)))


def test_a_weight_standardized_conv_absorbs_the_gate_in_its_gain():
    _, fused, report = _fused(StdConvBlock(), torch.randn(2, 3, 6, 6))
    (fold,) = report.folds
    assert fold.where == "producer" and "conv.gain" in fold.into, str(report)
    assert _muls(fused) == 1  # the standardization's own gain * scale, and no gate


class InplacePsiBranch(nn.Module):
    """An in-place Swish inside the excitation (timm's inplace activations) and a .to(x.dtype)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.SiLU(inplace=True))
        self.fc1, self.fc2 = nn.Conv2d(6, 3, 1), nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        u = self.fc1(x.mean((2, 3), keepdim=True))
        u = u.mul_(u.sigmoid())
        g = self.fc2(u).sigmoid_().to(x.dtype)
        return self.head(x * g)


def test_in_place_ops_and_casts_in_the_psi_branch_are_constant_folded():
    gm, fused, report = _fused(InplacePsiBranch(), torch.randn(2, 3, 6, 6))
    assert [f.where for f in report.folds] == ["consumers"]
    assert not any("psi" in n for n, _ in fused.named_parameters())
    assert not any(op_of(n, {}).name == "sigmoid" for n in fused.graph.nodes)


class RepeatedGate(nn.Module):
    """The gate broadcast by repeat(1, 1, h, w) instead of expand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Hardswish())
        self.fc = nn.Conv2d(6, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        g = torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        return self.head(x * g.repeat(1, 1, x.size(2), x.size(3)))


def test_a_gate_broadcast_by_repeat_folds_and_the_deployed_model_runs_at_every_size():
    gm, fused, report = _fused(RepeatedGate(), torch.randn(2, 3, 6, 6))
    assert not report.kept
    for size in (3, 6, 11):
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), gm(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("op", ["mul", "add"])
def test_grouped_and_depthwise_consumers(groups, op):
    """A gate after a non-commuting activation folds into a grouped or depthwise conv's input
    slices; an additive gate (no padding) into its bias."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GELU())
            self.fc = nn.Conv2d(6, 6, 1)
            self.dw = nn.Conv2d(6, 6, 3, groups=groups, bias=True)

        def forward(self, x):
            x = self.conv(x)
            g = torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
            return self.dw(x * g if op == "mul" else x + g)

    _, fused, report = _fused(Block(), torch.randn(2, 3, 7, 7))
    (fold,) = report.folds
    assert fold.where == "consumers" and fold.into == ("dw",), str(report)


def test_an_additive_gate_into_a_biasless_conv_goes_into_the_next_batchnorm_in_float64():
    """GC-style x + g read by a bias-less conv and a BatchNorm: the shift becomes BN bias
    (W.g scaled by gamma / sqrt(var + eps): a forgotten eps shows at 1e-10)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GELU())
            self.fc = nn.Conv2d(6, 6, 1)
            self.pw = nn.Conv2d(6, 4, 1, bias=False)
            self.bn = nn.BatchNorm2d(4, eps=0.5)

        def forward(self, x):
            x = self.conv(x)
            return self.bn(self.pw(x + self.fc(x.mean((2, 3), keepdim=True))))

    model = Block()
    _, fused, report = _fused(model, torch.randn(2, 3, 5, 5))
    (fold,) = report.folds
    assert fold.where == "consumers" and fold.into == ("pw", "bn.bias"), str(report)
    assert _params(fused) == _params(model) - _params(model.fc)


class SignedGate(nn.Module):
    """A tanh gate (can be negative) on relu(BN(conv(x))), read by a conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.fc = nn.Conv2d(6, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        return self.head(x * torch.tanh(self.fc(x.mean((2, 3), keepdim=True))))


def _signed(sign: float):
    """SignedGate with fc(psi) of the given sign on every channel (psi = 1, fc's weight 0)."""
    model = randomize(SignedGate(), 2).double().eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.uniform_(0.5, 1.0).mul_(sign)
    return model


@pytest.mark.parametrize("sign, where", [(1.0, "producer"), (-1.0, "consumers")])
def test_a_negative_gate_never_folds_through_relu(sign, where):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    (site,) = asrfx.find_attention(SignedGate(), x.float())
    assert "if the gate is non-negative" in site.absorption.reason  # tanh: the sign is known only at fuse time
    gm = asrfx.convert(_signed(sign), x, psi_init=1.0, gate_in_consumers=False).eval()  # fuse decides
    fused = asrfx.fuse(gm)
    (fold,) = asrfx.report_of(fused).folds
    assert fold.where == where, str(asrfx.report_of(fused))
    if sign < 0:
        assert "negative" in fold.reason
    with torch.no_grad():
        torch.testing.assert_close(fused(x), gm(x), rtol=1e-10, atol=1e-10)


def _timm_block(kind):
    from timm.layers import SEModule
    from timm.models import byobnet

    layers = byobnet.LayerFn(attn=functools.partial(SEModule, rd_ratio=0.5))
    block = {"repvgg": lambda: byobnet.RepVggBlock(8, 8, layers=layers),
             "mobileone": lambda: byobnet.MobileOneBlock(8, 8, num_conv_branches=2, layers=layers)}[kind]()
    return randomize(block, 1).double().eval()


@pytest.mark.parametrize("kind", ["repvgg", "mobileone"])
def test_asr_composes_with_structural_reparameterization(kind):
    """Paper Table 6: an ASR model on RepVGG/MobileOne blocks, fused by asrfx, deployed in its own class,
    then re-parameterized by timm: the plain single-branch network, with the ASR form's outputs."""
    from timm.utils.model import reparameterize_model

    block = _timm_block(kind)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    gm = asrfx.convert(block, x, psi_init=lambda site, shape: torch.randn(shape, dtype=torch.float64)).eval()
    fused = asrfx.fuse(gm)
    assert not asrfx.report_of(fused).kept, str(asrfx.report_of(fused))
    deployed = asrfx.backbone(block, x, state_dict=fused.state_dict()).eval()
    single = reparameterize_model(nn.Sequential(deployed))[0]  # timm re-parameterizes children
    assert single.reparam_conv is not None and isinstance(single.attn, nn.Identity)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in single.modules())
    with torch.no_grad():
        torch.testing.assert_close(single(x), gm(x), rtol=1e-9, atol=1e-9)


def test_a_kept_gate_is_never_called_the_plain_backbone():
    """A shift after GELU read by a padded conv cannot fold: the verdict says so, with the reason."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GELU())
            self.fc = nn.Conv2d(6, 6, 1)
            self.head = nn.Conv2d(6, 2, 3, padding=1)

        def forward(self, x):
            x = self.conv(x)
            return self.head(x + self.fc(x.mean((2, 3), keepdim=True)))

    model = Block()
    _, fused, report = _fused(model, torch.randn(2, 3, 5, 5))
    (fold,) = report.kept
    assert "pads its input" in fold.reason
    backbone = _params(model) - _params(model.fc)
    assert _params(fused) == backbone  # the constant is a buffer: parameter counts alone would say "plain"
    verdict = report.verdict(_params(fused), backbone)
    assert verdict.startswith("not the plain backbone") and "1 gate(s) kept" in verdict and "pads" in verdict
    assert report.verdict(_params(fused) + 1, backbone).count("parameters") == 1


class ResidualSE(nn.Module):
    """x + SE(x) (a residual gate, PP-OCR's RSE): x * (1 + g) folds into the conv that made x."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.se = SE(6)
        self.head = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        return self.head(x + self.se(x))


def test_a_residual_gate_folds_as_one_plus_the_gate():
    x = torch.randn(2, 3, 6, 6)
    (site,) = asrfx.find_attention(ResidualSE(), x)
    assert site.absorption.side == "producer" and [t.target for t in site.absorption.targets] == ["conv"]
    _, fused, report = _fused(ResidualSE(), x)
    (fold,) = report.folds
    assert fold.where == "producer" and fold.into == ("conv",), str(report)
    assert _muls(fused) == 0 and not any(op_of(n, {}).name == "add" for n in fused.graph.nodes)


class ShapeListSE(nn.Module):
    """MONAI's ChannelSELayer: the gate's view shape is list arithmetic on x's shape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.fc = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 6), nn.Sigmoid())

    def forward(self, x):
        x = self.conv(x)
        b, c = x.shape[:2]
        y = F.adaptive_avg_pool2d(x, 1).view(b, c)
        return x * self.fc(y).view([b, c] + [1] * (x.ndim - 2))


def test_a_gate_shaped_by_list_arithmetic_converts_with_batch_one():
    gm, _, report = _fused(ShapeListSE(), torch.randn(3, 3, 5, 5))
    (fold,) = report.folds
    assert fold.where == "producer" and fold.into == ("conv.1",)
    with torch.no_grad():  # the psi branch does not depend on the batch size
        gm(torch.randn(1, 3, 5, 5, dtype=torch.float64))
