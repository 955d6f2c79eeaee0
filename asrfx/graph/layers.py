"""Where a layer's parameters live, whichever way the graph calls it.

A conv, linear or norm layer reaches a graph in two forms: a ``call_module`` node
(``self.conv(x)``, torch.fx tracing) or a functional call reading ``get_attr`` nodes
(``torch.conv2d(x, w, b)``, ``F.batch_norm(x, rm, rv, w, b)``: timm's BatchNormAct2d,
TorchDynamo graphs with parameters frozen, exported programs). Fuse folds constants into
both through one view, :class:`Layer`, so each folding rule is written once.
"""

from __future__ import annotations

import collections
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .edit import copy_meta, unique_attr_name
from .ops import argument, op_of

__all__ = ["Layer", "LayerIndex", "layer_of", "set_parameter", "call_argument", "set_call_argument"]

# The layers fuse can fold into, by canonical op name.
_LAYERS = frozenset({"conv", "conv_transpose", "linear", "batch_norm", "group_norm", "layer_norm"})


@functools.lru_cache(maxsize=None)
def _positions(target: Any) -> dict[str, int] | None:
    """Argument name -> position for a functional call's target, read from the op itself: the
    schema of an aten op (``aten.batch_norm(input, weight, bias, running_mean, ...)``), the Python
    signature of a torch.nn.functional function (``F.batch_norm(input, running_mean, ...)``), or,
    for a torch builtin without one (``torch.conv2d``, ``torch.batch_norm``), the schema of the
    aten op of the same name."""
    if isinstance(target, torch._ops.OpOverload):
        return {a.name: i for i, a in enumerate(target._schema.arguments)}
    try:
        return {name: i for i, name in enumerate(inspect.signature(target).parameters)}
    except (TypeError, ValueError):
        pass
    packet = getattr(torch.ops.aten, getattr(target, "__name__", ""), None)
    if isinstance(packet, torch._ops.OpOverloadPacket) and packet.overloads():
        overload = "default" if "default" in packet.overloads() else packet.overloads()[0]
        return _positions(getattr(packet, overload))
    return None


def call_argument(node: fx.Node, name: str, default: Any = None) -> Any:
    """The argument ``name`` of a functional call, by keyword or at the position its op's
    signature gives it (``default`` if absent)."""
    position = (_positions(node.target) or {}).get(name)
    if position is None:
        return node.kwargs.get(name, default)
    return argument(node, position, name, default)


def set_call_argument(node: fx.Node, name: str, value: Any) -> None:
    """Set the argument ``name`` of a functional call where it is passed (as a keyword if it is not)."""
    position = (_positions(node.target) or {}).get(name)
    if position is None:
        node.update_kwarg(name, value)
    else:
        _set_argument(node, position, name, value)


def set_parameter(owner: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Install a copy of ``value`` as ``owner.name``: a Parameter (keeping requires_grad), or a buffer
    where the old tensor was one (running statistics); the old tensor is never written to."""
    if value is None:
        return
    if name in owner._buffers:
        owner._buffers[name] = value.detach().clone()
        return
    old = getattr(owner, name, None)
    requires_grad = old.requires_grad if isinstance(old, torch.Tensor) else True
    setattr(owner, name, nn.Parameter(value.detach().clone(), requires_grad=requires_grad))


class LayerIndex(dict):
    """``dict(gm.named_modules())``, plus how often the graph calls each module and reads
    each attribute: folding into a layer whose weights are shared would change the others."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm.named_modules())
        self.gm = gm
        self.calls = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
        self.reads = collections.Counter()
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                self.reads[str(n.target)] += len(n.users)


@dataclass
class Layer:
    """One conv / conv-transpose / linear / norm call and its parameters."""

    node: fx.Node  # the call
    name: str  # canonical op: "conv", "conv_transpose", "linear", "batch_norm", "group_norm", "layer_norm" ...
    label: str  # how reasons name it: the module path, or the node name of a functional call
    module: nn.Module | None  # the called module, None for a functional call
    weight: torch.Tensor | None  # the stored weight (None when absent or computed in the graph)
    bias: torch.Tensor | None  # the stored bias (None when absent or computed in the graph)
    computed: dict[str, fx.Node]  # "weight"/"bias" computed in the graph from parameters -> that node
    groups: int  # conv groups (1 for other layers)
    padded: bool  # a conv that pads its input (a shift cannot fold into it exactly)
    normalized_shape: tuple[int, ...] | None  # layer_norm only
    running_mean: torch.Tensor | None  # batch_norm only
    running_var: torch.Tensor | None  # batch_norm only
    eps: float  # norms only
    training: bool  # normalizes with batch statistics (batch_norm in training mode)
    qualified_bias: str | None  # where the bias lives (a dotted attribute path), if it exists

    @property
    def has_weight(self) -> bool:
        return self.weight is not None or "weight" in self.computed

    @property
    def has_bias(self) -> bool:
        return self.bias is not None or "bias" in self.computed

    def set(self, which: str, value: torch.Tensor) -> None:
        """Replace a stored tensor (weight, bias, running_mean), keeping it a parameter or a buffer;
        a functional call without a bias gets one."""
        if self.module is not None:
            set_parameter(self.module, which, value)
            return
        gm = self.node.graph.owning_module
        current = call_argument(self.node, which)
        if isinstance(current, fx.Node):
            owner, attr = _owner(gm, str(current.target))
            set_parameter(owner, attr, value)
            return
        attr = unique_attr_name(gm, f"{self.node.name}_{which}")
        set_parameter(gm, attr, value)
        with gm.graph.inserting_before(self.node):
            getter = gm.graph.get_attr(attr)
        copy_meta(self.node, getter)
        getter.meta.pop("tensor_meta", None)
        set_call_argument(self.node, which, getter)


    def argument(self, which: str) -> Any:
        """What a functional call passes for ``which`` ("weight", "bias" ...): a node, a constant, None."""
        return call_argument(self.node, which)

    def pass_argument(self, which: str, value: fx.Node) -> None:
        """Make a functional call read ``which`` from ``value``, a node computing it in the graph
        (convert's training fast path: ``weight * gate``)."""
        set_call_argument(self.node, which, value)


def layer_of(node: fx.Node, index: LayerIndex) -> Layer | str:
    """The layer ``node`` calls, or the reason fuse cannot change its parameters."""
    op = op_of(node, index)
    if op.name not in _LAYERS:
        what = type(op.module).__name__ if op.module is not None else op.name
        return f"'{node.target if node.op == 'call_module' else node.name}' ({what}) cannot absorb a per-channel constant"
    if node.op == "call_module":
        return _module_layer(node, op.name, index)
    if node.op == "call_function":
        return _functional_layer(node, op.name, index)
    return f"'{node.name}' ({op.name}) cannot absorb a per-channel constant"


def _padded(padding: Any) -> bool:
    if padding is None:
        return False
    if isinstance(padding, str):
        return padding != "valid"
    return any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))


def _module_layer(node: fx.Node, name: str, index: LayerIndex) -> Layer | str:
    path = str(node.target)
    module = index[path]
    if index.calls[path] != 1:
        return f"'{path}' is called more than once (shared weights)"
    if name == "conv" and getattr(module, "padding_mode", "zeros") != "zeros":
        padded = True  # reflect/replicate/circular padding copies values: a shift would see them
    else:
        padded = name == "conv" and _padded(getattr(module, "padding", 0))
    return Layer(
        node=node, name=name, label=path, module=module,
        weight=getattr(module, "weight", None), bias=getattr(module, "bias", None), computed={},
        groups=getattr(module, "groups", 1), padded=padded,
        normalized_shape=tuple(module.normalized_shape) if name == "layer_norm" else None,
        running_mean=getattr(module, "running_mean", None), running_var=getattr(module, "running_var", None),
        eps=float(getattr(module, "eps", 0.0)),
        training=name == "batch_norm" and (module.training or module.running_var is None),
        qualified_bias=f"{path}.bias" if getattr(module, "bias", None) is not None else None,
    )


def _functional_layer(node: fx.Node, name: str, index: LayerIndex) -> Layer | str:
    gm = index.gm
    if _positions(node.target) is None:
        return f"'{node.name}' ({name}): asrfx cannot read the arguments of {node.target}"
    read = lambda key, default=None: call_argument(node, key, default)  # noqa: E731
    values: dict[str, Any] = {}
    computed: dict[str, fx.Node] = {}
    for which in ("weight", "bias"):
        arg = read(which)
        if arg is None:
            values[which] = None
        elif isinstance(arg, fx.Node) and arg.op == "get_attr":
            if index.reads[str(arg.target)] != 1:
                return f"'{node.name}' ({name}) shares its {which} '{arg.target}' with other layers"
            values[which] = _fetch(gm, str(arg.target))
        elif isinstance(arg, fx.Node):
            values[which] = None  # weight standardization, weight norm: folded through its own graph
            computed[which] = arg
        else:
            return f"'{node.name}' ({name}) takes a constant {which} that cannot change"
    if isinstance(read("groups", 1), fx.Node):
        return f"'{node.name}' ({name}) computes its groups at run time (per-sample kernels)"
    training = read("training")
    if isinstance(training, fx.Node):  # a read of a module's training flag (graph.modes), else computed
        flag = training.op == "get_attr" and str(training.target).rpartition(".")[2] == "training"
        training = bool(_fetch(gm, str(training.target))) if flag else True
    mean, var, eps, shape, bias_arg = (read("running_mean"), read("running_var"), read("eps"),
                                      read("normalized_shape"), read("bias"))
    stored = lambda arg: _fetch(gm, str(arg.target)) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None
    return Layer(
        node=node, name=name, label=node.name, module=None,
        weight=values["weight"], bias=values["bias"], computed=computed,
        groups=int(read("groups", 1) or 1), padded=name == "conv" and _padded(read("padding", 0)),
        normalized_shape=tuple(shape) if shape is not None else None,
        running_mean=stored(mean), running_var=stored(var),
        eps=1e-5 if eps is None else float(eps),
        training=name == "batch_norm" and (training is not False or stored(var) is None),
        qualified_bias=str(bias_arg.target) if isinstance(bias_arg, fx.Node) and bias_arg.op == "get_attr" else None,
    )


def _set_argument(node: fx.Node, position: int, keyword: str, value: Any) -> None:
    if keyword in node.kwargs or len(node.args) <= position:
        node.update_kwarg(keyword, value)
    else:
        node.update_arg(position, value)


def _owner(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    path, _, attr = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), attr


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, attr = _owner(gm, target)
    return getattr(owner, attr)
