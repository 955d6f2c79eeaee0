"""asrfx.fuse: constant gates fold into the backbone; outputs equal, sizes equal the backbone's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import asrfx
from asrfx import AsrfxError
from asrfx.graph.ops import op_of

import zoo
from helpers import randomize

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _psi(seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    return lambda site, shape: torch.randn(shape, generator=gen)


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _assert_fused(model, x, *, seed=0, backbone=None, **convert_kw):
    """convert -> eval -> fuse; outputs equal the converted model's, sizes the backbone's."""
    gm = asrfx.convert(model, x, psi_init=_psi(seed), **convert_kw).eval()
    fused = asrfx.fuse(gm)
    with torch.no_grad():
        want, got = gm(x), fused(x)
    tol = 1e-10 if x.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(want.abs().max().item(), 1.0))
    assert not [n for n, _ in fused.named_parameters() if "psi" in n]
    if backbone is not None:
        assert _count(fused) == _count(backbone)
    return fused, asrfx.report_of(fused)


class Producer(nn.Module):
    """stem -> producer layer -> [look-through op] -> SE (x * g) -> consumer conv -> head.

    producer: conv | grouped | depthwise | convT | bn | gn | functional_bn
    through: none | relu | leaky | maxpool | avgpool | dropout
    """

    def __init__(self, producer: str, through: str, c: int = 8):
        super().__init__()
        self.producer, self.through = producer, through
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layer = {
            "conv": nn.Conv2d(c, c, 3, padding=1),
            "grouped": nn.Conv2d(c, c, 3, padding=1, groups=2),
            "depthwise": nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
            "convT": nn.ConvTranspose2d(c, c, 3, padding=1, groups=2),
            "bn": nn.BatchNorm2d(c),
            "gn": nn.GroupNorm(2, c),
            "functional_bn": nn.BatchNorm2d(c),
        }[producer]
        self.se = zoo.SEConv(c)
        self.consumer = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        if self.producer == "functional_bn":
            b = self.layer
            y = F.batch_norm(x, b.running_mean, b.running_var, b.weight, b.bias, False, 0.1, b.eps)
        else:
            y = self.layer(x)
        y = {"none": lambda t: t, "relu": F.relu, "leaky": lambda t: F.leaky_relu(t, 0.1),
             "maxpool": lambda t: F.max_pool2d(t, 2), "avgpool": lambda t: F.avg_pool2d(t, 2),
             "dropout": lambda t: F.dropout(t, 0.3, training=False)}[self.through](y)
        y = self.consumer(self.se(y))
        return self.head(y.mean((2, 3)))


@SETTINGS
@given(st.sampled_from(["conv", "grouped", "depthwise", "convT", "bn", "gn", "functional_bn"]),
       st.sampled_from(["none", "relu", "leaky", "maxpool", "avgpool", "dropout"]),
       st.integers(0, 2**16), st.integers(1, 3), st.integers(2, 7))
def test_gate_folds_into_the_producer(producer, through, seed, batch, size):
    """
    before: producer ─> [through] ─> x * g(psi) ─> consumer
    after:  producer' ─> [through] ─> consumer          (g folded into producer', eqs. 6-7)
    The sigmoid gate is positive, so ReLU, LeakyReLU and max pooling commute with it.
    """
    model = randomize(Producer(producer, through), seed).double()
    x = torch.randn(batch, 3, size * 2, size * 2, dtype=torch.float64)
    backbone = copy.deepcopy(model)
    backbone.se = nn.Identity()
    fused, report = _assert_fused(model, x, seed=seed, backbone=backbone)
    (fold,) = report.folds
    assert fold.where == "producer" and fold.site == "se"
    if producer == "bn" and through in ("none", "relu", "dropout"):
        assert fold.op == "gated_bn"  # convert moved it into the BatchNorm already
    elif producer == "functional_bn":
        assert fold.into and fold.into[0].startswith("batch_norm")
    else:
        assert fold.into == ("layer",)


class ConsumerOnly(Producer):
    """The gated x comes out of a ReLU6 / SiLU / a residual sum: fold into the consumer conv."""

    def __init__(self, kind: str, c: int = 8):
        super().__init__("conv", "none", c)
        self.kind = kind

    def forward(self, x):
        x = self.stem(x)
        y = self.layer(x)
        y = {"relu6": F.relu6, "silu": F.silu, "residual": lambda t: t + x}[self.kind](y)
        return self.head(self.consumer(self.se(y)).mean((2, 3)))


@SETTINGS
@given(st.sampled_from(["relu6", "silu", "residual"]), st.integers(0, 2**16), st.integers(1, 3))
def test_gate_folds_into_consumers_when_the_producer_cannot_take_it(kind, seed, batch):
    """ReLU6 does not commute with a scale: the consumer conv's input slices take the gate."""
    model = randomize(ConsumerOnly(kind), seed).double()
    x = torch.randn(batch, 3, 6, 6, dtype=torch.float64)
    backbone = copy.deepcopy(model)
    backbone.se = nn.Identity()
    _, report = _assert_fused(model, x, seed=seed, backbone=backbone)
    (fold,) = report.folds
    assert fold.where == "consumers" and fold.into == ("consumer",)


class SharedInput(Producer):
    """x is read unscaled by another branch, and the gated tensor feeds a pooling: kept."""

    def forward(self, x):
        x = self.stem(x)
        y = F.silu(self.layer(x))
        gated = self.se(y)
        return self.head((F.max_pool2d(gated, 2) + F.max_pool2d(y, 2)).mean((2, 3)))


def test_gate_that_cannot_fold_stays_as_one_constant_and_says_why():
    model = randomize(SharedInput("conv", "none"), 5).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fused, report = _assert_fused(model, x, seed=5)
    (fold,) = report.kept
    assert "read unscaled" in fold.reason and "max_pool" in fold.reason
    assert "kept" in str(report)
    # the psi branch is gone: one stored constant remains
    assert not any("fc" in n for n, _ in fused.named_parameters())
    assert any(n.startswith("asr_gate") for n, _ in fused.named_buffers())


class TokenGate(nn.Module):
    """tokens -> Linear or LayerNorm -> SE over the embedding dim ([N, 1, C] gate) -> Linear."""

    def __init__(self, producer: str, c: int = 12):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 2, 2)
        self.layer = nn.Linear(c, c) if producer == "linear" else nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)
        self.out = nn.Linear(c, 3)

    def forward(self, x):
        t = self.layer(self.embed(x).flatten(2).transpose(1, 2))
        t = t * torch.sigmoid(self.fc(t.mean(1, keepdim=True)))
        return self.out(t).mean(1)


@pytest.mark.parametrize("producer", ["linear", "layernorm"])
def test_token_gate_folds_into_linear_or_layernorm(producer):
    model = randomize(TokenGate(producer), 2).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    backbone_params = _count(model) - _count(model.fc)
    fused, report = _assert_fused(model, x, seed=2)
    assert report.folds[0].into == ("layer",)
    assert _count(fused) == backbone_params


@pytest.mark.parametrize("plug", ["gc_add", "gc_scale"])
def test_global_context_gates_fold(plug):
    """GC's additive gate goes into the producer's bias; its pooling branch is gone."""
    attention = zoo.ContextBlock(8) if plug == "gc_add" else zoo.GlobalContextScale(8)
    model = Producer("bn", "none")
    model.se = attention
    model = randomize(model, 4).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    backbone = copy.deepcopy(model)
    backbone.se = nn.Identity()
    _, report = _assert_fused(model, x, seed=4, backbone=backbone)
    # the scale variant already trained inside the BatchNorm (convert's fast path)
    assert report.folds[0].op == ("add" if plug == "gc_add" else "gated_bn")
    assert report.folds[0].where == "producer"


def test_gated_batchnorm_becomes_a_plain_batchnorm():
    """convert's fast path (gate inside the BN affine) fuses back into an ordinary BatchNorm2d."""
    model = randomize(Producer("bn", "relu"), 9).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm = asrfx.convert(model, x)
    assert isinstance(gm.layer, asrfx.GatedBatchNorm)
    fused = asrfx.fuse(gm.eval())
    assert type(fused.layer) is nn.BatchNorm2d
    assert asrfx.report_of(fused).folds[0].op == "gated_bn"
    with torch.no_grad():
        torch.testing.assert_close(fused(x), gm(x), rtol=1e-10, atol=1e-10)


def test_repeated_gates_multiply_into_one_layer():
    """Keep mode: x * g_asr folds into the producer; the original (input-dependent) SE stays."""
    model = randomize(Producer("conv", "none"), 3).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fused, report = _assert_fused(model, x, seed=3, keep=True)
    assert [f.where for f in report.folds] == ["producer"]
    assert len(asrfx.find_attention(fused, x)) == 1  # k itself is still there (ASR(k) + k)


def test_training_mode_is_refused():
    gm = asrfx.convert(Producer("bn", "none"), torch.randn(2, 3, 6, 6))
    with pytest.raises(AsrfxError, match=r"eval\(\)"):
        asrfx.fuse(gm)


def test_fuse_does_not_touch_its_input():
    gm = asrfx.convert(randomize(Producer("conv", "none"), 1), torch.randn(2, 3, 6, 6)).eval()
    before = copy.deepcopy(gm.state_dict())
    asrfx.fuse(gm)
    after = gm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_float32_tolerance():
    model = randomize(Producer("grouped", "relu"), 8)
    _assert_fused(model, torch.randn(4, 3, 8, 8), seed=8)


class TwoGates(nn.Module):
    """bn -> constant gate -> constant gate: both multiply into the BatchNorm (repeats, delta = 2)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.g1, self.g2 = zoo.ASRTrainGate(c), zoo.ASRTrainGate(c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        return self.head(self.g2(self.g1(self.bn(self.conv(x)))).mean((2, 3)))


def test_two_gates_on_one_tensor_multiply_into_one_layer():
    model = randomize(TwoGates(), 6).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    fused = asrfx.fuse(torch.fx.symbolic_trace(model).eval(), x)
    report = asrfx.report_of(fused)
    assert [f.into for f in report.folds] == [("bn",), ("bn",)]
    assert _count(fused) == _count(model) - _count(model.g1) - _count(model.g2)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


class Conv1dOr3d(nn.Module):
    """conv{1,3}d -> SE over channels -> consumer, for sequences and volumes."""

    def __init__(self, dims: int, c=6):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv3d
        self.dims = dims
        self.conv, self.fc, self.out = conv(2, c, 3, padding=1), nn.Linear(c, c), conv(c, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        axes = tuple(range(2, 2 + self.dims))
        g = torch.sigmoid(self.fc(y.mean(axes))).view(y.shape[0], -1, *([1] * self.dims))
        return self.out(y * g).mean(axes)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_producers(dims):
    model = randomize(Conv1dOr3d(dims), dims).double()
    x = torch.randn(2, 2, *([5] * dims), dtype=torch.float64)
    fused, report = _assert_fused(model, x, seed=dims)
    assert report.folds[0].into == ("conv",)
    assert _count(fused) == _count(model) - _count(model.fc)


def test_verify_checks_sizes_and_outputs():
    model = randomize(Producer("conv", "relu"), 12).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm = asrfx.convert(model, x, psi_init=_psi(12)).eval()
    fused = asrfx.fuse(gm)
    backbone = copy.deepcopy(model)
    backbone.se = nn.Identity()
    report = asrfx.verify(fused, gm, x, backbone=backbone)  # passes, and says what it checked
    assert isinstance(report, asrfx.VerifyReport) and report.invariants and report.outputs == 1
    assert report.parameters == report.backbone == sum(p.numel() for p in backbone.parameters())
    assert report.max_abs_error < 1e-10 and report.rtol == 1e-10
    assert str(report).startswith("verify passed: fused-graph invariants") and "= the backbone's" in str(report)
    assert asrfx.verify(fused).outputs == 0
    with pytest.raises(AsrfxError, match="parameters"):
        asrfx.verify(fused, backbone=model)
    with torch.no_grad():
        fused.layer.bias.add_(1.0)
    with pytest.raises(AsrfxError, match="differ"):
        asrfx.verify(fused, gm, x)


class PatchTokens(nn.Module):
    """img -> conv (patches) -> flatten(2).transpose(1, 2) -> tokens [N, L, C] * gate -> Linear."""

    def __init__(self, c=10, bias=True):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 2, 2, bias=bias)
        self.fc = nn.Linear(c, c)
        self.out = nn.Linear(c, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t * torch.sigmoid(self.fc(t.mean(1, keepdim=True)))
        return self.out(t).mean(1)


def test_gate_on_tokens_folds_through_flatten_and_transpose_into_the_conv():
    """
    before: conv ─> flatten(2) ─> transpose(1, 2) ─> tokens * g[1, 1, C] ─> linear
    after:  conv' ─> flatten(2) ─> transpose(1, 2) ─> linear      (channel axis 2 -> axis 1)
    """
    model = randomize(PatchTokens(), 13).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused, report = _assert_fused(model, x, seed=13)
    assert report.folds[0].where == "producer" and report.folds[0].into == ("embed",)
    assert _count(fused) == _count(model) - _count(model.fc)


class AddGateNoBias(nn.Module):
    """conv without bias -> x + g (GC-style shift) -> silu: the shift creates the conv's bias."""

    def __init__(self, c=6):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        y = self.conv(x)
        return F.silu(y + self.fc(y.mean((2, 3)))[:, :, None, None]).mean((2, 3))


def test_additive_gate_creates_a_bias_where_there_is_none():
    model = randomize(AddGateNoBias(), 14).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    fused, report = _assert_fused(model, x, seed=14)
    (fold,) = report.folds
    assert fold.op == "add" and fold.into == ("conv",)
    assert fused.conv.bias is not None and fused.conv.bias.shape == (6,)


def test_backbone_replaces_each_attention_block_by_identity():
    """
    before: conv -> bn -> relu -> SE (x * sigmoid(fc(relu(fc(gap(x))))))
    after:  conv -> bn -> relu -> Identity        (a copy; the model keeps its SE)
    fuse(convert(model)) has the backbone's parameter count.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), zoo.SELayer(8)).eval()
    x = torch.randn(2, 3, 9, 9)
    plain = asrfx.backbone(model, x)
    assert isinstance(plain[3], nn.Identity) and isinstance(model[3], zoo.SELayer)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model[:3](x))
    fused = asrfx.fuse(asrfx.convert(model, x).eval())
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())


def test_backbone_refuses_attention_that_computes_the_tensor_it_gates():
    """IEBN: the module is bn(x) * g(x); identity would drop the BatchNorm."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), zoo.InstanceEnhance(8)).eval()
    with pytest.raises(AsrfxError, match=r"'1' \(ie\) computes the tensor it gates"):
        asrfx.backbone(model, torch.randn(2, 3, 9, 9))


class GateBeforeHead(nn.Module):
    """stem -> GELU -> SE (x * g) -> global pooling -> classifier: the gate's only consumer is the head."""

    def __init__(self, pooling: str, c: int = 8):
        super().__init__()
        self.pooling = pooling
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.se = zoo.SEConv(c)
        self.pool = nn.AdaptiveAvgPool2d(1) if pooling == "adaptive" else nn.AvgPool2d(3)
        self.head = nn.Linear(4 * c if pooling == "avgpool_2x2" else c, 5)

    def forward(self, x):
        y = self.se(F.gelu(self.stem(x)))
        if self.pooling == "mean":
            return self.head(y.mean((2, 3)))
        return self.head(torch.flatten(self.pool(y), 1))


@pytest.mark.parametrize("pooling", ["adaptive", "mean"])
def test_gate_before_the_classifier_folds_through_global_pooling_into_the_head(pooling):
    """
    before: stem -> gelu -> mul(y, g) -> adaptive_avg_pool / mean -> flatten -> head
    after:  stem -> gelu -> adaptive_avg_pool / mean -> flatten -> head (columns scaled by g)
    """
    model = randomize(GateBeforeHead(pooling), 3).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    backbone = copy.deepcopy(model)
    backbone.se = nn.Identity()
    fused, report = _assert_fused(model, x, seed=3, backbone=backbone)
    (fold,) = report.folds
    assert fold.where == "consumers" and fold.into == ("head",)
    assert not any(op_of(n, dict(fused.named_modules())).name == "mul" for n in fused.graph.nodes)


def test_gate_before_a_head_that_mixes_channels_with_positions_is_kept():
    """avg_pool to 2x2, then flatten: the head's columns mix channel and position; no exact fold."""
    model = randomize(GateBeforeHead("avgpool_2x2"), 3).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    _, report = _assert_fused(model, x, seed=3)
    (fold,) = report.kept
    assert "splits the gated axis" in fold.reason


def test_fused_weights_load_into_the_backbone_class():
    """
    fuse(convert(model)) as a GraphModule  ->  its state_dict, loaded into backbone(model):
    the model's own class (Sequential here) with SE replaced by identity and the gate in bn's affine.
    """
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), zoo.SELayer(8),
                                    nn.Conv2d(8, 4, 1)), 4).double().eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    gm = asrfx.convert(model, x, psi_init=_psi(4)).eval()
    deployed = asrfx.backbone(model, x, state_dict=asrfx.fuse(gm).state_dict())
    assert type(deployed) is nn.Sequential and isinstance(deployed[3], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), gm(x), rtol=1e-10, atol=1e-12)


def test_fused_weights_with_a_kept_gate_do_not_load_into_the_backbone_class():
    model = randomize(SharedInput("conv", "none"), 5).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fused = asrfx.fuse(asrfx.convert(model, x, psi_init=_psi(5)).eval())
    with pytest.raises(AsrfxError, match=r"unexpected \['asr_gate_0'\].*Deploy the fused GraphModule"):
        asrfx.backbone(model, x, state_dict=fused.state_dict())


class _StochasticDepthSE(nn.Module):
    """An SE block whose residual branch is dropped per sample by a random mask (timm's drop_path
    as torch.fx records it: a fresh tensor of the input's batch size, filled by bernoulli_)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = y * torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        mask = y.new_empty(y.shape[0], 1, 1, 1).bernoulli_(0.8).div_(0.8)
        return x + y * mask


def test_a_random_mask_is_never_taken_for_a_constant_gate():
    """A random value varies from call to call like the input: fuse must neither evaluate nor fold
    it (it used to try, reading the input of new_empty), and only the SE's gate is a constant."""
    from asrfx.passes.contract import constant_gates

    gm = asrfx.convert(_StochasticDepthSE(), torch.randn(2, 8, 6, 6), psi_init=0.3).eval()
    assert all(op_of(g.gate, {}).name != "div" for g in constant_gates(gm))
    fused = asrfx.fuse(gm)
    assert len(asrfx.report_of(fused).folds) == 1 and constant_gates(fused) == []
    assert any(op_of(n, {}).name == "bernoulli" for n in fused.graph.nodes)  # the mask is still drawn
