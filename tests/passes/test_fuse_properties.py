"""Property tests: fuse(convert(m)) on random architectures equals convert(m), backbone-sized."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import asrfx
from asrfx.graph.edit import set_module

import zoo
from strategies import networks
from helpers import examples


def kind_of(expected, path):
    return next(kind for p, kind, _ in expected if p == path)


@settings(max_examples=examples(30))
@given(networks(with_attention=True), st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 9))
def test_fuse_random_networks(net_expected, seed, batch, size):
    """
    Random depth, widths, kernels, groups, strides, residuals, norms (BN with random running
    statistics, GN, none), activations, attention kinds and decoys, random psi, batch and
    resolution. In float64: outputs equal within 1e-10; no psi or excitation parameter is left;
    the parameter count equals the network with its attention modules replaced by identity;
    every gate is reported, folded (where) or kept (why).
    """
    net, expected = net_expected
    net = net.double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    # positive psi: SRM's psi stands where a variance was (its sqrt follows)
    gm = asrfx.convert(net, x, psi_init=lambda site, shape: torch.rand(shape, generator=gen) + 0.05).eval()
    fused = asrfx.fuse(gm)
    with torch.no_grad():
        want, got = gm(x), fused(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * max(want.abs().max().item(), 1.0))
    backbone = copy.deepcopy(net)
    for path, _, _ in expected:
        plug = backbone.get_submodule(path)
        # IE gates the BatchNorm it wraps (IEBN): that BatchNorm belongs to the backbone
        set_module(backbone, path, plug.bn if hasattr(plug, "bn") and kind_of(expected, path) == "ie"
                   else nn.Identity())
    # a hand-written constant-input gate (a decoy for detection) is a computed constant: fuse folds it
    constant = [p for p, m in net.named_modules() if isinstance(m, zoo.ASRTrainGate)]
    for path in constant:
        set_module(backbone, path, nn.Identity())
    count = lambda m: sum(p.numel() for p in m.parameters())
    report = asrfx.report_of(fused)
    created = sum(1 for f in report.folds if f.op == "add" and f.where == "consumers")
    if not created:
        assert count(fused) == count(backbone), str(report)
    assert {f.site for f in report.folds} == {path for path, _, _ in expected} | set(constant)
    assert all(f.reason for f in report.folds)
    assert not any("psi" in n for n, _ in fused.named_parameters())
