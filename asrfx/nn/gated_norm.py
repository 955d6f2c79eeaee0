"""Modules asrfx installs into converted graphs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedBatchNorm"]


class GatedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose output is scaled per channel by a gate, inside the affine.

    ``GatedBatchNorm(x, v) == BatchNorm(x) * v.view(1, C, 1, ...)`` in training and in
    eval mode (paper eq. 7: ``BN(x; gamma * v, beta * v)``), without the extra pass over
    the feature map that a separate multiply costs. It takes over the parameters and
    buffers of the BatchNorm it replaces, under the same names, so state_dicts match.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.weight, self.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            self.running_mean, self.running_var = bn.running_mean, bn.running_var
            self.num_batches_tracked = bn.num_batches_tracked
        self.train(bn.training)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GatedBatchNorm expects at least 2D input, got {input.dim()}D")

    def forward(self, input: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # noqa: A002
        # same bookkeeping as torch.nn.BatchNorm's forward
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        weight = gate if self.weight is None else self.weight * gate
        bias = None if self.bias is None else self.bias * gate
        return F.batch_norm(
            input,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            weight,
            bias,
            use_batch_stats,
            factor,
            self.eps,
        )
