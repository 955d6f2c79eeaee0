"""The export route: capture with torch.export what torch.fx cannot get through.

torch.export (non-strict, training IR) runs the model's own Python forward on fake tensors,
so it follows what symbolic tracing cannot: iteration over tensors and sizes ("Proxy object
cannot be iterated"), ``if h % 32: raise`` size checks, ``**kwargs`` passed down, dataclass
outputs (HF ``ModelOutput`` registers itself as a pytree node). Its graph is made of aten ops
(``aten.conv2d``, ``aten.batch_norm``, ``aten.mul.Tensor``) whose parameters are read by
``get_attr`` nodes; the passes read it through the same op vocabulary (``ops.op_of``) and
layer views (``layers.layer_of``) as an fx graph.

:func:`export_capture` turns the program into a plain ``fx.GraphModule`` (the one
``ExportedProgram.module()`` returns refuses ``.train()``/``.eval()``):

* parameters and buffers are the model's own tensors under their own names: the state_dict
  keys are the model's, so checkpoints load, and ``inplace`` training trains the model's own
  tensors; constants export lifted become non-persistent buffers (they follow ``.to()``);
* each module of the model has a holder module at its path: psi is registered on the holder
  of its attention block, as on the fx route, and each holder has a training flag;
* the model is exported with every module in train mode and again in eval mode; the graphs
  are merged by :func:`capture.merge_training_graphs`, so batch_norm's and dropout's
  ``training`` argument reads the flag of the module that made the call, and BatchNorm's
  ``num_batches_tracked`` counts in train mode only: ``.train()``/``.eval()`` act as on the
  model, and per-module flags (a frozen BatchNorm) are kept;
* the GraphModule is called as the model was (``gm(*example_inputs, **example_kwargs)``) and
  returns the model's output structure (the program's pytree codegen);
* every dimension of every input tensor is exported as ``Dim.AUTO`` (dynamic unless the code
  fixes it); a batch of one is exported as a batch of two, since export fixes sizes 0 and 1,
  and the program's guards are dropped, so the graph runs at any batch size.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export import Dim
from torch.fx.graph_module import _assign_attr, _get_attr

from ..errors import TracingError
from .edit import rewire_inplace
from .capture import CaptureRoute, Traced, check_call, first_line, user_frame
from .modes import training_graph, uniform_mode

__all__ = ["export_capture"]


def export_capture(model: nn.Module, args: tuple, kwargs: dict[str, Any], reason: str, *,
                   both_modes: bool = True) -> Traced:
    """Capture ``model(*args, **kwargs)`` with torch.export; ``reason``: why the fx route was not taken.

    ``both_modes=False`` exports once, in the model's own mode: enough to look for attention,
    and half the time, but the graph does not follow ``.train()``/``.eval()``.
    Raises :class:`TracingError` with export's own reason and the user's line when it fails.
    """
    check_call(model, args, kwargs)
    name = type(model).__name__
    programs: dict[bool, torch.export.ExportedProgram] = {}
    failure: Exception | None = None
    for training in (model.training, not model.training)[: 2 if both_modes else 1]:
        try:
            programs[training] = _export(model, args, kwargs, training)
        except Exception as exc:  # export raises many types; the one of the model's own mode is reported
            if training == model.training:
                where = user_frame(exc)
                raise TracingError(
                    f"torch.export cannot capture {name} either: {first_line(exc)}"
                    + (f"\n  at {where}" if where else "")
                    + "\n  What to do for torch.export: write control flow on tensor values with torch.cond, "
                    "or move it into a submodule that holds no attention (torch.fx keeps that one whole)."
                ) from exc
            failure = exc
    modules = {training: program.module(check_guards=False) for training, program in programs.items()}
    graph, note = training_graph({t: modules[t].graph if t in modules else None for t in (True, False)},
                                 model.training, name)
    notes = [note + (f" ({first_line(failure)})" if failure is not None else "")] if note and both_modes else []
    fixed = _fixed_batch(programs[model.training])
    if fixed:
        notes.append(f"torch.export fixed the batch size of {', '.join(fixed)} (the forward's code depends on "
                     "it): the captured graph runs only with that many samples")
    source = next(m for m in modules.values() if m.graph is graph)
    gm = _graph_module(model, source, graph, name)
    rewire_inplace(gm)  # aten.relu_ in a psi branch: its readers read its result, as on the fx route
    return Traced(gm, (), "; ".join(notes), CaptureRoute("export", reason))


def _fixed_batch(program: torch.export.ExportedProgram) -> list[str]:
    """Inputs whose first axis export made static, as 'name (n)'."""
    inputs = set(program.graph_signature.user_inputs)
    fixed = []
    for node in program.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if node.name in inputs and isinstance(value, torch.Tensor) and value.dim() \
                and not isinstance(value.shape[0], torch.SymInt):
            fixed.append(f"{node.name} ({value.shape[0]})")
    return fixed


def _export(model: nn.Module, args: tuple, kwargs: dict[str, Any], training: bool) -> torch.export.ExportedProgram:
    """One export with every module in train (or eval) mode; a batch of one as a batch of two."""
    calls = [(args, kwargs)]
    doubled = pytree.tree_map_only(torch.Tensor, _two_samples, (args, kwargs))
    if any(d is not o for d, o in zip(pytree.tree_leaves(doubled), pytree.tree_leaves((args, kwargs)))):
        calls.insert(0, doubled)  # sizes 0 and 1 are fixed by export, and train-mode BatchNorm refuses them
    # export prints the partial graph of a failed capture to stderr; the caller reports the failure
    with uniform_mode(model, training), contextlib.redirect_stderr(io.StringIO()):
        for k, (call_args, call_kwargs) in enumerate(calls):
            try:
                return torch.export.export(model, tuple(call_args), dict(call_kwargs),
                                           dynamic_shapes=_dynamic_shapes(model, call_args, call_kwargs),
                                           strict=False)
            except Exception:
                if k == len(calls) - 1:
                    raise
    raise AssertionError("unreachable")


def _two_samples(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t


def _dynamic_shapes(model: nn.Module, args, kwargs) -> dict[str, Any]:
    """Dim.AUTO for every axis of every tensor argument, by parameter name."""
    bound = check_call(model, tuple(args), dict(kwargs))
    auto = lambda v: {d: Dim.AUTO for d in range(v.dim())} if isinstance(v, torch.Tensor) else None  # noqa: E731
    return {key: pytree.tree_map(auto, value) for key, value in bound.arguments.items()}


def _graph_module(model: nn.Module, source: fx.GraphModule, graph: fx.Graph, name: str) -> fx.GraphModule:
    """A plain GraphModule over ``graph``: the model's tensors under their own names, a holder
    module at every module path, each with the model's training flag there."""
    root: dict[str, Any] = {}
    for node in graph.find_nodes(op="get_attr"):
        target = str(node.target)
        path, _, attr = target.rpartition(".")
        if attr == "training":
            root[target] = _module(model, path).training if _module(model, path) is not None else model.training
        else:
            root[target] = _tensor(model, source, target)
    gm = fx.GraphModule(root, graph, name)
    for path, module in model.named_modules():
        if path and _module(gm, path) is None:
            _assign_attr(nn.Module(), gm, path)
    used = {id(t) for t in gm.parameters()} | {id(t) for t in gm.buffers()}
    for key, tensor in _named_tensors(model):  # tied weights: every name the model has for a tensor it uses
        if id(tensor) in used and _module(gm, key.rpartition(".")[0]) is not None \
                and not hasattr(_module(gm, key.rpartition(".")[0]), key.rpartition(".")[2]):
            _assign_attr(tensor, gm, key)
    saved = set(model.state_dict(keep_vars=True))
    for key, buffer in list(gm.named_buffers()):
        if key not in saved:  # constants export lifted, and the model's non-persistent buffers
            owner, _, attr = key.rpartition(".")
            _module(gm, owner).register_buffer(attr, buffer, persistent=False)
    gm.train(model.training)
    for path, holder in gm.named_modules():  # per-module flags after the uniform train() above
        original = _module(model, path)
        if original is not None:
            holder.training = original.training
    return gm


def _named_tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _tensor(model: nn.Module, source: fx.GraphModule, target: str) -> Any:
    """The model's own parameter or buffer named ``target``, else the program's constant."""
    for getter in (model.get_parameter, model.get_buffer):
        try:
            return getter(target)
        except AttributeError:
            continue
    value = _get_attr(source, target)
    return value.detach() if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) else value
