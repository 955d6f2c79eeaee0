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

from .errors import TracingError
from .site import LeafRecord

__all__ = ["Traced", "trace", "propagate_shapes", "as_input_tuple"]

_MAX_LEAVES = 512


@dataclass(frozen=True)
class Traced:
    """A traced model."""

    gm: fx.GraphModule  # shares submodules with the model it came from (read-only use)
    leaves: tuple[LeafRecord, ...]  # submodules kept as single calls because fx failed inside them


class _LeafTracer(fx.Tracer):
    """fx.Tracer that also keeps the given module paths and types as leaves."""

    def __init__(self, leaf_paths: set[str], leaf_types: tuple[type, ...]):
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
    while True:
        tracer = _LeafTracer(set(leaf_paths), leaf_types)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
            break
        except Exception as exc:  # fx raises many types; we name the place and move on
            failing = next(reversed(tracer.module_stack), "") if tracer.module_stack else ""
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
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    return Traced(gm, tuple(leaves))


class _MetaRecorder(fx.Interpreter):
    """Runs a (fake) copy of a graph and records each node's tensor metadata."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.metas: list[Any] = []

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
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Write ``tensor_meta`` onto every node of ``gm`` from ``example_inputs``.

    Runs a copy in eval mode (train-mode BatchNorm rejects a batch of one 1x1
    map and would update running statistics): first with fake tensors (no
    compute), then for real if some op has no fake implementation.
    """
    inputs = as_input_tuple(example_inputs)
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
    for node, meta in zip(gm.graph.nodes, recorder.metas):
        if meta is not None:
            node.meta["tensor_meta"] = meta
