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


def test_same_padding_ports_trace_with_leaves():
    """tf_* ports pad with Python math on x.size(): each Conv2dSame becomes a leaf, the SEs are still found."""
    import timm

    model = timm.create_model("tf_mobilenetv3_small_100", pretrained=False).eval()
    sites = asrfx.find_attention(model, torch.randn(1, 3, 64, 64))
    assert len(sites) == 9
    assert {leaf.module_type for leaf in sites.leaves} == {"Conv2dSame"}
    assert len(sites.leaves) == sum(type(m).__name__ == "Conv2dSame" for m in model.modules())


def test_untraceable_model_forward_is_named():
    """timm's dynamic-size ViT branches on tensor sizes in its own forward: the error names the line."""
    import timm

    model = timm.create_model("test_vit", pretrained=False, dynamic_img_size=True)
    with pytest.raises(asrfx.TracingError) as info:
        asrfx.find_attention(model, torch.randn(1, 3, 64, 64))
    assert "VisionTransformer" in str(info.value) and "pos_embed" in str(info.value)


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
