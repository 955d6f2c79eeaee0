"""Detection on real torchvision and timm models (random weights, nothing downloaded).

For every model the number of sites equals the number of attention blocks counted
from its modules (tests/model_catalog.py), every site maps to exactly one of those
modules by path, and its kind matches the family; plain models give zero sites.
"""

from __future__ import annotations

import pytest
import torch

import asrfx
from model_catalog import NEGATIVE_MODELS, TIMM_MODELS, TORCHVISION_MODELS, count_attention_modules

# The structural kind each attention family must be detected as.
FAMILY_KIND = {
    "SqueezeExcitation": "se", "SEModule": "se", "SqueezeExcite": "se", "EffectiveSEModule": "se",
    "EcaModule": "eca", "CecaModule": "eca",
    "ChannelAttn": "cbam_channel", "LightChannelAttn": "cbam_channel",
    "GlobalContext": "gc",
    "SelectiveKernel": "split", "SplitAttn": "split",
}

POSITIVES = [m for m in TORCHVISION_MODELS + TIMM_MODELS if not m.slow]
NEGATIVES = [m for m in NEGATIVE_MODELS if m.traces_plainly or "tf_" in m.name]


def _attention_paths(model, classes) -> dict[str, str]:
    names = {c.rsplit(".", 1)[-1] for c in classes}
    return {path: type(mod).__name__ for path, mod in model.named_modules()
            if type(mod).__name__ in names and count_attention_modules(mod, classes) >= 1}


@pytest.mark.parametrize("entry", POSITIVES, ids=lambda m: m.name)
def test_every_attention_block_is_found(entry):
    model = entry.build()
    assert count_attention_modules(model, entry.attention_classes) == entry.expected_sites
    sites = asrfx.find_attention(model, torch.randn(*entry.input_shape))
    assert len(sites) == entry.expected_sites, sites.format()
    assert not sites.layout_losses and not sites.rejections, sites.format()  # nothing lost, nothing undecided
    blocks = _attention_paths(model, entry.attention_classes)
    matched = {}
    for site in sites:
        owners = [p for p in blocks if site.module_path == p or site.module_path.startswith(p + ".")]
        assert len(owners) == 1, (site.module_path, sorted(blocks)[:5])
        matched[owners[0]] = site
        assert site.kind == FAMILY_KIND[blocks[owners[0]]], (site.module_path, site.kind)
        assert site.channels == site.x.meta["tensor_meta"].shape[site.channel_dim]
    assert set(matched) == set(blocks)  # one site per block, none twice


@pytest.mark.parametrize("entry", NEGATIVES, ids=lambda m: m.name)
def test_plain_and_look_alike_models_have_no_sites(entry):
    """Plain nets, layer scale, GRN, FRN, EvoNorm, CondConv, coordinate attention, XCiT, ViT."""
    sites = asrfx.find_attention(entry.build(), torch.randn(*entry.input_shape))
    assert len(sites) == 0, sites.format()
    assert not sites.layout_losses, sites.format()
    assert not [r for r in sites.rejections if r.verdict is not asrfx.Verdict.NOT_ATTENTION], sites.format()


def test_same_padding_ports_trace_with_leaves():
    """tf_* ports pad with Python math on x.size(): each Conv2dSame becomes a leaf, the SEs are still found."""
    import timm

    model = timm.create_model("tf_mobilenetv3_small_100", pretrained=False).eval()
    sites = asrfx.find_attention(model, torch.randn(1, 3, 64, 64))
    assert len(sites) == 9
    assert {leaf.module_type for leaf in sites.leaves} == {"Conv2dSame"}
    assert len(sites.leaves) == sum(type(m).__name__ == "Conv2dSame" for m in model.modules())


def test_untraceable_model_forward_is_named():
    """timm's dynamic-size ViT branches on tensor sizes in its own forward: torch.fx cannot follow it, so
    the model is captured by torch.export, and the table names the line torch.fx stopped at."""
    import timm

    model = timm.create_model("test_vit", pretrained=False, dynamic_img_size=True)
    sites = asrfx.find_attention(model, torch.randn(1, 3, 64, 64))
    assert len(sites) == 0 and sites.capture.name == "export"
    assert "VisionTransformer" in sites.capture.reason and "pos_embed" in sites.capture.reason


def test_quickstart_table_for_mobilenet_v3_large():
    """The README quickstart: module path, kind, channels, gate shape and fold target of each site."""
    import torchvision

    model = torchvision.models.mobilenet_v3_large(weights=None)
    sites = asrfx.find_attention(model, torch.randn(1, 3, 224, 224))
    text = str(sites)
    assert "8 channel-attention site(s)" in text
    assert "features.4.block.2" in text and "(1, 72, 1, 1)" in text
    # blocks 4-6 use ReLU after BN: the gate folds into that BN; later blocks end in Hardswish
    assert [s.absorbable for s in sites] == [True] * 3 + [False] * 5
    assert sites[0].absorption.target.target == "features.4.block.1.1"
    assert "Hardswish" in sites[3].absorption.reason


# -- convert + fuse on real models -----------------------------------------------------------------

FUSE_MODELS = [m for m in POSITIVES if not m.name.startswith("timm:test_")] + \
    [m for m in POSITIVES if m.name in ("timm:test_resnet[cbam]", "timm:test_resnet[gc_scale_add]")]


def _randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Running statistics and affine parameters that are not the defaults."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 0.5 + 0.75)
                if m.weight is not None:
                    m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model


@pytest.mark.parametrize("entry", FUSE_MODELS, ids=lambda m: m.name)
def test_convert_then_fuse_real_models(entry):
    """fuse(convert(m)) equals convert(m) in eval mode and is the size of m without attention."""
    from asrfx.graph.edit import set_module

    model = _randomize_norms(entry.build())
    x = torch.randn(*entry.input_shape)
    gm = asrfx.convert(model, x, psi_init=lambda site, shape: torch.randn(shape)).eval()
    fused = asrfx.fuse(gm)
    report = asrfx.report_of(fused)
    assert len({f.site for f in report.folds}) == entry.expected_sites, str(report)
    with torch.no_grad():
        want, got = gm(x), fused(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(want.abs().max().item(), 1.0))
    blocks = _attention_paths(model, entry.attention_classes)
    kinds = {FAMILY_KIND[kind] for kind in blocks.values()}
    if "split" in kinds:  # gates over stacked branches fold through the reshape into each branch's layers
        assert not report.kept and all(f.where in ("producer", "consumers") for f in report.folds), str(report)
        return
    # a gate stays (as one stored constant, not a parameter) only with a reason: CondConv's
    # per-sample kernels read the gated tensor through a reshape
    assert all(f.reason for f in report.kept)
    assert not report.kept or "cc_" in entry.name, str(report)
    backbone = entry.build()
    for path in blocks:
        set_module(backbone, path, torch.nn.Identity())
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in backbone.parameters())
