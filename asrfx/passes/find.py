"""Capture a model and search it for attention: the first steps of every verb.

:func:`capture_model` turns a model into a GraphModule with shapes: the fx route, else the export
route when torch.fx cannot get through the forward or a submodule it had to keep whole holds
attention (each leaf is searched: captured alone, or child by child). :func:`find_sites` adds
detection and returns the :class:`SiteTable` users see. Nothing here changes the model.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from ..errors import AsrfxError, AsrfxWarning, TracingError
from ..graph.capture import (CaptureRoute, LeafRecord, Traced, as_input_tuple, as_kwargs, propagate_shapes,
                             trace)
from ..graph.export_route import export_capture
from ..graph.ops import node_shape
from .detect import detect
from .report import SiteTable

__all__ = ["capture_model", "find_sites", "has_shapes"]


def find_sites(model: nn.Module, example_inputs: Any = None, example_kwargs: dict[str, Any] | None = None,
               leaf_modules: Iterable[str | type] = (), concrete_args: dict[str, Any] | None = None) -> SiteTable:
    """Capture ``model`` and detect its attention sites (``asrfx.find_attention`` without its warnings)."""
    traced = capture_model(model, example_inputs, example_kwargs, leaf_modules, concrete_args)
    found = detect(traced.gm)
    return SiteTable(sites=tuple(found.sites), rejections=tuple(found.rejections), leaves=traced.leaves,
                     graph_module=traced.gm, model_name=type(model).__name__,
                     layout_losses=tuple(found.layout_losses), capture=traced.route)


def capture_model(model, example_inputs, example_kwargs, leaf_modules, concrete_args,
                        require_inputs=False, both_modes=True) -> Traced:
    """Capture ``model`` (GraphModules are copied, never annotated in place) and propagate shapes.

    The fx route first; where torch.fx cannot get through the model's forward, or a submodule it
    had to keep as a single call holds attention, the export route, which records why
    (``both_modes=False``: exported in the model's mode only, to look for attention).
    """
    inputs, kwargs = as_input_tuple(example_inputs), as_kwargs(example_kwargs)
    if isinstance(model, fx.GraphModule):
        gm = fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
        traced = Traced(gm, (), route=CaptureRoute("given"))
    elif not isinstance(model, nn.Module):
        return trace(model)  # raises, naming what was passed
    elif not (inputs or kwargs):
        traced = None
    else:
        try:
            traced = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args,
                           example_inputs=inputs, example_kwargs=kwargs)
            propagate_shapes(traced.gm, inputs, kwargs)
            why, leaves = _hidden_attention(model, traced.gm, traced.leaves)
            traced = dataclasses.replace(traced, leaves=leaves)
        except TracingError as exc:
            traced, why = None, str(exc)
        if why:
            traced = _exported(model, inputs, kwargs, why, both_modes)
        for leaf in traced.leaves:
            if leaf.unsearched:
                warnings.warn(f"module '{leaf.path}' ({leaf.module_type}) is kept as a single call and could not be "
                              f"searched for attention ({leaf.unsearched}); attention inside its own forward would "
                              "not be found", AsrfxWarning, stacklevel=4)
    if inputs or kwargs:
        if traced.route.name == "given":
            propagate_shapes(traced.gm, inputs, kwargs)
    elif traced is None or require_inputs or not has_shapes(traced.gm):
        raise AsrfxError(
            f"asrfx needs the shapes of {type(model).__name__}'s tensors: pass "
            "example_inputs=(torch.randn(1, 3, 224, 224),) (any batch size and resolution the "
            "model accepts)" + ("." if require_inputs else
                                ", or a GraphModule whose nodes carry shape metadata.")
        )
    return traced


def _exported(model: nn.Module, inputs: tuple, kwargs: dict, why: str, both_modes: bool = True) -> Traced:
    """The export route, after the fx route failed for ``why``; both reasons if it fails too."""
    first, _, rest = why.partition("\n")
    where = next((line.strip() for line in rest.splitlines() if line.strip().startswith("at ")), "")
    try:
        traced = export_capture(model, inputs, kwargs, reason=first + (f" ({where})" if where else ""),
                                both_modes=both_modes)
        propagate_shapes(traced.gm, inputs, kwargs)
    except TracingError as exc:
        raise TracingError(f"{why}\n  {exc}") from exc
    return traced


def has_shapes(gm: fx.GraphModule) -> bool:
    return any(node_shape(n) is not None for n in gm.graph.nodes if n.op == "placeholder")


def _hidden_attention(model: nn.Module, gm: fx.GraphModule,
                      leaves: tuple[LeafRecord, ...]) -> tuple[str, tuple[LeafRecord, ...]]:
    """Why the fx graph cannot be used: a submodule kept as a single call holds attention (empty
    if none does); and the leaves, each saying if it could not be searched."""
    checked = []
    for leaf in leaves:
        found, unsearched = _leaf_attention(model, gm, leaf)
        if found:
            return (f"module '{leaf.path}' ({leaf.module_type}) cannot be traced by torch.fx ({leaf.reason}), "
                    f"and it contains attention at {found}. asrfx never hides attention inside an untraceable "
                    "module.\n  What to do: make its forward traceable, or pass a pre-traced torch.fx.GraphModule."
                    ), leaves
        checked.append(dataclasses.replace(leaf, unsearched=unsearched))
    return "", tuple(checked)


def _leaf_attention(model: nn.Module, gm: fx.GraphModule, leaf: LeafRecord) -> tuple[str, str]:
    """(where attention is inside ``leaf``, why the leaf could not be searched); both empty when
    it was searched and holds none.

    The leaf runs on inputs shaped like the ones it receives: captured alone it takes the export
    route (torch.fx failed inside it). If that fails too, each child that may hold attention is
    captured alone; the leaf's own forward then stays unsearched, and says so.
    """
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == leaf.path]
    module = model.get_submodule(leaf.path)
    if not calls or not _may_hold_attention(module):
        return "", ""
    inputs = _random_like(calls[0].args)
    if inputs is None:
        return "", "no shapes for its inputs"
    try:
        found = detect(capture_model(module, inputs, None, (), None, both_modes=False).gm).sites
        return (f"'{leaf.path}{'.' + found[0].module_path if found[0].module_path else ''}' ({found[0].kind})"
                if found else ""), ""
    except TracingError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        unsearched = next((line for line in lines if line.startswith("torch.export cannot")), lines[0])
    children = {name: c for name, c in module.named_children() if _may_hold_attention(c)}
    for name, (child_args, child_kwargs) in _child_inputs(module, inputs, children).items():
        try:
            found = find_sites(module.get_submodule(name), child_args, child_kwargs).sites
        except TracingError:
            continue  # the child reports its own failures when it is traced alone
        if len(found):
            return f"'{leaf.path}.{name}{'.' + found[0].module_path if found[0].module_path else ''}' " \
                   f"({found[0].kind})", ""
    return "", unsearched


def _may_hold_attention(module: nn.Module) -> bool:
    """torch.nn's own layers cannot, nor can a module without parameters (every channel attention
    learns its excitation: timm's DropPath is searched for nothing); containers and user modules may."""
    own = type(module).__module__.startswith("torch.nn") and not isinstance(
        module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
    return not own and next(module.parameters(), None) is not None


def _random_like(args) -> tuple | None:
    values = []
    for a in args:
        if isinstance(a, fx.Node):
            meta = a.meta.get("tensor_meta")
            if meta is None or not hasattr(meta, "shape"):
                return None
            if meta.dtype.is_floating_point:
                values.append(torch.randn(meta.shape, dtype=meta.dtype))
            else:
                values.append(torch.zeros(meta.shape, dtype=meta.dtype))
        else:
            values.append(a)
    return tuple(values)


def _child_inputs(module: nn.Module, inputs: tuple, children: dict[str, nn.Module]) -> dict[str, tuple]:
    """Run a copy of ``module`` and record the first (args, kwargs) each child is called with."""
    probe = copy.deepcopy(module).eval()
    seen: dict[str, tuple] = {}
    hooks = []
    copied = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    for name in children:
        def hook(_mod, args, kwargs, _name=name):
            seen.setdefault(_name, (tuple(copied(a) for a in args), {k: copied(v) for k, v in kwargs.items()}))
        hooks.append(probe.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            probe(*inputs)
    except Exception:
        return {}
    finally:
        for h in hooks:
            h.remove()
    return seen
