"""Tracing: untraceable submodules become leaves, never hiding attention; errors say where and what to do."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import asrfx
from asrfx import AsrfxError, TracingError


class SamePadConv(nn.Conv2d):
    """Like timm's Conv2dSame: padding computed with Python math from the input size."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        if ih % 2 == 1:  # control flow on a traced value: fx cannot follow it
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Net(nn.Module):
    """stem (untraceable conv) -> bn -> SE -> head."""

    def __init__(self):
        super().__init__()
        self.stem = SamePadConv(3, 8, 3, padding=0)
        self.bn = nn.BatchNorm2d(8)
        self.se = SE(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.se(self.bn(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_untraceable_submodule_becomes_a_leaf():
    """Net.stem has data-dependent control flow: traced as one call, the SE after it is still found."""
    model = Net()
    with pytest.raises(Exception):
        fx.symbolic_trace(model)
    sites = asrfx.find_attention(model, torch.randn(2, 3, 15, 15))
    assert [leaf.path for leaf in sites.leaves] == ["stem"]
    assert sites.leaves[0].module_type == "SamePadConv"
    assert "control flow" in sites.leaves[0].reason
    assert [s.module_path for s in sites] == ["se"]
    assert "stem (SamePadConv)" in str(sites)


class GatedBlock(nn.Module):
    """An untraceable block whose child is an SE: making it a leaf would hide the attention."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.se = SE(8)

    def forward(self, x):
        if x.sum() > 0:
            x = self.conv(x)
        return self.se(x)


class HidingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = GatedBlock()

    def forward(self, x):
        return self.block(self.stem(x))


def test_refuses_to_hide_attention_in_a_leaf():
    """block cannot be traced and holds block.se: refuse, naming both, instead of missing it."""
    with pytest.raises(TracingError) as info:
        asrfx.find_attention(HidingNet(), torch.randn(2, 3, 8, 8))
    message = str(info.value)
    assert "'block' (GatedBlock)" in message
    assert "block.se" in message
    assert "What to do" in message


class BadForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return x


def test_untraceable_top_level_names_the_line_and_the_fix():
    with pytest.raises(TracingError) as info:
        asrfx.find_attention(BadForward(), torch.randn(1, 3, 4, 4))
    message = str(info.value)
    assert "BadForward" in message
    assert "test_tracing.py" in message  # the user's line
    assert "leaf_modules" in message and "GraphModule" in message


def test_leaf_modules_option_and_graph_module_input():
    """A caller may name leaves up front, or pass a GraphModule they traced themselves."""
    model = Net()
    sites = asrfx.find_attention(model, torch.randn(2, 3, 15, 15), leaf_modules=[SamePadConv])
    assert len(sites) == 1 and sites.leaves == ()
    tracer_leaves = asrfx.trace(model, leaf_modules=["stem"])
    sites_gm = asrfx.find_attention(tracer_leaves.gm, torch.randn(2, 3, 15, 15))
    assert len(sites_gm) == 1


def test_needs_shapes():
    """No example inputs and no shape metadata: a clear error saying what to pass."""
    with pytest.raises(AsrfxError, match="example_inputs"):
        asrfx.find_attention(SE(8))


def test_graph_module_shapes_are_reused_and_not_written():
    """A GraphModule that already carries shapes needs no inputs; its own graph is not annotated."""
    gm = fx.symbolic_trace(SE(8))
    assert len(asrfx.find_attention(gm, torch.randn(2, 8, 4, 4))) == 1
    assert all("tensor_meta" not in n.meta for n in gm.graph.nodes)
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(torch.randn(2, 8, 4, 4))
    assert len(asrfx.find_attention(gm)) == 1


def test_not_a_module():
    with pytest.raises(TracingError, match="nn.Module"):
        asrfx.find_attention(lambda x: x, torch.randn(1))


def test_caller_model_untouched_in_train_mode():
    """Train-mode BatchNorm with batch 1 on a 1x1 map would fail, and would update stats: neither happens."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), SE(8)).train()
    model[1].running_mean.uniform_(-1, 1)
    before = copy.deepcopy(model.state_dict())
    sites = asrfx.find_attention(model, torch.randn(1, 3, 1, 1))
    assert len(sites) == 1
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
