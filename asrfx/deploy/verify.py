"""Invariant checker for fused graphs (run by fuse; callable on its own)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from ..errors import AsrfxError
from ..passes.contract import check_fused, report_of
from ..passes.fuse import FuseReport
from ..graph.capture import as_input_tuple
from ..graph.edit import params_and_buffers

__all__ = ["verify"]


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise AsrfxError(f"{what} holds {int((~torch.isfinite(tensor)).sum())} NaN or infinite value(s) of "
                         f"{tensor.numel()}")


def _count(model: nn.Module | int) -> int:
    return model if isinstance(model, int) else sum(p.numel() for p in model.parameters())


def verify(
    fused: fx.GraphModule,
    reference: nn.Module | None = None,
    example_inputs: Any = None,
    *,
    backbone: nn.Module | int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Check a fused model: invariants, finite weights, optionally parameter count and outputs.

    ``backbone``: a module (or a parameter count) the fused model must match in size.
    ``reference`` + ``example_inputs``: outputs must be finite and agree (default tolerances
    1e-5 relative in float32, 1e-10 in float64). Raises AsrfxError saying what differs.
    """
    report = report_of(fused)
    if isinstance(report, FuseReport):
        check_fused(fused)
    for name, tensor in params_and_buffers(fused):
        _check_finite(tensor, f"the fused model's '{name}'")
    if backbone is not None and _count(fused) != _count(backbone):
        raise AsrfxError(f"fused model has {_count(fused):,} parameters, the backbone {_count(backbone):,}")
    if reference is not None:
        inputs = as_input_tuple(example_inputs)
        with torch.no_grad():
            got, want = fused(*inputs), reference(*inputs)
        for out in tree_leaves(got):
            if isinstance(out, torch.Tensor):
                _check_finite(out, "the fused model's output")
        double = want.dtype == torch.float64
        rtol = rtol if rtol is not None else (1e-10 if double else 1e-5)
        atol = atol if atol is not None else (1e-10 if double else 1e-5) * max(want.abs().max().item(), 1.0)
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        except AssertionError as exc:
            raise AsrfxError(f"fused outputs differ from the reference: {str(exc).splitlines()[1:3]}") from exc
