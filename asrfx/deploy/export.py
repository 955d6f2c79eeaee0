"""asrfx.fuse on a torch.export ExportedProgram: unlift, fold as a functional graph, export again."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import AsrfxError
from ..graph.layers import call_argument
from ..graph.ops import op_of
from ..passes.contract import attach_report, mark_psi_attributes
from .frozen import fuse_frozen

__all__ = ["fuse_exported"]


def fuse_exported(program: torch.export.ExportedProgram, dynamic_shapes: Any) -> torch.export.ExportedProgram:
    """Unlift the program (parameters become get_attr constants), fold, export again."""
    training = [n.name for n in program.graph.nodes if n.op == "call_function" and op_of(n, {}).name == "batch_norm"
                and call_argument(n, "training") is True]
    if training:
        raise AsrfxError(f"the exported program normalizes with batch statistics ('{training[0]}'): export the "
                         "model in eval mode (call .eval() before torch.export.export), then fuse")
    if program.example_inputs is None:
        raise AsrfxError("the exported program keeps no example inputs (it was loaded or built without them): "
                         "fuse the GraphModule from asrfx.convert, then export it")
    args, kwargs = program.example_inputs
    module = program.module()  # a new module: the program itself is never changed
    mark_psi_attributes(module)
    report = fuse_frozen(module, args, kwargs)  # the module takes the program's call structure
    fused = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes)
    attach_report(fused.graph_module, report)
    return fused
