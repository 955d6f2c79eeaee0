"""What detect reports as a site's fold target is what fuse then does: both read the rule table
(asrfx.algebra.rules) through the same planner (asrfx.passes.absorb)."""

from __future__ import annotations

import pytest
import torch

import asrfx
from asrfx.passes.absorb import label_of
from helpers import randomize

from zoo import POSITIVE_CASES


def _label(node) -> str:
    return str(node.target) if node.op == "get_attr" else label_of(node)


@pytest.mark.parametrize("case", POSITIVE_CASES, ids=lambda c: c.name)
def test_detect_reports_the_fold_fuse_does(case):
    model = randomize(case.build(), 0).eval()
    x = torch.randn(*case.input_shape, generator=torch.Generator().manual_seed(0))
    sites = asrfx.find_attention(model, x)
    fused = asrfx.fuse(asrfx.convert(model, x).eval())
    folds = {}
    for fold in asrfx.report_of(fused).folds:
        folds.setdefault(fold.site, fold)  # the first use of each site, as detect reports it
    assert len(folds) == len(sites)
    for site in sites:
        fold = folds[site.module_path]
        said = site.absorption
        where = "producer" if fold.where == "producer" else fold.where
        assert said.side == where, f"{site.module_path}: detect said {said.reason!r}, fuse did {fold}"
        assert {_label(t) for t in said.targets} <= set(fold.into), f"{site.module_path}: {said.reason!r} vs {fold}"


def _real(name):
    import timm
    import torchvision

    source, _, model = name.partition(":")
    return (torchvision.models.get_model(model, weights=None) if source == "torchvision"
            else timm.create_model(model, pretrained=False))


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v3_small", "timm:mixnet_s", "timm:skresnet18",
                                  "timm:eca_nfnet_l0"])
def test_detect_reports_the_fold_fuse_does_on_real_models(name):
    model = randomize(_real(name), 0).eval()
    x = torch.randn(1, 3, 64, 64)
    sites = asrfx.find_attention(model, x)
    fused = asrfx.fuse(asrfx.convert(model, x).eval())
    report = asrfx.report_of(fused)
    assert not report.kept, str(report)  # every gate of these folds (mixnet: splits; nfnet: std-conv gains)
    folds = {}
    for fold in report.folds:
        folds.setdefault(fold.site, fold)
    for site in sites:
        fold = folds[site.module_path]
        assert site.absorption.side == fold.where, f"{site.module_path}: {site.absorption.reason!r} vs {fold}"
        assert {_label(t) for t in site.absorption.targets} <= set(fold.into)
