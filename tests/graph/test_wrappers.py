"""Wrapped models: DataParallel, DistributedDataParallel and torch.compile's OptimizedModule (nested
too) are unwrapped by every verb, which says so (a warning, and a note in convert's report: the
result is not wrapped); FSDP-sharded models are refused (tests/training/test_distributed.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import asrfx

import zoo
from helpers import examples, randomize

X = torch.randn(2, 3, 8, 8)
WRAPPERS = {"DataParallel": (nn.DataParallel, ".module"), "torch.compile": (torch.compile, "._orig_mod")}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.se = zoo.SELayer(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.se(self.bn(self.conv(x))).mean((2, 3)))


def _wrap(model: nn.Module, names: list[str]) -> nn.Module:
    for name in names:  # innermost first
        model = WRAPPERS[name][0](model)
    return model


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, asrfx.AsrfxWarning)]


@settings(max_examples=examples(10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(sorted(WRAPPERS)), min_size=1, max_size=3)
       .filter(lambda names: names.count("torch.compile") <= 1),  # compiling a compiled module gives a function
       st.integers(0, 2**16))
def test_every_verb_unwraps_and_says_how(names, seed):
    model = randomize(Net(), seed).eval()
    wrapped = _wrap(model, names)
    reach = "model" + "".join(WRAPPERS[n][1] for n in reversed(names))
    plain = asrfx.convert(model, X)
    gm, said = _caught(lambda: asrfx.convert(wrapped, X))
    (note,) = said
    assert f"asrfx.convert worked on the Net inside {' inside '.join(names)} ({reach})" in note
    assert f"apply {', then '.join(names)} to it again" in note
    assert note in asrfx.report_of(gm).notes
    assert isinstance(gm, torch.fx.GraphModule)
    torch.testing.assert_close(gm(X), plain(X), rtol=0, atol=0)

    fused, said = _caught(lambda: asrfx.fuse(_wrap(gm, names)))
    assert len(said) == 1 and "asrfx.fuse worked on" in said[0] and "again" not in said[0]
    torch.testing.assert_close(fused(X), gm(X), rtol=1e-5, atol=1e-6)

    table, said = _caught(lambda: asrfx.find_attention(wrapped, X))
    assert len(table) == 1 and len(said) == 1
    inserted, said = _caught(lambda: asrfx.insert(_wrap(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), names),
                                                  "se", X))
    assert any("asrfx.insert worked on the Sequential" in n for n in asrfx.report_of(inserted).notes)
    plain_backbone, said = _caught(lambda: asrfx.backbone(wrapped, X))
    assert isinstance(plain_backbone.se, nn.Identity) and len(said) == 1
    assert model.training is False and isinstance(model.se, zoo.SELayer)  # the caller's model untouched


def test_distributed_data_parallel_is_unwrapped():
    """DDP (a one-process gloo group here; tests/training/test_distributed.py trains it with two)."""
    model = Net()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        gm, said = _caught(lambda: asrfx.convert(ddp, X))
    finally:
        dist.destroy_process_group()
    assert "inside DistributedDataParallel (model.module)" in said[0] and "apply DistributedDataParallel" in said[0]
    assert [s.module_path for s in asrfx.report_of(gm).sites] == ["se"]


def test_anything_else_still_gets_the_tracing_error():
    class Untraceable(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(asrfx.TracingError, match="torch.fx cannot trace"):
        asrfx.convert(Untraceable(), X)
