"""Folding math: pure functions of tensors (graph code in fuse.py calls these).

Each function returns new tensors and leaves its arguments alone. ``scale`` and
``shift`` are per-channel vectors of length C; the layer computes ``y = f(x)`` and the
fold makes it compute ``y * scale + shift`` (output side) or ``f(x * scale + shift)``
(input side).
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


def fold_output_affine(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Output channel c of a layer whose weight has output channels on axis 0.

    Conv (any groups), Linear, and the affine of BatchNorm/GroupNorm/LayerNorm (a
    weight vector): ``(W x + b) * s + t == (W * s) x + (b * s + t)`` (paper eqs. 6, 7).
    A missing bias is created only when a shift needs it.
    """
    if weight is not None and scale is not None:
        weight = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    if bias is not None and scale is not None:
        bias = bias * scale
    if shift is not None:
        bias = shift.clone() if bias is None else bias + shift
    return weight, bias


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
        w = weight.reshape(groups, c_in // groups, per_group, *weight.shape[2:])
        s = scale.reshape(groups, 1, per_group, *([1] * (weight.dim() - 2)))
        weight = (w * s).reshape(weight.shape)
    _, bias = fold_output_affine(None, bias, scale, shift)
    return weight, bias


def fold_input_scale(weight: torch.Tensor, scale: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A consumer conv/linear reading ``x * s``: scale its input-channel slices.

    Weight is [C_out, C_in / groups, *k] (Linear: [out, in], groups 1). Input channel
    ``g * (C_in / groups) + i`` meets column i of group g's output rows. Exact with zero
    padding too, since padded zeros stay zero.
    """
    c_out, per_group = weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, c_out // groups, per_group, *weight.shape[2:])
    s = scale.reshape(groups, 1, per_group, *([1] * (weight.dim() - 2)))
    return (w * s).reshape(weight.shape)


def fold_input_shift(weight: torch.Tensor, bias: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor:
    """A consumer reading ``x + t`` with no padding (Linear, or a conv whose every window
    lies inside the input): ``W (x + t) + b == W x + (b + sum(W * t))``. Groups 1 only."""
    t = shift.reshape((1, -1) + (1,) * (weight.dim() - 2))
    extra = (weight * t).sum(dim=tuple(range(1, weight.dim())))
    return extra if bias is None else bias + extra


def fold_shift_through_batchnorm(
    bias: torch.Tensor, weight: torch.Tensor | None, running_var: torch.Tensor, eps: float, shift: torch.Tensor
) -> torch.Tensor:
    """An eval-mode BatchNorm reading ``y + c``: ``BN(y + c) == BN(y) + c * gamma / sqrt(var + eps)``."""
    gamma = torch.ones_like(running_var) if weight is None else weight
    return bias + shift * gamma / torch.sqrt(running_var + eps)
