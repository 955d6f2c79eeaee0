"""The TorchDynamo backend ``"asrfx"``: fuse ASR gates inside ``torch.compile``.

::

    fast = torch.compile(asr_model.eval(), backend="asrfx")        # fold every gate, then inductor
    fast = torch.compile(asr_model.eval(), backend="asrfx", options={"inner": "inductor",
                         "inner_options": {"freezing": True}})
    with torch.inference_mode():
        y = fast(x)

Dynamo hands a backend a graph of functional calls whose parameters and buffers are
graph inputs (placeholders), not module attributes. For an *inference* graph (gradients
off, no training-mode BatchNorm or dropout) the backend

1. freezes the model's parameters and buffers into constants of the graph (the inputs
   Dynamo marks as static module state; the data inputs stay inputs);
2. runs asrfx's fuse pass on it, which folds every constant gate into the conv / BN /
   linear calls around it, whether they are modules or functional calls;
3. folds what is left of each psi branch (a gate applied inside a BatchNorm's affine)
   into constants, checks that nothing reads a psi any more, and
4. hands the plain backbone graph, with only the data inputs, to the inner backend
   (inductor unless ``options={"inner": ...}`` names another backend or a callable).

Training graphs pass through unchanged, so ``torch.compile(asr_model)`` trains the ASR
form. Freezing works like inductor's ``freezing`` option: the compiled function keeps
the parameter values it saw at compile time; after changing weights, call
``torch._dynamo.reset()`` (or compile again). A graph with nothing to fold, or one whose
folding fails a check, is handed over unchanged and :data:`reports` says why.

The backend is registered under the name ``"asrfx"`` through the
``torch_dynamo_backends`` entry point when asrfx is installed, and when this module is
imported.
"""

from __future__ import annotations

import collections
import copy
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..errors import AsrfxError, AsrfxWarning
from ..passes.contract import attach_report, mark_psi, mark_psi_attributes
from .frozen import fuse_frozen
from ..passes.fuse import FuseReport
from ..graph.edit import copy_meta, unique_attr_name
from ..graph.ops import op_of

__all__ = ["asrfx_backend", "BackendReport", "reports", "BACKEND_NAME"]

BACKEND_NAME = "asrfx"
_OPTIONS = {"inner": "the backend that compiles the fused graph: a registered name (default 'inductor') "
                     "or a callable backend(gm, example_inputs)",
            "inner_options": "a dict for the inner backend (inductor: config patches such as {'freezing': True})"}


@dataclass(frozen=True)
class BackendReport:
    """What the backend did with one graph Dynamo captured."""

    folded: bool  # True: an inference graph whose gates were folded; False: handed over unchanged
    reason: str  # why it was handed over unchanged, or a one-line summary of the folding
    fuse: FuseReport | None  # every gate folded (into which calls) or kept, when folding ran
    frozen: int  # parameters and buffers frozen into constants of the graph
    inner: str  # the backend the graph went to

    def __str__(self) -> str:
        head = f"asrfx backend -> {self.inner}: " + ("folded" if self.folded else "unchanged") + f"; {self.reason}"
        return head + ("\n" + str(self.fuse) if self.fuse is not None and self.fuse.folds else "")


reports: collections.deque[BackendReport] = collections.deque(maxlen=64)  # newest last


def asrfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict | None = None,
                  mode: str | None = None) -> Callable:
    """Dynamo backend: fold constant (ASR) gates of an inference graph, then compile with the inner backend."""
    inner, inner_name = _inner_backend(options, mode)
    why = _why_not_inference(gm)
    if why:
        return _hand_over(gm, example_inputs, inner, inner_name, why)
    state = _state_inputs(gm, example_inputs)
    work = copy.deepcopy(gm)  # the graph Dynamo gave (and any module it calls) stays as it was
    frozen = _freeze(work, state, example_inputs)
    mark_psi_attributes(work)  # parameters Dynamo installed as graph attributes (inductor freezing on)
    keep = [i for i in range(len(example_inputs)) if i not in state]
    data = [example_inputs[i] for i in keep]
    try:
        report = fuse_frozen(work, data)
    except (AsrfxError, RuntimeError, TypeError, ValueError) as exc:
        problem = f"folding failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        warnings.warn(f"asrfx backend: {problem}; the graph is compiled unchanged", AsrfxWarning, stacklevel=2)
        return _hand_over(gm, example_inputs, inner, inner_name, problem)
    if not report.folds:
        return _hand_over(gm, example_inputs, inner, inner_name, "no constant gate in this graph")
    kept = len(report.kept)
    summary = (f"{len(report.folds) - kept} gate(s) folded, {kept} kept; "
               f"{frozen} parameters and buffers frozen; {len(keep)} data input(s)")
    backend_report = BackendReport(True, summary, report, frozen, inner_name)
    reports.append(backend_report)
    attach_report(work, backend_report)
    compiled = inner(work, data)

    def run(*args):
        return compiled(*[args[i] for i in keep])

    return run


# -- what kind of graph --------------------------------------------------------------------------


def _why_not_inference(gm: fx.GraphModule) -> str | None:
    """A reason to leave the graph alone: it may be trained, or it runs in training mode."""
    for node in gm.graph.nodes:
        name = op_of(node, {}).name
        if name in ("batch_norm", "dropout") and node.op == "call_function" and _training_flag(node, name):
            return (f"'{node.name}' ({name}) runs in training mode: call .eval() on the model to fold its gates")
    if torch.is_grad_enabled():
        warnings.warn(
            "asrfx backend: gradients are enabled, so the graph is compiled as it is (it may be trained) and "
            "its ASR gates are not folded. Call the compiled eval-mode model under torch.no_grad() or "
            "torch.inference_mode() to run the fused backbone.", AsrfxWarning, stacklevel=3)
        return "gradients are enabled (a training graph): compiled unchanged"
    return None


def _training_flag(node: fx.Node, name: str) -> bool:
    # F.batch_norm(x, mean, var, w, b, training, ...), F.dropout(x, p, training, inplace)
    position, default = (5, False) if name == "batch_norm" else (2, True)
    value = node.kwargs.get("training", node.args[position] if len(node.args) > position else default)
    return value is not False


def _state_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[int, str]:
    """Graph inputs that are the model's parameters and buffers: position -> qualified name."""
    state = {}
    for i, (node, value) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), example_inputs)):
        if not isinstance(value, torch.Tensor):
            continue
        source = getattr(node, "_dynamo_source", None)
        source_name = getattr(source, "name", "") or ""
        source_name = source_name() if callable(source_name) else source_name
        marked = (node.meta.get("tensor_dict") or {}).get("_dynamo_static_input_type") is not None
        module_state = "._parameters[" in source_name or "._buffers[" in source_name
        if isinstance(value, torch.nn.Parameter) or module_state or (marked and "self" in source_name):
            state[i] = _qualified_name(source_name) or node.name
    return state


def _qualified_name(source_name: str) -> str:
    """``L['self']._modules['layer1']._parameters['psi']`` -> ``layer1.psi``."""
    parts = re.findall(r"\['([^']*)'\]|\.(\w+)", source_name)
    names = [a or b for a, b in parts]
    names = [n for n in names if n not in ("self", "_modules", "_parameters", "_buffers")]
    return ".".join(names)


# -- freezing ------------------------------------------------------------------------------------


def _freeze(gm: fx.GraphModule, state: dict[int, str], example_inputs: Sequence[Any]) -> int:
    """Parameter and buffer inputs become constants of the graph (tensors shared, not copied)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    first = next((n for n in gm.graph.nodes if n.op != "placeholder"), None)
    for i, qualified in state.items():
        node = placeholders[i]
        attr = unique_attr_name(gm, "frozen_" + qualified.replace(".", "_"))
        value = example_inputs[i]
        if isinstance(value, torch.nn.Parameter):  # shared storage, not a copy; no gradient is taken
            gm.register_parameter(attr, torch.nn.Parameter(value.detach(), requires_grad=False))
        else:
            gm.register_buffer(attr, value.detach())
        with gm.graph.inserting_before(first):
            const = gm.graph.get_attr(attr)
        copy_meta(node, const)
        mark_psi(const, qualified)
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return len(state)


# -- the inner backend ---------------------------------------------------------------------------


def _inner_backend(options: dict | None, mode: str | None) -> tuple[Callable, str]:
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        known = "; ".join(f"'{k}': {v}" for k, v in _OPTIONS.items())
        raise AsrfxError(f"the asrfx backend has no option {unknown}; its options are {known}")
    inner = options.get("inner", "inductor")
    inner_options = dict(options.get("inner_options") or {})
    if callable(inner):
        return (lambda g, ex: inner(g, ex, **inner_options)), getattr(inner, "__name__", repr(inner))
    if not isinstance(inner, str):
        raise AsrfxError(f"options['inner'] names a backend or is a callable, got {type(inner).__name__}")
    if inner == BACKEND_NAME:
        raise AsrfxError("options['inner'] cannot be 'asrfx' itself: name the backend that compiles the fused graph")
    if inner == "inductor":
        def inductor(g, ex):
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            patches = {**(list_mode_options(mode) if mode else {}), **inner_options}
            return compile_fx(g, ex, config_patches=patches)
        return inductor, "inductor"
    from torch._dynamo import lookup_backend

    backend = lookup_backend(inner)
    return (lambda g, ex: backend(g, ex, **inner_options)), inner


def _hand_over(gm, example_inputs, inner, inner_name, reason) -> Callable:
    reports.append(BackendReport(False, reason, None, 0, inner_name))
    return inner(gm, list(example_inputs))


def _register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    # An installed asrfx is found through its entry point, and torch registers what it loads:
    # registering here as well would be a duplicate. Without the entry point, importing registers.
    if _BACKENDS.get(BACKEND_NAME) is None and BACKEND_NAME not in _COMPILER_FNS:
        register_backend(asrfx_backend, name=BACKEND_NAME)


_register()
