"""Fuse for graphs of functional calls whose parameters are graph constants.

TorchDynamo graphs (after the backend freezes the parameter inputs) and exported
programs (``ExportedProgram.module()``) call ``conv2d(x, w, b)``, ``batch_norm(x, ...)``
and read their parameters with ``get_attr``. There is no ``convert`` metadata on
their nodes, so psi is found by name (a parameter whose own name starts with ``psi``,
as convert names it). Then:

1. fuse's pass folds every computed constant gate into the calls around it;
2. what is left of a psi branch (a gate convert applied inside a BatchNorm's affine or a
   conv's input weights reaches it as ``weight * gate``) goes into that parameter, or becomes
   one constant (:func:`asrfx.passes.fuse.fold_psi_remainders`, shared with plain graphs);
3. the invariants are checked: nothing reads a psi, no computed constant gate is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import fx

from ..graph.capture import propagate_shapes
from ..passes.contract import check_fused
from ..passes.fuse import FuseReport, fuse_graph

__all__ = ["fuse_frozen"]


def fuse_frozen(gm: fx.GraphModule, data_inputs: Sequence[Any], data_kwargs: dict[str, Any] | None = None) -> FuseReport:
    """Fold every constant gate of ``gm`` in place; raise AsrfxError if an invariant fails.
    ``gm`` is called as ``gm(*data_inputs, **data_kwargs)`` for the shapes."""
    propagate_shapes(gm, data_inputs, data_kwargs)
    gm, report = fuse_graph(gm)  # its last step folds what is left of each psi branch (fold_psi_remainders)
    check_fused(gm)
    return report
