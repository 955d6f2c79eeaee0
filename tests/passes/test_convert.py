"""asrfx.convert: replace and keep modes, checked against independent oracles.

The oracles never look at the converted graph: they run the *original* model with a
hook that feeds psi where the pooled statistic was (replace mode), or that gates x with
the excitation evaluated on psi before the attention (keep mode).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import asrfx
from asrfx import AsrfxWarning, GatedBatchNorm

import zoo
from helpers import randomize

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Host(nn.Module):
    """stem -> conv -> bn -> [act] -> plug (attention) -> + shortcut -> GAP -> fc

    act: "none" (an nn.Identity), "relu", "silu", or "direct" (no module at all).
    """

    def __init__(self, plug: nn.Module, c: int = 16, act: str = "none"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = {"none": nn.Identity(), "relu": nn.ReLU(), "silu": nn.SiLU(), "direct": None}[act]
        self.plug = plug
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        h = self.bn(self.conv(x))
        if self.act is not None:  # "direct": the attention reads the BatchNorm output itself
            h = self.act(h)
        return self.fc((self.plug(h) + x).mean((2, 3)))


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    return randomize(model, seed, scale=0.3, mean_scale=0.2)


def _psi_init(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda site, shape: torch.randn(shape, generator=gen)


def _param(gm, name):
    return dict(gm.named_parameters())[name]


# -- replace mode ---------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 2**16), st.integers(1, 4), st.integers(4, 10), st.sampled_from(["se", "spa"]))
def test_replace_equals_original_fed_psi(seed, batch, size, kind):
    """
    before: x ─> avg_pool(s) ─> fc ─> gate ─> x * gate
    after:  psi(s) ─────────────> fc ─> gate ─> x * gate     (pools gone)
    oracle: the original model with each pool's output replaced by psi, by forward hook.
    """
    plug = zoo.SELayer(16) if kind == "se" else zoo.SPALayer(16, reduction=4)
    model = _randomize(Host(plug), seed).eval()
    x = torch.randn(batch, 3, size, size)
    gm = asrfx.convert(model, (torch.randn(2, 3, 8, 8),), psi_init=_psi_init(seed)).eval()
    (site,) = asrfx.report_of(gm).sites
    pools = [m for m in plug.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    psis = [_param(gm, name) for name in site.psi]
    assert len(psis) == len(pools)
    hooks = [p.register_forward_hook(lambda mod, inp, out, v=v: v.expand_as(out)) for p, v in zip(pools, psis)]
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        got = gm(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the pools are gone from the graph; the gate no longer depends on the input
    assert not any(n.op == "call_module" and "pool" in str(n.target) for n in gm.graph.nodes)


def test_psi_names_shapes_and_default_init():
    """psi lives on the attention module, shaped like each pooled statistic with batch 1."""
    model = Host(zoo.SPALayer(16, reduction=4))
    gm = asrfx.convert(model, torch.randn(2, 3, 8, 8))
    (site,) = asrfx.report_of(gm).sites
    assert site.psi == ("plug.psi_avg1", "plug.psi_avg2", "plug.psi_avg4")
    shapes = [tuple(_param(gm, n).shape) for n in site.psi]
    assert shapes == [(1, 16, 1, 1), (1, 16, 2, 2), (1, 16, 4, 4)]
    assert all(torch.all(_param(gm, n) == 0.1) for n in site.psi)  # the paper's C_0.1


def test_psi_init_value_and_tensor():
    model = Host(zoo.SELayer(16))
    gm = asrfx.convert(model, torch.randn(1, 3, 8, 8), psi_init=0.5)
    assert torch.all(gm.plug.psi == 0.5)
    init = torch.linspace(-1, 1, 16).view(1, 16, 1, 1)
    gm = asrfx.convert(model, torch.randn(1, 3, 8, 8), psi_init=init)
    assert torch.equal(gm.plug.psi.detach(), init)


def test_srm_batchnorm_in_excitation_uses_running_statistics():
    """
    SRM: (mean, var) -> +eps -> sqrt -> cat -> *cfc -> sum -> BN -> sigmoid.
    After convert, BN sees one constant vector: it uses running statistics (an affine
    whose weight and bias train), in train mode too, and batch 1 trains without error.
    """
    model = _randomize(Host(zoo.SRMLayer(16)), 3).train()
    positive = lambda site, shape: torch.rand(shape) + 0.5  # one psi stands where a variance was
    gm = asrfx.convert(model, torch.randn(2, 3, 8, 8), psi_init=positive)
    (site,) = asrfx.report_of(gm).sites
    assert site.frozen_norms == ("plug.bn",)
    mean, var = (_param(gm, n) for n in site.psi)
    plug = model.plug
    t = torch.cat((mean, (var + 1e-5).sqrt()), dim=2)
    z = (t * plug.cfc[None]).sum(2)[:, :, None, None]
    bn = plug.bn
    g = torch.sigmoid((z - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_var.view(1, -1, 1, 1) + bn.eps).sqrt()
                      * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    x = torch.randn(1, 3, 5, 5)
    model.eval()
    gm.eval()
    with torch.no_grad():
        xin = model.stem(x)
        expected = model.fc((model.bn(model.conv(xin)) * g + xin).mean((2, 3)))
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-6)
    gm.train()
    stats_before = gm.plug.bn.running_mean.clone()
    gm(x).sum().backward()  # batch 1 in training mode: no "more than 1 value per channel" error
    assert torch.equal(gm.plug.bn.running_mean, stats_before)  # excitation BN statistics frozen
    assert gm.plug.bn.weight.grad is not None and mean.grad is not None


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_batch_dependent_shapes_keep_working(batch):
    """SELayer does view(b, c) with b = x.size(0): after convert the psi branch uses 1."""
    model = Host(zoo.SELayer(16)).eval()
    gm = asrfx.convert(model, torch.randn(2, 3, 8, 8)).eval()
    out = gm(torch.randn(batch, 3, 6, 6))
    assert out.shape == (batch, 5)
    gate_nodes = [n for n in gm.graph.nodes if n.meta.get("asrfx", {}).get("role") == "gate"]
    assert gate_nodes and all("placeholder" not in {a.op for a in _ancestors(n)} for n in gate_nodes)


def _ancestors(node):
    seen, stack = set(), [node]
    while stack:
        for i in stack.pop().all_input_nodes:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


# -- keep mode ----------------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(4, 9))
def test_keep_mode_gates_x_before_the_original_attention(seed, batch, size):
    """
    before: x ─> SE(x)
    after:  x ─> x * gate_asr(psi) ─> SE(.)       gate_asr: a copy of SE's excitation
    oracle: a pre-hook on the original SE multiplies its input by fc(psi) of the SE's own fc.
    """
    model = _randomize(Host(zoo.SELayer(16)), seed).eval()
    gm = asrfx.convert(model, torch.randn(2, 3, 8, 8), keep=True, psi_init=_psi_init(seed)).eval()
    (site,) = asrfx.report_of(gm).sites
    assert site.mode == "keep" and site.psi == ("plug_asr.psi",)
    psi = _param(gm, "plug_asr.psi")
    # the copy has its own parameters, initialised from the original's
    copy_w, orig_w = gm.get_submodule("plug_asr.fc.0").weight, gm.get_submodule("plug.fc.0").weight
    assert copy_w is not orig_w and torch.equal(copy_w, model.plug.fc[0].weight)
    gate = model.plug.fc(psi.view(1, 16)).view(1, 16, 1, 1)
    hook = model.plug.register_forward_pre_hook(lambda mod, args: (args[0] * gate,))
    x = torch.randn(batch, 3, size, size)
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        hook.remove()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-6)


# -- parameters, training, saving ------------------------------------------------------------------


def test_backbone_parameters_and_buffers_bitwise_unchanged_and_model_untouched():
    model = _randomize(Host(zoo.SELayer(16)), 7)
    before = copy.deepcopy(model.state_dict())
    gm = asrfx.convert(model, torch.randn(2, 3, 8, 8))
    after = gm.state_dict()
    assert set(after) == set(before) | {"plug.psi"}
    for key, value in before.items():
        assert torch.equal(after[key], value), key
        assert torch.equal(model.state_dict()[key], value), key  # the caller's model is untouched
    assert not hasattr(model.plug, "psi")


def test_gradients_reach_psi_and_excitation():
    model = Host(zoo.SELayer(16)).train()
    gm = asrfx.convert(model, torch.randn(2, 3, 8, 8))
    gm(torch.randn(4, 3, 8, 8)).pow(2).sum().backward()
    assert gm.plug.psi.grad is not None and gm.plug.psi.grad.abs().sum() > 0
    assert gm.get_submodule("plug.fc.0").weight.grad.abs().sum() > 0


def test_state_dict_round_trip_into_a_fresh_conversion():
    model = _randomize(Host(zoo.SPALayer(16, reduction=4)), 11)
    gm = asrfx.convert(model, torch.randn(2, 3, 8, 8), psi_init=_psi_init(1)).eval()
    buffer = io.BytesIO()
    torch.save(gm.state_dict(), buffer)
    buffer.seek(0)
    fresh = asrfx.convert(Host(zoo.SPALayer(16, reduction=4)), torch.randn(2, 3, 8, 8)).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), gm(x))


# -- BatchNorm fast path ---------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 2**16), st.integers(2, 4), st.booleans(), st.sampled_from([1, 2, 3]))
def test_gated_batchnorm_equals_batchnorm_times_gate(seed, batch, training, dims):
    """GatedBatchNorm(x, v) == BN(x) * v, and running statistics move identically."""
    gen = torch.Generator().manual_seed(seed)
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    bn = _randomize(cls(6), seed).train(training)
    gated = GatedBatchNorm(copy.deepcopy(bn))
    shape = (batch, 6) + (3,) * dims if dims > 1 else (batch, 6, 4)
    x = torch.randn(shape, generator=gen)
    v = torch.rand(6, generator=gen) + 0.1
    view = (1, 6) + (1,) * (x.dim() - 2)
    torch.testing.assert_close(gated(x, v), bn(x) * v.view(view), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gated.running_mean, bn.running_mean)
    torch.testing.assert_close(gated.running_var, bn.running_var)


@SETTINGS
@given(st.integers(0, 2**16), st.sampled_from(["none", "relu", "direct"]), st.booleans())
def test_gate_in_norm_is_the_same_function(seed, act, training):
    """With and without the BatchNorm fast path: same outputs, same running statistics."""
    model = _randomize(Host(zoo.SEConv(16), act=act), seed)
    fast = asrfx.convert(model, torch.randn(2, 3, 8, 8)).train(training)
    slow = asrfx.convert(model, torch.randn(2, 3, 8, 8), gate_in_norm=False).train(training)
    (site,) = asrfx.report_of(fast).sites
    assert site.gated_norm == "bn" and isinstance(fast.bn, GatedBatchNorm)
    assert asrfx.report_of(slow).sites[0].gated_norm is None
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.bn.running_mean, slow.bn.running_mean)


def test_gate_stays_outside_when_the_producer_cannot_take_it():
    """x = SiLU(BN(y)): SiLU does not commute with a scale, so the multiply stays."""
    gm = asrfx.convert(Host(zoo.SEConv(16), act="silu"), torch.randn(2, 3, 8, 8))
    assert asrfx.report_of(gm).sites[0].gated_norm is None
    assert not isinstance(gm.bn, GatedBatchNorm)


# -- bad input -------------------------------------------------------------------------------------


def test_model_without_attention_is_returned_equivalent_with_a_note():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(AsrfxWarning, match="nothing was converted"):
        gm = asrfx.convert(model, x)
    assert "nothing was converted" in str(asrfx.report_of(gm))
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), model(x))


def test_bad_options_are_refused_clearly():
    model = Host(zoo.SELayer(16))
    with pytest.raises(TypeError, match="unexpected keyword argument 'keeep'"):
        asrfx.convert(model, torch.randn(1, 3, 8, 8), keeep=True)
    with pytest.raises(TypeError, match="psi_init"):
        asrfx.convert(model, torch.randn(1, 3, 8, 8), psi_init="zeros")
    with pytest.raises(TypeError, match="keep"):
        asrfx.convert(model, torch.randn(1, 3, 8, 8), keep="yes")
    with pytest.raises(asrfx.AsrfxError, match="example_inputs"):
        asrfx.convert(model)


def test_inplace_shares_the_models_parameters():
    model = Host(zoo.SELayer(16))
    gm = asrfx.convert(model, torch.randn(1, 3, 8, 8), inplace=True, gate_in_norm=False)
    assert gm.conv.weight is model.conv.weight
    copied = asrfx.convert(model, torch.randn(1, 3, 8, 8))
    assert copied.conv.weight is not model.conv.weight


def test_report_lists_every_site():
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("error", AsrfxWarning)
        gm = asrfx.convert(torchvision.models.mobilenet_v3_small(), torch.randn(1, 3, 64, 64))
    report = asrfx.report_of(gm)
    assert len(report.sites) == 9 and not report.skipped
    assert "features.1.block.1.psi" in dict(gm.named_parameters())
    assert "9 site(s) converted" in str(report)
