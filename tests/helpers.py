"""Shared test helpers."""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["randomize", "examples"]

_SCALE = {"deep": 10}.get(os.environ.get("HYPOTHESIS_PROFILE", "ci"), 1)


def examples(n: int) -> int:
    """A property test's example budget: ``n`` in CI, ten times that in the ``deep`` profile (conftest.py)."""
    return n * _SCALE


def randomize(model: nn.Module, seed: int, *, scale: float = 0.4, mean_scale: float = 0.3) -> nn.Module:
    """Random parameters and BatchNorm running statistics (never the defaults), in place.

    Parameters ~ N(0, scale^2); running means ~ N(0, mean_scale^2); running variances in [0.5, 1.5).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen,
                                                 dtype=m.running_mean.dtype) * mean_scale)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype) + 0.5)
    return model
