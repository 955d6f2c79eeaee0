"""Third-party models, captured without workarounds (the ``models`` extra: HF transformers v5,
segmentation_models_pytorch; random weights, built from config objects, nothing downloaded).

Ground truth: the attention modules each forward calls, counted with forward hooks on the
libraries' own SE classes (class names are fine in tests, never in the library). For each
model: the sites equal that count; convert and one training step reach every psi; fuse is
exact in float64 with random BatchNorm statistics; the fused model has the parameter count of
the model without its attention; and the number of gates folded (not kept) is at least what
is measured today (the lead is adding folds, so it is a lower bound).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import asrfx
from asrfx.graph.capture import propagate_shapes
from asrfx.graph.edit import set_module
from asrfx.graph.export_route import export_capture
from asrfx.passes.fuse import constant_gates

from helpers import randomize

transformers = pytest.importorskip("transformers", minversion="5")
smp = pytest.importorskip("segmentation_models_pytorch", minversion="0.4")


@dataclass(frozen=True)
class Entry:
    """One third-party model and what is measured on it."""

    name: str  # test id
    build: Callable[[], nn.Module]  # random weights, small config
    shape: tuple[int, ...]  # input shape
    attention: tuple[str, ...]  # class names of the library's channel-attention modules
    route: str  # the capture route asrfx takes by default
    folded: int  # gates folded (not kept) today: a lower bound
    why_not: str = ""  # strict xfail of the site count: what outside capture keeps it from passing


def _efficientnet():
    config = transformers.EfficientNetConfig(image_size=64, width_coefficient=0.25, depth_coefficient=0.25,
                                             hidden_dim=320, num_labels=5)
    return transformers.EfficientNetForImageClassification(config)


def _regnet():
    config = transformers.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1],
                                       groups_width=8, layer_type="y", num_labels=5)
    return transformers.RegNetForImageClassification(config)


def _unet(encoder):
    return lambda: smp.Unet(encoder_name=encoder, encoder_weights=None, encoder_depth=3,
                            decoder_channels=(64, 32, 16), decoder_attention_type="scse", classes=2,
                            aux_params={"classes": 3})  # a (masks, labels) tuple out


ENTRIES = [
    Entry("hf-efficientnet", _efficientnet, (2, 3, 64, 64), ("EfficientNetSqueezeExciteLayer",), "fx", 0),
    Entry("hf-regnet-y", _regnet, (2, 3, 32, 32), ("RegNetSELayer",), "fx", 5),
    Entry("smp-unet-scse-se_resnet50", _unet("se_resnet50"), (2, 3, 64, 64), ("SEModule", "SCSEModule"), "fx", 7),
    Entry("smp-unet-scse-timm-efficientnet", _unet("timm-efficientnet-b0"), (2, 3, 64, 64),
          ("SqueezeExcite", "SCSEModule"), "fx", 5),
]


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _attention_calls(model: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> list[str]:
    calls = []
    hooks = [m.register_forward_hook(lambda *_, p=p: calls.append(p)) for p, m in model.named_modules()
             if type(m).__name__ in names]
    try:
        with torch.no_grad():
            copy.deepcopy(model).eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _owner(site_path: str, calls: list[str]) -> str:
    owners = [p for p in calls if site_path == p or site_path.startswith(p + ".")]
    assert len(owners) == 1, (site_path, calls)
    return owners[0]


def _used_parameters(model: nn.Module, x: torch.Tensor) -> int:
    """Parameters the forward reads (smp builds encoder stages its depth never uses)."""
    return sum(p.numel() for p in asrfx.trace(model, example_inputs=(x,)).gm.parameters())


def _check_pipeline(entry: Entry, model: nn.Module, x: torch.Tensor, capture: Callable[[nn.Module, Any], Any],
                    calls: list[str]):
    """convert -> one training step -> eval -> fuse, on what ``capture`` makes of the model."""
    model = randomize(model.double(), 0).train()
    x = x.double()
    gen = torch.Generator().manual_seed(0)
    gm = asrfx.convert(capture(model, x), (x,),
                       psi_init=lambda site, shape: torch.rand(shape, generator=gen, dtype=torch.float64))
    report = asrfx.report_of(gm)
    assert sorted(_owner(s.module_path, calls) for s in report.sites) == sorted(calls)
    psi = {n: p for n, p in gm.named_parameters() if n.rpartition(".")[2].startswith("psi")}
    assert sorted(psi) == sorted(f"{s.module_path}.psi" for s in report.sites)
    # a ReLU in an excitation that is zero everywhere passes no gradient (SCSE's cSE is 16 -> 1 channel
    # in the last decoder block): those psi must still be connected, others must move
    dead = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out, p=p: dead.add(p) if not out.any() else None)
             for p, m in gm.named_modules() if isinstance(m, nn.ReLU)]
    out = gm(x)
    for h in hooks:
        h.remove()
    assert type(out) is type(model(x))
    grads = torch.autograd.grad(sum(t.sum() for t in _tensors(out)), list(psi.values()))  # raises if one is unused
    for (name, _), grad in zip(psi.items(), grads):
        site = name.rpartition(".")[0]
        assert grad.abs().sum() > 0 or any(p.startswith(site + ".") for p in dead), name
    gm.eval()
    fused = asrfx.fuse(gm)
    fold_report = asrfx.report_of(fused)
    folded = len(fold_report.folds) - len(fold_report.kept)
    assert folded >= entry.folded, str(fold_report)
    # nothing kept silently: no computed gate is left, and each stored one is reported
    assert constant_gates(fused) == []
    assert len(fold_report.kept) == sum(1 for n, _ in fused.named_buffers() if n.startswith("asr_gate"))
    asrfx.verify(fused, gm, (x,))  # 1e-10 in float64, tensor by tensor, same structure
    backbone = copy.deepcopy(model)  # the model without its attention (what asrfx.backbone builds)
    for site in report.sites:
        set_module(backbone, site.module_path, nn.Identity())
    assert sum(p.numel() for p in fused.parameters()) == _used_parameters(backbone, x)
    return fold_report


def _params():
    """Each entry, its assertions xfail(strict=True) where something outside capture stops them."""
    return [pytest.param(e, id=e.name, marks=[pytest.mark.xfail(strict=True, reason=e.why_not)] if e.why_not else [])
            for e in ENTRIES]


@pytest.mark.parametrize("entry", _params())
def test_sites_equal_the_attention_calls(entry):
    model, x = entry.build(), torch.randn(*entry.shape)
    calls = _attention_calls(model, x, entry.attention)
    table = asrfx.find_attention(model, (x,))
    assert calls and table.capture.name == entry.route
    assert sorted(_owner(s.module_path, calls) for s in table) == sorted(calls), table.format()


@pytest.mark.parametrize("entry", _params())
def test_convert_train_fuse(entry):
    model, x = entry.build(), torch.randn(*entry.shape)
    _check_pipeline(entry, model, x, lambda m, _x: m, _attention_calls(model, x, entry.attention))


def _exported(model, x):
    traced = export_capture(model, (x,), {}, reason="forced by the test")
    propagate_shapes(traced.gm, (x,))
    return traced.gm


def test_regnet_on_the_export_route():
    """RegNet-Y through torch.export (no opaque leaf): every SE found, trained, folded exactly."""
    entry = next(e for e in ENTRIES if e.name == "hf-regnet-y")
    model, x = entry.build(), torch.randn(*entry.shape)
    calls = _attention_calls(model, x, entry.attention)
    table = asrfx.find_attention(_exported(model, x), (x,))
    assert sorted(_owner(s.module_path, calls) for s in table) == sorted(calls) and len(calls) == 5
    report = _check_pipeline(entry, model, x, _exported, calls)
    assert len(report.kept) == 0
