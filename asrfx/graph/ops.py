"""The op vocabulary: what a torch.fx node computes, in one canonical name.

torch.fx spells the same operation many ways (``operator.mul``, ``torch.mul``,
``Tensor.mul``, ``mul_``, ``nn.ReLU`` vs ``F.relu`` ...). Every analysis in asrfx
asks :func:`op_of` instead of looking at targets, so each spelling is handled once.
Names describe *operations* of torch and torch.nn, never user classes: detection
must work on attention code nobody has seen before.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "PERMUTES",
    "axis_order",
    "Op",
    "op_of",
    "module_op",
    "pad_fill",
    "node_shape",
    "node_shapes",
    "is_tensor_node",
    "REDUCTIONS",
    "POOLS",
    "CONTRACTIONS",
    "RESHAPES",
    "BROADCASTS",
    "COMBINE_MUL",
    "COMBINE_ADD",
    "SHAPE_QUERIES",
    "SHAPE_ONLY_OPERAND",
    "FROM_SHAPE",
    "RANDOM",
    "data_inputs",
    "data_readers",
    "is_shape_query",
    "argument",
    "broadcast_source",
    "module_path_of",
]


@dataclass(frozen=True)
class Op:
    """A node's operation in canonical form."""

    name: str  # canonical name, e.g. "mul", "mean", "adaptive_avg_pool", "conv", "view"
    module: nn.Module | None = None  # the called module, for call_module nodes
    dims: int = 0  # spatial rank for conv/pool ops (2 for conv2d), else 0


# Reductions whose `dim` argument says which axes disappear.
REDUCTIONS = frozenset(
    {"mean", "sum", "nansum", "nanmean", "amax", "amin", "max", "min", "std", "var",
     "std_mean", "var_mean", "logsumexp", "norm", "vector_norm", "prod"}
)
# Pooling windows; "adaptive_*" pool to a fixed output grid whatever the input size.
POOLS = frozenset(
    {"adaptive_avg_pool", "adaptive_max_pool", "avg_pool", "max_pool", "lp_pool"}
)
# Ops that contract an axis of a data tensor against another tensor (GC's attention pooling).
CONTRACTIONS = frozenset({"matmul", "bmm", "mm", "einsum"})
# Ops that only re-arrange elements; tags follow sizes (see layout.py).
RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"})
# Ops that broadcast a tensor to a bigger shape without changing what it holds.
BROADCASTS = frozenset({"expand", "expand_as", "broadcast_to", "contiguous", "clone", "repeat", "tile"})
COMBINE_MUL = frozenset({"mul"})
COMBINE_ADD = frozenset({"add"})
# Ops whose second operand only lends its shape, dtype or device: x.expand_as(y), x.to(y) read no data of y.
SHAPE_ONLY_OPERAND = frozenset({"expand_as", "view_as", "reshape_as", "type_as", "to"})
# Ops that make a new tensor from their first operand's shape, dtype or device only: zeros_like(x), x.new_ones(n).
FROM_SHAPE = frozenset({"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
                        "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"})
# Ops whose values are drawn at random (or left uninitialized): never a constant, whatever they read
# (stochastic depth's x.new_empty(n, 1, 1, 1).bernoulli_(p) is not a gate to fold).
RANDOM = frozenset({"bernoulli", "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "normal",
                    "uniform", "exponential", "geometric", "log_normal", "cauchy", "random", "multinomial",
                    "randperm", "empty", "empty_like", "new_empty", "native_dropout"})
# Non-tensor queries of a tensor's shape: they carry no data of the tensor.
SHAPE_QUERIES = frozenset({"size", "dim", "numel", "shape", "ndim", "ndimension", "device", "dtype"})

# Function names that mean the same operation.
_ALIASES = {
    "multiply": "mul", "imul": "mul",
    "iadd": "add",
    "matrix_multiply": "matmul", "__matmul__": "matmul",
    "true_divide": "div", "truediv": "div", "divide": "div",
    "hard_sigmoid": "hardsigmoid", "hard_swish": "hardswish", "swish": "silu",
    "permute_dims": "permute", "swapaxes": "transpose", "swapdims": "transpose",
    "moveaxis": "movedim",
    "concat": "cat", "concatenate": "cat",
    "dropout1d": "dropout", "dropout2d": "dropout", "dropout3d": "dropout",
    "alpha_dropout": "dropout", "feature_alpha_dropout": "dropout",
    "upsample": "interpolate", "upsample_nearest": "interpolate", "upsample_bilinear": "interpolate",
    "constant_pad_nd": "pad", "_pad_circular": "pad",
}
# Every spelling of padding (F.pad, aten.reflection_pad2d, ...) is one op: it keeps what each axis means.
_PAD_NAME = re.compile(r"^(reflection|replication|circular|constant|zero)_?pad(\dd)?$")

# torch.nn module types -> canonical op (checked with isinstance, most specific first).
_MODULE_OPS: list[tuple[type, str]] = [
    (nn.modules.conv._ConvTransposeNd, "conv_transpose"),
    (nn.modules.conv._ConvNd, "conv"),
    (nn.Linear, "linear"),
    (nn.Bilinear, "bilinear"),
    (nn.modules.batchnorm._BatchNorm, "batch_norm"),
    (nn.modules.instancenorm._InstanceNorm, "instance_norm"),
    (nn.LayerNorm, "layer_norm"),
    (nn.GroupNorm, "group_norm"),
    (nn.LocalResponseNorm, "local_response_norm"),
    (nn.AdaptiveAvgPool1d, "adaptive_avg_pool"), (nn.AdaptiveAvgPool2d, "adaptive_avg_pool"),
    (nn.AdaptiveAvgPool3d, "adaptive_avg_pool"),
    (nn.AdaptiveMaxPool1d, "adaptive_max_pool"), (nn.AdaptiveMaxPool2d, "adaptive_max_pool"),
    (nn.AdaptiveMaxPool3d, "adaptive_max_pool"),
    (nn.modules.pooling._AvgPoolNd, "avg_pool"),
    (nn.modules.pooling._MaxPoolNd, "max_pool"),
    (nn.modules.pooling._LPPoolNd, "lp_pool"),
    (nn.Flatten, "flatten"),
    (nn.Unflatten, "unflatten"),
    (nn.Identity, "identity"),
    (nn.modules.dropout._DropoutNd, "dropout"),
    (nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.LeakyReLU, "leaky_relu"), (nn.PReLU, "prelu"),
    (nn.Sigmoid, "sigmoid"), (nn.Hardsigmoid, "hardsigmoid"), (nn.Tanh, "tanh"),
    (nn.SiLU, "silu"), (nn.Hardswish, "hardswish"), (nn.GELU, "gelu"), (nn.Mish, "mish"),
    (nn.ELU, "elu"), (nn.SELU, "selu"), (nn.CELU, "celu"), (nn.Hardtanh, "hardtanh"),
    (nn.Softmax, "softmax"), (nn.LogSoftmax, "log_softmax"), (nn.Softplus, "softplus"),
    (nn.Upsample, "interpolate"),
    (nn.modules.padding._ConstantPadNd, "pad"), (nn.modules.padding._ReflectionPadNd, "pad"),
    (nn.modules.padding._ReplicationPadNd, "pad"), (nn.modules.padding._CircularPadNd, "pad"),
    (nn.PixelShuffle, "pixel_shuffle"), (nn.PixelUnshuffle, "pixel_unshuffle"),
    (nn.Embedding, "embedding"),
]

_DIMMED_PREFIXES = (
    "adaptive_avg_pool", "adaptive_max_pool", "avg_pool", "max_pool", "lp_pool",
    "conv_transpose", "conv", "batch_norm", "instance_norm",
)


def _split_dims(name: str) -> tuple[str, int]:
    """'adaptive_avg_pool2d' -> ('adaptive_avg_pool', 2); other names pass through."""
    for prefix in _DIMMED_PREFIXES:
        if name.startswith(prefix) and name[len(prefix):] in ("1d", "2d", "3d"):
            return prefix, int(name[len(prefix)])
    return name, 0


def _canonical(raw: str) -> tuple[str, int]:
    name = raw
    if name.startswith("__") and name.endswith("__"):  # Tensor.__mul__ and friends
        name = name[2:-2]
        if name.startswith("r") and name[1:] in ("mul", "add", "matmul", "sub", "truediv"):
            name = name[1:]
    if name.endswith("_") and not name.endswith("__"):  # in-place spelling: mul_, relu_
        name = name[:-1]
    name = _ALIASES.get(name, name)
    if _PAD_NAME.match(name):
        return "pad", 0
    return _split_dims(name)


def _is_torch_callable(target: Any) -> bool:
    """True for functions of torch, torch.nn.functional, operator and builtins."""
    module = getattr(target, "__module__", None) or ""
    if module.startswith("torch") or module in ("_operator", "operator", "builtins", "math"):
        return True
    # Tensor methods used as functions (torch.Tensor.mul) carry no __module__.
    return getattr(target, "__objclass__", None) is torch._C.TensorBase


def op_of(node: fx.Node, modules: dict[str, nn.Module]) -> Op:
    """The canonical operation of ``node``.

    ``modules`` is ``dict(gm.named_modules())``. Nodes asrfx has no name for (user
    functions wrapped by fx, opaque leaf modules) come back as ``"function"`` or
    ``"module"``: analyses treat them conservatively.
    """
    if node.op in ("placeholder", "output", "get_attr"):
        return Op(node.op)
    if node.op == "call_module":
        return module_op(modules.get(str(node.target)))
    if node.op == "call_method":
        name, dims = _canonical(str(node.target))
        return Op(name, None, dims)
    # call_function
    target = node.target
    if target is getattr:
        attr = node.args[1] if len(node.args) > 1 else ""
        if attr in SHAPE_QUERIES:
            return Op("shape")
        return Op("getattr_" + str(attr))
    if target is operator.getitem:
        return Op("getitem")
    if not _is_torch_callable(target):
        return Op("function")
    # aten ops (exported programs) are named by their op, not the overload: aten.mul.Tensor -> "mul"
    name, dims = _canonical(_raw_name(target))
    return Op(name, None, dims)


def _raw_name(target: Any) -> str:
    """A called function's own name; aten ops by their op, not the overload (aten.mul.Tensor -> "mul")."""
    return target._opname if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


# How each spelling of padding fills the border; F.pad and aten.pad say it in their ``mode`` argument.
_PAD_FILLS = (("reflection", "reflect"), ("replication", "replicate"), ("circular", "circular"),
              ("constant", "constant"), ("zero", "constant"))
_PAD_MODULE_FILLS = ((nn.modules.padding._ReflectionPadNd, "reflect"), (nn.modules.padding._ReplicationPadNd, "replicate"),
                     (nn.modules.padding._CircularPadNd, "circular"), (nn.modules.padding._ConstantPadNd, "constant"))


def pad_fill(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """How a padding node fills the border when its spelling says so: "constant" (ConstantPad2d,
    ZeroPad2d, aten.constant_pad_nd), "reflect", "replicate" or "circular"; None when a ``mode``
    argument says it (F.pad, aten.pad) or the node does not pad."""
    op = op_of(node, modules)
    if op.name != "pad":
        return None
    if op.module is not None:
        return next((fill for cls, fill in _PAD_MODULE_FILLS if isinstance(op.module, cls)), None)
    raw = _raw_name(node.target) if node.op == "call_function" else str(node.target)
    return next((fill for key, fill in _PAD_FILLS if key in raw), None)


def module_op(module: nn.Module | None) -> Op:
    """The canonical operation of calling ``module``: "module" for a type asrfx has no name for."""
    for cls, name in _MODULE_OPS:
        if isinstance(module, cls):
            return Op(name, module, _module_dims(module, name))
    return Op("module", module)


def _module_dims(module: nn.Module, name: str) -> int:
    if name in ("conv", "conv_transpose"):
        return len(module.kernel_size)
    if name in POOLS or name in ("batch_norm", "instance_norm"):
        cls = type(module).__name__
        for d in (1, 2, 3):
            if cls.endswith(f"{d}d"):
                return d
    return 0


def is_tensor_node(node: fx.Node) -> bool:
    """Whether the node's value is a single tensor (needs shape metadata)."""
    return node_shape(node) is not None


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The concrete shape of a tensor-valued node, from ShapeProp or export metadata."""
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except (TypeError, ValueError):  # symbolic sizes without a hint
            return None
    return None


def node_shapes(node: fx.Node) -> tuple[tuple[int, ...] | None, ...] | None:
    """Shapes of a tuple-valued node (split, chunk, max with dim ...), else None."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):  # TensorMetadata is a NamedTuple
        return tuple(tuple(int(s) for s in m.shape) if hasattr(m, "shape") else None for m in meta)
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return tuple(tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None for v in val)
    return None


def data_inputs(node: fx.Node, op: Op) -> list[fx.Node]:
    """Input nodes whose *values* the node reads (not just their shape)."""
    if op.name in SHAPE_ONLY_OPERAND and node.args and isinstance(node.args[0], fx.Node):
        return [node.args[0]]
    if op.name in FROM_SHAPE and node.args:
        return [n for n in node.all_input_nodes if n is not node.args[0]]
    return node.all_input_nodes


def is_shape_query(node: fx.Node, op: Op) -> bool:
    """x.shape, x.size(), x.dim(): reads no data of x."""
    return op.name == "shape" or (node.op == "call_method" and op.name in ("size", "dim", "numel")) or (
        node.op == "call_function" and op.name in ("sym_size", "sym_numel", "sym_stride"))  # exported graphs


def data_readers(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """Users of ``node`` that read its values: not x.size(), x.shape, or y.expand_as(x)."""
    readers = []
    for user in node.users:
        op = op_of(user, modules)
        if is_shape_query(user, op) or (op.name in SHAPE_ONLY_OPERAND and user.args[0] is not node):
            continue
        readers.append(user)
    return readers


def argument(node: fx.Node, position: int, name: str, default: Any = None) -> Any:
    """An argument of a call by keyword or position (``conv2d(x, w, b, stride, padding)``): the one reader."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if len(node.args) > position else default


def broadcast_source(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """The tensor that broadcast-only ops spread: through expand, expand_as, broadcast_to,
    contiguous, clone, and repeat / tile where every repeated axis has size 1 (``g.repeat(1, 1, h, w)``
    of a ``[N, C, 1, 1]`` gate is a broadcast; a multiply broadcasts the source the same way)."""
    while node.args and isinstance(node.args[0], fx.Node) and op_of(node, modules).name in BROADCASTS:
        if op_of(node, modules).name in ("repeat", "tile") and not _repeat_broadcasts(node):
            break
        node = node.args[0]
    return node


def _repeat_broadcasts(node: fx.Node) -> bool:
    shape = node_shape(node.args[0])
    reps = node.args[1:] if len(node.args) > 2 or not isinstance(argument(node, 1, "dims"), (tuple, list)) \
        else argument(node, 1, "dims")
    reps = list(argument(node, 1, "repeats", reps) if "repeats" in node.kwargs else reps)
    if shape is None or not reps:
        return False
    padded = (1,) * max(len(reps) - len(shape), 0) + tuple(shape)
    return all(size == 1 for size, rep in zip(padded[-len(reps):], reps) if not (isinstance(rep, int) and rep == 1))


def module_path_of(node: fx.Node) -> str | None:
    """The innermost module (of the original model) whose forward created ``node``."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        key, value = next(reversed(stack.items()))
        return _dotted(value[0] if isinstance(value, tuple) else key)
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    return None


def _dotted(path: str) -> str:
    """Dynamo writes module paths as source code: ``getattr(L['self'].features, '1').fc1`` or
    ``L['self'].layer1[0]`` -> ``features.1.fc1``, ``layer1.0``. Other paths pass through."""
    if "L['self']" not in path:
        return path
    path = path.replace("getattr(", "")
    path = re.sub(r", '([^']*)'\)", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    return path.replace("L['self']", "").lstrip(".")


# Ops that only permute axes (canonical names; .T / .mT / numpy's .T as op_of spells them).
PERMUTES = frozenset({"permute", "transpose", "movedim", "t", "getattr_T", "getattr_mT", "numpy_T"})


def axis_order(node: fx.Node, name: str, rank: int) -> list[int] | None:
    """Where each output axis of a permute/transpose/movedim/.T comes from (read by layout and by the
    absorb planner); None for another op or a dim computed at run time."""
    if name not in PERMUTES:
        return None
    try:
        if name == "permute":
            order = node.args[1:] if len(node.args) > 2 or isinstance(argument(node, 1, "dims"), int) \
                else argument(node, 1, "dims")
            return [int(d) % rank for d in order]
        if name == "transpose":
            a, b = int(argument(node, 1, "dim0")) % rank, int(argument(node, 2, "dim1")) % rank
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
            return order
        if name == "movedim":
            src, dst = argument(node, 1, "source"), argument(node, 2, "destination")
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src, dst = [s % rank for s in src], [d % rank for d in dst]
            rest = iter(d for d in range(rank) if d not in src)
            placed = dict(zip(dst, src))
            return [placed[d] if d in placed else next(rest) for d in range(rank)]
    except (TypeError, ValueError, StopIteration):  # a dim computed at run time
        return None
    order = list(range(rank))  # .t(), .T, .mT: reverse the last two
    if rank >= 2:
        order[-1], order[-2] = order[-2], order[-1]
    return order
