"""Small graph-editing helpers shared by the passes (convert, fuse)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import fx, nn

from .ops import is_shape_query, op_of

__all__ = [
    "substitute",
    "finish",
    "eliminate_dead_code",
    "unique_attr_name",
    "set_module",
    "shape_constants",
    "copy_meta",
    "ancestors",
]


def substitute(value: Any, mapping: dict[fx.Node, Any]) -> Any:
    """``value`` (node args/kwargs) with every node in ``mapping`` replaced."""
    return fx.node.map_aggregate(value, lambda a: mapping.get(a, a) if isinstance(a, fx.Node) else a)


def _is_impure(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """What must stay even when unused: in-place ops on what others see, user leaf modules, side effects."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return not type(module).__module__.startswith("torch.nn")
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__") and _mutation_seen(node, modules)
    if node.op == "call_function":
        # aten ops (export route) are named by their op: aten.add_.Tensor -> "add_"
        name = node.target._opname if isinstance(node.target, torch._ops.OpOverload) \
            else getattr(node.target, "__name__", "")
        if name.startswith("_assert") or name == "print":
            return True
        return name.endswith("_") and _mutation_seen(node, modules)
    return False


# Ops whose result may share memory with their input: an in-place op on it writes the input too.
_VIEWS = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose",
                    "t", "expand", "expand_as", "view_as", "reshape_as", "getitem", "select", "narrow", "slice",
                    "split", "chunk", "unbind", "alias", "detach", "diagonal", "as_strided", "contiguous",
                    "movedim", "identity", "dropout", "to", "type_as", "float", "double", "half"})


def _mutation_seen(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether an unused in-place op changes something still read: a graph input, a parameter or
    buffer, a tensor it may be a view of, or a value read after it. The in-place activation of a
    dead psi branch (``relu_``, timm's in-place Swish) is not, and goes with the branch."""
    target = node.args[0] if node.args else None
    if not isinstance(target, fx.Node) or target.op in ("placeholder", "get_attr"):
        return True
    if op_of(target, modules).name in _VIEWS or target.op == "call_module" and op_of(target, modules).name == "module":
        return True
    return any(user is not node and user > node for user in target.users)


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Remove unused pure nodes (fx's own DCE keeps every module call)."""
    modules = dict(gm.named_modules())
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: _is_impure(n, modules))


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Every mutation ends here: dead code out, lint, drop dead submodules, recompile."""
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def unique_attr_name(owner: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2`` ... if the owner already has that attribute."""
    name, i = base, 1
    while hasattr(owner, name):
        name = f"{base}_{i}"
        i += 1
    return name


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Install ``module`` at dotted ``path`` under ``root``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def shape_constants(gm: fx.GraphModule, layouts) -> dict[fx.Node, int]:
    """Sizes read off a tensor's shape that a psi branch may treat as constants.

    ``x.size(0)`` / ``x.shape[0]`` on a batch axis -> 1 (the psi branch has batch 1);
    ``x.size(1)`` on a channel axis -> its size (fixed by the architecture). Spatial
    sizes vary from input to input and are left alone.
    """
    modules = dict(gm.named_modules())
    found: dict[fx.Node, int] = {}

    def value(tensor: fx.Node, axis: int) -> int | None:
        lay, shape = layouts.get(tensor), tensor.meta.get("tensor_meta")
        if not (isinstance(lay, tuple) and lay and isinstance(lay[0], str)) or shape is None:
            return None
        if not -len(lay) <= axis < len(lay):
            return None
        tag = lay[axis]
        if "B" in tag:
            return 1
        if set(tag) <= {"C", "O"}:
            return int(shape.shape[axis])
        return None

    tuples: dict[fx.Node, tuple[fx.Node, int]] = {}  # shape tuple -> (tensor, first axis): x.shape[1:]
    for node in gm.graph.nodes:
        op = op_of(node, modules)
        if op.name == "sym_size" and len(node.args) > 1 and isinstance(node.args[0], fx.Node):
            v = value(node.args[0], node.args[1])  # aten.sym_size.int(x, dim): export-route graphs
            if v is not None:
                found[node] = v
        elif node.op == "call_method" and op.name == "size" and node.args:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if isinstance(dim, int) and isinstance(node.args[0], fx.Node):
                v = value(node.args[0], dim)
                if v is not None:
                    found[node] = v
            elif dim is None and isinstance(node.args[0], fx.Node):
                tuples[node] = (node.args[0], 0)
        elif op.name == "shape" and isinstance(node.args[0], fx.Node):
            tuples[node] = (node.args[0], 0)
        elif op.name == "getitem" and node.args[0] in tuples:
            tensor, offset = tuples[node.args[0]]
            index = node.args[1]
            if isinstance(index, int) and index >= 0:
                v = value(tensor, offset + index)
                if v is not None:
                    found[node] = v
            elif isinstance(index, slice) and (index.start or 0) >= 0 and index.step in (None, 1):
                tuples[node] = (tensor, offset + (index.start or 0))
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


def copy_meta(src: fx.Node, dst: fx.Node) -> None:
    """Carry a node's metadata (module stack, stack trace) onto its replacement."""
    for key, value in src.meta.items():
        if key not in dst.meta:
            dst.meta[key] = copy.copy(value)


def params_and_buffers(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()
