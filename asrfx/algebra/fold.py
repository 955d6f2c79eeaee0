"""Folding math: pure functions of tensors (graph code in fuse.py calls these).

Each function returns new tensors and leaves its arguments alone. ``scale`` and
``shift`` are per-channel vectors of length C; the layer computes ``y = f(x)`` and the
fold makes it compute ``y * scale + shift`` (output side) or ``f(x * scale + shift)``
(input side).

Folds are computed in float64 and each result is cast back to the dtype of the parameter
it replaces (:func:`_in_float64`): a bfloat16 or float16 model is rounded once per fold,
not once per operation.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.fx  # Proxy: a fold met while torch.fx traces a graph that calls it

__all__ = [
    "embed",
    "fold_output_affine",
    "fold_conv_transpose_output_affine",
    "fold_input_scale",
    "fold_conv_transpose_input_scale",
    "fold_input_shift",
    "fold_shift_through_batchnorm",
    "fold_scale_into_batchnorm_input",
    "scale_along",
    "shift_along",
]


def _in_float64(*results: tuple[str, ...]):
    """Run the decorated fold on float64 copies of its floating-point arguments and cast result i
    to the dtype of the first argument named in ``results[i]`` that is a tensor (the parameter it
    replaces; for a created bias, the weight's). Applied as ``fold_x = _in_float64(...)(_fold_x)``
    rather than as a decorator, so mutation testing (mutmut mutates undecorated functions only)
    reaches the folding math (docs/testing.md)."""

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            traced = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.fx.Proxy)), None)
            if traced is not None:  # a graph calling a fold is traced again (fx re-traces a GraphModule it
                # unpickles): the fold stays one call, as torch.fx.wrap would keep it
                return traced.tracer.create_proxy("call_function", run, args, kwargs)
            bound = signature.bind(*args, **kwargs).arguments
            dtypes = [next((bound[n].dtype for n in names if isinstance(bound.get(n), torch.Tensor)), None)
                      for names in results]
            wide = {k: v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                    for k, v in bound.items()}
            out = fn(**wide)
            outs = out if isinstance(out, tuple) else (out,)
            outs = tuple(o.to(d) if isinstance(o, torch.Tensor) and d is not None else o for o, d in zip(outs, dtypes))
            return outs if isinstance(out, tuple) else outs[0]

        run.__name__ = run.__qualname__ = fn.__name__.lstrip("_")  # the public name: fx code and pickles find it
        # the same math in the arguments' own dtype, for a layer that applies it at every training
        # step (autograd through it): float64 copies there would only cost casts, forward and backward
        run.in_dtype = fn
        return run

    return wrap


def embed(part: torch.Tensor, offset: int, width: int, neutral: float) -> torch.Tensor:
    """A length-``width`` vector holding ``part`` at ``offset`` and ``neutral`` (1 for a scale, 0 for a
    shift) elsewhere: the gate as seen by a layer that also carries channels the gate does not touch
    (one input of a concatenation, one piece of a split)."""
    if offset == 0 and part.numel() == width:
        return part
    full = torch.full((width,), neutral, dtype=part.dtype, device=part.device)
    full[offset: offset + part.numel()] = part
    return full


def _fold_output_affine(
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


fold_output_affine = _in_float64(("weight",), ("bias", "weight", "shift"))(_fold_output_affine)


def _fold_conv_transpose_output_affine(
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


fold_conv_transpose_output_affine = _in_float64(("weight",), ("bias", "weight"))(_fold_conv_transpose_output_affine)


def _fold_input_scale(weight: torch.Tensor, scale: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A consumer conv/linear reading ``x * s``: scale its input-channel slices.

    Weight is [C_out, C_in / groups, *k] (Linear: [out, in], groups 1). Input channel
    ``g * (C_in / groups) + i`` meets column i of group g's output rows. Exact with zero
    padding too, since padded zeros stay zero.
    """
    c_out, per_group = weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, c_out // groups, per_group, *weight.shape[2:])
    s = scale.reshape(groups, 1, per_group, *([1] * (weight.dim() - 2)))
    return (w * s).reshape(weight.shape)


fold_input_scale = _in_float64(("weight",))(_fold_input_scale)


def _fold_conv_transpose_input_scale(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A ConvTranspose reading ``x * s``: its weight is [C_in, C_out / groups, *k], input channel c
    is row c whatever the groups."""
    return weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))


fold_conv_transpose_input_scale = _in_float64(("weight",))(_fold_conv_transpose_input_scale)


def _fold_input_shift(weight: torch.Tensor, bias: torch.Tensor | None, shift: torch.Tensor,
                     groups: int = 1) -> torch.Tensor:
    """A consumer reading ``x + t`` with no padding (Linear, or a conv whose every window lies
    inside the input): ``W (x + t) + b == W x + (b + sum(W * t))``; output channel o of group g
    sums over its group's input slice. Returns the new bias."""
    c_out, per_group = weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, c_out // groups, per_group, *weight.shape[2:])
    t = shift.reshape(groups, 1, per_group, *([1] * (weight.dim() - 2)))
    extra = (w * t).sum(dim=tuple(range(2, w.dim()))).reshape(c_out)
    return extra if bias is None else bias + extra


fold_input_shift = _in_float64(("bias", "weight"))(_fold_input_shift)


def _fold_shift_through_batchnorm(
    bias: torch.Tensor, weight: torch.Tensor | None, running_var: torch.Tensor, eps: float, shift: torch.Tensor
) -> torch.Tensor:
    """An eval-mode BatchNorm reading ``y + c``: ``BN(y + c) == BN(y) + c * gamma / sqrt(var + eps)``."""
    gamma = torch.ones_like(running_var) if weight is None else weight
    return bias + shift * gamma / torch.sqrt(running_var + eps)


fold_shift_through_batchnorm = _in_float64(("bias",))(_fold_shift_through_batchnorm)


def _fold_scale_into_batchnorm_input(
    running_mean: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_var: torch.Tensor, eps: float,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm reading ``x * s``: returns (running_mean, weight, bias) such that
    ``BN'(x) == BN(x * s)``.

    ``(x s - m) / d * g + b == (x - m / s) / d * (g s) + b`` with ``d = sqrt(var + eps)``; where
    ``s == 0`` the output is the constant ``b - m g / d``, so the mean is 0, the weight 0 and the
    bias takes that constant. The running variance (and eps) stay as they are.
    """
    zero = scale == 0
    safe = torch.where(zero, torch.ones_like(scale), scale)
    mean = torch.where(zero, torch.zeros_like(running_mean), running_mean / safe)
    new_bias = torch.where(zero, bias - running_mean * weight / torch.sqrt(running_var + eps), bias)
    return mean, weight * scale, new_bias


fold_scale_into_batchnorm_input = _in_float64(("running_mean",), ("weight",), ("bias",))(_fold_scale_into_batchnorm_input)


def _scale_along(tensor: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """``tensor`` with its slices along ``axis`` multiplied by ``scale`` (a parameter inside a
    weight's computation, a layer scale): ``(t * g) * v == t * (g * v)``."""
    shape = [1] * tensor.dim()
    shape[axis] = -1
    return tensor * scale.reshape(shape)


scale_along = _in_float64(("tensor",))(_scale_along)


def _shift_along(tensor: torch.Tensor, shift: torch.Tensor, axis: int) -> torch.Tensor:
    """``tensor`` with ``shift`` added along ``axis`` (a bias added in the graph: ``(x + b) + c``)."""
    shape = [1] * tensor.dim()
    shape[axis] = -1
    return tensor + shift.reshape(shape)


shift_along = _in_float64(("tensor",))(_shift_along)
