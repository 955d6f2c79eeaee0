"""Layout analysis: axis tags follow sizes and op semantics, not the example's sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import fx, nn

from asrfx.graph.layout import has_spatial, infer_layouts, merge_tags, reshape_tags, unknown_origins
from asrfx.graph.capture import propagate_shapes, trace
from helpers import examples


def _traced(module: nn.Module, *inputs, leaves=()):
    gm = trace(module, leaf_modules=leaves).gm
    propagate_shapes(gm, inputs)
    return gm, infer_layouts(gm)


def _layouts(module: nn.Module, *inputs, leaves=()):
    gm, lay = _traced(module, *inputs, leaves=leaves)
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


# -- anchoring: layers re-establish the layout after an op the pass cannot follow ---------------


@fx.wrap
def _unflatten(flat, shape):
    """A user function from a flat vector to a shape: the layout pass cannot tell its axes."""
    return flat.reshape(shape)


def _scramble(x):
    """x again, through an op whose output axes are unknown to the layout pass."""
    return _unflatten(x.flatten(), x.shape)


@fx.wrap
def _to_grid(t):
    """[N, L, C] tokens -> [N, C, L, 1]: a user function, its output layout unknown."""
    return t.transpose(1, 2).unsqueeze(-1)


class _Anchored(nn.Module):
    """unknown op -> layer: the layer's output has its own layout again."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(_scramble(x))


def test_an_unknown_op_loses_the_layout():
    lay = _layouts(_Anchored(nn.Identity()), torch.randn(2, 3, 5, 5))
    assert lay["_unflatten"] == ("?", "?", "?", "?")


@pytest.mark.parametrize("layer, shape, want", [
    (nn.Conv1d(3, 4, 3), (2, 3, 9), ("B", "C", "S")),
    (nn.Conv2d(3, 4, 3), (2, 3, 9, 9), ("B", "C", "S", "S")),
    (nn.Conv3d(3, 4, 3), (2, 3, 5, 5, 5), ("B", "C", "S", "S", "S")),
    (nn.ConvTranspose1d(3, 4, 2, 2), (2, 3, 5), ("B", "C", "S")),
    (nn.ConvTranspose2d(3, 4, 2, 2), (2, 3, 5, 5), ("B", "C", "S", "S")),
    (nn.ConvTranspose3d(3, 4, 2, 2), (2, 3, 3, 3, 3), ("B", "C", "S", "S", "S")),
    (nn.Conv2d(3, 4, 3), (3, 9, 9), ("C", "S", "S")),  # unbatched
    (nn.Linear(5, 4), (2, 7, 5), ("B", "S", "C")),
    (nn.Linear(5, 4), (2, 5), ("B", "C")),
    (nn.BatchNorm1d(3), (2, 3, 9), ("B", "C", "S")),
    (nn.BatchNorm2d(3), (2, 3, 5, 5), ("B", "C", "S", "S")),
    (nn.BatchNorm3d(3), (2, 3, 3, 3, 3), ("B", "C", "S", "S", "S")),
    (nn.GroupNorm(1, 3), (2, 3, 5, 5), ("B", "C", "S", "S")),
    (nn.InstanceNorm2d(3), (2, 3, 5, 5), ("B", "C", "S", "S")),
    (nn.LayerNorm(5), (2, 7, 5), ("B", "S", "C")),
    (nn.LayerNorm([3, 5, 5]), (2, 3, 5, 5), ("B", "C", "S", "S")),
    (nn.MaxPool2d(2), (2, 3, 6, 6), ("B", "C", "S", "S")),
    (nn.AvgPool1d(2), (2, 3, 6), ("B", "C", "S")),
    (nn.AdaptiveAvgPool2d(1), (2, 3, 6, 6), ("B", "C", "1", "1")),
    (nn.AdaptiveMaxPool3d(1), (2, 3, 4, 4, 4), ("B", "C", "1", "1", "1")),
    (nn.AdaptiveAvgPool2d(2), (2, 3, 6, 6), ("B", "C", "G", "G")),
])
def test_layers_re_anchor_after_an_unknown_op(layer, shape, want):
    """conv / conv-transpose of any dims, linear, norms and pools: the output layout comes from
    what the layer computes, so one unknown op does not poison the rest of the graph."""
    lay = _layouts(_Anchored(layer), torch.randn(*shape))
    assert "?" in "".join(lay["_unflatten"])
    assert lay["layer"] == want


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.lin = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        y = F.conv2d(_scramble(x), self.w)
        z = F.layer_norm(_scramble(y).flatten(2).transpose(1, 2), (4,))
        return F.batch_norm(_scramble(y), None, None, training=True), F.linear(z, self.lin)


def test_functional_layers_re_anchor_too():
    lay = _layouts(_Functional(), torch.randn(2, 3, 7, 7))
    assert lay["conv2d"] == ("B", "C", "S", "S")
    assert lay["layer_norm"] == ("B", "S", "C")
    assert lay["batch_norm"] == ("B", "C", "S", "S")
    assert lay["linear"] == ("B", "S", "C")


class _KnownTagsStay(nn.Module):
    """A layer re-anchors only what is unknown: pooled axes stay 1, ECA's conv1d slides over C."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Conv2d(8, 8, 1)
        self.padded = nn.Conv2d(8, 8, 3, padding=2)
        self.eca = nn.Conv1d(1, 1, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        u = x.mean((2, 3), keepdim=True)
        e = self.eca(u.squeeze(-1).transpose(-1, -2))
        return self.bn(self.fc(u)), self.padded(u), e


def test_layers_keep_the_tags_they_know():
    lay = _layouts(_KnownTagsStay(), torch.randn(2, 8, 5, 5))
    assert lay["fc"] == ("B", "C", "1", "1")
    assert lay["bn"] == ("B", "C", "1", "1")
    assert lay["padded"] == ("B", "C", "G", "G")  # a pooled value spread over a fixed 3x3 grid
    assert lay["eca"] == ("B", "C", "C")


# -- padding, cropping, slicing, narrow: every axis keeps its meaning -------------------------


class _Pads(nn.Module):
    def __init__(self, pad: nn.Module):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return self.pad(x)


@pytest.mark.parametrize("pad, shape", [
    (nn.ZeroPad1d(1), (2, 3, 5)), (nn.ZeroPad2d((0, 1, 0, 1)), (2, 3, 5, 5)), (nn.ZeroPad3d(1), (2, 3, 3, 3, 3)),
    (nn.ConstantPad1d(2, 0.5), (2, 3, 5)), (nn.ConstantPad2d(1, 0.0), (2, 3, 5, 5)),
    (nn.ConstantPad3d(1, 0.0), (2, 3, 3, 3, 3)),
    (nn.ReflectionPad1d(1), (2, 3, 5)), (nn.ReflectionPad2d(1), (2, 3, 5, 5)), (nn.ReflectionPad3d(1), (2, 3, 3, 3, 3)),
    (nn.ReplicationPad1d(1), (2, 3, 5)), (nn.ReplicationPad2d(1), (2, 3, 5, 5)),
    (nn.ReplicationPad3d(1), (2, 3, 3, 3, 3)),
    (nn.CircularPad1d(1), (2, 3, 5)), (nn.CircularPad2d(1), (2, 3, 5, 5)), (nn.CircularPad3d(1), (2, 3, 3, 3, 3)),
])
def test_padding_modules_keep_every_axis(pad, shape):
    lay = _layouts(_Pads(pad), torch.randn(*shape))
    assert lay["pad"] == ("B", "C") + ("S",) * (len(shape) - 2)


class _Crops(nn.Module):
    """F.pad on the channel axis (CIFAR ResNet option-A shortcut), crops, narrow, circular F.pad
    of a pooled vector (timm's CECA)."""

    def forward(self, x):
        a = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        b = F.pad(x, (-1, -1, -1, -1))
        c = x.narrow(2, 1, 3)
        d = torch.narrow(x, 1, 0, 2)
        e = F.pad(x.mean((2, 3)).view(x.shape[0], 1, -1), (1, 1), mode="circular")
        return a, b, c, d, e, x[..., 1:-1, :]


def test_padding_cropping_slicing_and_narrow_keep_the_channel_axis():
    lay = _layouts(_Crops(), torch.randn(2, 4, 6, 6))
    assert lay["pad"] == ("B", "C", "S", "S")
    assert lay["pad_1"] == ("B", "C", "S", "S")
    assert lay["narrow"] == ("B", "C", "S", "S")
    assert lay["narrow_1"] == ("B", "C", "S", "S")
    assert lay["pad_2"] == ("B", "1", "C")
    assert lay["getitem_2"] == ("B", "C", "S", "S")


# -- opaque leaves: from their type, else from their shapes -----------------------------------


class _ConvBlock(nn.Module):
    """A stem block kept as a leaf (its forward is untraceable): conv -> BN, shapes change."""

    def __init__(self, cin=3, cout=8):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 2, 1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx keeps this module as a leaf
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


class _PatchEmbed(nn.Module):
    """A patch embedding kept as a leaf: [N, 3, H, W] -> [N, L, C] tokens through a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, 4)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class _Crop(nn.Module):
    """A parameter-free leaf that keeps the rank (a crop): its input's tags carry over."""

    def forward(self, x):
        return x[:, :, 1:, 1:]


class _Reshaper(nn.Module):
    """A parameter-free leaf that changes the rank: unknown until the next layer."""

    def forward(self, x):
        return x.flatten(2)


class _Leaves(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.patch, self.crop, self.reshaper = _ConvBlock(), _PatchEmbed(), _Crop(), _Reshaper()
        self.conv = nn.Conv1d(8, 8, 1)

    def forward(self, x):
        return self.block(self.crop(x)), self.patch(x), self.conv(self.reshaper(self.block(x)))


def test_opaque_leaves_take_the_layout_of_their_last_layer_or_their_shapes():
    lay = _layouts(_Leaves(), torch.randn(2, 3, 8, 8), leaves=(_ConvBlock, _PatchEmbed, _Crop, _Reshaper))
    assert lay["crop"] == ("B", "C", "S", "S")  # same rank: the input's tags
    assert lay["block"] == ("B", "C", "S", "S")  # last layer: BatchNorm2d
    assert lay["patch"] == ("B", "S", "C")  # last layer: LayerNorm over the last axis
    assert lay["reshaper"] == ("?", "?", "?")  # nothing to read it from ...
    assert lay["conv"] == ("B", "C", "S")  # ... until the next layer


def test_untraceable_stem_becomes_a_leaf_with_a_layout():
    """asrfx.trace makes the failing block a leaf by itself; its output is still a feature map."""
    model = nn.Sequential(_ConvBlock(), nn.Conv2d(8, 8, 1))
    gm, lay = _traced(model, torch.randn(2, 3, 8, 8))
    calls = {str(n.target): lay[n] for n in gm.graph.nodes if n.op == "call_module"}
    assert calls == {"0": ("B", "C", "S", "S"), "1": ("B", "C", "S", "S")}


# -- model inputs: the layout their first layer reads ------------------------------------------


class _Audio(nn.Module):
    """[N, T, F] -> transpose -> Conv1d -> BN -> ReLU (audio models: time is the spatial axis)."""

    def __init__(self, feats=6):
        super().__init__()
        self.conv = nn.Conv1d(feats, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x.transpose(1, 2))))


class _FirstLayer(nn.Module):
    def __init__(self, layer: nn.Module, prepare):
        super().__init__()
        self.layer, self.prepare = layer, prepare

    def forward(self, x):
        return self.layer(self.prepare(x))


@pytest.mark.parametrize("model, shape, want", [
    (_Audio(), (2, 20, 6), ("B", "S", "C")),
    (_FirstLayer(nn.Linear(6, 8), lambda x: x * 2.0), (2, 20, 6), ("B", "S", "C")),  # [N, L, C] tokens
    (_FirstLayer(nn.LayerNorm(6), lambda x: x), (2, 20, 6), ("B", "S", "C")),
    (_FirstLayer(nn.Embedding(10, 8), lambda x: x), (2, 20), ("B", "S")),  # token ids
    (_FirstLayer(nn.Conv1d(1, 8, 3), lambda x: x.unsqueeze(1)), (2, 50), ("B", "S")),  # a waveform
    (_FirstLayer(nn.Conv2d(1, 8, 3), lambda x: x.unsqueeze(1)), (2, 12, 9), ("B", "S", "S")),  # a spectrogram
    (_FirstLayer(nn.Conv2d(3, 8, 3), lambda x: x.permute(0, 3, 1, 2)), (2, 9, 9, 3), ("B", "S", "S", "C")),
    (_FirstLayer(nn.Conv3d(3, 8, 1), lambda x: x.movedim(-1, 1)), (2, 4, 4, 4, 3), ("B", "S", "S", "S", "C")),
    (_FirstLayer(nn.Conv2d(3, 8, 3), lambda x: F.pad(x, (1, 1, 1, 1))), (2, 3, 9, 9), ("B", "C", "S", "S")),
    (_FirstLayer(nn.Identity(), lambda x: x.flatten(1)), (2, 3, 9, 9), ("B", "C", "S", "S")),  # no layer
])
def test_inputs_take_the_layout_their_first_layer_reads(model, shape, want):
    ids = isinstance(getattr(model, "layer", None), nn.Embedding)
    lay = _layouts(model, torch.randint(0, 10, shape) if ids else torch.randn(*shape))
    assert lay["x"] == want


def test_audio_input_transposed_inside_the_model():
    lay = _layouts(_Audio(), torch.randn(2, 20, 6))
    assert lay["transpose"] == ("B", "C", "S")
    assert lay["conv"] == ("B", "C", "S")
    assert lay["relu"] == ("B", "C", "S")


def test_embedding_gives_tokens():
    lay = _layouts(_FirstLayer(nn.Embedding(10, 8), lambda x: x), torch.randint(0, 10, (2, 5)))
    assert lay["layer"] == ("B", "S", "C")


# -- values that read only a shape carry no data -------------------------------------------------


class _ShapeOnly(nn.Module):
    def forward(self, x):
        g = x.mean((2, 3), keepdim=True)
        return torch.zeros_like(x), x.new_ones(x.shape[0], 4), g.to(x), torch.arange(x.shape[2])


def test_shape_only_reads_are_constants():
    lay = _layouts(_ShapeOnly(), torch.randn(2, 4, 5, 5))
    assert lay["zeros_like"] == ("C", "C", "C", "C")  # a constant: no batch or spatial data
    assert lay["new_ones"] == ("C", "C")
    assert lay["to"] == ("B", "C", "1", "1")  # g's layout: x lends only its dtype and device
    assert lay["arange"] == ("C",)


# -- where the layout was lost -------------------------------------------------------------------


def test_unknown_origins_name_the_node_that_lost_the_layout():
    class Lost(nn.Module):
        def forward(self, t):
            y = _to_grid(t)
            return (y * 2).mean((2, 3)), t.mean(1)

    gm, lay = _traced(Lost(), torch.randn(2, 6, 4))
    origins = unknown_origins(gm, lay)
    names = {n.name: o.name for n, o in origins.items()}
    assert names == {"_to_grid": "_to_grid", "mul": "_to_grid", "mean": "_to_grid", "output": "_to_grid"}


# -- property: whatever comes before, a layer re-anchors ------------------------------------------


_SCRAMBLERS = {
    "unknown": lambda x: _scramble(x),
    "pad": lambda x: F.pad(x, (1, 0) * (x.dim() - 2)),
    "crop": lambda x: x[(slice(None), slice(None)) + (slice(0, -1),) * (x.dim() - 2)],
    "narrow": lambda x: x.narrow(-1, 0, x.shape[-1] - 1),
    "scale": lambda x: x * 0.5,
}


class _Chain(nn.Module):
    def __init__(self, dims: int, ops: list[str], cin: int):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        self.ops = ops
        self.conv = conv(cin, 4, 1)

    def forward(self, x):
        for name in self.ops:
            x = _SCRAMBLERS[name](x)
        return self.conv(x)


@settings(max_examples=examples(60), deadline=None)
@given(st.integers(1, 3), st.lists(st.sampled_from(sorted(_SCRAMBLERS)), max_size=4), st.integers(1, 3),
       st.integers(1, 6), st.integers(1, 4))
@example(1, ["crop", "crop", "crop", "crop"], 1, 1, 1)  # crops to one pixel: still S, not a broadcast 1
@example(2, ["unknown"], 1, 1, 3)  # an unknown op on a batch of one: B again after the conv
def test_any_chain_of_ops_then_a_conv_is_a_feature_map(dims, ops, batch, size, cin):
    lay = _layouts(_Chain(dims, ops, cin), torch.randn(batch, cin, *([size + 4] * dims)))  # 4 crops at most
    assert lay["conv"] == ("B", "C") + ("S",) * dims
