"""Invariant checker for fused graphs (run by fuse; callable on its own)."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from ..errors import AsrfxError
from ..passes.contract import check_fused, report_of
from ..passes.fuse import FuseReport
from ..graph.capture import as_input_tuple, as_kwargs
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
    example_kwargs: dict[str, Any] | None = None,
    backbone: nn.Module | int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Check a fused model: invariants, finite weights, optionally parameter count and outputs.

    ``backbone``: a module (or a parameter count) the fused model must match in size.
    ``reference`` + ``example_inputs`` (+ ``example_kwargs``): both are called as
    ``m(*example_inputs, **example_kwargs)``; their outputs must be finite, have the same
    structure (tensor, tuple, dict, dataclass) and agree tensor by tensor (default tolerances
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
        inputs, kwargs = as_input_tuple(example_inputs), as_kwargs(example_kwargs)
        with torch.no_grad():
            got, want = fused(*inputs, **kwargs), reference(*inputs, **kwargs)
        got_leaves, got_spec = pytree.tree_flatten(got)
        want_leaves, want_spec = pytree.tree_flatten_with_path(want)
        if got_spec != want_spec:
            raise AsrfxError(f"fused outputs have another structure than the reference's: {got_spec} vs {want_spec}")
        for g, (path, w) in zip(got_leaves, want_leaves):
            where = pytree.keystr(path)
            if isinstance(g, torch.Tensor):
                _check_finite(g, f"the fused model's output{where}")
            if not isinstance(w, torch.Tensor):
                if g != w:
                    raise AsrfxError(f"fused output {where} is {g!r}, the reference's {w!r}")
                continue
            double = w.dtype == torch.float64
            r = rtol if rtol is not None else (1e-10 if double else 1e-5)
            a = atol if atol is not None else (1e-10 if double else 1e-5) * max(w.abs().max().item() if w.numel() else 0, 1.0)
            try:
                torch.testing.assert_close(g, w, rtol=r, atol=a)
            except AssertionError as exc:
                raise AsrfxError(f"fused output {where} differs from the reference: "
                                 f"{str(exc).splitlines()[1:3]}") from exc
