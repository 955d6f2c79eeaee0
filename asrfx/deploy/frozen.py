"""Fuse for graphs of functional calls whose parameters are graph constants.

TorchDynamo graphs (after the backend freezes the parameter inputs) and exported
programs (``ExportedProgram.module()``) call ``conv2d(x, w, b)``, ``batch_norm(x, ...)``
and read their parameters with ``get_attr``. There is no ``convert`` metadata on
their nodes, so psi is found by name (a parameter whose own name starts with ``psi``,
as convert names it). Then:

1. fuse's pass folds every computed constant gate into the calls around it;
2. what is left of a psi branch (a gate convert applied inside a BatchNorm's affine
   reaches it as ``weight * gate``) becomes one constant per parameter;
3. the invariants are checked: nothing reads a psi, no computed constant gate is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from ..graph.capture import propagate_shapes
from ..graph.dataflow import ancestors, input_dependence
from ..graph.edit import copy_meta, finish, unique_attr_name
from ..passes.contract import ASR_META, Role, check_fused, psi_dependent, role_of, site_of
from ..passes.fuse import ConstantEvaluator, Fold, FuseReport, drop_unused_attributes, fuse_graph

__all__ = ["fuse_frozen"]


def fuse_frozen(gm: fx.GraphModule, data_inputs: Sequence[Any], data_kwargs: dict[str, Any] | None = None) -> FuseReport:
    """Fold every constant gate of ``gm`` in place; raise AsrfxError if an invariant fails.
    ``gm`` is called as ``gm(*data_inputs, **data_kwargs)`` for the shapes."""
    propagate_shapes(gm, data_inputs, data_kwargs)
    gm, report = fuse_graph(gm)
    _fold_psi_remainders(gm, report)
    check_fused(gm)
    return report


def _fold_psi_remainders(gm: fx.GraphModule, report: FuseReport) -> None:
    """Each psi-derived value that a data-reading call consumes becomes one stored constant."""
    dependent = psi_dependent(gm)
    if not dependent:
        return
    # shape reads count as data here: a psi value shaped by the batch (view(g, x.size(0), ...))
    # must not be frozen at the example's batch size
    reads_data = input_dependence(gm, shape_reads=True)
    evaluator = ConstantEvaluator(gm)
    absorbed: dict[tuple[str, str], None] = {}  # (site, call) pairs in order, each reported once
    for node in list(gm.graph.nodes):
        if node not in dependent or reads_data[node] or node.op == "get_attr":
            continue
        users = [u for u in node.users if u not in dependent or reads_data[u]]
        if not users:
            continue
        value = evaluator.value(node)
        if not isinstance(value, torch.Tensor):
            continue
        attr = unique_attr_name(gm, "asr_constant")
        # it stands for parameters (a BatchNorm's weight times the gate): it stays one
        gm.register_parameter(attr, nn.Parameter(value.detach().clone(), requires_grad=False))
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(attr)
        copy_meta(node, const)
        const.meta.pop(ASR_META, None)  # a constant now, not a psi
        for user in users:
            user.replace_input_with(node, const)
            absorbed[(_site_of(node), user.name)] = None
    for site, call in absorbed:
        report.folds.append(Fold(site, "gated_bn", (call,), "producer",
                                 "folded into the affine parameters of the call that applied the gate"))
    finish(gm)
    drop_unused_attributes(gm)


def _site_of(node: fx.Node) -> str:
    """The attention block of the psi a node is computed from."""
    return next((site_of(n) for n in ancestors(node) if role_of(n) == Role.PSI), "") or ""
