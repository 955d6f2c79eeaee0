"""The TorchDynamo backend "asrfx": torch.compile folds the ASR gates of inference graphs.

What Dynamo captures from an ASR model in eval mode, and what the backend hands to the
inner backend (here a capturing one, so the tests can read the graph)::

    before (Dynamo's graph: parameters are inputs)      after (to the inner backend)
      x, p_conv_w, p_bn_w, ..., p_se_psi, p_fc1_w ...      x
      g = sigmoid(conv(relu(conv(p_se_psi, ...))))        y = batch_norm(conv(x, w), ..., w*g, b*g)
      y = mul(batch_norm(conv(x, p_conv_w), ...), g)      (no psi, no excitation, no mul)

Training graphs (gradients on, or BatchNorm in training mode) go to the inner backend
unchanged.
"""

from __future__ import annotations

import collections
import copy
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import asrfx
import asrfx.dynamo as backend
from asrfx.graph.edit import set_module
from asrfx.graph.ops import op_of

import zoo
from helpers import examples, randomize
from strategies import networks


def assert_equal_outputs(got, want):
    """float32 on the torchvision model: within 1e-5 of the output's scale (float64 random networks: 1e-10)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


class Capture:
    """An inner backend that keeps the graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs: list[fx.GraphModule] = []
        self.inputs: list[list] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        self.inputs.append(list(example_inputs))
        return gm.forward


def compiled(model, inner, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="asrfx", options={"inner": inner, **options})


def captured(model, x) -> fx.GraphModule:
    """The graph Dynamo captures from ``model`` (parameters as inputs), untouched."""
    capture = Capture()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(x)
    return capture.graphs[-1]


def histogram(gm: fx.GraphModule) -> collections.Counter:
    """Canonical ops of the calls in a graph (how parameters reach them does not count)."""
    return collections.Counter(op_of(n, {}).name for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


def psi_nodes(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op in ("placeholder", "get_attr") and "psi" in str(n.target)]


@pytest.fixture(scope="module")
def mobilenet():
    import torchvision

    torch.manual_seed(0)
    model = randomize(torchvision.models.mobilenet_v3_small(weights=None), seed=1).eval()
    x = torch.randn(2, 3, 32, 32)
    asr = asrfx.convert(model, x, psi_init=lambda site, shape: torch.randn(shape)).eval()
    return model, asr, x


def test_inference_graph_reaches_the_inner_backend_as_the_backbone(mobilenet):
    """Every gate folds: the graph the inner backend gets has the backbone's ops, one data
    input, no psi; outputs equal the ASR model's."""
    model, asr, x = mobilenet
    capture = Capture()
    fast = compiled(asr, capture)
    with torch.no_grad():
        got, want = fast(x), asr(x)
    assert_equal_outputs(got, want)
    (graph,) = capture.graphs
    assert [type(v) for v in capture.inputs[0]] == [torch.Tensor]
    assert psi_nodes(graph) == []
    assert histogram(graph) == histogram(captured(asrfx.backbone(model, x).eval(), x))
    report = backend.reports[-1]
    assert report.folded and report.fuse is not None and not report.fuse.kept
    assert {f.site for f in report.fuse.folds} == {s.module_path for s in asrfx.report_of(asr).sites}


def test_parameters_dynamo_installs_as_attributes_fold_too(mobilenet):
    """With inductor's freezing on, Dynamo puts parameters on the graph as get_attr constants
    (named L__self___features_1_block_1_psi): psi is found by that name and everything folds."""
    model, asr, x = mobilenet
    capture = Capture()
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        got = compiled(asr, capture)(x)
        backbone_graph = captured(asrfx.backbone(model, x).eval(), x)
    assert_equal_outputs(got, asr(x))
    (graph,) = capture.graphs
    assert len(capture.inputs[0]) == 1 and psi_nodes(graph) == []
    assert histogram(graph) == histogram(backbone_graph)
    report = backend.reports[-1]
    assert report.frozen == 0 and not report.fuse.kept
    assert {f.site for f in report.fuse.folds} == {s.module_path for s in asrfx.report_of(asr).sites}


def test_batch_size_change_recompiles_with_a_symbolic_batch_and_still_folds(mobilenet):
    _, asr, x = mobilenet
    capture = Capture()
    fast = compiled(asr, capture)
    with torch.no_grad():
        for batch in (2, 3, 5):
            xb = torch.randn(batch, *x.shape[1:], dtype=x.dtype)
            assert_equal_outputs(fast(xb), asr(xb))
    assert len(capture.graphs) == 2  # batch 2, then one graph for any batch
    assert any(isinstance(v, torch.SymInt) for v in capture.inputs[-1])
    assert all(psi_nodes(g) == [] for g in capture.graphs)


def test_parameters_as_module_attributes_fold_too(mobilenet):
    """The other form a backend can get: an fx graph calling modules and reading attributes
    (convert's own GraphModule). The caller's modules keep their parameters."""
    _, asr, x = mobilenet
    before = {k: v.clone() for k, v in asr.state_dict().items()}
    capture = Capture()
    with torch.no_grad():
        fn = backend.asrfx_backend(asr, [x], options={"inner": capture})
        assert_equal_outputs(fn(x), asr(x))
    assert psi_nodes(capture.graphs[0]) == []
    assert not any(isinstance(m, asrfx.GatedBatchNorm) for m in capture.graphs[0].modules())
    after = asr.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_callers_parameters_are_never_changed(mobilenet):
    _, asr, x = mobilenet
    params = {k: (v, v.clone()) for k, v in list(asr.named_parameters()) + list(asr.named_buffers())}
    with torch.no_grad():
        compiled(asr, Capture())(x)
    now = dict(list(asr.named_parameters()) + list(asr.named_buffers()))
    for name, (tensor, value) in params.items():
        assert now[name] is tensor and torch.equal(tensor, value), name


def test_training_graph_passes_through_unchanged_and_trains_psi(mobilenet):
    """Train mode with gradients: the inner backend gets exactly Dynamo's graph, and psi
    receives the same gradient as in eager mode."""
    _, asr, x = mobilenet
    train = copy.deepcopy(asr).train()
    for m in train.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # the same function in both runs, whatever the random stream
    eager = copy.deepcopy(train)
    capture = Capture()
    fast = compiled(train, capture)
    fast(x).square().sum().backward()
    eager(x).square().sum().backward()
    (graph,) = capture.graphs
    assert psi_nodes(graph)  # psi is still an input of the graph
    assert histogram(graph)["hardsigmoid"] > 0
    report = backend.reports[-1]
    assert not report.folded and "training mode" in report.reason
    for (name, p), q in zip(train.named_parameters(), eager.parameters()):
        if "psi" in name:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * q.grad.abs().max().item())


def test_eval_mode_with_gradients_enabled_warns_and_passes_through(mobilenet):
    _, asr, x = mobilenet
    capture = Capture()
    fast = compiled(asr, capture)
    with pytest.warns(asrfx.AsrfxWarning, match="gradients are enabled"):
        fast(x)
    assert psi_nodes(capture.graphs[0])
    assert "gradients are enabled" in backend.reports[-1].reason


def test_train_mode_under_no_grad_passes_through_naming_the_batch_norm(mobilenet):
    _, asr, x = mobilenet
    train = copy.deepcopy(asr).train()
    capture = Capture()
    with torch.no_grad():
        compiled(train, capture)(x)
    report = backend.reports[-1]
    assert not report.folded
    assert "batch_norm" in report.reason and "call .eval()" in report.reason
    assert psi_nodes(capture.graphs[0])


def test_attention_that_reads_the_input_is_left_alone():
    """Plain SE (not converted): its gate depends on x, nothing folds, the graph is Dynamo's."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), zoo.SELayer(8)).eval()
    x = torch.randn(2, 3, 8, 8)
    capture = Capture()
    with torch.no_grad():
        out = compiled(model, capture)(x)
    torch.testing.assert_close(out, model(x))
    assert histogram(capture.graphs[0])["sigmoid"] == 1
    assert not backend.reports[-1].folded and "no constant gate" in backend.reports[-1].reason


def test_unknown_options_are_refused_with_the_valid_ones(mobilenet):
    _, asr, x = mobilenet
    with pytest.raises(Exception, match="no option.*freeze.*inner_options"), torch.no_grad():
        compiled(asr, "eager", freeze=True)(x)
    with pytest.raises(Exception, match="cannot be 'asrfx' itself"), torch.no_grad():
        compiled(asr, "asrfx")(x)


def test_the_backend_is_registered_by_name_and_entry_point():
    from torch._dynamo import list_backends, lookup_backend

    assert "asrfx" in list_backends()
    assert lookup_backend("asrfx") is backend.asrfx_backend
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '[project.entry-points.torch_dynamo_backends]\nasrfx = "asrfx.deploy.dynamo:asrfx_backend"' in pyproject


@pytest.mark.parametrize("inner_options", [{}, {"freezing": True}], ids=["inductor", "inductor-freezing"])
def test_inductor_compiles_the_fused_graph(inner_options):
    """The default inner backend, with and without freezing, on a small SE network."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), zoo.SELayer(16),
                          nn.Conv2d(16, 8, 3), nn.Hardswish(), zoo.SELayer(8), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(2, 3, 16, 16)
    asr = asrfx.convert(randomize(model, seed=3), x, psi_init=lambda s, shape: torch.rand(shape)).eval()
    torch._dynamo.reset()
    fast = torch.compile(asr, backend="asrfx", options={"inner_options": inner_options})
    with torch.no_grad():
        torch.testing.assert_close(fast(x), asr(x), rtol=1e-4, atol=1e-5)
    report = backend.reports[-1]
    assert report.folded and report.inner == "inductor" and len(report.fuse.folds) == 2


@settings(max_examples=examples(12))
@given(networks(with_attention=True), st.integers(0, 2**16), st.integers(1, 3), st.integers(2, 9))
def test_random_networks_compile_to_their_backbone(net_expected, seed, batch, size):
    """
    Random architectures (attention kinds, decoys, norms with random statistics), random psi,
    batch and resolution, float64: the compiled ASR model equals eager within 1e-10, and the
    graph the inner backend gets has no psi and the op histogram of the backbone's graph.
    """
    net, expected = net_expected
    net = net.double().eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", asrfx.AsrfxWarning)
        asr = asrfx.convert(net, x, psi_init=lambda site, shape: torch.rand(shape, generator=gen) + 0.05).eval()
    capture = Capture()
    with torch.no_grad():
        got, want = compiled(asr, capture)(x), asr(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * max(want.abs().max().item(), 1.0))
    graph = capture.graphs[0]
    assert psi_nodes(graph) == []
    backbone = copy.deepcopy(net)
    for path, kind, _ in expected:
        plug = backbone.get_submodule(path)
        set_module(backbone, path, plug.bn if kind == "ie" else nn.Identity())  # IEBN keeps its BatchNorm
    for path, module in net.named_modules():
        if isinstance(module, zoo.ASRTrainGate):  # a hand-written constant gate folds as well
            set_module(backbone, path, nn.Identity())
    report = backend.reports[-1]
    want = histogram(captured(backbone, x))
    for fold in (report.fuse.kept if report.fuse else []):  # a gate no layer can absorb stays as one constant multiply (or add)
        want[fold.op] += 1
    assert histogram(graph) == want, str(report)
