"""asrfx.insert: ASR(k) into plain backbones; fuse gives the backbone back, size and function."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import asrfx
from asrfx.attention import ATTENTION
from helpers import examples

count = lambda m: sum(p.numel() for p in m.parameters())


def _check(model, x, attention, **kw):
    gm = asrfx.insert(model, attention, x, **kw)
    fused = asrfx.fuse(gm.eval())
    with torch.no_grad():
        want, got = gm(x), fused(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(want.abs().max().item(), 1.0))
    assert count(fused) == count(model)
    assert not asrfx.report_of(fused).kept
    return gm, asrfx.report_of(gm)


@pytest.mark.parametrize("backbone, sites", [("resnet18", 8), ("vgg11_bn", 8), ("mobilenet_v2", 10),
                                             ("shufflenet_v2_x1_0", 56)])
@pytest.mark.parametrize("attention", ["se", "srm", "gc"])
def test_torchvision_backbones(backbone, sites, attention):
    import torchvision

    model = getattr(torchvision.models, backbone)(weights=None).eval()
    _, report = _check(model, torch.randn(2, 3, 64, 64), attention)
    assert len(report.sites) == sites


def test_vgg19_bn():
    """No residual adds: a gate after every BatchNorm (16 in VGG-19-BN)."""
    import torchvision

    model = torchvision.models.vgg19_bn(weights=None).eval()
    _, report = _check(model, torch.randn(1, 3, 32, 32), "se")
    assert len(report.sites) == 16


def test_default_placement_is_after_the_last_bn_of_each_residual_block():
    """ResNet bottleneck: after bn3, before the add (the paper's and official code's placement)."""
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    gm, report = _check(model, torch.randn(1, 3, 64, 64), "se")
    assert len(report.sites) == 16
    assert report.sites[0].psi == ("layer1.0.asr.psi",)
    assert report.sites[0].gated_norm == "layer1.0.bn3"  # trained inside bn3's affine


def test_where_and_repeats():
    """where picks modules by path; repeats=2 puts two modules, each with its own parameters."""
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    where = lambda path, module: path.startswith("layer4") and isinstance(module, nn.BatchNorm2d)
    gm, report = _check(model, torch.randn(2, 3, 32, 32), "eca", where=where, repeats=2)
    paths = [s.module_path for s in report.sites]
    assert len(paths) == 2 * 5 and "layer4.0.asr" in paths and "layer4.0.asr_1" in paths
    assert all(p.startswith("layer4") for p in paths)


def test_bad_arguments():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="unknown attention 'sse'"):
        asrfx.insert(model, "sse", torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="repeats"):
        asrfx.insert(model, "se", torch.randn(1, 3, 8, 8), repeats=0)
    with pytest.raises(asrfx.AsrfxError, match="where="):
        asrfx.insert(nn.Sequential(nn.Conv2d(3, 4, 3)), "se", torch.randn(1, 3, 8, 8))


class SmallResNet(nn.Module):
    def __init__(self, blocks: int, c: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                          nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)) for _ in range(blocks))
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(block(x) + x)
        return self.head(x.mean((2, 3)))


@settings(max_examples=examples(20))
@given(st.sampled_from(sorted(ATTENTION)), st.sampled_from(["default", "every_bn", "first_block"]),
       st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**16))
def test_kind_placement_repeats(kind, placement, repeats, blocks, seed):
    """Any kind x placement x repeats: fuse(insert(m)) has m's size and the psi form's outputs."""
    torch.manual_seed(seed)
    model = SmallResNet(blocks).eval()
    where = {"default": None,
             "every_bn": lambda path, module: isinstance(module, nn.BatchNorm2d),
             "first_block": lambda path, module: path == "blocks.0.4"}[placement]
    gm, report = _check(model, torch.randn(2, 3, 8, 8), kind, where=where, repeats=repeats,
                        psi_init=lambda site, shape: torch.rand(shape) + 0.05)
    places = {"default": blocks, "every_bn": 1 + 2 * blocks, "first_block": 1}[placement]
    assert len(report.sites) == places * repeats


@pytest.mark.parametrize("name, blocks, params", [("resnet56", 27, 0.86e6), ("resnet110", 54, 1.74e6),
                                                  ("resnet83", 27, 0.89e6), ("resnet164", 54, 1.73e6)])
def test_paper_cifar_resnets(name, blocks, params):
    """The paper's backbones (Table 1: ResNet-164 on CIFAR-100 has 1.73M parameters)."""
    from asrfx import models

    model = getattr(models, name)(num_classes=100).eval()
    assert abs(count(model) - params) / params < 0.02
    _, report = _check(model, torch.randn(2, 3, 32, 32), "se")
    assert len(report.sites) == blocks
    last_bn = "bn3" if "164" in name or "83" in name else "bn2"
    assert all(s.gated_norm and s.gated_norm.endswith(last_bn) for s in report.sites)


def test_cifar_resnet_depths_are_checked():
    from asrfx.models import cifar_resnet

    with pytest.raises(ValueError, match="9n\\+2"):
        cifar_resnet(100, "bottleneck")


def test_vit_gates_act_on_tokens_after_layernorm():
    """torchvision ViT: gates on [N, L, D] tokens after each block's LayerNorm fold into it."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    gm, report = _check(model, torch.randn(2, 3, 32, 32), "se")
    assert [s.module_path for s in report.sites] == [
        "encoder.layers.encoder_layer_0.asr", "encoder.layers.encoder_layer_0.asr_1",
        "encoder.layers.encoder_layer_1.asr", "encoder.layers.encoder_layer_1.asr_1"]
    fused = asrfx.fuse(gm.eval())
    into = {f.into[0] for f in asrfx.report_of(fused).folds}
    assert into == {f"encoder.layers.encoder_layer_{i}.ln_{j}" for i in (0, 1) for j in (1, 2)}


def test_insert_without_convert_gives_the_attention_baseline():
    """convert=False: the original, input-dependent modules at the same places (the paper's
    'backbone + k'); converting that later gives the same psi names as insert would."""
    from asrfx.models import cifar_resnet

    model = cifar_resnet(20, "basic", num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    plain = asrfx.insert(model, "se", (x,), convert=False)
    assert not any("psi" in n for n, _ in plain.named_parameters())
    assert len(asrfx.find_attention(plain, (x,))) == 9
    # each sample is gated by its own statistics, whatever else is in the batch
    with torch.no_grad():
        a, b = plain(x), plain(torch.cat([x[:1], torch.randn(2, 3, 32, 32)]))
    torch.testing.assert_close(a[:1], b[:1])  # per-sample gates
    asr = asrfx.insert(model, "se", (x,))
    later = asrfx.convert(plain, (x,))
    assert sorted(n for n, _ in later.named_parameters()) == sorted(n for n, _ in asr.named_parameters())
    assert count(plain) > count(model)
    assert count(asrfx.fuse(asrfx.convert(plain, (x,), keep=True).eval())) == count(plain)


def test_where_choosing_a_layer_without_positions_names_it_and_says_why():
    """where=lambda p, m: True also picks Flatten and the final Linear ([N, C], nothing to pool over):
    the error names each of them and the reason, instead of a shape error from running the model."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(asrfx.AsrfxError, match=r"'4' \(Flatten\).*no spatial or token axis") as info:
        asrfx.insert(model, "srm", x, where=lambda path, m: True)
    assert "'5' (Linear)" in str(info.value) and "'1'" not in str(info.value)
    gm = asrfx.insert(model, "srm", x, where=lambda path, m: isinstance(m, nn.BatchNorm2d))
    assert [s.module_path for s in asrfx.report_of(gm).sites] == ["asr"]
