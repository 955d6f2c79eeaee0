"""Small graph-editing helpers shared by the passes (convert, fuse)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from .ops import op_of

__all__ = [
    "rewire_inplace",
    "is_inplace",
    "is_assertion",
    "substitute",
    "finish",
    "eliminate_dead_code",
    "unique_attr_name",
    "set_module",
    "shape_constants",
    "copy_meta",
]


def substitute(value: Any, mapping: dict[fx.Node, Any]) -> Any:
    """``value`` (node args/kwargs) with every node in ``mapping`` replaced."""
    return fx.node.map_aggregate(value, lambda a: mapping.get(a, a) if isinstance(a, fx.Node) else a)


def is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An op that writes into its first argument: ``x.mul_(y)``, ``torch.relu_(x)``,
    ``F.silu(x, inplace=True)``, ``nn.ReLU(inplace=True)``."""
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        name = _function_name(node.target)
        return (name.endswith("_") and not name.endswith("__") and not name.startswith("_assert")) \
            or node.kwargs.get("inplace") is True
    if node.op == "call_module":
        return getattr(modules.get(str(node.target)), "inplace", False) is True
    return False


# Ops whose result may share memory with their input: writing into it writes into the input too.
_VIEWS = frozenset({"view", "reshape", "getitem", "transpose", "permute", "expand", "expand_as", "narrow",
                    "squeeze", "unsqueeze", "flatten", "unflatten", "select", "as_strided", "t", "detach",
                    "view_as", "reshape_as", "split", "chunk", "unbind", "diagonal", "movedim", "slice"})


def _function_name(target: Any) -> str:
    """A call_function target's name; aten ops (export route) by their op: aten.add_.Tensor -> 'add_'."""
    return target._opname if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", "")


def rewire_inplace(gm: fx.GraphModule) -> None:
    """Readers that come after an in-place op read its result instead of the tensor it wrote into.

    ``y = x.mul_(g); z = f(x)`` reads the written values through the name x; after this pass
    ``z = f(y)``, so every analysis (and dead-code elimination) sees the data flow as it is.
    """
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        target = node.args[0] if node.args else None
        if not isinstance(target, fx.Node) or not is_inplace(node, modules):
            continue
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)


def is_assertion(node: fx.Node) -> bool:
    """torch._assert, and the export route's aten._assert_scalar / _assert_tensor_metadata: kept by
    dead-code elimination although nothing reads them."""
    return node.op == "call_function" and _function_name(node.target).startswith("_assert")


def _is_impure(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """What must stay even when unused: writes into inputs, parameters or views, user leaf modules,
    side effects. A write into a temporary nothing reads afterwards (after :func:`rewire_inplace`)
    is dead like any other op."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if getattr(module, "inplace", False) is True:
            return _writes_observably(node, modules)
        return not type(module).__module__.startswith("torch.nn")
    if is_assertion(node) and _function_name(node.target) == "_assert_tensor_metadata":
        # export's check of a tensor's dtype before a .to(): it goes when nothing else reads the tensor
        checked = node.args[0] if node.args else None
        return not isinstance(checked, fx.Node) or any(u is not node and not is_assertion(u) for u in checked.users)
    if is_assertion(node) or (node.op == "call_function" and _function_name(node.target) == "print"):
        return True
    if node.op in ("call_method", "call_function") and is_inplace(node, modules):
        return _writes_observably(node, modules)
    return False


def _writes_observably(node: fx.Node, modules) -> bool:
    target = node.args[0] if node.args else None
    if not isinstance(target, fx.Node):
        return True
    if target.op in ("placeholder", "get_attr") or op_of(target, modules).name in _VIEWS:
        return True
    return any(u is not node and u > node for u in target.users)  # read again after the write


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Remove unused pure nodes (fx's own DCE keeps every module call)."""
    modules = dict(gm.named_modules())
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: _is_impure(n, modules))


def finish(gm: fx.GraphModule, recompile: bool = True) -> fx.GraphModule:
    """Every mutation ends here: dead code out, lint, drop dead submodules, recompile (``recompile=False``
    when another pass rewrites the graph next and recompiles it: Python code for every node, compiled)."""
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    if recompile:
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
        rank_of = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], fx.Node) else None
        if rank_of is not None and hasattr(rank_of, "shape") and (
                (node.op == "call_function" and node.target is getattr and node.args[1] == "ndim")
                or (node.op == "call_method" and node.target in ("dim", "ndimension"))):
            found[node] = len(rank_of.shape)  # the rank is fixed by the architecture
            continue
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


def copy_meta(src: fx.Node, dst: fx.Node) -> None:
    """Carry a node's metadata (module stack, stack trace) onto its replacement."""
    for key, value in src.meta.items():
        if key not in dst.meta:
            dst.meta[key] = copy.copy(value)


def params_and_buffers(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()
