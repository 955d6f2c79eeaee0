"""The fused model deploys like the backbone: torch.compile, torch.export, ONNX + onnxruntime.

The strongest check is an op histogram: the exported fused model has exactly the ops of the
exported backbone (the model with its attention modules replaced by identity).
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch

import asrfx


@pytest.fixture(scope="module")
def models():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    gm = asrfx.convert(model, x, psi_init=lambda site, shape: torch.randn(shape)).eval()
    fused = asrfx.fuse(gm)
    return gm, fused, asrfx.backbone(model, x).eval(), x


def _histogram(exported) -> collections.Counter:
    """aten ops by name; in-place and out-of-place spellings count as one (add_ == add)."""
    names = (str(n.target) for n in exported.graph.nodes if n.op == "call_function")
    return collections.Counter(name.replace("_.", ".") for name in names)


def test_torch_export_has_exactly_the_backbones_ops(models):
    gm, fused, backbone, x = models
    exported = torch.export.export(fused, (x,))
    assert _histogram(exported) == _histogram(torch.export.export(backbone, (x,)))
    assert not any("sigmoid" in op for op in _histogram(exported))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), gm(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_of_the_fused_model(models):
    gm, fused, _, x = models
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), gm(x), rtol=1e-4, atol=1e-4)


def test_onnx_runs_in_onnxruntime_without_attention_ops(models, tmp_path):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    gm, fused, backbone, x = models
    ops = {}
    for name, model in (("fused", fused), ("backbone", backbone)):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(model, (x,), dynamo=True).save(str(path))
        ops[name] = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        if name == "fused":
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            with torch.no_grad():
                torch.testing.assert_close(torch.from_numpy(out), gm(x), rtol=1e-5, atol=1e-5)
    assert ops["fused"] == ops["backbone"]
    assert not {"Sigmoid", "HardSigmoid", "Mul"} & set(ops["fused"])


def test_fuse_takes_an_exported_program_and_returns_the_backbones(models):
    """
    torch.export of the ASR model, then fuse:

        before: conv2d(psi, ..) -> relu -> conv2d -> hardsigmoid -> mul(x, gate)   (aten ops, lifted params)
        after:  the exported backbone's ops, exactly; no psi among the program's state

    The given program is not changed.
    """
    gm, _, backbone, x = models
    program = torch.export.export(gm, (x,))
    before = _histogram(program)
    state = {k: v.clone() for k, v in program.state_dict.items()}
    fused = asrfx.fuse(program)
    assert isinstance(fused, torch.export.ExportedProgram)
    assert _histogram(fused) == _histogram(torch.export.export(backbone, (x,)))
    assert not any("psi" in name for name in fused.state_dict)
    params = lambda p: sum(v.numel() for k, v in p.named_parameters())
    assert params(fused.module()) == sum(v.numel() for v in backbone.parameters())
    with torch.no_grad():
        torch.testing.assert_close(fused.module()(x), gm(x), rtol=1e-5, atol=1e-5 * gm(x).abs().max().item())
    report = asrfx.report_of(fused)
    assert {f.site for f in report.folds} == {s.module_path for s in asrfx.report_of(gm).sites}
    assert not report.kept
    assert _histogram(program) == before and all(torch.equal(program.state_dict[k], v) for k, v in state.items())


def test_fuse_of_an_exported_program_keeps_a_dynamic_batch(models):
    gm, _, _, x = models
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(gm, (x,), dynamic_shapes=({0: batch},))
    fused = asrfx.fuse(program, dynamic_shapes=({0: batch},))
    x5 = torch.randn(5, *x.shape[1:])
    with torch.no_grad():
        want = gm(x5)
        torch.testing.assert_close(fused.module()(x5), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_fuse_refuses_a_program_exported_in_training_mode(models):
    gm, _, _, x = models
    program = torch.export.export(copy.deepcopy(gm).train(), (x,))
    with pytest.raises(asrfx.AsrfxError, match=r"batch statistics .*call \.eval\(\)"):
        asrfx.fuse(program)
    with pytest.raises(TypeError, match="ExportedProgram only"):
        asrfx.fuse(gm, dynamic_shapes=({0: torch.export.Dim("batch")},))
