"""Shared test helpers."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

__all__ = ["randomize", "examples", "through_backend", "fresh_shapes", "carried_shapes"]

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


def through_backend(model: nn.Module, *inputs, **options):
    """``model(*inputs)`` compiled by the asrfx backend, no gradients, with an inner backend that
    keeps every graph the backend hands it (and runs it as it is): (output, graphs)."""
    import asrfx.dynamo  # noqa: F401  (registers the backend)

    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="asrfx", options={"inner": inner, **options})(*inputs)
    return out, graphs


def fresh_shapes(gm, inputs) -> list:
    """(tensor_meta, device) per node of a copy of ``gm`` stripped of both and propagated anew."""
    fresh = copy.deepcopy(gm)
    for n in fresh.graph.nodes:
        n.meta.pop("tensor_meta", None)
        n.meta.pop("device", None)
    from asrfx.graph.capture import propagate_shapes

    propagate_shapes(fresh, inputs)
    return [(n.meta.get("tensor_meta"), n.meta.get("device")) for n in fresh.graph.nodes]


def carried_shapes(gm) -> list:
    """(tensor_meta, device) per node, as the graph carries them."""
    return [(n.meta.get("tensor_meta"), n.meta.get("device")) for n in gm.graph.nodes]
