"""Dataflow over fx graphs: what each value is computed from, and what depends on what.

Three questions every pass asks, answered once:

* :func:`input_dependence`: does a value depend on the model's input data? Shape reads
  (``x.size()``, ``x.shape``, ``y.expand_as(x)``'s x) carry no data of x, unless asked to
  count them (a value shaped by the batch must not be frozen at the example's batch size);
* :func:`dependents`: the values computed from a set of roots (what reads a psi);
* :func:`ancestors`: the values one value is computed from.

Detection's refined analysis (through which global reductions a value depends on the
input, and whether a learned op lies in between) is :func:`asrfx.passes.detect.analyse_flow`,
built on the same notion of the data a node reads (:func:`asrfx.graph.ops.data_inputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import fx

from .ops import RANDOM, data_inputs, is_shape_query, op_of

__all__ = ["input_dependence", "dependents", "ancestors"]


def input_dependence(gm: fx.GraphModule, *, shape_reads: bool = False) -> dict[fx.Node, bool]:
    """For every node, whether its value depends on a graph input (one pass in graph order).
    Random (and uninitialized) values vary from call to call like an input does.

    ``shape_reads``: count reading an input's shape as depending on it.
    """
    reads: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (node.op != "get_attr" and op_of(node, {}).name in RANDOM):
            reads[node] = True
            continue
        if shape_reads:
            reads[node] = any(reads.get(i, False) for i in node.all_input_nodes)
            continue
        op = op_of(node, {})
        reads[node] = not is_shape_query(node, op) and any(reads.get(i, False) for i in data_inputs(node, op))
    return reads


def dependents(gm: fx.GraphModule, is_root: Callable[[fx.Node], bool]) -> set[fx.Node]:
    """The roots and every node computed from them (one pass in graph order)."""
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if is_root(node) or any(i in found for i in node.all_input_nodes):
            found.add(node)
    return found


def ancestors(node: fx.Node) -> Iterator[fx.Node]:
    """``node``, then every node it is computed from, each once (depth first)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        stack.extend(n.all_input_nodes)
