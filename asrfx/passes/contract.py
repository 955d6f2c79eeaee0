"""The ASR contract: what convert promises the passes after it, and what a fused graph must satisfy.

* **Roles.** Convert tags the nodes it creates in ``node.meta["asrfx"]``: ``{"role": "psi" |
  "gate" | "gate_vector", "site": <attention module path>}``. Graphs that lose node metadata
  (Dynamo, torch.export) are re-tagged from parameter names (:func:`mark_psi_attributes`).
* **psi names.** A pooled statistic u of the site at ``path`` becomes the parameter
  ``path.psi``, or ``path.psi_<statistic>`` when the site pools several ways
  (:func:`psi_names`); :func:`is_psi_name` recognises them, also as Dynamo mangles them.
* **Constant gates.** A multiply (or add) of a data tensor and a value computed from
  parameters only (:func:`constant_gates`): what fuse folds, and what must be gone after it.
* **Invariants of a fused graph** (:func:`check_fused`, run by fuse, the frozen-graph path and
  :func:`asrfx.verify`): no psi parameter, no node with an ASR role, nothing computed from a
  psi, no computed constant gate other than the ones the report lists as kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from ..errors import AsrfxError
from ..graph.dataflow import ancestors, dependents, input_dependence
from ..graph.ops import broadcast_source, module_path_of, node_shape, op_of

__all__ = [
    "ASR_META", "Role", "mark", "role_of", "site_of", "psi_names", "is_psi_name", "psi_parameters", "mark_psi",
    "mark_psi_attributes", "ConstantGate", "constant_gates", "psi_dependent", "check_fused", "attach_report",
    "report_of",
]

ASR_META = "asrfx"  # node.meta key (roles), and GraphModule.meta key (the report of the pass that made it)


def attach_report(gm: fx.GraphModule, report: Any) -> None:
    """Every pass that returns a module leaves its report here (convert, insert, fuse, the export
    route, the dynamo backend on the graph it compiles); :func:`report_of` reads it."""
    gm.meta[ASR_META] = report


def report_of(obj: Any) -> Any:
    """The report an asrfx pass left on a GraphModule or ExportedProgram (None if it has none)."""
    import torch

    if isinstance(obj, torch.export.ExportedProgram):
        obj = obj.graph_module
    return getattr(obj, "meta", {}).get(ASR_META)


class Role:
    """The roles convert gives nodes (``node.meta["asrfx"]["role"]``)."""

    PSI = "psi"  # a get_attr of a psi parameter
    GATE = "gate"  # the gate an excitation computes from psi, before broadcasting
    GATE_VECTOR = "gate_vector"  # the gate flattened for a GatedBatchNorm


def mark(node: fx.Node, role: str, site: str) -> None:
    node.meta[ASR_META] = {"role": role, "site": site}


def role_of(node: fx.Node) -> str | None:
    return (node.meta.get(ASR_META) or {}).get("role")


def site_of(node: fx.Node) -> str | None:
    return (node.meta.get(ASR_META) or {}).get("site")


# -- psi names ---------------------------------------------------------------------------------

_POOL_LABELS = {"mean": "avg", "sum": "avg", "adaptive_avg_pool": "avg", "avg_pool": "avg",
                "amax": "max", "max": "max", "adaptive_max_pool": "max", "max_pool": "max",
                "std": "std", "var": "var", "matmul": "context", "bmm": "context", "einsum": "context",
                "norm": "norm", "vector_norm": "norm"}


def _grid_side(pool: fx.Node) -> int:
    shape = node_shape(pool) or ()
    cells = 1
    for s in shape[2:]:
        cells *= s
    return int(round(cells ** 0.5))


def psi_names(site: Any, modules) -> list[str]:
    """psi, or psi_<statistic> per pool of ``site``: psi_avg/psi_max (CBAM), psi_avg/psi_std (SRM),
    psi_avg1/psi_avg2/psi_avg4 (SPA's pyramid)."""
    if len(site.pools) == 1:
        return ["psi"]
    labels = [_POOL_LABELS.get(op_of(p, modules).name, op_of(p, modules).name) for p in site.pools]
    if len({_grid_side(p) for p in site.pools}) > 1:
        labels = [f"{lab}{_grid_side(p)}" for lab, p in zip(labels, site.pools)]
    return [f"psi_{lab}" if labels.count(lab) == 1 else f"psi_{lab}_{labels[:i].count(lab)}"
            for i, lab in enumerate(labels)]


def is_psi_name(qualified: str) -> bool:
    """``layer1.0.se.psi``, ``...psi_avg``: the names convert gives psi."""
    return qualified.rpartition(".")[2].startswith("psi")


def psi_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The psi parameters of a converted model, by name."""
    return [(n, p) for n, p in module.named_parameters() if is_psi_name(n)]


def mark_psi(node: fx.Node, qualified: str) -> None:
    """Tag a constant that holds a psi, with the attention block it belongs to."""
    if is_psi_name(qualified):
        mark(node, Role.PSI, qualified.rpartition(".")[0])


# A psi attribute as Dynamo names it when it installs parameters on the graph (freezing):
# the dotted path with "_" for ".", e.g. L__self___layer1_0_se_psi, ..._psi_avg, ..._psi_avg_1.
_MANGLED_PSI = re.compile(r"(?:^|_)(psi(?:_[A-Za-z]+\d*)?(?:_\d+)?)$")


def mark_psi_attributes(gm: fx.GraphModule) -> int:
    """Tag every get_attr constant that holds a psi (dotted or Dynamo-mangled name); returns how many."""
    marked = 0
    for node in gm.graph.find_nodes(op="get_attr"):
        target = str(node.target)
        if role_of(node) == Role.PSI:
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


# -- constant gates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConstantGate:
    """A multiply (or add) of a data tensor and a constant computed from parameters."""

    combine: fx.Node  # the mul/add node
    x: fx.Node  # the data operand
    operand: fx.Node  # the constant operand as the combine reads it (maybe g.expand_as(x))
    gate: fx.Node  # the constant before broadcasting: what is evaluated and folded
    op: str  # "mul" or "add"


# Ops that make a constant "computed" (an ASR gate), not stored (a layer scale stays as it is).
_COMPUTING = frozenset({"linear", "conv", "sigmoid", "hardsigmoid", "softmax", "relu", "matmul", "mm", "addmm",
                        "einsum", "tanh", "silu"})


def _computed(node: fx.Node) -> bool:
    if role_of(node) == Role.GATE:
        return True
    return any(n.op == "call_module" or op_of(n, {}).name in _COMPUTING for n in ancestors(node))


def constant_gates(gm: fx.GraphModule) -> list[ConstantGate]:
    """Pattern: mul/add of a data tensor and a computed constant (in graph order)."""
    modules = dict(gm.named_modules())
    reads = input_dependence(gm)
    found = []
    for node in gm.graph.nodes:
        name = op_of(node, modules).name
        if name not in ("mul", "add") or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        for x, g in ((a, b), (b, a)):
            if reads[x] and not reads[g] and _computed(g):
                found.append(ConstantGate(node, x, g, broadcast_source(g, modules), name))
                break
    return found


def psi_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value is computed from a psi."""
    return dependents(gm, lambda node: role_of(node) == Role.PSI)


# -- invariants --------------------------------------------------------------------------------


def check_fused(gm: fx.GraphModule) -> None:
    """The invariants of a fused graph; AsrfxError naming what is left. A gate fuse kept is a
    stored constant now, which is not a computed gate."""
    psi = [n for n, _ in psi_parameters(gm)]
    if psi:
        raise AsrfxError(f"fuse left psi parameters behind: {psi[:3]}")
    # a node reading a psi reads a node marked PSI, which this names first
    roles = [n.name for n in gm.graph.nodes if role_of(n) in (Role.PSI, Role.GATE)]
    if roles:
        raise AsrfxError(f"fuse left ASR nodes in the graph: {roles[:3]}")
    gates = constant_gates(gm)
    if gates:
        raise AsrfxError(f"fuse left computed constant gates: {[g.combine.name for g in gates[:3]]}")
