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
from torch.fx.passes.shape_prop import _extract_tensor_metadata

__all__ = ["meta_run", "tensor_metadata"]


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


def tensor_metadata(result: Any) -> Any:
    """A node's ``tensor_meta``: the TensorMetadata of a tensor result, the same structure of them for
    a tuple/list/dict of tensors, None when the result holds no tensor."""
    found = False

    def extract(obj):
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return _extract_tensor_metadata(obj)
        return obj

    meta = map_aggregate(result, extract)
    return meta if found else None


class _MetaInterpreter(fx.Interpreter):
    """Runs the graph in eval mode on meta twins; records each node's tensor metadata."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.twins = _Twins()
        self.metas: list[Any] = []

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.metas.append(tensor_metadata(result))
        return result

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if _keeps_shape(module, args, kwargs):
            return torch.empty_like(args[0])
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


def _is_tensor_meta(meta: Any) -> bool:
    return meta is not None and hasattr(meta, "shape") and hasattr(meta, "dtype")
