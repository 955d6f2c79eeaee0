"""Tracing: any nn.Module to a torch.fx GraphModule whose nodes carry shapes.

Plain ``symbolic_trace`` stops at the first submodule with data-dependent control
flow (timm's 'same'-padding convolutions, size asserts ...). :func:`trace` retries,
each time keeping the innermost failing submodule as a single call (a *leaf*), and
reports every leaf it made. Whether a leaf hides attention is checked by the caller
(:mod:`asrfx.api`), which can run detection on the leaf's children.

Shapes come from example inputs, propagated on a fake-tensor copy in eval mode:
nothing is computed and the caller's modules, parameters and buffers are untouched.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.fx.node import map_aggregate

from ..errors import TracingError
from .edit import rewire_inplace
from .flags import FlagProbe, probe_training_flags
from .shapes import meta_run
from ..passes.site import LeafRecord

__all__ = ["Traced", "trace", "propagate_shapes", "as_input_tuple"]

_MAX_LEAVES = 512


@dataclass(frozen=True)
class Traced:
    """A traced model."""

    gm: fx.GraphModule  # shares submodules with the model it came from (read-only use)
    leaves: tuple[LeafRecord, ...]  # submodules kept as single calls because fx failed inside them
    mode_note: str = ""  # set when the graph cannot follow .train()/.eval() (see _follow_training_flag)


class _LeafTracer(fx.Tracer):
    """fx.Tracer that also keeps the given module paths and types as leaves."""

    def __init__(self, leaf_paths: set[str] = frozenset(), leaf_types: tuple[type, ...] = ()):
        # defaults: unpickling a GraphModule (torch.save(gm), spawn) re-creates its tracer with no arguments
        super().__init__()
        self.leaf_paths = leaf_paths
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def as_input_tuple(example_inputs: Any) -> tuple:
    """Accept a tensor or a sequence of inputs."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _user_frame(exc: BaseException) -> str:
    """The last traceback frame outside torch: where the user's code failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename
              and "/asrfx/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {f.line}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Traced:
    """Trace ``model`` with torch.fx, keeping untraceable submodules as leaves.

    ``leaf_modules`` names module paths or classes to keep as leaves up front.
    A GraphModule is returned as it is. Raises :class:`TracingError` naming the
    module and line that failed when the model's own forward cannot be traced.
    """
    if isinstance(model, fx.GraphModule):
        return Traced(model, ())
    if not isinstance(model, nn.Module):
        raise TracingError(f"expected an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}")
    leaf_paths = {p for p in leaf_modules if isinstance(p, str)}
    leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
    leaves: list[LeafRecord] = []
    probe: FlagProbe | None = None
    probing = True  # the first attempt records how the training flags are read (graph/flags.py)
    while True:
        tracer = _LeafTracer(set(leaf_paths), leaf_types)
        try:
            if probing:
                with probe_training_flags(model) as probe:
                    graph = tracer.trace(model, concrete_args=concrete_args)
            else:
                graph = tracer.trace(model, concrete_args=concrete_args)
            break
        except Exception as exc:  # fx raises many types; we name the place and move on
            if probing:  # maybe the probe's flags upset the model: the same attempt again, plainly
                probe, probing = None, False
                continue
            # the stack's values hold the module path; its keys add '@1', '@2' for repeated calls
            failing = next(reversed(tracer.module_stack.values()))[0] if tracer.module_stack else ""
            where = _user_frame(exc)
            if not failing or failing in leaf_paths or len(leaves) >= _MAX_LEAVES:
                scope = f"module '{failing}'" if failing else f"the forward of {type(model).__name__}"
                raise TracingError(
                    f"torch.fx cannot trace {scope}: {_first_line(exc)}"
                    + (f"\n  at {where}" if where else "")
                    + "\n  What to do: make that code traceable (no Python control flow on tensor values), "
                    "pass concrete_args=... for flags, name the module in leaf_modules=..., "
                    "or pass a pre-traced torch.fx.GraphModule."
                ) from exc
            module_type = type(model.get_submodule(failing)).__name__
            leaf_paths.add(failing)
            leaves.append(LeafRecord(failing, module_type, _first_line(exc)))
    graph, mode_note = _follow_training_flag(model, graph, leaf_paths, leaf_types, concrete_args, probe)
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    rewire_inplace(gm)
    return Traced(gm, tuple(leaves), mode_note)


def _follow_training_flag(model, graph, leaf_paths, leaf_types, concrete_args,
                          probe: FlagProbe | None = None) -> tuple[fx.Graph, str]:
    """Make constants that torch.fx baked from ``self.training`` follow ``.train()/.eval()``.

    torch.fx evaluates ``self.training`` once, while tracing: a wrapped call such as
    torchvision's ``stochastic_depth(x, p, mode, self.training)`` or timm's functional
    ``batch_norm(..., training, momentum, ...)`` keeps the mode it was traced in. The
    model is traced again in the other mode (flags restored after); where the graphs
    differ only in a bool that is True in train mode and False in eval mode, it becomes
    a read of the GraphModule's ``training`` flag. Returns a note when they differ in
    structure (then the graph stays in the mode it was traced in). When the first trace was
    probed and no flag was used as a truth value, flags passed as arguments become the read
    of the flag directly, and the second trace is skipped.
    """
    if probe is not None and probe.mode_free:
        if FlagProbe.arguments(graph):
            first = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first):
                flag_node = graph.get_attr("training")
            # a module in the model's mode follows the GraphModule's flag; one set apart keeps its mode
            FlagProbe.replace(graph, lambda flag: flag_node if flag.value == model.training else flag.value)
        return graph, ""
    if probe is not None:
        FlagProbe.materialize(graph)
    flags = {m: m.training for m in model.modules()}
    try:
        model.train(not model.training)
        other = _LeafTracer(set(leaf_paths), leaf_types).trace(model, concrete_args=concrete_args)
    except Exception:
        return graph, ""
    finally:
        for m, flag in flags.items():
            m.training = flag
    train_graph, eval_graph = (graph, other) if model.training else (other, graph)
    a, b = list(train_graph.nodes), list(eval_graph.nodes)
    if len(a) != len(b) or any((x.op, x.target) != (y.op, y.target) for x, y in zip(a, b)):
        return graph, (f"{type(model).__name__} takes different paths in train and eval mode; the graph "
                       f"follows the mode it was traced in ({'train' if model.training else 'eval'})")
    index = {y: x for x, y in zip(a, b)}
    flag_node = None
    keep = a if graph is train_graph else b  # edit the graph we return
    for x, y, k in zip(a, b, keep):
        merged_args, diff_a = _merge(x.args, y.args, index)
        merged_kwargs, diff_k = _merge(x.kwargs, y.kwargs, index)
        if not (diff_a or diff_k):
            continue
        if merged_args is None or merged_kwargs is None:
            return graph, (f"'{x.name}' differs between train and eval mode in a way asrfx cannot "
                           "express; the graph follows the mode it was traced in")
        if flag_node is None:
            first = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first):
                flag_node = graph.get_attr("training")
        k.args = _place_flag(merged_args, flag_node, index if graph is eval_graph else None)
        k.kwargs = _place_flag(merged_kwargs, flag_node, index if graph is eval_graph else None)
    return graph, ""


_FLAG = object()  # marks where the training flag goes


def _merge(ta, ea, index):
    """Merge train-mode and eval-mode args: (merged, differs). merged None: cannot merge.

    A bool True (train) / False (eval) becomes the flag; any other constant that differs
    takes its train-mode value (e.g. BatchNorm's momentum, unused in eval mode).
    """
    if isinstance(ta, fx.Node) or isinstance(ea, fx.Node):
        same = isinstance(ta, fx.Node) and isinstance(ea, fx.Node) and index.get(ea) is ta
        return (ta, False) if same else (None, True)
    if isinstance(ta, (tuple, list)) and isinstance(ea, (tuple, list)) and len(ta) == len(ea):
        items, differs = [], False
        for t, e in zip(ta, ea):
            m, d = _merge(t, e, index)
            if m is None and d:
                return None, True
            items.append(m)
            differs |= d
        return type(ta)(items), differs
    if isinstance(ta, dict) and isinstance(ea, dict) and ta.keys() == ea.keys():
        items, differs = {}, False
        for key in ta:
            m, d = _merge(ta[key], ea[key], index)
            if m is None and d:
                return None, True
            items[key] = m
            differs |= d
        return items, differs
    if ta is True and ea is False:
        return _FLAG, True
    if type(ta) is type(ea) and isinstance(ta, (int, float)) and ta != ea:
        return ta, True
    return (ta, False) if ta == ea else (None, True)


def _place_flag(value, flag_node, eval_index):
    """Put the flag node where _merge marked it; map train-graph nodes if editing the eval graph."""
    reverse = {v: k for k, v in eval_index.items()} if eval_index else None

    def fix(v):
        if v is _FLAG:
            return flag_node
        if reverse is not None and isinstance(v, fx.Node):
            return reverse.get(v, v)
        return v

    return fx.node.map_aggregate(value, fix)


class _MetaRecorder(fx.Interpreter):
    """Runs a (fake) copy of a graph and records each node's tensor metadata."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.metas: list[Any] = []
        self.devices: list[torch.device | None] = []  # x.device reads in a psi branch are answered from these

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        found = False

        def extract(obj):
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        self.metas.append(meta if found else None)
        self.devices.append(result.device if isinstance(result, torch.Tensor) else None)
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Write ``tensor_meta`` onto every node of ``gm`` from ``example_inputs``.

    Runs the graph in eval mode (train-mode BatchNorm rejects a batch of one 1x1
    map and would update running statistics): on meta tensors (:mod:`asrfx.graph.shapes`:
    no copy of the model, no compute), else on a fake-tensor copy, else for real on a copy.
    """
    inputs = as_input_tuple(example_inputs)
    found = meta_run(gm, inputs)
    metas, devices = found if found is not None else _fake_or_real_run(gm, inputs)
    for node, meta, device in zip(gm.graph.nodes, metas, devices):
        if meta is not None:
            node.meta["tensor_meta"] = meta
        if device is not None:
            node.meta["device"] = device


def _fake_or_real_run(gm: fx.GraphModule, inputs: tuple) -> tuple[list[Any], list[Any]]:
    """Tensor metadata and devices per node: a fake-tensor copy in eval mode, else a real copy."""
    try:
        from torch._dynamo.utils import deepcopy_to_fake_tensor
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_gm = deepcopy_to_fake_tensor(gm, mode).eval()
        recorder = _MetaRecorder(fake_gm)
        with mode:
            fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
            recorder.run(*fake_inputs)
    except Exception:
        real_gm = copy.deepcopy(gm).eval()
        recorder = _MetaRecorder(real_gm)
        try:
            with torch.no_grad():
                recorder.run(*inputs)
        except Exception as exc:
            raise TracingError(
                f"running the traced model on example_inputs failed: {_first_line(exc)}\n"
                "  What to do: check that example_inputs match the model's forward "
                "(a tensor or a tuple of positional inputs)."
            ) from exc
    return recorder.metas, recorder.devices
