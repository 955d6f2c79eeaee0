"""Capture: any nn.Module to a GraphModule whose nodes carry shapes.

The passes read one kind of graph, which two routes produce:

* the **fx route**, :func:`trace`: torch.fx symbolic tracing. Plain ``symbolic_trace`` stops at
  the first submodule with data-dependent control flow (timm's 'same'-padding convolutions,
  size asserts ...); :func:`trace` retries, each time keeping the innermost failing submodule
  as a single call (a *leaf*), and reports every leaf it made. Whether a leaf hides attention
  is checked by the caller (:mod:`asrfx.api`), which can run detection on the leaf's children.
* the **export route**, :func:`asrfx.graph.export_route.export_capture`: torch.export (training
  IR), for what torch.fx cannot get through; the caller falls back to it.

Both call the model as ``model(*example_inputs, **example_kwargs)`` and keep that calling
convention and the model's output structure; both make the flags torch bakes from
``self.training`` follow ``.train()``/``.eval()`` (:func:`merge_training_graphs`).

Shapes come from example inputs, propagated on meta tensors (graph/shapes.py), else on a
fake-tensor copy in eval mode, else for real on a copy: the caller's modules, parameters and
buffers are untouched. After a rewrite, :func:`repropagate_shapes` runs only what changed.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import inspect
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx.graph import _PyTreeCodeGen

from ..errors import TracingError
from .edit import rewire_inplace
from .shapes import meta_rerun, meta_run, tensor_metadata
from .modes import dedupe_sizes, flag_reads, training_graph_or_divergence, uniform_mode

__all__ = ["CaptureRoute", "LeafRecord", "Traced", "trace", "propagate_shapes", "repropagate_shapes", "as_input_tuple",
           "as_kwargs", "check_call", "placeholder_values", "GraphRunner", "first_line", "user_frame"]

_MAX_LEAVES = 512


@dataclass(frozen=True)
class CaptureRoute:
    """How a model became the graph the passes read."""

    name: str  # "fx" (torch.fx symbolic tracing), "export" (torch.export, training IR), "given" (a GraphModule)
    reason: str = ""  # why the fx route was not taken; empty when it was

    def __str__(self) -> str:
        what = {"fx": "torch.fx symbolic tracing", "export": "torch.export (training IR)",
                "given": "the GraphModule as given"}.get(self.name, self.name)
        return f"captured by {what}" + (f", because {self.reason}" if self.reason else "")


@dataclass(frozen=True)
class LeafRecord:
    """A submodule that torch.fx could not trace through and was kept as one call."""

    path: str  # module path in the original model
    module_type: str  # its class name
    reason: str  # first line of the tracing error
    unsearched: str = ""  # why it could not be searched for attention ("" when it was)


@dataclass(frozen=True)
class Traced:
    """A captured model."""

    gm: fx.GraphModule  # shares submodules (fx) or tensors (export) with the model it came from
    leaves: tuple[LeafRecord, ...]  # submodules kept as single calls because fx failed inside them
    mode_note: str = ""  # set when the graph cannot follow .train()/.eval() (see merge_training_graphs)
    route: CaptureRoute = field(default_factory=lambda: CaptureRoute("fx"))  # which route made gm, and why


@functools.lru_cache(maxsize=None)
def _forward_signature(cls: type) -> inspect.Signature | None:
    """The signature of ``cls.forward`` without ``self`` (None when Python cannot tell it)."""
    try:
        signature = inspect.signature(cls.forward)
        return signature.replace(parameters=list(signature.parameters.values())[1:])
    except (TypeError, ValueError):
        return None


class _LeafTracer(fx.Tracer):
    """fx.Tracer that also keeps the given module paths and types as leaves."""

    def __init__(self, leaf_paths: set[str] = frozenset(), leaf_types: tuple[type, ...] = ()):
        # defaults: unpickling a GraphModule (torch.save(gm), spawn) re-creates its tracer with no arguments
        super().__init__()
        self.leaf_paths = leaf_paths
        self.leaf_types = leaf_types
        self._depth = 0  # create_arg's recursion depth: 0 for the value a node (or the output) takes
        self.top_value: Any = None  # the last top-level value given to create_arg: the forward's result

    def create_arg(self, a: Any):
        self._depth += 1
        try:
            return super().create_arg(a)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.top_value = a

    def call_module(self, m: nn.Module, forward, args, kwargs):
        # A module kept as one call is not run while tracing; an eager call with arguments its forward
        # does not take raises TypeError, and code such as `try: layer(x, lengths=n) except TypeError:
        # layer(x)` (speechbrain) relies on it. Binding the arguments here takes the same path.
        if self.is_leaf_module(m, self.path_of_module(m)):
            signature = _forward_signature(type(m))
            if signature is not None:
                try:
                    signature.bind(*args, **kwargs)
                except TypeError as exc:
                    raise TypeError(f"{type(m).__name__}.forward() {exc}") from None
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


# -- how the model is called -----------------------------------------------------------------


def as_input_tuple(example_inputs: Any) -> tuple:
    """Accept a tensor or a sequence of inputs."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def as_kwargs(example_kwargs: Any) -> dict[str, Any]:
    """Accept None or a mapping of keyword arguments."""
    if example_kwargs is None:
        return {}
    if not isinstance(example_kwargs, Mapping) or not all(isinstance(k, str) for k in example_kwargs):
        raise TypeError(f"example_kwargs takes a dict of keyword arguments (name -> value), "
                        f"got {type(example_kwargs).__name__}")
    return dict(example_kwargs)


def check_call(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> inspect.BoundArguments:
    """The call ``model(*args, **kwargs)`` bound to the forward's signature, or a TracingError
    saying what the forward takes."""
    signature = inspect.signature(model.forward)
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TracingError(
            f"{type(model).__name__}.forward{signature} cannot be called with {len(args)} example input(s)"
            f"{' and example_kwargs ' + str(sorted(kwargs)) if kwargs else ''}: {exc}\n"
            "  What to do: pass example_inputs=(...) and example_kwargs={...} as you would call the model."
        ) from None


def _is_constant(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _fixed_arguments(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """concrete_args for torch.fx from the example call: parameters it leaves out keep their
    defaults, and constants it passes (flags such as ``return_dict=False``) are fixed, so that
    ``if mask is not None`` follows the call; tensors stay graph inputs."""
    if not args and not kwargs:
        return {}
    bound = check_call(model, args, kwargs)
    fixed: dict[str, Any] = {}
    for name, param in inspect.signature(model.forward).parameters.items():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            star = "*" if param.kind is inspect.Parameter.VAR_POSITIONAL else "**"
            if bound.arguments.get(name):
                raise TracingError(
                    f"torch.fx cannot trace {type(model).__name__}.forward with inputs in {star}{name} "
                    f"({sorted(bound.arguments[name]) if star == '**' else len(bound.arguments[name])}): "
                    "a proxy there does not follow what the forward reads from it")
            continue
        if name in bound.arguments:
            if _is_constant(bound.arguments[name]):
                fixed[name] = bound.arguments[name]
        elif param.default is not inspect.Parameter.empty and _is_constant(param.default):
            fixed[name] = param.default
    return fixed


def _restore_argument_names(graph: fx.Graph, fixed: dict[str, Any]) -> None:
    """torch.fx names a fixed argument's placeholder ``mask_1``: the GraphModule's forward would
    then take ``mask_1=`` instead of ``mask=``. The signature keeps the model's names."""
    for node in graph.find_nodes(op="placeholder"):
        target = str(node.target)
        base, _, suffix = target.rpartition("_")
        if suffix == "1" and base in fixed:
            node.target = base


def user_frame(exc: BaseException) -> str:
    """The last traceback frame outside torch: where the user's code failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename
              and "/asrfx/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {f.line}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# -- the fx route -------------------------------------------------------------------------------


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: Any = None,
    example_kwargs: dict[str, Any] | None = None,
) -> Traced:
    """Trace ``model`` with torch.fx, keeping untraceable submodules as leaves.

    ``leaf_modules`` names module paths or classes to keep as leaves up front. With
    ``example_inputs``/``example_kwargs``, the graph takes the arguments of that call: those it
    leaves out keep their defaults, constants it passes are fixed (``concrete_args`` adds or
    overrides). A GraphModule is returned as it is. Raises :class:`TracingError` naming the
    module and line that failed when the model's own forward cannot be traced.
    """
    if isinstance(model, fx.GraphModule):
        return Traced(model, (), route=CaptureRoute("given"))
    if not isinstance(model, nn.Module):
        raise TracingError(f"expected an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}")
    fixed = {**_fixed_arguments(model, as_input_tuple(example_inputs), as_kwargs(example_kwargs)),
             **(concrete_args or {})} or None
    leaf_paths = {p for p in leaf_modules if isinstance(p, str)}
    leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
    leaves: list[LeafRecord] = []
    while True:
        graph, tracer, read_flags = _trace_with_leaves(model, fixed, leaf_paths, leaf_types, leaves)
        if not read_flags:  # no module's training flag was read: the other mode traces the same graph
            dedupe_sizes(graph)  # as merging the two would
            mode_note = ""
            break
        other = None
        with uniform_mode(model, not model.training), contextlib.suppress(Exception):
            other = _LeafTracer(set(leaf_paths), leaf_types).trace(model, concrete_args=fixed)
        graph, mode_note, differs = training_graph_or_divergence(
            {model.training: graph, not model.training: other}, model.training, type(model).__name__)
        if not differs or differs in leaf_paths or len(leaves) >= _MAX_LEAVES:
            break
        # a submodule whose forward takes other paths in eval mode (timm's DropPath): kept whole, it
        # runs its own forward and follows its own .train()/.eval(); then capture again
        leaf_paths.add(differs)
        leaves.append(LeafRecord(differs, type(model.get_submodule(differs)).__name__,
                                 "its forward takes other paths in train and eval mode"))
    _restore_argument_names(graph, fixed or {})
    _restore_output_type(graph, type(tracer.top_value))
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    rewire_inplace(gm)
    return Traced(gm, tuple(leaves), mode_note)


def _trace_with_leaves(model: nn.Module, fixed, leaf_paths: set[str], leaf_types: tuple[type, ...],
                       leaves: list[LeafRecord]) -> tuple[fx.Graph, _LeafTracer, bool]:
    """Trace in the model's mode; each submodule torch.fx fails inside becomes a leaf (added to
    ``leaf_paths`` and ``leaves``) and tracing retries. Also says whether the trace read a module's
    training flag (:func:`flag_reads`)."""
    with uniform_mode(model, model.training):
        while True:
            tracer = _LeafTracer(set(leaf_paths), leaf_types)
            try:
                with flag_reads(model) as read:
                    graph = tracer.trace(model, concrete_args=fixed)
                return graph, tracer, read()
            except Exception as exc:  # fx raises many types; we name the place and move on
                # the stack's values hold the module path; its keys add '@1', '@2' for repeated calls
                failing = next(reversed(tracer.module_stack.values()))[0] if tracer.module_stack else ""
                where = user_frame(exc)
                if not failing or failing in leaf_paths or len(leaves) >= _MAX_LEAVES:
                    scope = f"module '{failing}'" if failing else f"the forward of {type(model).__name__}"
                    raise TracingError(
                        f"torch.fx cannot trace {scope}: {first_line(exc)}"
                        + (f"\n  at {where}" if where else "")
                        + "\n  What to do: make that code traceable (no Python control flow on tensor values), "
                        "pass concrete_args=... for flags, name the module in leaf_modules=..., "
                        "or pass a pre-traced torch.fx.GraphModule."
                    ) from exc
                leaf_paths.add(failing)
                leaves.append(LeafRecord(failing, type(model.get_submodule(failing)).__name__, first_line(exc)))


def _restore_output_type(graph: fx.Graph, cls: type) -> None:
    """fx records a returned dict subclass (HF's ModelOutput dataclasses) as a plain dict; the
    graph builds the model's own type again so that ``out.logits`` keeps working."""
    if not (issubclass(cls, dict) and cls not in (dict, collections.OrderedDict, collections.defaultdict)
            and dataclasses.is_dataclass(cls)):
        return
    out = graph.output_node()
    fields = out.args[0]
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        return
    with graph.inserting_before(out):
        rebuilt = graph.call_function(cls, (), dict(fields))
    out.args = (rebuilt,)


# -- shapes ----------------------------------------------------------------------------------------


def placeholder_values(gm: fx.GraphModule, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> list:
    """The values of ``gm``'s placeholders when it is called as ``gm(*args, **kwargs)``.

    An fx-route graph has one placeholder per argument of its forward (``**kwargs`` one dict);
    an export-route graph one per tensor of the flattened call (its forward flattens them
    with the input spec of the example call, as ``ExportedProgram.module()`` does).
    """
    kwargs = dict(kwargs or {})
    signature = _call_signature(gm)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TracingError(f"the captured graph's forward{signature} cannot be called with {len(args)} "
                           f"input(s) and keywords {sorted(kwargs)}: {exc}") from None
    bound.apply_defaults()
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None:
        info = codegen.pytree_info
        values = list(bound.arguments.values())
        spec = info.in_spec
        if (spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple
                and spec.child(1).type is dict):  # (args, kwargs), as gen_var_bindings builds it
            count = spec.child(0).num_children
            tree: Any = (list(values[:count]), dict(zip(spec.child(1).context, values[count:])))
        else:
            tree = values
        return list(fx_pytree.tree_flatten_spec(tree, spec))
    return list(bound.arguments.values())


def _call_signature(gm: fx.GraphModule) -> inspect.Signature:
    """The signature of ``gm``'s forward, read off its graph (a lazily compiled GraphModule, as
    Dynamo hands over, reports ``(*args, **kwargs)`` until it first runs)."""
    codegen = gm.graph._codegen
    kind = inspect.Parameter
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None:
        return inspect.Signature([kind(n, kind.POSITIONAL_OR_KEYWORD) for n in codegen.pytree_info.orig_args
                                  if n != "self"])
    params, keyword_only = [], False
    for node in gm.graph.find_nodes(op="placeholder"):
        target = str(node.target)
        if target.startswith("**"):
            params.append(kind(target[2:], kind.VAR_KEYWORD))
        elif target.startswith("*"):
            params.append(kind(target[1:], kind.VAR_POSITIONAL))
            keyword_only = True
        else:
            default = node.args[0] if node.args else kind.empty
            params.append(kind(target, kind.KEYWORD_ONLY if keyword_only else kind.POSITIONAL_OR_KEYWORD,
                               default=default))
    return inspect.Signature(params)


class GraphRunner(fx.Interpreter):
    """fx.Interpreter fed by :func:`placeholder_values`: one value per placeholder, also for
    ``*args`` (a tuple) and ``**kwargs`` (a dict), which fx.Interpreter would gather into a list."""

    def placeholder(self, target, args, kwargs):
        if str(target).startswith("*"):
            return next(self.args_iter)
        return super().placeholder(target, args, kwargs)


class _MetaRecorder(GraphRunner):
    """Runs a (fake) copy of a graph and records each node's tensor metadata."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.metas: list[Any] = []
        self.devices: list[torch.device | None] = []  # x.device reads in a psi branch are answered from these

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.metas.append(tensor_metadata(result))
        self.devices.append(result.device if isinstance(result, torch.Tensor) else None)
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: Any, example_kwargs: Mapping[str, Any] | None = None) -> None:
    """Write ``tensor_meta`` onto every node of ``gm`` from the call ``gm(*example_inputs, **example_kwargs)``.

    Runs the graph in eval mode (train-mode BatchNorm rejects a batch of one 1x1
    map and would update running statistics): on meta tensors (:mod:`asrfx.graph.shapes`:
    no copy of the model, no compute), else on a fake-tensor copy, else for real on a copy.
    """
    values = placeholder_values(gm, as_input_tuple(example_inputs), as_kwargs(example_kwargs))
    found = meta_run(gm, values)
    metas, devices = found if found is not None else _fake_or_real_run(gm, values)
    for node, meta, device in zip(gm.graph.nodes, metas, devices):
        if meta is not None:
            node.meta["tensor_meta"] = meta
        if device is not None:
            node.meta["device"] = device


def repropagate_shapes(gm: fx.GraphModule, before: dict[fx.Node, tuple], example_inputs: Any,
                       example_kwargs: Mapping[str, Any] | None = None) -> None:
    """:func:`propagate_shapes` after a rewrite of a graph that carried shapes: only the nodes made or
    changed since ``before`` (:func:`asrfx.graph.shapes.node_records`) and those their shapes reach
    run; the whole graph when that part cannot run on meta tensors."""
    found = meta_rerun(gm, before, placeholder_values(gm, as_input_tuple(example_inputs), as_kwargs(example_kwargs)))
    if found is None:
        propagate_shapes(gm, example_inputs, example_kwargs)
        return
    for node, (meta, device) in found.items():
        for key, value in (("tensor_meta", meta), ("device", device)):
            if value is None:
                node.meta.pop(key, None)
            else:
                node.meta[key] = value


def _fake_or_real_run(gm: fx.GraphModule, values: list) -> tuple[list[Any], list[Any]]:
    """Tensor metadata and devices per node: a fake-tensor copy in eval mode, else a real copy."""
    try:
        from torch._dynamo.utils import deepcopy_to_fake_tensor
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_gm = deepcopy_to_fake_tensor(gm, mode).eval()
        recorder = _MetaRecorder(fake_gm)
        with mode:
            recorder.run(*pytree.tree_map_only(torch.Tensor, mode.from_tensor, values))
    except Exception:
        real_gm = copy.deepcopy(gm).eval()
        recorder = _MetaRecorder(real_gm)
        try:
            with torch.no_grad():
                recorder.run(*values)
        except Exception as exc:
            raise TracingError(
                f"running the traced model on example_inputs failed: {first_line(exc)}\n"
                "  What to do: check that example_inputs (and example_kwargs) match the model's forward, "
                "as you would call the model: model(*example_inputs, **example_kwargs)."
            ) from exc
    return recorder.metas, recorder.devices
