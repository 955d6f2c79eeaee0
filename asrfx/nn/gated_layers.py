"""Conv and Linear layers that apply a gate through their weights.

``GatedConv2d(x, v)`` equals ``Conv2d(x * v.view(1, C_in, 1, 1))`` (``side="input"``) or
``Conv2d(x) * v.view(1, C_out, 1, 1)`` (``side="output"``) for any v, in training and in eval
mode: the layer multiplies its weight's input-channel slices by v (or its output rows and its
bias), a weight-sized multiply instead of a feature-map-sized one, forward and backward.
Convert installs them where an ASR gate's tensor comes out of convs or linear layers (through
ops the gate commutes with; the producer-side twin of :class:`GatedBatchNorm`) or, when its
producer cannot take the gate, where it is read only by convs or linear layers (through ops
that keep the channel axis). Each takes over the parameters of the layer it replaces under the
same names (state_dicts match) and is an instance of that layer's class; :meth:`folded` gives
the plain layer back with the constant gate inside its parameters, which is what fuse deploys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..algebra.fold import fold_input_scale, fold_output_affine

__all__ = ["WeightGated", "GatedConv1d", "GatedConv2d", "GatedConv3d", "GatedLinear", "GATED", "gated_layer"]


class WeightGated:
    """Shared by the gated layers: built from a plain layer, folded back into one."""

    plain: type[nn.Module]  # the layer class it replaces and folds back into
    gate_side: str  # "input": the gate scales the input channels; "output": the output channels

    @classmethod
    def take_over(cls, layer: nn.Module, side: str) -> nn.Module:
        """A gated layer with ``layer``'s configuration, parameters (shared, same names) and mode."""
        if side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', got {side!r}")
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)  # configuration (stride, padding, groups ...), hooks, mode
        # own containers: the two modules must not share one parameter dict
        new._parameters = dict(layer._parameters)
        new._buffers = dict(layer._buffers)
        new._modules = dict(layer._modules)
        new.gate_side = side
        return new

    def gated_parameters(self, gate: torch.Tensor, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) with the gate inside: in the parameters' dtype while training (``exact``
        False), computed in float64 for the deployed layer (``exact``)."""
        scale = fold_input_scale if exact else fold_input_scale.in_dtype
        affine = fold_output_affine if exact else fold_output_affine.in_dtype
        if self.gate_side == "input":
            return scale(self.weight, gate.reshape(-1), getattr(self, "groups", 1)), self.bias
        return affine(self.weight, self.bias, gate.reshape(-1))

    def folded(self, gate: torch.Tensor) -> nn.Module:
        """The plain layer computing ``self(x, gate)`` for this constant gate (same parameter names)."""
        plain = self.plain.__new__(self.plain)
        plain.__dict__.update(self.__dict__)
        del plain.__dict__["gate_side"]
        plain._parameters = dict(self._parameters)
        plain._buffers = dict(self._buffers)
        plain._modules = dict(self._modules)
        with torch.no_grad():
            weight, bias = self.gated_parameters(gate.to(self.weight.dtype), exact=True)
        plain.weight = nn.Parameter(weight.detach().clone(), requires_grad=self.weight.requires_grad)
        if bias is not None and bias is not self.bias:
            plain.bias = nn.Parameter(bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate on the {self.gate_side} channels"


class _GatedConv(WeightGated):
    """The forward of the gated convolutions of every dimension."""

    def forward(self, input: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return self._conv_forward(input, *self.gated_parameters(gate))


class GatedConv1d(_GatedConv, nn.Conv1d):
    """``Conv1d(x * v)`` or ``Conv1d(x) * v``, computed as a Conv1d with v in its weights."""

    plain = nn.Conv1d


class GatedConv2d(_GatedConv, nn.Conv2d):
    """``Conv2d(x * v)`` or ``Conv2d(x) * v``, computed as a Conv2d with v in its weights."""

    plain = nn.Conv2d


class GatedConv3d(_GatedConv, nn.Conv3d):
    """``Conv3d(x * v)`` or ``Conv3d(x) * v``, computed as a Conv3d with v in its weights."""

    plain = nn.Conv3d


class GatedLinear(WeightGated, nn.Linear):
    """``Linear(x * v)`` or ``Linear(x) * v`` (v along the last axis), computed as a Linear with v in its weights."""

    plain = nn.Linear

    def forward(self, input: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return F.linear(input, *self.gated_parameters(gate))


# exactly these layer classes (a subclass may compute its weight or its output differently)
GATED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: GatedConv1d, nn.Conv2d: GatedConv2d, nn.Conv3d: GatedConv3d, nn.Linear: GatedLinear,
}


def gated_layer(layer: nn.Module, side: str) -> nn.Module | None:
    """The gated twin of ``layer`` sharing its parameters, or None for a layer class without one."""
    cls = GATED.get(type(layer))
    return cls.take_over(layer, side) if cls is not None else None
