"""Gates applied inside layers while training (convert's fast path), and folded back by fuse.

Producer side: ``BN(y) * v`` -> ``GatedBatchNorm(y, v)`` (also tests/passes/test_convert.py), ``conv(y) * v``
-> ``GatedConv2d(y, v)`` scaling its output rows and bias. Consumer side, where x comes out of an
activation that does not commute with a scale (SiLU, Hardswish): ``conv(x * v)`` ->
``GatedConv2d(x, v)``, which multiplies its weight's input channels by v instead of the feature map. Properties, in float64: the fast ASR form equals the plain one
(gates as feature-map multiplies) in outputs, gradients and BatchNorm statistics, in train and
eval mode; no feature-map multiply by a gate is left where a fast path applied; fuse gives the
plain layers back (same classes, same parameter names) with the ASR form's outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import asrfx
from asrfx.graph.dataflow import input_dependence
from asrfx.graph.ops import op_of
from asrfx.nn.gated_layers import GatedConv1d, GatedConv2d, GatedConv3d, GatedLinear, WeightGated
from asrfx.nn.gated_norm import GatedBatchNorm
from asrfx.passes.contract import Role, role_of, psi_dependent

from helpers import randomize, through_backend
from strategies import Around, structures

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def feature_map_gates(gm: fx.GraphModule) -> list[str]:
    """Multiplies of a data tensor by a psi-derived value: the passes over the feature map a gate costs."""
    reads = input_dependence(gm)
    psi = psi_dependent(gm)
    return [n.name for n in gm.graph.nodes if op_of(n, {}).name == "mul" and len(n.args) == 2
            and any(isinstance(a, fx.Node) and reads[a] for a in n.args)
            and any(isinstance(a, fx.Node) and a in psi and not reads[a] for a in n.args)]


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * max(want.abs().max().item(), 1.0))


# -- the layers ------------------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 2**16), st.sampled_from([1, 2, 3]), st.integers(1, 3), st.integers(1, 3),
       st.integers(1, 3), st.sampled_from(["zeros", "reflect", "circular"]), st.booleans(),
       st.sampled_from(["input", "output"]))
def test_gated_conv_equals_conv_with_the_gate(seed, dims, groups, per_in, per_out, padding_mode, bias, side):
    """GatedConvNd(x, v) == ConvNd(x * v) (input side) or ConvNd(x) * v (output side), for any
    groups, padding mode, bias; gradients of x, W, v agree; folded(v) is a plain ConvNd (same
    parameter names) computing the same."""
    gen = torch.Generator().manual_seed(seed)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    c_in, c_out = groups * per_in, groups * per_out
    conv = cls(c_in, c_out, 3, padding=1, groups=groups, bias=bias, padding_mode=padding_mode).double()
    randomize(conv, seed)
    gated = {1: GatedConv1d, 2: GatedConv2d, 3: GatedConv3d}[dims].take_over(conv, side)
    assert isinstance(gated, cls) and gated.weight is conv.weight and gated.bias is conv.bias
    assert list(gated.state_dict()) == list(conv.state_dict())
    x = torch.randn((2, c_in) + (4,) * dims, generator=gen, dtype=torch.float64, requires_grad=True)
    c = c_in if side == "input" else c_out
    v = torch.randn(c, generator=gen, dtype=torch.float64, requires_grad=True)
    view = (1, c) + (1,) * dims
    got = gated(x, v)
    want = conv(x * v.view(view)) if side == "input" else conv(x) * v.view(view)
    close(got, want)
    grads = torch.autograd.grad(got.square().sum(), (x, v, conv.weight))
    wants = torch.autograd.grad(want.square().sum(), (x, v, conv.weight))
    for g, w in zip(grads, wants):
        close(g, w)
    plain = gated.folded(v.detach())
    assert type(plain) is cls and list(plain.state_dict()) == list(conv.state_dict())
    assert "gate_side" not in plain.__dict__
    close(plain(x), want)


@SETTINGS
@given(st.integers(0, 2**16), st.integers(1, 5), st.integers(1, 4), st.booleans(), st.sampled_from(["input", "output"]))
def test_gated_linear_equals_linear_with_the_gate(seed, c_in, c_out, bias, side):
    gen = torch.Generator().manual_seed(seed)
    linear = randomize(nn.Linear(c_in, c_out, bias=bias).double(), seed)
    gated = GatedLinear.take_over(linear, side)
    x = torch.randn(2, 3, c_in, generator=gen, dtype=torch.float64)
    v = torch.randn(c_in if side == "input" else c_out, generator=gen, dtype=torch.float64)
    want = linear(x * v) if side == "input" else linear(x) * v
    close(gated(x, v), want)
    plain = gated.folded(v)
    assert type(plain) is nn.Linear
    close(plain(x), want)


def test_a_gated_layer_names_its_side():
    with pytest.raises(ValueError, match="side"):
        GatedConv2d.take_over(nn.Conv2d(2, 2, 1), "both")
    assert "gate on the input channels" in repr(GatedConv2d.take_over(nn.Conv2d(2, 2, 1), "input"))


@pytest.mark.parametrize("side", ["input", "output"])
def test_a_gated_layer_trains_in_its_own_dtype(side):
    """Every training step multiplies the weight by the gate: in the weight's dtype, no float64
    copies forward or backward (the deployed layer's fold, once, is computed in float64)."""
    layer = GatedConv2d.take_over(nn.Conv2d(3, 4, 1), side)
    gate = torch.rand(3 if side == "input" else 4, requires_grad=True)
    out = layer(torch.randn(2, 3, 5, 5), gate)
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
    assert not any("ToCopy" in type(fn).__name__ for fn in seen), sorted({type(fn).__name__ for fn in seen})
    out.sum().backward()
    assert gate.grad is not None and gate.grad.dtype == torch.float32


# -- convert's fast path ------------------------------------------------------------


def _both(model, x, gen_seed=0):
    """The fast ASR form (default) and the plain one (gates as multiplies), same psi."""
    def init(seed):
        gen = torch.Generator().manual_seed(seed)
        return lambda site, shape: torch.randn(shape, generator=gen, dtype=torch.float64)
    fast = asrfx.convert(model, x, psi_init=init(gen_seed))
    slow = asrfx.convert(model, x, psi_init=init(gen_seed), gate_in_norm=False, gate_in_consumers=False)
    return fast, slow


def _assert_same_function(fast, slow, x, training):
    fast.train(training)
    slow.train(training)
    torch.manual_seed(0)
    got = fast(x)
    torch.manual_seed(0)
    want = slow(x)
    close(got, want)
    grads = torch.autograd.grad(got.square().sum(), list(fast.parameters()), allow_unused=True)
    wants = torch.autograd.grad(want.square().sum(), list(slow.parameters()), allow_unused=True)
    names = [n for n, _ in fast.named_parameters()]
    assert names == [n for n, _ in slow.named_parameters()]
    for name, g, w in zip(names, grads, wants):
        if g is None or w is None:
            assert g is None and w is None, name
            continue
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * max(w.abs().max().item(), 1.0), msg=name)
    for (name, a), b in zip(fast.named_buffers(), slow.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures(), st.integers(0, 2**16), st.integers(2, 3), st.integers(2, 6), st.booleans())
@example(dict(before="sum", branches=("conv", "conv"), act="silu", after="split", gate="sigmoid",
              c=4, pieces=3), 0, 2, 4, True)  # consumers: one conv per piece of a split
@example(dict(before="cat", branches=("conv_bn", "identity"), act="silu", after="grouped", gate="tanh",
              c=3, pieces=2), 1, 2, 3, True)  # a grouped conv takes a gate of any sign
@example(dict(before="sum", branches=("conv_bn", "bn"), act="silu", after="pool_linear", gate="sigmoid",
              c=3, pieces=2), 2, 3, 5, True)  # through global pooling into the classifier
def test_fast_path_is_the_same_function(structure, seed, batch, size, training):
    """Random structures around a gate (tests/algebra/test_fold_properties.py): the ASR form with gates
    applied inside layers equals the one with feature-map multiplies, in outputs, gradients and
    running statistics, train and eval mode; where a fast path applied, no feature-map multiply by
    a gate is left; fuse gives both the same plain model."""
    model = randomize(Around(**structure), seed).double()
    x = torch.randn(batch, structure["c"], size, size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    fast, slow = _both(model, x, seed)
    (site,) = asrfx.report_of(fast).sites
    applied = site.gated_norm or site.gated_consumers or site.gated_producers
    if structure["gate"] != "add":
        assert len(feature_map_gates(slow)) == 1
        assert len(feature_map_gates(fast)) == (0 if applied else 1), (site, fast.code)
    producer_fails = structure["act"] == "silu" or (structure["act"] == "relu" and structure["gate"] == "tanh") \
        or "identity" in structure["branches"]  # SiLU, a gate of unknown sign through ReLU, the graph input
    if structure["gate"] != "add":
        # every producer here is a BatchNorm or a conv, every consumer a conv or a Linear, except a
        # BatchNorm after the gate, which normalizes the gate away in training mode
        assert bool(applied) == (not producer_fails or structure["after"] != "bn_conv"), site
        assert (site.gated_consumers is not None) == (producer_fails and bool(applied)), site
    _assert_same_function(fast, slow, x, training)
    fast.eval()
    slow.eval()
    fused_fast, fused_slow = asrfx.fuse(fast), asrfx.fuse(slow)
    assert not any(isinstance(m, (WeightGated, GatedBatchNorm)) for m in fused_fast.modules())
    assert list(fused_fast.state_dict()) == list(fused_slow.state_dict())
    assert [type(m) for m in fused_fast.modules()][1:] == [type(m) for m in fused_slow.modules()][1:]
    with torch.no_grad():
        close(fused_fast(x), slow(x))
        close(fused_slow(x), slow(x))


class SiLUBlock(nn.Module):
    """MobileNetV3 / EfficientNet style: depthwise conv-BN-act, SE, project conv; and a Linear head."""

    def __init__(self, act=nn.Hardswish):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), act())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), act())
        self.se = asrfx.attention.SE(8, reduction=2)
        self.project = nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.project(self.se(self.dw(self.expand(x)))).mean((2, 3)))


def test_gate_after_hardswish_goes_into_the_project_conv_and_back():
    model = randomize(SiLUBlock(), 0).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fast, slow = _both(model, x)
    (site,) = asrfx.report_of(fast).sites
    assert site.gated_norm is None and site.gated_consumers == "project.0"
    assert type(fast.get_submodule("project.0")) is GatedConv2d and fast.get_submodule("project.0").weight is not None
    assert "gate applied to the input weights of project.0" in str(asrfx.report_of(fast))
    assert feature_map_gates(fast) == []
    assert list(fast.state_dict()) == list(slow.state_dict())  # same names: checkpoints load both ways
    for training in (True, False):
        _assert_same_function(fast, slow, x, training)
    fused = asrfx.fuse(fast.eval())
    (fold,) = asrfx.report_of(fused).folds
    assert fold.where == "consumers" and fold.into == ("project.0",) and fold.site == "se"
    backbone = asrfx.backbone(model, x)
    assert sorted(fused.state_dict()) == sorted(backbone.state_dict())
    assert type(fused.get_submodule("project.0")) is nn.Conv2d
    with torch.no_grad():
        close(fused(x), slow.eval()(x))


def test_inplace_training_keeps_sharing_the_model_parameters():
    """inplace=True: the gated conv trains the model's own weight tensor."""
    model = SiLUBlock()
    gm = asrfx.convert(model, torch.randn(2, 3, 6, 6), inplace=True)
    assert gm.get_submodule("project.0").weight is model.project[0].weight


class FunctionalConsumer(nn.Module):
    """The consumer is a functional conv reading its own parameter (get_attr in the graph)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.se = asrfx.attention.SE(6, reduction=2)
        self.weight = nn.Parameter(torch.randn(4, 6, 3, 3))

    def forward(self, x):
        y = self.se(F.silu(self.conv(x)))
        return F.conv2d(y, self.weight, None, 1, 1)


def test_functional_consumer_gets_the_gate_in_its_weight_and_fuse_folds_it_there():
    model = randomize(FunctionalConsumer(), 3).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    fast, slow = _both(model, x)
    (site,) = asrfx.report_of(fast).sites
    assert site.gated_consumers == "conv2d"
    assert feature_map_gates(fast) == []
    assert sum(1 for n in fast.graph.nodes if role_of(n) == Role.GATE_VECTOR) >= 1
    _assert_same_function(fast, slow, x, True)
    fused = asrfx.fuse(fast.eval())
    (fold,) = asrfx.report_of(fused).folds
    assert fold.where == "consumers" and fold.into == ("conv2d",)
    # folded into the parameter the conv reads: same name, no extra constant
    assert sorted(fused.state_dict()) == ["conv.bias", "conv.weight", "weight"]
    assert [str(n.target) for n in fused.graph.nodes if n.op == "get_attr"] == ["weight"]
    with torch.no_grad():
        close(fused(x), slow.eval()(x))


class Repeated(nn.Module):
    """Two gates on one tensor (the paper's delta = 2), read by one conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.se1, self.se2 = asrfx.attention.SE(6, reduction=2), asrfx.attention.SE(6, reduction=3)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(self.se2(self.se1(F.silu(self.conv(x)))))


def test_repeated_gates_both_go_into_the_consumer():
    model = randomize(Repeated(), 4).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    fast, slow = _both(model, x)
    sites = asrfx.report_of(fast).sites
    assert [s.gated_consumers for s in sites] == ["out", "out"]
    assert feature_map_gates(fast) == []
    _assert_same_function(fast, slow, x, True)
    fused = asrfx.fuse(fast.eval())
    assert {f.site for f in asrfx.report_of(fused).folds} == {"se1", "se2"}
    assert not asrfx.report_of(fused).kept and type(fused.out) is nn.Conv2d
    with torch.no_grad():
        close(fused(x), slow.eval()(x))


class BatchNormConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.se = asrfx.attention.SE(6, reduction=2)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.se(F.silu(self.conv(x))))


class SharedConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.se = asrfx.attention.SE(6, reduction=2)
        self.out = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        return self.out(self.out(self.se(F.silu(self.conv(x)))))


@pytest.mark.parametrize("model", [BatchNormConsumer(), SharedConsumer()], ids=["batchnorm", "shared_weights"])
def test_gate_stays_a_multiply_where_a_consumer_cannot_apply_it_while_training(model):
    """A training-mode BatchNorm reading x * v normalizes v away (only in eval mode is it a fold);
    a conv called twice would gate its second input too: the multiply stays."""
    x = torch.randn(2, 3, 5, 5)
    gm = asrfx.convert(model, x)
    (site,) = asrfx.report_of(gm).sites
    assert site.gated_consumers is None and site.gated_norm is None and site.gated_producers is None
    assert len(feature_map_gates(gm)) == 1
    assert not any(isinstance(m, WeightGated) for m in gm.modules())


def test_compiled_training_step_matches_eager():
    """torch.compile(fullgraph=True) trains the consumer-gated ASR form as eager does."""
    torch.manual_seed(0)
    gm = asrfx.convert(SiLUBlock(nn.SiLU), torch.randn(2, 3, 8, 8)).train()
    assert asrfx.report_of(gm).sites[0].gated_consumers == "project.0"
    eager = copy.deepcopy(gm)
    compiled = torch.compile(gm, fullgraph=True)
    opt_c = torch.optim.SGD(gm.parameters(), lr=0.05)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    for _ in range(2):
        x = torch.randn(4, 3, 8, 8)
        for model, opt in ((compiled, opt_c), (eager, opt_e)):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, p), q in zip(gm.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_backend_and_export_fold_the_consumer_gate():
    """Dynamo and torch.export inline the gated conv (``conv2d(x, weight * gate)``): the frozen-graph
    path folds ``weight * gate`` into one weight, and the graph is the backbone's."""
    import asrfx.dynamo as backend

    model = randomize(SiLUBlock(), 5).eval()
    x = torch.randn(2, 3, 6, 6)
    asr = asrfx.convert(model, x).eval()
    assert asrfx.report_of(asr).sites[0].gated_consumers == "project.0"
    got, graphs = through_backend(asr, x)
    with torch.no_grad():
        want = asr(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (graph,) = graphs
    assert not any("psi" in str(n.target) for n in graph.graph.nodes)
    assert sum(op_of(n, {}).name == "mul" for n in graph.graph.nodes) == 0
    (fold,) = backend.reports[-1].fuse.folds
    assert fold.where == "consumers"
    program = asrfx.fuse(torch.export.export(asr, (x,)))
    torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-6)
    assert not any(n.target is torch.ops.aten.mul.Tensor for n in program.graph.nodes)


class ConvProducer(nn.Module):
    """The gate right after a conv (no BatchNorm): the conv's output rows and bias take it."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.se = asrfx.attention.SE(6, reduction=2)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = F.conv2d(x, self.conv.weight, self.conv.bias, 1, 1) if self.functional else self.conv(x)
        return self.out(self.se(y))


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_producer_conv_applies_the_gate_to_its_output_rows(functional):
    model = randomize(ConvProducer(functional), 6).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    fast, slow = _both(model, x)
    (site,) = asrfx.report_of(fast).sites
    assert site.gated_producers == ("conv2d" if functional else "conv") and site.gated_consumers is None
    if not functional:
        assert type(fast.get_submodule("conv")) is GatedConv2d and fast.get_submodule("conv").gate_side == "output"
    assert feature_map_gates(fast) == []
    for training in (True, False):
        _assert_same_function(fast, slow, x, training)
    fused = asrfx.fuse(fast.eval())
    (fold,) = asrfx.report_of(fused).folds
    assert fold.where == "producer"
    assert sorted(fused.state_dict()) == sorted(k for k in model.state_dict() if not k.startswith("se."))
    assert not any(str(n.target).startswith("asr_constant") for n in fused.graph.nodes)
    with torch.no_grad():
        close(fused(x), slow.eval()(x))
    (site,) = asrfx.find_attention(model.eval(), x)
    assert site.absorption.side == fold.where


class FunctionalNorm(nn.Module):
    """A functional BatchNorm before the gate (timm's BatchNormAct2d traces to one)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.weight, self.bias = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.randn(6))
        self.register_buffer("running_mean", torch.zeros(6))
        self.register_buffer("running_var", torch.ones(6))
        self.se = asrfx.attention.SE(6, reduction=2)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = F.batch_norm(self.conv(x), self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, 0.1, 1e-5)
        return self.out(self.se(y))


def test_functional_batchnorm_applies_the_gate_to_its_affine():
    model = randomize(FunctionalNorm(), 7).double()
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    fast, slow = _both(model, x)
    (site,) = asrfx.report_of(fast).sites
    assert site.gated_norm == "batch_norm" and feature_map_gates(fast) == []
    for training in (True, False):
        _assert_same_function(fast, slow, x, training)
    fused = asrfx.fuse(fast.eval())
    assert [f.where for f in asrfx.report_of(fused).folds] == ["producer"]
    assert sorted(fused.state_dict()) == sorted(k for k in model.state_dict() if not k.startswith("se."))
    with torch.no_grad():
        close(fused(x), slow.eval()(x))


# -- fuse(placement="balanced"): gates shared between producer and consumers, for INT8 ------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures(), st.integers(0, 2**16))
def test_balanced_placement_is_the_same_function(structure, seed):
    """placement="balanced" computes what the default placement does (float64, 1e-10), with the
    same parameter names and layer classes: the backbone, re-parameterized."""
    model = randomize(Around(**structure), seed).double()
    x = torch.randn(2, structure["c"], 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    gm = asrfx.convert(model, x, psi_init=lambda site, shape: torch.randn(shape, generator=gen,
                                                                          dtype=torch.float64)).eval()
    plain, balanced = asrfx.fuse(gm), asrfx.fuse(gm, placement="balanced")
    assert list(balanced.state_dict()) == list(plain.state_dict())
    assert [type(m) for m in balanced.modules()][1:] == [type(m) for m in plain.modules()][1:]
    with torch.no_grad():
        close(balanced(x), plain(x))


def test_balanced_placement_equalizes_producer_and_consumer_ranges():
    """conv -> BN -> ReLU -> SE -> conv: after balancing, channel i of the producer (conv row times
    the BatchNorm's scale) and input column i of the consumer have the same largest |weight|."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          asrfx.attention.SE(8, reduction=2), nn.Conv2d(8, 4, 3, padding=1))
    model = randomize(model, 8).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm = asrfx.convert(model, x, psi_init=lambda site, shape: torch.randn(shape, dtype=torch.float64)).eval()
    fused = asrfx.fuse(gm, placement="balanced")
    (fold,) = asrfx.report_of(fused).folds
    assert fold.into == ("1", "4") and "balanced" in fold.reason
    conv, bn, out = fused.get_submodule("0"), fused.get_submodule("1"), fused.get_submodule("4")
    r_p = conv.weight.abs().flatten(1).amax(1) * bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)
    r_c = out.weight.abs().transpose(0, 1).flatten(1).amax(1)
    torch.testing.assert_close(r_p, r_c)
    with torch.no_grad():
        close(fused(x), asrfx.fuse(gm)(x))


def test_placement_is_checked():
    gm = asrfx.convert(SiLUBlock(), torch.randn(2, 3, 6, 6)).eval()
    with pytest.raises(ValueError, match="placement"):
        asrfx.fuse(gm, placement="consumer")


class TwoSEOnOneNorm(nn.Module):
    """conv -> BN -> ReLU -> SE -> SE (an audio model's block SE followed by a stage SE): both gates
    reach the same BatchNorm while training."""

    def __init__(self, producer="bn"):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=producer != "bn")
        self.bn = nn.BatchNorm2d(6) if producer == "bn" else nn.Identity()
        self.se1, self.se2 = asrfx.attention.SE(6, reduction=2), asrfx.attention.SE(6, reduction=3)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.se2(self.se1(F.relu(self.bn(self.conv(x))))).mean((2, 3)))


@pytest.mark.parametrize("producer", ["bn", "conv"])
@pytest.mark.parametrize("training", [True, False])
def test_two_gates_on_one_producer_multiply_there(producer, training):
    """The second gate finds the producer gated by the first: the gates multiply (the second used to
    replace the first, which was then lost). Outputs, gradients and statistics as with multiplies."""
    model = randomize(TwoSEOnOneNorm(producer), 3).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    fast, slow = _both(model, x, 3)
    sites = asrfx.report_of(fast).sites
    assert len(sites) == 2 and all(s.gated_norm or s.gated_producers for s in sites), sites
    assert len(feature_map_gates(fast)) == 0
    _assert_same_function(fast, slow, x, training)
    fast.eval()
    slow.eval()
    with torch.no_grad():
        close(asrfx.fuse(fast)(x), slow(x))
