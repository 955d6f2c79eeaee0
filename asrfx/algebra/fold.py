"""Folding math: pure functions of tensors (graph code in fuse.py calls these).

Each function returns new tensors and leaves its arguments alone. ``scale`` and
``shift`` are per-channel vectors of length C; the layer computes ``y = f(x)`` and the
fold makes it compute ``y * scale + shift`` (output side) or ``f(x * scale + shift)``
(input side).

Folds are computed in float64 and each result is cast back to the dtype of the parameter
it replaces: a bfloat16 or float16 model is rounded once per fold, not once per operation.
"""

from __future__ import annotations

import torch

__all__ = [
    "fold_output_affine",
    "fold_conv_transpose_output_affine",
    "fold_input_scale",
    "fold_input_shift",
    "fold_shift_through_batchnorm",
]


def _wide(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.to(torch.float64) if t is not None and t.is_floating_point() else t


def _back(t: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return t.to(like.dtype) if t is not None and like is not None else t


def fold_output_affine(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Output channel c of a layer whose weight has output channels on axis 0.

    Conv (any groups), Linear, and the affine of BatchNorm/GroupNorm/LayerNorm (a
    weight vector): ``(W x + b) * s + t == (W * s) x + (b * s + t)`` (paper eqs. 6, 7).
    A missing bias is created only when a shift needs it, in the weight's dtype.
    """
    like_w, like_b = weight, bias if bias is not None else weight if weight is not None else shift
    weight, bias, scale, shift = _wide(weight), _wide(bias), _wide(scale), _wide(shift)
    if weight is not None and scale is not None:
        weight = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    if bias is not None and scale is not None:
        bias = bias * scale
    if shift is not None:
        bias = shift.clone() if bias is None else bias + shift
    return _back(weight, like_w), _back(bias, like_b)


def fold_conv_transpose_output_affine(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ConvTranspose: weight is [C_in, C_out / groups, *k]; output channel
    ``g * (C_out / groups) + j`` is column j of group g's rows."""
    if scale is not None:
        c_in, per_group = weight.shape[0], weight.shape[1]
        w = _wide(weight).reshape(groups, c_in // groups, per_group, *weight.shape[2:])
        s = _wide(scale).reshape(groups, 1, per_group, *([1] * (weight.dim() - 2)))
        weight = _back((w * s).reshape(weight.shape), weight)
    _, bias = fold_output_affine(None, bias, scale, shift)
    return weight, _back(bias, weight)


def fold_input_scale(weight: torch.Tensor, scale: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A consumer conv/linear reading ``x * s``: scale its input-channel slices.

    Weight is [C_out, C_in / groups, *k] (Linear: [out, in], groups 1). Input channel
    ``g * (C_in / groups) + i`` meets column i of group g's output rows. Exact with zero
    padding too, since padded zeros stay zero.
    """
    c_out, per_group = weight.shape[0], weight.shape[1]
    w = _wide(weight).reshape(groups, c_out // groups, per_group, *weight.shape[2:])
    s = _wide(scale).reshape(groups, 1, per_group, *([1] * (weight.dim() - 2)))
    return _back((w * s).reshape(weight.shape), weight)


def fold_input_shift(weight: torch.Tensor, bias: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor:
    """A consumer reading ``x + t`` with no padding (Linear, or a conv whose every window
    lies inside the input): ``W (x + t) + b == W x + (b + sum(W * t))``. Groups 1 only."""
    t = _wide(shift).reshape((1, -1) + (1,) * (weight.dim() - 2))
    extra = (_wide(weight) * t).sum(dim=tuple(range(1, weight.dim())))
    return _back(extra if bias is None else _wide(bias) + extra, bias if bias is not None else weight)


def fold_shift_through_batchnorm(
    bias: torch.Tensor, weight: torch.Tensor | None, running_var: torch.Tensor, eps: float, shift: torch.Tensor
) -> torch.Tensor:
    """An eval-mode BatchNorm reading ``y + c``: ``BN(y + c) == BN(y) + c * gamma / sqrt(var + eps)``."""
    var = _wide(running_var)
    gamma = torch.ones_like(var) if weight is None else _wide(weight)
    return _back(_wide(bias) + _wide(shift) * gamma / torch.sqrt(var + eps), bias)
