"""No silent damage: psi_init that is not finite or does not fit psi's shape is refused naming the site
and the shape; fuse refuses a gate it would fold that is NaN or infinite; verify checks finiteness."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import asrfx

import zoo
from helpers import examples, randomize

SETTINGS = settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Host(nn.Module):
    """conv-BN-attention (the gate goes inside the BatchNorm), then conv-SiLU-SE (a multiply that folds
    into the consumer conv), then a head."""

    def __init__(self, first: nn.Module, channels: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.plug = first
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()
        self.se = zoo.SELayer(channels)
        self.head = nn.Conv2d(channels, 4, 1)

    def forward(self, x):
        x = self.plug(self.bn1(self.conv1(x)))
        return self.head(self.se(self.act(self.conv2(x))))


def _host(kind: str = "se") -> nn.Module:
    plug = {"se": zoo.SELayer(8), "spa": zoo.SPALayer(8, reduction=4), "srm": zoo.SRMLayer(8)}[kind]
    return randomize(Host(plug), 0).eval()


X = torch.randn(2, 3, 8, 8)
BAD = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", BAD, ids=["nan", "inf", "-inf"])
def test_a_non_finite_psi_init_is_refused_naming_the_site_and_shape(value):
    model = _host()
    with pytest.raises(asrfx.AsrfxError, match=r"psi for '.*' of 'plug' \(se\), shape \(1, 8, 1, 1\).*not finite"):
        asrfx.convert(model, X, psi_init=value)
    tensor = torch.full((1, 8, 1, 1), 0.1)
    tensor[0, 3] = value
    with pytest.raises(asrfx.AsrfxError, match=r"shape \(1, 8, 1, 1\): the psi_init tensor is not finite \(1 NaN"):
        asrfx.convert(model, X, psi_init=tensor)
    with pytest.raises(asrfx.AsrfxError, match=r"psi_init\(site, shape\) is not finite"):
        asrfx.convert(model, X, psi_init=lambda site, shape: torch.full(shape, value))


@SETTINGS
@given(st.lists(st.integers(1, 9), min_size=1, max_size=4), st.sampled_from(["tensor", "function"]),
       st.sampled_from(["se", "spa"]))
def test_a_psi_of_the_wrong_shape_is_refused_naming_the_site_and_shape(shape, how, kind):
    """Any shape that neither broadcasts to psi's nor holds its values (with other size-1 axes) is
    refused with the site and the expected shape; the ones that fit are accepted."""
    model = _host(kind)
    sites = asrfx.find_attention(model, X)
    expected = [(1, 8, 1, 1)] if kind == "se" else [(1, 8, 1, 1), (1, 8, 2, 2), (1, 8, 4, 4)]
    value = torch.rand(shape)
    init = value if how == "tensor" else (lambda site, psi_shape: value)

    def fits(target):
        squeezed = lambda s: [d for d in s if d != 1]
        if math.prod(shape) == math.prod(target) and squeezed(shape) == squeezed(target):
            return True
        try:
            torch.broadcast_shapes(tuple(shape), target)
            return torch.broadcast_shapes(tuple(shape), target) == target
        except RuntimeError:
            return False

    if all(fits(t) for t in expected):  # the SE after SiLU has psi (1, 8, 1, 1) too
        gm = asrfx.convert(model, X, psi_init=init)
        assert len(asrfx.report_of(gm).sites) == len(sites)
        return
    with pytest.raises(asrfx.AsrfxError) as err:
        asrfx.convert(model, X, psi_init=init)
    message = str(err.value)
    assert f"has shape {tuple(shape)}" in message
    assert re.search(r"of '(plug|se)' \((se|spa)\), shape \(1, 8, \d, \d\)", message), message
    assert "give a tensor of shape (1, 8," in message


def test_psi_init_function_returning_something_else_is_refused():
    with pytest.raises(asrfx.AsrfxError, match=r"of 'plug' \(se\), shape \(1, 8, 1, 1\): psi_init\(site, shape\) "
                                               r"gave str, not a tensor"):
        asrfx.convert(_host(), X, psi_init=lambda site, shape: "zeros")


def test_a_flat_vector_fits_a_channel_psi():
    """(C,) for (1, C, 1, 1): the same values, other size-1 axes; accepted as before."""
    init = torch.linspace(-1, 1, 8)
    gm = asrfx.convert(_host(), X, psi_init=lambda site, shape: init)
    assert torch.equal(gm.plug.psi.detach().reshape(-1), init)


@SETTINGS
@given(st.sampled_from(BAD), st.sampled_from(["plug.psi", "se.psi", "plug.fc.0.weight", "se.fc.2.weight"]),
       st.integers(0, 7), st.sampled_from(["se", "srm"]))
def test_fuse_refuses_a_gate_that_is_not_finite(value, where, index, kind):
    """A diverged run (psi or an excitation weight NaN/inf) makes a gate non-finite: fuse refuses, naming
    the site, and leaves the model alone; the site gated in a BatchNorm and the multiply alike."""
    model = _host(kind)
    if kind == "srm" and where.startswith("plug.fc"):
        where = "plug.cfc"
    gm = asrfx.convert(model, X, psi_init=lambda site, shape: torch.rand(shape) + 0.5).eval()
    param = gm.get_parameter(where if where != "plug.psi" or kind == "se" else "plug.psi_avg")
    with torch.no_grad():
        param.view(-1)[index % param.numel()] = value
    snapshot = copy.deepcopy(gm.state_dict())
    site = where.split(".")[0]
    if torch.isfinite(gm(X)).all():  # a bad weight that no gate value reads (inf * 0): nothing to refuse
        asrfx.fuse(gm)
        return
    with pytest.raises(asrfx.AsrfxError, match=rf"the gate of '{site}' has \d+ NaN or infinite value"):
        asrfx.fuse(gm)
    for k, v in gm.state_dict().items():  # fuse worked on a copy
        torch.testing.assert_close(v, snapshot[k], rtol=0, atol=0, equal_nan=True)


def test_verify_checks_finiteness_of_weights_and_outputs():
    gm = asrfx.convert(_host(), X, psi_init=0.5).eval()
    fused = asrfx.fuse(gm)
    asrfx.verify(fused, gm, X)  # finite: passes
    with torch.no_grad():
        fused.bn1.running_var[2] = math.inf
    with pytest.raises(asrfx.AsrfxError, match=r"the fused model's 'bn1.running_var' holds 1 NaN or infinite"):
        asrfx.verify(fused, gm, X)
    fused = asrfx.fuse(gm)
    with pytest.raises(asrfx.AsrfxError, match=r"the fused model's output holds \d+ NaN"):
        asrfx.verify(fused, gm, torch.full_like(X, math.nan))
