"""What makes find_attention and convert cheap, checked for what it must not change.

* Shapes come from a run on meta tensors (:mod:`asrfx.graph.shapes`): the same shapes, dtypes
  and devices as the fake-tensor run it replaces, on every model of the zoo; models that cannot
  run on meta fall back to fake tensors; the caller's model is not touched.
* After convert rewrites the sites, only the nodes it made or changed (and those their shapes
  reach) are propagated again (:func:`repropagate_shapes`): the metadata equals a fresh
  propagation over the whole converted graph.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import asrfx

from asrfx.graph.capture import _fake_or_real_run, propagate_shapes, repropagate_shapes, trace
from asrfx.graph.shapes import meta_run, node_records

import zoo
from helpers import carried_shapes, fresh_shapes


def _summary(meta):
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return tuple(meta.shape), meta.dtype
    if isinstance(meta, (tuple, list)):
        return tuple(_summary(m) for m in meta)
    return repr(meta)


@pytest.mark.parametrize("case", zoo.ALL_CASES, ids=lambda c: c.name)
def test_meta_shapes_equal_fake_tensor_shapes(case):
    """Per node: shape, dtype (and tuple structure) and device as the fake-tensor run gives them.
    (Strides may differ: meta kernels do not pick the CPU kernels' memory formats; asrfx reads none.)"""
    model = case.build().eval()
    gm = trace(model).gm
    x = torch.randn(case.input_shape)
    found = meta_run(gm, (x,))
    assert found is not None, "runs on meta"
    metas, devices = _fake_or_real_run(gm, (x,))
    assert [_summary(m) for m in found[0]] == [_summary(m) for m in metas]
    assert found[1] == devices


class MakesATensor(nn.Module):
    """torch.arange without a device: a CPU tensor meeting a meta one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return y + torch.arange(y.shape[-1], dtype=y.dtype)


def scale_by_max(x):
    return x * float(x.abs().max())  # a value read: meta tensors have none


torch.fx.wrap("scale_by_max")


class ReadsAValue(nn.Module):
    def forward(self, x):
        return scale_by_max(x)


@pytest.mark.parametrize("model", [MakesATensor(), ReadsAValue()], ids=["device_less_tensor", "value_read"])
def test_graphs_that_cannot_run_on_meta_fall_back(model):
    gm = trace(model).gm
    x = torch.randn(2, 3, 4, 5)
    assert meta_run(gm, (x,)) is None
    propagate_shapes(gm, (x,))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out.meta["tensor_meta"].shape) == tuple(model(x).shape)


def test_shape_propagation_leaves_the_model_alone():
    """Training flags, parameters, buffers (BatchNorm statistics) untouched; nothing copied to meta."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gm = trace(model).gm
    propagate_shapes(gm, (torch.randn(1, 3, 3, 3),))  # train-mode BatchNorm would refuse 1x1 at batch 1
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, state[k]), k
    assert gm.graph.find_nodes(op="call_module", target="1")[0].meta["tensor_meta"].shape == (1, 4, 1, 1)


def test_wrong_example_inputs_still_fail_clearly():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(asrfx.TracingError, match="example_inputs"):
        propagate_shapes(trace(model).gm, (torch.randn(1, 5, 8, 8),))


@pytest.mark.filterwarnings("ignore::asrfx.AsrfxWarning")
@pytest.mark.parametrize("keep", [False, True], ids=["replace", "keep"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", zoo.ALL_CASES, ids=lambda c: c.name)
def test_converted_graph_carries_fresh_shapes(case, batch, keep):
    """Every node's metadata (strides and requires_grad included) as a propagation over the whole
    converted graph gives it; the gates stay where convert put them (the layers' gates add nodes)."""
    x = torch.randn((batch,) + tuple(case.input_shape[1:]))
    gm = asrfx.convert(case.build().eval(), x, keep=keep, gate_in_norm=False, gate_in_consumers=False)
    assert carried_shapes(gm) == fresh_shapes(gm, (x,))


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_repropagation_reaches_every_reader_and_falls_back():
    """A changed node's new shape reaches the nodes reading it (and theirs); a rewrite that cannot
    run on meta tensors is propagated over the whole graph."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten(), nn.ReLU(), nn.Dropout())
    gm = trace(model).gm
    x = torch.randn(2, 3, 5, 5)
    propagate_shapes(gm, (x,))
    before = node_records(gm)
    relu = gm.graph.find_nodes(op="call_module", target="1")[0]
    with gm.graph.inserting_after(relu):
        pooled = gm.graph.call_function(torch.nn.functional.avg_pool2d, (relu, 5))
    relu.replace_all_uses_with(pooled, delete_user_cb=lambda user: user is not pooled)
    gm.recompile()
    repropagate_shapes(gm, before, (x,))
    assert carried_shapes(gm) == fresh_shapes(gm, (x,))
    assert gm.graph.output_node().args[0].meta["tensor_meta"].shape == (2, 4)  # two unchanged nodes later

    before = node_records(gm)
    with gm.graph.inserting_after(pooled):
        scaled = gm.graph.call_function(scale_by_max, (pooled,))
    pooled.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    gm.recompile()
    repropagate_shapes(gm, before, (x,))  # a value read: meta tensors have none
    assert scaled.meta["tensor_meta"].shape == (2, 4, 1, 1)
    assert carried_shapes(gm) == fresh_shapes(gm, (x,))
