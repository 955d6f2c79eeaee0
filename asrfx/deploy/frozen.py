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

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from ..passes.convert import ASR_META
from ..passes.detect import module_path_of
from ..errors import AsrfxError
from ..passes.fuse import ConstantEvaluator, Fold, FuseReport, constant_gates, drop_unused_attributes, fuse_graph
from ..graph.edit import ancestors, copy_meta, finish, unique_attr_name
from ..graph.capture import propagate_shapes

__all__ = ["mark_psi", "mark_psi_attributes", "fuse_frozen", "is_psi_name"]


def is_psi_name(qualified: str) -> bool:
    """``layer1.0.se.psi``, ``...psi_avg``: the names convert gives psi."""
    return qualified.rpartition(".")[2].startswith("psi")


def mark_psi(node: fx.Node, qualified: str) -> None:
    """Tag a constant that holds a psi, with the attention block it belongs to."""
    if is_psi_name(qualified):
        node.meta[ASR_META] = {"role": "psi", "site": qualified.rpartition(".")[0]}


# A psi attribute as Dynamo names it when it installs parameters on the graph (freezing):
# the dotted path with "_" for ".", e.g. L__self___layer1_0_se_psi, ..._psi_avg, ..._psi_avg_1.
_MANGLED_PSI = re.compile(r"(?:^|_)(psi(?:_[A-Za-z]+\d*)?(?:_\d+)?)$")


def mark_psi_attributes(gm: fx.GraphModule) -> int:
    """Tag every get_attr constant that holds a psi (dotted or Dynamo-mangled name); returns how many."""
    marked = 0
    for node in gm.graph.find_nodes(op="get_attr"):
        target = str(node.target)
        if (node.meta.get(ASR_META) or {}).get("role") == "psi":
            continue  # already known (frozen from a graph input whose source named it)
        if is_psi_name(target):
            mark_psi(node, target)
        elif (found := _MANGLED_PSI.search(target)) is not None:
            mark_psi(node, _demangled_owner(node, target[: found.start()]) + "." + found.group(1))
        else:
            continue
        marked += 1
    return marked


def _demangled_owner(node: fx.Node, mangled: str) -> str:
    """The dotted module path whose mangled form ends ``mangled``: found among the module paths
    of the psi's readers (the excitation lives under the attention module that owns psi)."""
    for user in node.users:
        parts = (module_path_of(user) or "").split(".")
        for k in range(len(parts), 0, -1):
            candidate = ".".join(parts[:k])
            if candidate and mangled.endswith(candidate.replace(".", "_")):
                return candidate
    return mangled


def fuse_frozen(gm: fx.GraphModule, data_inputs: Sequence[Any], data_kwargs: dict[str, Any] | None = None) -> FuseReport:
    """Fold every constant gate of ``gm`` in place; raise AsrfxError if an invariant fails.
    ``gm`` is called as ``gm(*data_inputs, **data_kwargs)`` for the shapes."""
    propagate_shapes(gm, data_inputs, data_kwargs)
    gm, report = fuse_graph(gm)
    _fold_psi_remainders(gm, report)
    left = [n.name for n in psi_dependent(gm)]
    if left:
        raise AsrfxError(f"nodes still read a psi after folding: {left[:3]}")
    gates = constant_gates(gm)
    if gates:
        raise AsrfxError(f"computed constant gates are left: {[g.combine.name for g in gates[:3]]}")
    return report


def psi_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value is computed from a psi (one pass in graph order)."""
    dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if (node.meta.get(ASR_META) or {}).get("role") == "psi" or any(i in dependent for i in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _fold_psi_remainders(gm: fx.GraphModule, report: FuseReport) -> None:
    """Each psi-derived value that a data-reading call consumes becomes one stored constant."""
    dependent = psi_dependent(gm)
    if not dependent:
        return
    # unlike fuse's _input_dependence, shape reads count as data here: a psi value shaped by the
    # batch (view(g, x.size(0), ...)) must not be frozen at the example's batch size
    reads_data: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        reads_data[node] = node.op == "placeholder" or any(reads_data.get(i, False) for i in node.all_input_nodes)
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
        const.meta.pop(ASR_META, None)
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
    psi = (n.meta[ASR_META] for n in ancestors(node) if (n.meta.get(ASR_META) or {}).get("role") == "psi")
    return next(psi, {}).get("site", "")
