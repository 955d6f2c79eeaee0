"""The ASR contract (asrfx/passes/contract.py): the invariant checker of fused graphs fails when an
invariant is broken, and every spelling of the gate multiply is found and folded on every route
(torch.fx, the Dynamo backend, torch.export)."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn

import asrfx
import asrfx.dynamo as backend
from asrfx import AsrfxError
from asrfx.graph.ops import op_of
from asrfx.passes.contract import Role, check_fused, mark

from helpers import randomize, through_backend


class Gated(nn.Module):
    """conv -> BN -> SE whose gate is applied with the given spelling."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc1, self.fc2 = nn.Conv2d(6, 3, 1), nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        if self.spelling == "x*g":
            y = y * g
        elif self.spelling == "g*x":
            y = g * y
        elif self.spelling == "torch.mul":
            y = torch.mul(y, g)
        elif self.spelling == "method":
            y = y.mul(g)
        elif self.spelling == "inplace":
            y = y.mul_(g)
        elif self.spelling == "operator":
            y = operator.mul(y, g)
        elif self.spelling == "expand_as":
            y = y * g.expand_as(y)
        return self.head(y)


SPELLINGS = ["x*g", "g*x", "torch.mul", "method", "inplace", "operator", "expand_as"]


def _asr(spelling: str):
    model = randomize(Gated(spelling), 7).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = asrfx.convert(model, x, psi_init=0.4, gate_in_norm=False, gate_in_consumers=False).eval()
    assert len(asrfx.report_of(gm).sites) == 1
    return gm, x


def _muls(nodes) -> int:
    return sum(op_of(n, {}).name == "mul" for n in nodes)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_gate_spelling_folds_on_the_fx_route(spelling):
    gm, x = _asr(spelling)
    assert _muls(gm.graph.nodes) >= 1
    fused = asrfx.fuse(gm)
    assert _muls(fused.graph.nodes) == 0 and not asrfx.report_of(fused).kept
    with torch.no_grad():
        torch.testing.assert_close(fused(x), gm(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_gate_spelling_folds_in_the_dynamo_backend(spelling):
    gm, x = _asr(spelling)
    got, graphs = through_backend(gm, x)
    with torch.no_grad():
        want = gm(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert graphs and all(_muls(g.graph.nodes) == 0 for g in graphs)
    assert len(backend.reports[-1].fuse.folds) == 1


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_gate_spelling_folds_in_an_exported_program(spelling):
    gm, x = _asr(spelling)
    program = asrfx.fuse(torch.export.export(gm, (x,)))
    assert not any(n.target in (torch.ops.aten.mul.Tensor, torch.ops.aten.mul_.Tensor) for n in program.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), gm(x), rtol=1e-5, atol=1e-6)


# -- the invariant checker sees failing graphs --------------------------------------------------


def _fused():
    gm, x = _asr("x*g")
    return asrfx.fuse(gm), x


def test_a_clean_fused_graph_passes():
    fused, _ = _fused()
    check_fused(fused)


def test_a_psi_parameter_left_fails():
    fused, _ = _fused()
    fused.register_parameter("psi", nn.Parameter(torch.ones(6)))
    with pytest.raises(AsrfxError, match="psi parameters behind"):
        check_fused(fused)


def test_a_node_still_marked_as_a_gate_fails():
    fused, _ = _fused()
    node = next(n for n in fused.graph.nodes if n.op == "call_module")
    mark(node, Role.GATE, "se")
    with pytest.raises(AsrfxError, match="ASR nodes"):
        check_fused(fused)


def test_a_node_reading_a_psi_fails():
    fused, _ = _fused()
    fused.register_buffer("kept_psi", torch.ones(1, 6, 1, 1))
    out = fused.graph.output_node()
    with fused.graph.inserting_before(out):
        psi = fused.graph.get_attr("kept_psi")
        mark(psi, Role.PSI, "se")
        scaled = fused.graph.call_function(operator.mul, (out.args[0], psi))
    out.args = (scaled,)
    with pytest.raises(AsrfxError, match="ASR nodes.*kept_psi"):
        check_fused(fused)


def test_a_computed_constant_gate_fails():
    """A gate computed from parameters (sigmoid of a stored vector) times the data: fuse must never
    leave one; the checker names the multiply."""
    fused, _ = _fused()
    fused.register_parameter("leftover", nn.Parameter(torch.zeros(1, 2, 1, 1)))
    out = fused.graph.output_node()
    with fused.graph.inserting_before(out):
        doubled = fused.graph.call_function(operator.mul, (out.args[0], 2.0))  # not a gate: scanning goes on
        gate = fused.graph.call_function(torch.sigmoid, (fused.graph.get_attr("leftover"),))
        scaled = fused.graph.call_function(operator.mul, (doubled, gate))
    out.args = (scaled,)
    fused.recompile()
    with pytest.raises(AsrfxError, match=f"computed constant gates: \\['{scaled.name}'\\]"):
        check_fused(fused)



@pytest.mark.parametrize("name, psi", [("layer1.0.se.psi", True), ("se.psi_avg", True), ("psi", True),
                                       ("layer1.0.psiblock.weight", False), ("se.fc.weight", False)])
def test_psi_names_are_read_by_their_last_part(name, psi):
    from asrfx.passes.contract import is_psi_name

    assert is_psi_name(name) is psi


def test_psi_constants_are_found_by_their_dotted_or_mangled_names():
    """Graphs of functional calls (Dynamo, an unlifted ExportedProgram) hold psi as get_attr
    constants: dotted names as they are, Dynamo-mangled ones mapped back to the attention module
    through the module path of the call that reads them; a node already marked is not counted."""
    from asrfx.passes.contract import mark_psi_attributes, role_of, site_of

    root = nn.Module()
    for name in ("L__self___layer1_0_se_psi", "L__self___layer2_se_psi_avg", "L__self___head_weight",
                 "known_psi", "stage.se.psi", "L__self___se_psi"):
        root.register_buffer(name.replace(".", "_"), torch.ones(1))
    graph = fx.Graph()
    x = graph.placeholder("x")
    nodes = {}
    for target, owner in (("L__self___layer1_0_se_psi", "layer1.0.se.fc1"), ("L__self___layer2_se_psi_avg", "layer2.se.fc"),
                          ("L__self___head_weight", "head"), ("known_psi", "other.se.fc"), ("stage_se_psi", "stage.se.fc"),
                          ("L__self___se_psi", "se.fc1")):  # the last: a top-level attention module
        node = graph.get_attr(target)
        user = graph.call_function(operator.mul, (x, node))
        user.meta["nn_module_stack"] = {owner: (owner, nn.Linear)}
        nodes[target] = node
        x = user
    graph.output(x)
    gm = fx.GraphModule(root, graph)
    nodes["stage_se_psi"].target = "stage.se.psi"  # a dotted name, as an unlifted program keeps it
    mark(nodes["known_psi"], Role.PSI, "other.se")
    assert mark_psi_attributes(gm) == 4
    assert site_of(nodes["L__self___layer1_0_se_psi"]) == "layer1.0.se"
    assert site_of(nodes["L__self___layer2_se_psi_avg"]) == "layer2.se"
    assert site_of(nodes["stage_se_psi"]) == "stage.se"
    assert site_of(nodes["L__self___se_psi"]) == "se"
    assert role_of(nodes["L__self___head_weight"]) is None and site_of(nodes["known_psi"]) == "other.se"
