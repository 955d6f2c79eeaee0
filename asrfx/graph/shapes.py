"""Shape propagation on meta tensors: what each node's tensor looks like, at the cost of no compute.

:func:`asrfx.graph.capture.propagate_shapes` needs every node's shape, dtype and strides for
the example inputs, on the model in eval mode, without touching the caller's parameters,
buffers or training flags. Fake tensors do that by deep-copying the model into fake tensors
(most of the cost: every parameter goes through the fake-tensor converter) and by running every
op through a Python dispatch mode. Meta tensors need neither: :func:`meta_run` calls each
module through a *twin*, a shallow copy whose parameters and buffers are meta tensors of the
same shapes and whose training flag is False, and runs the graph on meta inputs. Nothing is
allocated or computed, and the model is not copied.

Meta tensors carry no values, so a graph that needs one (``.item()``, data-dependent shapes),
mixes devices, or makes a tensor without saying the device fails here: :func:`meta_run` then
returns None and the caller falls back to fake tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

__all__ = ["meta_run", "meta_rerun", "node_records", "tensor_metadata"]


class _Twins:
    """Meta twins of modules and tensors, each made once (shared parameters stay shared)."""

    def __init__(self):
        self.tensors: dict[int, torch.Tensor] = {}
        self.modules: dict[int, nn.Module] = {}

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        found = self.tensors.get(id(t))
        if found is None:
            meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            found = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
            self.tensors[id(t)] = found
        return found

    def module(self, m: nn.Module) -> nn.Module:
        found = self.modules.get(id(m))
        if found is None:
            found = copy.copy(m)  # a new object with the same attributes; containers replaced below
            found._parameters = {k: None if p is None else self.tensor(p) for k, p in m._parameters.items()}
            found._buffers = {k: None if b is None else self.tensor(b) for k, b in m._buffers.items()}
            found._modules = {k: None if c is None else self.module(c) for k, c in m._modules.items()}
            found.training = False
            self.modules[id(m)] = found
        return found


def tensor_metadata(result: Any, cache: dict | None = None) -> Any:
    """A node's ``tensor_meta``: the TensorMetadata of a tensor result, the same structure of them for
    a tuple/list/dict of tensors, None when the result holds no tensor. ``cache`` (a dict kept over
    one run) shares the metadata of equal tensors: its memory-format checks are Python code."""
    found = False

    def extract(obj):
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            if cache is None or obj.layout is not torch.strided or obj.is_quantized:
                return _extract_tensor_metadata(obj)
            key = (obj.shape, obj.stride(), obj.dtype, obj.requires_grad)
            meta = cache.get(key)
            if meta is None:
                meta = cache[key] = _extract_tensor_metadata(obj)
            return meta
        return obj

    meta = map_aggregate(result, extract)
    return meta if found else None


class _MetaInterpreter(fx.Interpreter):
    """Runs the graph in eval mode on meta twins; records each node's tensor metadata."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.twins = _Twins()
        self.metas: list[Any] = []
        self.cache: dict = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.metas.append(tensor_metadata(result, self.cache))
        return result

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if _keeps_shape(module, args, kwargs):
            x = args[0]
            if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
                # what empty_like gives a dense tensor, without its Python meta kernel (~0.1 ms)
                return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
            return torch.empty_like(x)
        return self.twins.module(module)(*args, **kwargs)

    def placeholder(self, target, args, kwargs):
        if str(target).startswith("*"):  # *args / **kwargs: one value each (capture.placeholder_values)
            return next(self.args_iter)
        return super().placeholder(target, args, kwargs)

    def get_attr(self, target, args, kwargs):
        if target == "training" or str(target).endswith(".training"):  # flags the graph reads: eval
            return False
        value = self.fetch_attr(target)
        return self.twins.tensor(value) if isinstance(value, torch.Tensor) else value


# Modules whose output (in eval mode) is shaped, typed and laid out like their one input: their
# meta kernels (BatchNorm's is a Python decomposition, about a millisecond a call) are skipped.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                nn.GELU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Hardtanh, nn.Identity,
                nn.modules.dropout._DropoutNd)
_NORM_RANKS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def _keeps_shape(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """A torch.nn elementwise module or BatchNorm called on one floating tensor it accepts."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return False
    kind = type(module)
    if kind in _NORM_RANKS:  # the checks BatchNorm itself makes (a wrong example must still fail)
        x = args[0]
        return x.dim() in _NORM_RANKS[kind] and x.shape[1] == module.num_features \
            and (module.weight is None or module.weight.dtype == x.dtype)
    return kind in _ELEMENTWISE


def _device(gm: fx.GraphModule, inputs: Sequence[Any]) -> torch.device | None:
    """The one device of the inputs, parameters and buffers (None when they are on several)."""
    devices = {t.device for t in torch.utils._pytree.tree_leaves(list(inputs)) if isinstance(t, torch.Tensor)}
    devices |= {t.device for t in gm.parameters()} | {t.device for t in gm.buffers()}
    return next(iter(devices)) if len(devices) == 1 else None


def meta_run(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[list[Any], list[torch.device | None]] | None:
    """Per node of ``gm`` (in graph order): tensor metadata and device, from a run of the graph in
    eval mode on meta tensors shaped like ``inputs``; None when the graph cannot run on meta."""
    device = _device(gm, inputs)
    if device is None or device.type == "meta":
        return None
    runner = _MetaInterpreter(gm)
    meta_inputs = torch.utils._pytree.tree_map_only(torch.Tensor, runner.twins.tensor, list(inputs))
    try:
        with torch.no_grad():
            runner.run(*meta_inputs)
    except Exception:  # an op without a meta kernel, a value read, a tensor made on another device
        return None
    devices = [device if _is_tensor_meta(m) else None for m in runner.metas]
    return runner.metas, devices


def node_records(gm: fx.GraphModule) -> dict[fx.Node, tuple]:
    """What each node of ``gm`` computes: its op, target, arguments, and the module or attribute it
    names. :func:`meta_rerun` recomputes the nodes whose record has changed since."""
    return {n: _record(gm, n) for n in gm.graph.nodes}


def _record(gm: fx.GraphModule, n: fx.Node) -> tuple:
    held = None
    if n.op in ("call_module", "get_attr"):
        held = gm
        for part in str(n.target).split("."):
            held = getattr(held, part, None)
    return n.op, n.target, n.args, n.kwargs, held


def _same_record(a: tuple, b: tuple) -> bool:
    # fx gives a node new args and kwargs objects whenever they change
    return a[0] == b[0] and a[1] == b[1] and a[2] is b[2] and a[3] is b[3] and a[4] is b[4]


def meta_rerun(gm: fx.GraphModule, before: dict[fx.Node, tuple], inputs: Sequence[Any]
               ) -> dict[fx.Node, tuple[Any, torch.device | None]] | None:
    """New metadata (and device) for the nodes of ``gm`` that a rewrite made or changed since
    ``before`` (:func:`node_records`), and for those reading them whose inputs' metadata changed;
    None when that part of the graph cannot run on meta tensors.

    Nothing else runs: a tensor that did not change is rebuilt from its ``tensor_meta`` (shape,
    strides, dtype), and only values without one (sizes, flags) are computed again.
    """
    device = _device(gm, inputs)
    if device is None or device.type == "meta":
        return None
    runner = _MetaInterpreter(gm)
    values = iter(torch.utils._pytree.tree_map_only(torch.Tensor, runner.twins.tensor, list(inputs)))
    stale = {n for n in gm.graph.nodes if n not in before or not _same_record(before[n], _record(gm, n))}
    found: dict[fx.Node, tuple[Any, torch.device | None]] = {}
    env = runner.env
    try:
        with torch.no_grad():
            for n in gm.graph.nodes:
                old = n.meta.get("tensor_meta")
                if n.op == "placeholder":
                    env[n] = next(values)
                elif n not in stale and old is not None:
                    continue  # rebuilt from its metadata if a recomputed node reads it
                else:
                    for i in n.all_input_nodes:
                        if i not in env:
                            env[i] = _from_metadata(i.meta["tensor_meta"])
                    env[n] = fx.Interpreter.run_node(runner, n)
                if n in stale:
                    meta = tensor_metadata(env[n], runner.cache)
                    found[n] = (meta, device if _is_tensor_meta(meta) else None)
                    if meta is None or meta != old:
                        stale.update(n.users)
    except Exception:  # as meta_run: the caller propagates over the whole graph instead
        return None
    return found


def _from_metadata(meta: Any) -> Any:
    """A meta tensor (or the structure of them) described by a node's ``tensor_meta``."""
    if isinstance(meta, TensorMetadata):
        if meta.is_quantized:
            raise TypeError("no meta tensor for a quantized one")
        t = torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device="meta")
        return t.requires_grad_() if meta.requires_grad else t
    if isinstance(meta, tuple) and hasattr(meta, "_fields"):  # a named tuple
        return type(meta)(*(_from_metadata(m) for m in meta))
    if isinstance(meta, (tuple, list)):  # fx keeps lists as immutable_list
        return (tuple if isinstance(meta, tuple) else list)(_from_metadata(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _from_metadata(v) for k, v in meta.items()}
    return meta


def _is_tensor_meta(meta: Any) -> bool:
    return meta is not None and hasattr(meta, "shape") and hasattr(meta, "dtype")
