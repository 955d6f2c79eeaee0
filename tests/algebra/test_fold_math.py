"""The folding math (asrfx.algebra.fold) against the layers it stands for, in float64.

Each fold is checked by running the layer: ``layer'(x) == layer(x) * v`` (output side) or
``layer'(x) == layer(x * v)`` (input side), with random tensors, groups, signs and zeros.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asrfx.algebra.fold import (
    embed,
    fold_conv_transpose_input_scale,
    fold_conv_transpose_output_affine,
    fold_input_scale,
    fold_input_shift,
    fold_output_affine,
    fold_scale_into_batchnorm_input,
    fold_shift_through_batchnorm,
    scale_along,
    shift_along,
)

D = torch.float64
gen = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=gen, dtype=D)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def per_channel(v, rank=4):
    return v.reshape((1, -1) + (1,) * (rank - 2))


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_conv_output_affine(groups):
    x, w, b, s, t = rand(2, 6, 5, 5), rand(6, 6 // groups, 3, 3), rand(6), rand(6), rand(6)
    w2, b2 = fold_output_affine(w, b, s, t)
    close(F.conv2d(x, w2, b2, padding=1, groups=groups),
          F.conv2d(x, w, b, padding=1, groups=groups) * per_channel(s) + per_channel(t))


def test_output_affine_creates_a_bias_only_for_a_shift():
    w, s, t = rand(4, 3), rand(4), rand(4)
    assert fold_output_affine(w, None, s)[1] is None
    close(fold_output_affine(w, None, None, t)[1], t)


@pytest.mark.parametrize("groups", [1, 3])
def test_conv_transpose_output_affine(groups):
    x, w, b, s, t = rand(2, 6, 4, 4), rand(6, 9 // groups, 3, 3), rand(9), rand(9), rand(9)
    w2, b2 = fold_conv_transpose_output_affine(w, b, groups, s, t)
    close(F.conv_transpose2d(x, w2, b2, groups=groups),
          F.conv_transpose2d(x, w, b, groups=groups) * per_channel(s) + per_channel(t))


@pytest.mark.parametrize("groups", [1, 3])
def test_conv_transpose_input_scale(groups):
    x, w, s = rand(2, 6, 4, 4), rand(6, 9 // groups, 3, 3), rand(6)
    close(F.conv_transpose2d(x, fold_conv_transpose_input_scale(w, s), groups=groups),
          F.conv_transpose2d(x * per_channel(s), w, groups=groups))


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_conv_input_scale_grouped_and_depthwise(groups):
    x, w, b, s = rand(2, 6, 5, 5), rand(12, 6 // groups, 3, 3), rand(12), rand(6)
    close(F.conv2d(x, fold_input_scale(w, s, groups), b, padding=1, groups=groups),
          F.conv2d(x * per_channel(s), w, b, padding=1, groups=groups))


def test_linear_input_scale_and_shift():
    x, w, b, s, t = rand(3, 5), rand(4, 5), rand(4), rand(5), rand(5)
    close(F.linear(x, fold_input_scale(w, s), b), F.linear(x * s, w, b))
    close(F.linear(x, w, fold_input_shift(w, b, t)), F.linear(x + t, w, b))


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_unpadded_conv_input_shift(groups):
    x, w, b, t = rand(2, 6, 5, 5), rand(12, 6 // groups, 3, 3), rand(12), rand(6)
    close(F.conv2d(x, w, fold_input_shift(w, b, t, groups), groups=groups),
          F.conv2d(x + per_channel(t), w, b, groups=groups))
    close(F.conv2d(x, w, fold_input_shift(w, None, t, groups), groups=groups),
          F.conv2d(x + per_channel(t), w, None, groups=groups))


def _bn(x, mean, var, w, b, eps):
    return F.batch_norm(x, mean, var, w, b, False, 0.0, eps)


def test_shift_through_batchnorm_uses_eps():
    x, mean, var, w, b, t = rand(2, 4, 3, 3), rand(4), rand(4).abs() + 0.1, rand(4), rand(4), rand(4)
    eps = 0.3  # large: a fold that forgets it is off by far more than the tolerance
    close(_bn(x, mean, var, w, fold_shift_through_batchnorm(b, w, var, eps, t), eps),
          _bn(x + per_channel(t), mean, var, w, b, eps))
    close(_bn(x, mean, var, None, fold_shift_through_batchnorm(b, None, var, eps, t), eps),
          _bn(x + per_channel(t), mean, var, None, b, eps))


def test_scale_into_batchnorm_input_with_negative_and_zero_entries():
    x, mean, var, w, b = rand(2, 5, 3, 3), rand(5), rand(5).abs() + 0.1, rand(5), rand(5)
    s = torch.tensor([2.0, -0.5, 0.0, 1e-3, -3.0], dtype=D)
    eps = 0.2
    mean2, w2, b2 = fold_scale_into_batchnorm_input(mean, w, b, var, eps, s)
    close(_bn(x, mean2, var, w2, b2, eps), _bn(x * per_channel(s), mean, var, w, b, eps))


def test_embed_places_a_part_among_neutral_entries():
    part = rand(3)
    close(embed(part, 2, 7, 1.0), torch.cat([torch.ones(2, dtype=D), part, torch.ones(2, dtype=D)]))
    close(embed(part, 0, 5, 0.0), torch.cat([part, torch.zeros(2, dtype=D)]))
    assert embed(part, 0, 3, 1.0) is part


def test_scale_and_shift_along_an_axis():
    t, v = rand(3, 4, 1, 1), rand(4)
    close(scale_along(t, v, 1), t * v.reshape(1, 4, 1, 1))
    close(shift_along(t, v, 1), t + v.reshape(1, 4, 1, 1))
    g, u = rand(5, 1, 1, 1), rand(5)
    close(scale_along(g, u, 0), g * u.reshape(5, 1, 1, 1))


def test_the_float64_folds_keep_their_public_names_for_graphs_and_pickles(tmp_path):
    """The training fast path puts fold_input_scale / scale_along into graphs as call targets: fx's
    generated code and a pickled GraphModule find them by name in asrfx.algebra.fold."""
    import pickle

    import asrfx
    from asrfx.algebra import fold
    from torch import nn

    for name in fold.__all__:
        assert getattr(fold, name).__name__ == name and getattr(fold, name).__qualname__ == name
    class FunctionalConsumer(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn, self.se = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), asrfx.attention.SE(6, reduction=2)
            self.weight = nn.Parameter(torch.randn(2, 6, 1, 1))

        def forward(self, x):
            return F.conv2d(self.se(F.hardswish(self.bn(self.stem(x)))), self.weight)

    x = torch.randn(2, 3, 7, 7)
    gm = asrfx.convert(FunctionalConsumer(), x)
    assert any(getattr(n.target, "__name__", "") == "fold_input_scale" for n in gm.graph.nodes), gm.code
    again = pickle.loads(pickle.dumps(gm))
    torch.testing.assert_close(again(x), gm(x))
