"""Mixed precision: the ASR form trains under torch.autocast (bfloat16 on CPU; float16 with a
GradScaler), the gate meets the BatchNorm affine without being rounded to the gate's low
precision, and fuse computes every fold in float64 and rounds once to each parameter's dtype."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import asrfx
from asrfx.algebra import fold

from helpers import examples, randomize

SETTINGS = settings(max_examples=examples(15), deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOW = [torch.bfloat16, torch.float16]


def _asr(kind: str = "se", seed: int = 0) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    gm = asrfx.insert(asrfx.models.cifar_resnet(8, "basic", 10), kind, torch.randn(2, 3, 16, 16),
                      psi_init=lambda site, shape: torch.rand(shape) + 0.1)
    with torch.no_grad():  # SE's hidden ReLU units active: every psi gets a gradient
        for name, p in gm.named_parameters():
            if name.endswith("fc1.bias"):
                p.fill_(1.0)
    return gm.train()


def _data(step: int):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def _train(gm, steps: int, dtype: torch.dtype | None, scaler=None) -> list[float]:
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        x, y = _data(step)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(gm(x), y)
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        losses.append(loss.item())
    return losses


def test_bfloat16_autocast_training_tracks_float32():
    """A few SGD steps under autocast(bfloat16) follow float32 training: the same losses to bfloat16
    precision, and every parameter (psi included; float32, finite) moves the same way: the updates
    point in the same direction (cosine > 0.97) and differ by less than a quarter of their size."""
    full, mixed = _asr(), _asr()
    losses_full, losses_mixed = _train(full, 4, None), _train(mixed, 4, torch.bfloat16)
    assert all(abs(a - b) < 0.05 * abs(a) for a, b in zip(losses_full, losses_mixed)), (losses_full, losses_mixed)
    start = dict(_asr().named_parameters())
    psi = 0
    for (name, p), q in zip(full.named_parameters(), mixed.parameters()):
        assert q.dtype == torch.float32 and torch.isfinite(q).all(), name
        a, b = (p - start[name]).detach().flatten().double(), (q - start[name]).detach().flatten().double()
        assert a.norm() > 0, name  # every parameter trains, psi included
        cosine = (a @ b) / (a.norm() * b.norm())
        assert cosine > 0.97 and (a - b).norm() < 0.25 * a.norm(), (name, cosine.item())
        psi += name.endswith("psi")
    assert psi == 3


def test_float16_autocast_with_a_grad_scaler_trains():
    gm = _asr()
    start = copy.deepcopy(gm.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    losses = _train(gm, 3, torch.float16, scaler)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert scaler.get_scale() > 0
    psi = [n for n in start if n.endswith("psi")]
    assert psi and all(not torch.equal(gm.state_dict()[n], start[n]) for n in psi)


@SETTINGS
@given(st.sampled_from(LOW), st.integers(0, 2**16), st.integers(1, 16))
def test_the_gate_meets_the_affine_in_float32(dtype, seed, channels):
    """A low-precision gate (autocast's) and a float32 gamma: the affine is gamma * gate in float32, not
    rounded to the gate's dtype; a low-precision model rounds each product once."""
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(channels, generator=gen))
        bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
    gated = asrfx.GatedBatchNorm(bn)
    gate = torch.rand(channels, generator=gen).to(dtype)
    x = torch.randn(2, channels, 3, 3, generator=gen)
    want = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight * gate.float(), bn.bias * gate.float(),
                        False, 0.0, bn.eps)
    torch.testing.assert_close(gated(x, gate), want, rtol=0, atol=0)
    low = asrfx.GatedBatchNorm(copy.deepcopy(bn).to(dtype))
    weight, bias = low.weight.float() * gate.float(), low.bias.float() * gate.float()
    want = F.batch_norm(x.to(dtype), low.running_mean, low.running_var, weight.to(dtype), bias.to(dtype),
                        False, 0.0, low.eps)
    torch.testing.assert_close(low(x.to(dtype), gate), want, rtol=0, atol=0)


@SETTINGS
@given(st.sampled_from(LOW), st.integers(0, 2**16), st.integers(1, 6), st.integers(1, 3), st.booleans())
def test_folds_round_once_from_float64(dtype, seed, channels, groups, with_bias):
    """Every fold equals its float64 computation rounded once to the parameter's dtype."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)
    out_c, in_c = channels * groups, channels * groups
    w, b = rnd(out_c, in_c // groups, 3, 3), rnd(out_c) if with_bias else None
    s, t = rnd(out_c), rnd(out_c)
    d = lambda v: None if v is None else v.double()
    got_w, got_b = fold.fold_output_affine(w, b, s, t)
    want_w, want_b = fold.fold_output_affine(d(w), d(b), d(s), d(t))
    assert got_w.dtype == dtype and got_b.dtype == dtype
    assert torch.equal(got_w, want_w.to(dtype)) and torch.equal(got_b, want_b.to(dtype))
    s_in = rnd(in_c)
    assert torch.equal(fold.fold_input_scale(w, s_in, groups), fold.fold_input_scale(d(w), d(s_in), groups).to(dtype))
    dense, t_in = rnd(out_c, in_c, 3, 3), rnd(in_c)
    shifted = fold.fold_input_shift(dense, b, t_in)  # a sum over C x 3 x 3 products: float64 keeps it
    assert shifted.dtype == dtype
    assert torch.equal(shifted, fold.fold_input_shift(d(dense), d(b), d(t_in)).to(dtype))
    var = rnd(out_c).abs() + 0.5
    through = fold.fold_shift_through_batchnorm(rnd(out_c), rnd(out_c), var, 1e-5, t)
    assert through.dtype == dtype
    tw, tb = fold.fold_conv_transpose_output_affine(rnd(in_c, out_c // groups, 2, 2), b, groups, s, t)
    assert tw.dtype == dtype and tb.dtype == dtype
    wt = rnd(in_c, out_c // groups, 2, 2)
    assert torch.equal(fold.fold_conv_transpose_input_scale(wt, s_in),
                       fold.fold_conv_transpose_input_scale(d(wt), d(s_in)).to(dtype))
    mean, gamma, beta = rnd(out_c), rnd(out_c), rnd(out_c)
    got = fold.fold_scale_into_batchnorm_input(mean, gamma, beta, var, 1e-5, s)
    want = fold.fold_scale_into_batchnorm_input(d(mean), d(gamma), d(beta), d(var), 1e-5, d(s))
    assert all(g.dtype == dtype and torch.equal(g, w.to(dtype)) for g, w in zip(got, want))
    assert torch.equal(fold.scale_along(w, s, 0), fold.scale_along(d(w), d(s), 0).to(dtype))
    assert torch.equal(fold.shift_along(w, s, 0), fold.shift_along(d(w), d(s), 0).to(dtype))


@SETTINGS
@given(st.sampled_from(["se", "eca", "srm", "gc"]), st.sampled_from(LOW), st.integers(0, 2**16), st.integers(1, 4))
def test_a_low_precision_model_fuses_to_its_asr_form(kind, dtype, seed, batch):
    """A bfloat16 / float16 ASR form (model.to(dtype)) fuses with parameters in its dtype; a gate inside a
    BatchNorm deploys bit for bit (both round gamma * v once), other gates to the dtype's precision."""
    gm = randomize(_asr(kind, seed), seed).eval()
    low = copy.deepcopy(gm).to(dtype)
    fused = asrfx.fuse(low)
    assert {p.dtype for p in fused.parameters()} == {dtype}
    x = torch.randn(batch, 3, 16, 16).to(dtype)
    with torch.no_grad():
        got, want, exact = fused(x), low(x), gm(x.float())
    if all(f.op == "gated_bn" for f in asrfx.report_of(fused).folds):
        assert torch.equal(got, want)
    scale = exact.abs().max().item()
    eps = torch.finfo(dtype).eps
    # the fused model is as close to the float32 model as the ASR form itself is
    assert (got.float() - exact).abs().max().item() <= 2 * (want.float() - exact).abs().max().item() + 8 * eps * scale
