"""Layout analysis: axis tags follow sizes and op semantics, not the example's sizes."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from asrfx.graph.layout import has_spatial, infer_layouts, merge_tags, reshape_tags
from asrfx.graph.capture import propagate_shapes


def _layouts(module: nn.Module, *inputs):
    gm = fx.symbolic_trace(module)
    propagate_shapes(gm, inputs)
    lay = infer_layouts(gm)
    return {n.name: lay[n] for n in gm.graph.nodes}


def test_reshape_merges_and_splits():
    """[N,C,H,W] -> [N,C,HW] -> [N,C,H,W]; a split channel axis becomes (O, C)."""
    assert reshape_tags((2, 8, 4, 4), ("B", "C", "S", "S"), (2, 8, 16)) == ("B", "C", "S")
    assert reshape_tags((2, 8, 16), ("B", "C", "S"), (2, 8, 4, 4)) == ("B", "C", "S", "S")
    assert reshape_tags((2, 8, 4, 4), ("B", "C", "S", "S"), (2, 128)) == ("B", "CS")
    assert reshape_tags((2, 8, 4, 4), ("B", "C", "S", "S"), (2, 2, 4, 4, 4)) == ("B", "O", "C", "S", "S")
    assert reshape_tags((2, 8), ("B", "C"), (2, 8, 1, 1)) == ("B", "C", "1", "1")
    assert reshape_tags((2, 6), ("B", "C"), (2, 4, 3)) == ("?", "?", "?")  # sizes do not line up


@st.composite
def _shapes(draw):
    rank = draw(st.integers(2, 5))
    return tuple(draw(st.integers(1, 5)) for _ in range(rank))


@settings(max_examples=200, deadline=None)
@given(_shapes(), st.data())
def test_reshape_roundtrip_keeps_tags(shape, data):
    """Flattening any run of axes and restoring the shape gives back every non-trivial tag."""
    tags = tuple(data.draw(st.sampled_from("BCS")) for _ in shape)
    start = data.draw(st.integers(0, len(shape) - 1))
    end = data.draw(st.integers(start, len(shape) - 1))
    flat = shape[:start] + (math.prod(shape[start : end + 1]),) + shape[end + 1 :]
    there = reshape_tags(shape, tags, flat)
    back = reshape_tags(flat, there, shape)
    for size, tag, got in zip(shape, tags, back):
        if size > 1 and (tag != "C" or start == end or got != "O"):  # a flattened C run splits as (O.., C)
            assert set(tag) <= set(got), (shape, tags, flat, there, back)


def test_merge_tags():
    assert merge_tags(["C", "S"]) == "CS"
    assert merge_tags(["1", "S", "S"]) == "S"
    assert merge_tags(["1"]) == "1"
    assert has_spatial("CS") and has_spatial("?") and not has_spatial("C") and not has_spatial("G")


class _Tokens(nn.Module):
    """image -> conv patches -> flatten(2).transpose(1, 2) -> [N, L, C] -> LayerNorm -> mean over L."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = self.norm(t)
        return t.mean(1), t.mean(2)


def test_token_layout_and_reductions():
    """Tokens are (B, S, C): mean over tokens keeps C, mean over channels keeps S."""
    lay = _layouts(_Tokens(), torch.randn(2, 3, 16, 16))
    assert lay["transpose"] == ("B", "S", "C")
    assert lay["norm"] == ("B", "S", "C")
    assert lay["mean"] == ("B", "C")
    assert lay["mean_1"] == ("B", "S")


class _Pools(nn.Module):
    """Global, partial and pyramid pools on a tiny map: tags come from the op, not from sizes."""

    def forward(self, x):
        a = nn.functional.adaptive_avg_pool2d(x, 1)
        b = nn.functional.adaptive_avg_pool2d(x, 2)
        c = x.mean(3)
        d = nn.functional.avg_pool2d(x, (x.size(2), x.size(3)))
        e = nn.functional.max_pool2d(x, 3, 1, 1)
        f = nn.functional.adaptive_avg_pool2d(x, (None, 1))  # coordinate attention's H pool
        return a, b, c, d, e, f


def test_pool_tags_on_a_one_pixel_map():
    """On a 2x2 map a 3x3 window and a global pool both give small outputs; only one is global."""
    lay = _layouts(_Pools(), torch.randn(2, 4, 2, 1))
    assert lay["adaptive_avg_pool2d"] == ("B", "C", "1", "1")
    assert lay["adaptive_avg_pool2d_1"] == ("B", "C", "G", "G")
    assert lay["mean"] == ("B", "C", "S")
    assert lay["avg_pool2d"] == ("B", "C", "1", "1")
    assert lay["max_pool2d"] == ("B", "C", "S", "S")
    assert lay["adaptive_avg_pool2d_2"] == ("B", "C", "S", "1")


def test_one_pixel_maps_stay_spatial_through_reshapes():
    """[N,C,1,1].view(N,C,-1) is still spatial (SRM's std pooling on a 1x1 map); view(b,c,1,1) of [N,C] is not."""
    assert reshape_tags((2, 8, 1, 1), ("B", "C", "S", "S"), (2, 8, 1)) == ("B", "C", "S")
    assert reshape_tags((2, 8), ("B", "C"), (2, 8, 1, 1)) == ("B", "C", "1", "1")
    assert reshape_tags((1, 8, 1, 1), ("B", "C", "S", "S"), (8,)) == ("C",)
    assert reshape_tags((1, 1), ("B", "C"), (1, 1, 1, 1)) == ("B", "C", "1", "1")  # view(b, c, 1, 1)
    assert reshape_tags((1, 1, 1, 1), ("B", "C", "S", "S"), (1, 1, 1)) == ("B", "C", "S")  # view(b, c, -1)
    assert reshape_tags((1, 1, 1), ("B", "S", "S"), (1, 1, 1)) == ("B", "S", "S")


class _Unsqueeze(nn.Module):
    """CBAM's channel pool on a batch of one 1x1 map: every axis is size 1, yet B and S stay apart."""

    def forward(self, x):
        return torch.max(x, 1)[0].unsqueeze(1), x.mean(1).unsqueeze(1).squeeze(1)


def test_unsqueeze_and_squeeze_are_exact():
    lay = _layouts(_Unsqueeze(), torch.randn(1, 4, 1, 1))
    assert lay["unsqueeze"] == ("B", "1", "S", "S")
    assert lay["squeeze"] == ("B", "S", "S")
