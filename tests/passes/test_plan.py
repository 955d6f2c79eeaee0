"""The fold planner (passes/absorb.py) and the rule table it reads (algebra/rules.py), op by op.

Each test builds a small graph, asks the planner where the gate ``x * v`` (or ``x + v``) folds,
and compares the whole Plan: which layers take it, on which side, which gate entries land on which
channels (the Span), the ops it moved through, whether that needs a non-negative gate, the
parameters to change, or the exact reason it cannot fold. Fused numbers are checked elsewhere
(test_fold_rules.py, test_fuse*.py); here a planner that folds into the wrong channels, through the
wrong op, or refuses for the wrong reason fails even where the fused model would still be exact.
"""

from __future__ import annotations

import operator
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from asrfx.algebra import rules
from asrfx.algebra.rules import input_absorbs, output_absorbs, scale_passes, shift_passes
from asrfx.graph.layers import LayerIndex
from asrfx.passes.absorb import Span, label_of, plan_consumers, plan_producer, residual_add, static_sign, value_sign


def _graph(module: nn.Module, *shapes):
    gm = fx.symbolic_trace(module)
    ShapeProp(gm).propagate(*[torch.randn(s) for s in shapes])
    return gm, LayerIndex(gm)


def _combine(gm) -> fx.Node:
    """The node that applies the gate: the one reading the attribute ``v``."""
    found = [n for n in gm.graph.nodes if n.op == "call_function"
             and any(isinstance(a, fx.Node) and a.op == "get_attr" and a.target == "v" for a in n.args)]
    assert len(found) == 1
    return found[0]


def _sign(known):
    return lambda start, stop: known


def _plan(module, shapes, side, known, optimistic, axes):
    gm, modules = _graph(module, *shapes)
    combine = _combine(gm)
    op = "add" if combine.target in (torch.add, operator.add) else "mul"
    if side == "producer":
        plan = plan_producer(combine.args[0], combine, axes, op, _sign(known), modules, optimistic=optimistic)
    else:
        plan = plan_consumers(combine, axes, op, _sign(known), modules, optimistic=optimistic)
    assert plan.side == side  # a refusal says which side refused too
    return plan, modules


def producer(module, *shapes, known=True, optimistic=False, axes=1):
    return _plan(module, shapes, "producer", known, optimistic, axes)


def consumers(module, *shapes, known=True, optimistic=False, axes=1):
    return _plan(module, shapes, "consumers", known, optimistic, axes)


def targets(plan):
    """The plan as plain values: (layer, kind, side, span, width, through, non_negative, parts, shift_into)."""
    assert plan.ok and plan.reason == "", plan.reason
    return [(label_of(t.node), t.kind, t.side, t.span, t.width, tuple(label_of(n) for n in t.through),
             t.non_negative, t.parts, t.shift_into and label_of(t.shift_into)) for t in plan.targets]


def refused(plan) -> str:
    assert not plan.ok and plan.targets == ()
    return plan.reason


class Gate(nn.Module):
    """``after(self, before(self, x) (*|+) v)``; layers as keyword modules."""

    def __init__(self, before, after, v_shape, shift=False, **layers):
        super().__init__()
        self.before, self.after, self.shift = before, after, shift
        for name, layer in layers.items():
            setattr(self, name, layer)
        self.v = nn.Parameter(torch.rand(v_shape))

    def forward(self, x):
        y = self.before(self, x)
        return self.after(self, y + self.v if self.shift else y * self.v)


def Gated(body, v_shape=(1, 6, 1, 1), **kw):  # noqa: N802  (reads like the class it builds)
    """``body(x) (*|+) v``: the gate's producer side."""
    return Gate(body, lambda s, g: g, v_shape, **kw)


def Reads(read, v_shape=(1, 3, 1, 1), **kw):  # noqa: N802
    """``read(x (*|+) v)``: the gate's consumer side."""
    return Gate(lambda s, x: x, read, v_shape, **kw)


IMG = (2, 3, 8, 8)
SEQ = (2, 5, 6)  # [N, L, C]


def conv(c_in=3, c_out=6, **kw):
    return nn.Conv2d(c_in, c_out, 3, **kw)


def bn(c=6, **kw):
    m = nn.BatchNorm2d(c, **kw)
    return m.eval()


# -- producer side: layers ------------------------------------------------------------------------


def test_conv_takes_the_scale_on_its_output_rows_and_bias():
    plan, _ = producer(Gated(lambda s, x: s.conv(x), conv=conv()), IMG)
    assert targets(plan) == [("conv", "conv", "output", Span(1, 0, 6, 0), 6, (), False, ("weight", "bias"), None)]
    assert plan.side == "producer"


def test_a_shift_creates_the_bias_of_a_conv_without_one():
    plan, _ = producer(Gated(lambda s, x: s.conv(x), shift=True, conv=conv(bias=False)), IMG)
    assert targets(plan) == [("conv", "conv", "output", Span(1, 0, 6, 0), 6, (), False, ("bias",), None)]


def test_relu_passes_a_non_negative_gate_and_the_target_says_so():
    body = lambda s, x: F.relu(s.bn(s.conv(x)))  # noqa: E731
    plan, modules = producer(Gated(body, conv=conv(), bn=bn()), IMG)
    assert targets(plan) == [("bn", "batch_norm", "output", Span(1, 0, 6, 0), 6, ("relu",), True,
                              ("weight", "bias"), None)]
    assert plan.describe(modules) == "BatchNorm2d 'bn' through relu (if the gate is non-negative)"


def test_relu_refuses_a_gate_with_negative_entries_or_of_unknown_sign():
    body = lambda s, x: F.relu(s.bn(s.conv(x)))  # noqa: E731
    plan, modules = producer(Gated(body, conv=conv(), bn=bn()), IMG, known=False)
    assert refused(plan) == "'relu': relu commutes with a non-negative scale only, and the gate has negative entries"
    assert plan.describe(modules) == plan.reason
    plan, _ = producer(Gated(body, conv=conv(), bn=bn()), IMG, known=None)
    assert refused(plan) == "'relu': relu commutes with a non-negative scale only, and the gate may be negative"
    plan, _ = producer(Gated(body, conv=conv(), bn=bn()), IMG, known=None, optimistic=True)
    assert [t[0] for t in targets(plan)] == ["bn"] and plan.targets[0].non_negative


def test_a_non_negative_gate_passes_leaky_relu_and_a_module_relu():
    plan, modules = producer(Gated(lambda s, x: s.act(s.conv(x)), conv=conv(), act=nn.LeakyReLU(0.1)), IMG)
    assert targets(plan) == [("conv", "conv", "output", Span(1, 0, 6, 0), 6, ("act",), True,
                              ("weight", "bias"), None)]
    assert plan.describe(modules) == "Conv2d 'conv' through LeakyReLU (if the gate is non-negative)"


def test_a_shift_does_not_pass_relu():
    plan, _ = producer(Gated(lambda s, x: F.relu(s.conv(x)), shift=True, conv=conv()), IMG)
    assert refused(plan) == "'relu': relu does not commute with a per-channel shift"


def test_a_norm_without_affine_parameters_cannot_take_a_gate():
    plan, _ = producer(Gated(lambda s, x: s.bn(s.conv(x)), conv=conv(), bn=bn(affine=False)), IMG)
    assert refused(plan) == "'bn' (BatchNorm2d): it has no affine weight to absorb a scale"
    plan, _ = producer(Gated(lambda s, x: s.bn(s.conv(x)), shift=True, conv=conv(), bn=bn(affine=False)), IMG)
    assert refused(plan) == "'bn' (BatchNorm2d): it has no bias for the shift"
    plan, _ = producer(Gated(lambda s, x: s.gn(s.conv(x)), conv=conv(), gn=nn.GroupNorm(2, 6, affine=False)), IMG)
    assert refused(plan) == "'gn' (GroupNorm): it has no affine weight to absorb a scale"


def test_a_group_norm_takes_a_shift_in_its_bias_only():
    plan, _ = producer(Gated(lambda s, x: s.gn(s.conv(x)), shift=True, conv=conv(), gn=nn.GroupNorm(2, 6)), IMG)
    assert targets(plan) == [("gn", "group_norm", "output", Span(1, 0, 6, 0), 6, (), False, ("bias",), None)]


def test_layer_norm_takes_a_gate_on_its_last_axis_over_that_axis_alone():
    plan, _ = producer(Gated(lambda s, x: s.ln(s.fc(x)), v_shape=(1, 1, 6), fc=nn.Linear(6, 6),
                             ln=nn.LayerNorm(6)), SEQ, axes=2)
    assert targets(plan) == [("ln", "layer_norm", "output", Span(2, 0, 6, 0), 6, (), False, ("weight", "bias"), None)]
    plan, _ = producer(Gated(lambda s, x: s.ln(s.fc(x)), v_shape=(1, 1, 6), fc=nn.Linear(6, 6),
                             ln=nn.LayerNorm((5, 6))), SEQ, axes=2)
    assert refused(plan) == "'ln' (LayerNorm): it normalizes (5, 6), not the gated axis alone"
    plan, _ = producer(Gated(lambda s, x: s.ln(s.fc(x)), v_shape=(1, 5, 1), fc=nn.Linear(6, 6),
                             ln=nn.LayerNorm(6)), SEQ, axes=1)
    assert refused(plan) == "'ln' (LayerNorm): it has its channels on the last axis, the gate is on axis 1"


def test_a_gate_on_a_conv_output_axis_other_than_channels_is_refused():
    plan, _ = producer(Gated(lambda s, x: s.conv(x), v_shape=(1, 1, 6, 1), conv=conv()), IMG, axes=2)
    assert refused(plan) == "'conv' (Conv2d): it has its channels on axis 1, the gate is on axis 2"


def test_the_graph_input_and_a_non_commuting_op_are_named():
    plan, _ = producer(Gated(lambda s, x: x, v_shape=(1, 3, 1, 1)), IMG)
    assert refused(plan) == "x is the graph input 'x'"
    plan, modules = producer(Gated(lambda s, x: torch.sigmoid(s.conv(x)), conv=conv()), IMG)
    assert refused(plan) == "x comes out of sigmoid 'sigmoid', which does not commute with a per-channel constant"
    plan, _ = producer(Gated(lambda s, x: s.act(s.conv(x)), conv=conv(), act=nn.Hardswish()), IMG)
    assert refused(plan) == "x comes out of Hardswish 'act', which does not commute with a per-channel constant"


def test_x_read_unscaled_elsewhere_cannot_take_the_gate():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.v = conv(), nn.Parameter(torch.rand(1, 6, 1, 1))

        def forward(self, x):
            y = self.conv(x)
            return y * self.v + y

    plan, _ = producer(M(), IMG)
    assert refused(plan) == "'conv' is also read unscaled by 'add'"
    assert plan.side == "producer"


def test_an_op_whose_input_is_read_elsewhere_stops_the_walk():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.v = conv(), nn.Parameter(torch.rand(1, 6, 1, 1))

        def forward(self, x):
            y = self.conv(x)
            return F.relu(y) * self.v, y.sum()

    plan, _ = producer(M(), IMG)
    assert refused(plan) == "'conv' is also read by others than 'relu' (relu)"


# -- producer side: sums, concatenations, products ------------------------------------------------


def test_every_branch_of_a_sum_takes_the_scale():
    plan, modules = producer(Gated(lambda s, x: s.a(x) + s.b(x), a=conv(), b=conv()), IMG)
    assert targets(plan) == [
        ("a", "conv", "output", Span(1, 0, 6, 0), 6, ("add",), False, ("weight", "bias"), None),
        ("b", "conv", "output", Span(1, 0, 6, 0), 6, ("add",), False, ("weight", "bias"), None)]
    assert plan.describe(modules) == "Conv2d 'a', Conv2d 'b' through add"


def test_one_branch_of_a_sum_takes_a_shift():
    plan, _ = producer(Gated(lambda s, x: s.a(x) + s.b(x), shift=True, a=conv(), b=conv()), IMG)
    assert [t[:4] for t in targets(plan)] == [("a", "conv", "output", Span(1, 0, 6, 0))]
    # the first branch cannot (sigmoid): the second takes it
    plan, _ = producer(Gated(lambda s, x: torch.sigmoid(s.a(x)) + s.b(x), shift=True, a=conv(), b=conv()), IMG)
    assert [t[0] for t in targets(plan)] == ["b"]


def test_a_shift_of_a_difference_goes_to_the_first_operand_only():
    plan, _ = producer(Gated(lambda s, x: s.a(x) - s.b(x), shift=True, a=conv(), b=conv()), IMG)
    assert [t[0] for t in targets(plan)] == ["a"]
    plan, _ = producer(Gated(lambda s, x: torch.sigmoid(s.a(x)) - s.b(x), shift=True, a=conv(), b=conv()), IMG)
    assert refused(plan) == ("no branch of 'sub' can take the shift: x comes out of sigmoid 'sigmoid', which does "
                             "not commute with a per-channel constant")


def test_a_sum_with_a_branch_that_cannot_take_the_scale():
    plan, _ = producer(Gated(lambda s, x: torch.sigmoid(s.a(x)) + s.b(x), a=conv(), b=conv()), IMG)
    assert refused(plan) == ("x is a sum ('add') and a branch cannot take it: x comes out of sigmoid 'sigmoid', "
                             "which does not commute with a per-channel constant")


def test_numbers_added_to_the_gated_sum():
    plan, _ = producer(Gated(lambda s, x: s.a(x) + 0, a=conv()), IMG)
    assert [t[0] for t in targets(plan)] == ["a"]
    plan, _ = producer(Gated(lambda s, x: s.a(x) + 1.5, a=conv()), IMG)
    assert refused(plan) == "'add' adds the constant 1.5, which a per-channel scale would change"
    plan, _ = producer(Gated(lambda s, x: 1.5 + s.a(x), shift=True, a=conv()), IMG)
    assert [t[0] for t in targets(plan)] == ["a"]


def test_a_parameter_added_in_the_graph_takes_its_share_of_the_scale():
    class M(nn.Module):
        def __init__(self, b_shape):
            super().__init__()
            self.a, self.b = conv(bias=False), nn.Parameter(torch.rand(b_shape))
            self.v = nn.Parameter(torch.rand(1, 6, 1, 1))

        def forward(self, x):
            return (self.a(x) + self.b) * self.v

    plan, modules = producer(M((1, 6, 1, 1)), IMG)
    assert targets(plan) == [
        ("a", "conv", "output", Span(1, 0, 6, 0), 6, ("add",), False, ("weight", "bias"), None),
        ("b", "parameter", "output", Span(1, 0, 6, 0), 6, ("add",), False, (), None)]
    assert plan.describe(modules) == "Conv2d 'a', parameter 'b' through add"
    # a bias shared by every channel is broadcast along the gated axis: a scale would change it
    plan, _ = producer(M((1, 1, 1, 1)), IMG)
    assert refused(plan) == "'b' is broadcast along the gated axis of 'add'"


def test_a_broadcast_operand_does_not_stop_a_shift():
    plan, _ = producer(Gated(lambda s, x: s.b + s.a(x), shift=True, a=conv(), b=nn.Parameter(torch.rand(1, 1, 1, 1))),
                       IMG)
    assert [t[0] for t in targets(plan)] == ["a"]


def test_a_branch_read_elsewhere_cannot_take_a_scale_of_the_sum():
    class M(nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.a, self.b, self.shift = conv(), conv(), shift
            self.v = nn.Parameter(torch.rand(1, 6, 1, 1))

        def forward(self, x):
            y = self.a(x)
            s = y + self.b(x)
            return (s + self.v if self.shift else s * self.v) + y

    plan, _ = producer(M(False), IMG)
    assert refused(plan) == "x is a sum ('add'), and its branch 'a' is also read elsewhere"
    plan, _ = producer(M(True), IMG)  # a shift goes to the other branch
    assert [t[0] for t in targets(plan)] == ["b"]


def test_a_concatenation_along_the_gated_axis_splits_the_vector():
    body = lambda s, x: torch.cat([s.a(x), s.b(x)], 1)  # noqa: E731
    plan, _ = producer(Gated(body, a=conv(3, 4), b=conv(3, 2)), IMG)
    assert targets(plan) == [
        ("a", "conv", "output", Span(1, 0, 4, 0), 4, ("cat",), False, ("weight", "bias"), None),
        ("b", "conv", "output", Span(1, 4, 6, 0), 2, ("cat",), False, ("weight", "bias"), None)]


def test_a_concatenation_along_another_axis_gives_each_input_the_whole_vector():
    body = lambda s, x: torch.cat([s.a(x), s.b(x)], dim=2)  # noqa: E731
    plan, _ = producer(Gated(body, a=conv(), b=conv()), IMG)
    assert [t[:5] for t in targets(plan)] == [("a", "conv", "output", Span(1, 0, 6, 0), 6),
                                              ("b", "conv", "output", Span(1, 0, 6, 0), 6)]


def test_a_slice_of_a_concatenation_reaches_only_the_inputs_it_covers():
    body = lambda s, x: torch.cat([s.a(x), s.b(x)], 1)[:, 5:8]  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 3, 1, 1), a=conv(3, 4), b=conv(3, 6)), IMG)
    # channels 5:8 of the concatenation are channels 1:4 of b
    assert targets(plan) == [("b", "conv", "output", Span(1, 0, 3, 1), 6, ("getitem", "cat"), False,
                              ("weight", "bias"), None)]
    body = lambda s, x: torch.cat([s.a(x), s.b(x)], 1)[:, 2:6]  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 4, 1, 1), a=conv(3, 4), b=conv(3, 6)), IMG)
    assert [t[:5] for t in targets(plan)] == [("a", "conv", "output", Span(1, 0, 2, 2), 4),
                                              ("b", "conv", "output", Span(1, 2, 4, 0), 6)]


def test_a_concatenation_input_read_elsewhere_or_unable_to_take_its_part():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv(3, 4), conv(3, 2)
            self.v = nn.Parameter(torch.rand(1, 6, 1, 1))

        def forward(self, x):
            y = self.a(x)
            return torch.cat([y, self.b(x)], 1) * self.v, y

    plan, _ = producer(M(), IMG)
    assert refused(plan) == "'a' is also read by others than the concatenation 'cat'"
    body = lambda s, x: torch.cat([s.a(x), torch.sigmoid(s.b(x))], 1)  # noqa: E731
    plan, _ = producer(Gated(body, a=conv(3, 4), b=conv(3, 2)), IMG)
    assert refused(plan) == ("a part of the concatenation 'cat' cannot take it: x comes out of sigmoid 'sigmoid', "
                             "which does not commute with a per-channel constant")


def test_a_layer_scale_parameter_takes_the_scale_of_a_product():
    class M(nn.Module):
        def __init__(self, reads_gamma_twice=False):
            super().__init__()
            self.conv, self.gamma = conv(), nn.Parameter(torch.rand(6, 1, 1))
            self.v, self.twice = nn.Parameter(torch.rand(1, 6, 1, 1)), reads_gamma_twice

        def forward(self, x):
            y = self.conv(x) * self.gamma * self.v
            return y + self.gamma if self.twice else y

    plan, modules = producer(M(), IMG)
    assert targets(plan) == [("gamma", "parameter", "output", Span(0, 0, 6, 0), 6, ("mul",), False, (), None)]
    assert plan.describe(modules) == "parameter 'gamma' through mul"
    # read elsewhere too: the data factor takes it instead
    plan, _ = producer(M(reads_gamma_twice=True), IMG)
    assert targets(plan) == [("conv", "conv", "output", Span(1, 0, 6, 0), 6, ("mul",), False, ("weight", "bias"),
                              None)]


def test_a_product_of_two_data_factors():
    body = lambda s, x: s.a(x) * torch.sigmoid(s.b(x))  # noqa: E731
    plan, _ = producer(Gated(body, a=conv(), b=conv()), IMG)
    assert [t[:5] for t in targets(plan)] == [("a", "conv", "output", Span(1, 0, 6, 0), 6)]
    body = lambda s, x: torch.sigmoid(s.a(x)) * s.b(x)  # noqa: E731
    plan, _ = producer(Gated(body, a=conv(), b=conv()), IMG)
    assert [t[0] for t in targets(plan)] == ["b"]
    body = lambda s, x: torch.sigmoid(s.a(x)) * torch.tanh(s.b(x))  # noqa: E731
    plan, _ = producer(Gated(body, a=conv(), b=conv()), IMG)
    assert refused(plan) == "no factor of the product 'mul' can take the scale"
    plan, _ = producer(Gated(lambda s, x: s.a(x) * s.b(x), shift=True, a=conv(), b=conv()), IMG)
    assert refused(plan) == "'mul': mul does not commute with a per-channel shift"


def test_a_factor_broadcast_along_the_gated_axis_is_not_offered():
    plan, _ = producer(Gated(lambda s, x: s.s * s.conv(x), conv=conv(), s=nn.Parameter(torch.rand(1, 1, 1, 1))), IMG)
    assert [t[0] for t in targets(plan)] == ["conv"]


# -- producer side: re-arrangements and cuts ------------------------------------------------------


def test_a_permute_or_transpose_maps_the_gated_axis_back():
    for body in (lambda s, x: s.fc(x).permute(0, 2, 1), lambda s, x: s.fc(x).transpose(1, 2)):
        plan, _ = producer(Gated(body, v_shape=(1, 6, 1), fc=nn.Linear(6, 6)), SEQ)
        assert targets(plan)[0][:6] == ("fc", "linear", "output", Span(2, 0, 6, 0), 6,
                                        (plan.targets[0].through[0].name,))


def test_a_reshape_keeps_or_loses_the_gated_axis():
    plan, _ = producer(Gated(lambda s, x: s.conv(x).flatten(2), v_shape=(1, 6, 1), conv=conv()), IMG)
    assert targets(plan)[0][:6] == ("conv", "conv", "output", Span(1, 0, 6, 0), 6, ("flatten",))
    plan, _ = producer(Gated(lambda s, x: s.conv(x).unsqueeze(1), v_shape=(1, 1, 6, 1, 1), conv=conv()), IMG,
                       axes=2)
    assert targets(plan)[0][:4] == ("conv", "conv", "output", Span(1, 0, 6, 0))
    plan, _ = producer(Gated(lambda s, x: s.conv(x).reshape(2, -1), v_shape=(1, 216), conv=conv()), IMG)
    assert refused(plan) == "'reshape' (reshape) splits or merges the gated axis"


def test_a_channel_slice_carries_the_gate_to_its_channels_of_the_producer():
    plan, modules = producer(Gated(lambda s, x: s.conv(x)[:, 2:5], v_shape=(1, 3, 1, 1), conv=conv()), IMG)
    assert targets(plan) == [("conv", "conv", "output", Span(1, 0, 3, 2), 6, ("getitem",), False,
                              ("weight", "bias"), None)]
    assert plan.describe(modules) == "Conv2d 'conv'"  # getitem is not worth naming
    plan, _ = producer(Gated(lambda s, x: s.conv(x)[:, ::2], v_shape=(1, 3, 1, 1), conv=conv()), IMG)
    assert refused(plan) == "'getitem' (getitem) steps over the gated axis"


def test_slices_of_other_axes_keep_the_span():
    plan, _ = producer(Gated(lambda s, x: s.conv(x)[..., 1:3], conv=conv()), IMG)
    assert targets(plan)[0][:4] == ("conv", "conv", "output", Span(1, 0, 6, 0))
    plan, _ = producer(Gated(lambda s, x: s.conv(x)[:, :, 0], v_shape=(1, 6, 1), conv=conv()), IMG)
    assert targets(plan)[0][:4] == ("conv", "conv", "output", Span(1, 0, 6, 0))
    # an index on an axis before the gated one removes it: the gated axis moves back by one
    plan, _ = producer(Gated(lambda s, x: s.fc(x)[0], v_shape=(1, 6), fc=nn.Linear(6, 6)), SEQ)
    assert targets(plan)[0][:4] == ("fc", "linear", "output", Span(2, 0, 6, 0))


def test_a_new_axis_or_a_tensor_index():
    plan, _ = producer(Gated(lambda s, x: s.conv(x)[:, None], v_shape=(1, 1, 1, 1, 1), conv=conv()), IMG)
    assert refused(plan) == "'getitem' (getitem) creates the gated axis"

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.v = conv(), nn.Parameter(torch.rand(1, 3, 1, 1))
            self.register_buffer("idx", torch.tensor([0, 2, 4]))

        def forward(self, x):
            return self.conv(x)[:, self.idx] * self.v

    plan, _ = producer(M(), IMG)
    assert refused(plan) == "'getitem' (getitem) indexes with tensors or lists"


def test_narrow_and_aten_slice_carry_the_offset():
    for start in (2, -4):
        plan, _ = producer(Gated(lambda s, x: s.conv(x).narrow(1, start, 3), v_shape=(1, 3, 1, 1), conv=conv()),
                           IMG)
        assert targets(plan)[0][:6] == ("conv", "conv", "output", Span(1, 0, 3, 2), 6, ("narrow",))
    plan, _ = producer(Gated(lambda s, x: s.conv(x).narrow(2, 1, 3), conv=conv()), IMG)
    assert targets(plan)[0][:4] == ("conv", "conv", "output", Span(1, 0, 6, 0))
    body = lambda s, x: torch.ops.aten.slice.Tensor(s.conv(x), 1, 1, 4)  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 3, 1, 1), conv=conv()), IMG)
    assert targets(plan)[0][:5] == ("conv", "conv", "output", Span(1, 0, 3, 1), 6)
    body = lambda s, x: torch.ops.aten.slice.Tensor(s.conv(x), 1, 0, 6, 2)  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 3, 1, 1), conv=conv()), IMG)
    assert refused(plan) == "'slice_tensor' (slice) cuts with steps or arguments computed at run time"


def test_a_piece_of_a_split_or_chunk_maps_to_its_channels():
    class M(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.conv, self.how = conv(), how
            self.v = nn.Parameter(torch.rand(1, 4, 1, 1))

        def forward(self, x):
            y = self.conv(x)
            pieces = torch.split(y, [2, 4], 1) if self.how == "split" else torch.tensor_split(y, [2], 1)
            return pieces[1] * self.v

    for how in ("split", "tensor_split"):
        plan, _ = producer(M(how), IMG)
        assert targets(plan) == [("conv", "conv", "output", Span(1, 0, 4, 2), 6, ("getitem",), False,
                                  ("weight", "bias"), None)], how


def test_a_piece_of_a_split_along_another_axis_keeps_the_span():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.v = conv(), nn.Parameter(torch.rand(1, 6, 1, 1))

        def forward(self, x):
            return torch.chunk(self.conv(x), 2, dim=2)[1] * self.v

    plan, _ = producer(M(), IMG)
    assert targets(plan)[0][:4] == ("conv", "conv", "output", Span(1, 0, 6, 0))


def test_a_split_of_a_tensor_read_elsewhere_and_an_element_of_another_op():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.v = conv(), nn.Parameter(torch.rand(1, 4, 1, 1))

        def forward(self, x):
            y = self.conv(x)
            return torch.split(y, [2, 4], 1)[1] * self.v, y

    plan, _ = producer(M(), IMG)
    assert refused(plan) == "'getitem' (getitem) is a piece of 'conv', which others read too"

    class Max(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.v = conv(), nn.Parameter(torch.rand(1, 6, 1))

        def forward(self, x):
            return torch.max(self.conv(x), dim=2)[0] * self.v

    plan, _ = producer(Max(), IMG)
    assert refused(plan) == "'getitem' (getitem) is an element of max"


def test_a_piece_folds_back_only_where_no_other_reader_would_see_the_gate():
    class M(nn.Module):
        def __init__(self, dim, read):
            super().__init__()
            self.conv, self.dim, self.read = conv(), dim, read
            self.v = nn.Parameter(torch.rand(1, 4 if dim == 1 else 6, 1, 1))

        def forward(self, x):
            pieces = torch.split(self.conv(x), [2, 4], self.dim)
            out = pieces[1] * self.v
            if self.read == "other":
                return out, pieces[0]
            if self.read == "same":
                return out, pieces[1].sum()
            if self.read == "whole":
                return out, torch.stack(pieces[:1])  # the tuple itself is read
            return out

    # along the gated axis the other piece sees none of the gate
    plan, _ = producer(M(1, "other"), IMG)
    assert targets(plan)[0][:5] == ("conv", "conv", "output", Span(1, 0, 4, 2), 6)
    plan, _ = producer(M(1, "same"), IMG)
    assert refused(plan) == "'getitem' (getitem) is piece 1 of 'split', which is also read elsewhere"
    plan, _ = producer(M(1, "whole"), IMG)
    assert refused(plan) == "'getitem' (getitem) is a piece of 'split', which is also read whole"
    # along another axis the gate would reach every piece
    plan, _ = producer(M(2, "alone"), IMG)
    assert targets(plan)[0][:5] == ("conv", "conv", "output", Span(1, 0, 6, 0), 6)
    plan, _ = producer(M(2, "other"), IMG)
    assert refused(plan) == ("'getitem' (getitem) is a piece of 'split' cut along another axis than the gated "
                             "one, and its other pieces are read too")


def test_a_mean_over_other_axes_maps_the_gated_axis_back():
    plan, _ = producer(Gated(lambda s, x: s.conv(x).mean((2, 3)), v_shape=(1, 6), conv=conv()), IMG)
    assert targets(plan)[0][:6] == ("conv", "conv", "output", Span(1, 0, 6, 0), 6, ("mean",))
    plan, _ = producer(Gated(lambda s, x: s.conv(x).mean(-1, keepdim=True), conv=conv()), IMG)
    assert targets(plan)[0][:4] == ("conv", "conv", "output", Span(1, 0, 6, 0))
    # a reduced axis before the gated one: the gated axis was one further in the input
    plan, _ = producer(Gated(lambda s, x: s.fc(x).mean(1), v_shape=(1, 6), fc=nn.Linear(6, 6)), SEQ)
    assert targets(plan)[0][:4] == ("fc", "linear", "output", Span(2, 0, 6, 0))
    plan, _ = producer(Gated(lambda s, x: s.fc(x).sum(dim=[1]), v_shape=(1, 6), fc=nn.Linear(6, 6)), SEQ)
    assert targets(plan)[0][:4] == ("fc", "linear", "output", Span(2, 0, 6, 0))
    plan, _ = producer(Gated(lambda s, x: s.conv(x).mean(1, keepdim=True), v_shape=(1, 1, 1, 1), conv=conv()), IMG)
    assert refused(plan) == "'mean' (mean) reduces the gated axis"
    plan, _ = producer(Gated(lambda s, x: s.fc(x).sum(dim=1), shift=True, v_shape=(1, 6), fc=nn.Linear(6, 6)), SEQ)
    assert refused(plan) == "'sum_1': sum does not commute with a per-channel shift"  # fx avoids the builtin's name


def test_pooling_and_padding_under_a_shift_depend_on_their_arguments():
    def shift_through(body, **layers):
        plan, _ = producer(Gated(body, shift=True, conv=conv(), **layers), IMG)
        return plan.reason or [t[0] for t in targets(plan)]

    assert shift_through(lambda s, x: F.avg_pool2d(s.conv(x), 3, 1, 1)) == \
        "'avg_pool2d': avg_pool averages padded zeros"
    assert shift_through(lambda s, x: F.avg_pool2d(s.conv(x), 3, 1, 1, False, False)) == ["conv"]
    assert shift_through(lambda s, x: F.avg_pool2d(s.conv(x), 2, ceil_mode=True)) == \
        "'avg_pool2d': avg_pool uses ceil_mode (windows running past the border)"
    assert shift_through(lambda s, x: F.avg_pool2d(s.conv(x), 2)) == ["conv"]
    assert shift_through(lambda s, x: s.pool(s.conv(x)), pool=nn.AvgPool2d(3, 1, padding=(0, 1))) == \
        "'pool': avg_pool averages padded zeros"
    assert shift_through(lambda s, x: s.pool(s.conv(x)), pool=nn.AvgPool2d(3, 1, padding=(0, 0))) == ["conv"]
    assert shift_through(lambda s, x: F.pad(s.conv(x), (1, 1, 1, 1))) == \
        "'pad': pad pads with constants that are not shifted"
    assert shift_through(lambda s, x: F.pad(s.conv(x), (1, 1, 1, 1), mode="reflect")) == ["conv"]
    assert shift_through(lambda s, x: F.max_pool2d(s.conv(x), 2)) == ["conv"]


def test_max_pooling_passes_a_non_negative_scale_only():
    plan, _ = producer(Gated(lambda s, x: F.max_pool2d(s.conv(x), 2), conv=conv()), IMG)
    assert targets(plan)[0][5:7] == (("max_pool2d",), True)
    plan, _ = producer(Gated(lambda s, x: F.max_pool2d(s.conv(x), 2), conv=conv()), IMG, known=False)
    assert refused(plan) == ("'max_pool2d': max_pool commutes with a non-negative scale only, and the gate has "
                             "negative entries")
    plan, _ = producer(Gated(lambda s, x: F.avg_pool2d(s.conv(x), 2), conv=conv()), IMG, known=False)
    assert targets(plan)[0][6] is False  # an average is linear: any sign


def test_a_resampling_that_changes_the_gated_axis_size_is_refused():
    plan, _ = producer(Gated(lambda s, x: F.interpolate(s.conv(x), scale_factor=2.0), conv=conv()), IMG)
    assert targets(plan)[0][:4] == ("conv", "conv", "output", Span(1, 0, 6, 0))
    body = lambda s, x: F.adaptive_avg_pool1d(s.fc(x), 3)  # noqa: E731  [N, L, C] -> [N, L, 3]
    plan, _ = producer(Gated(body, v_shape=(1, 1, 3), fc=nn.Linear(6, 6)), SEQ, axes=2)
    assert refused(plan) == "'adaptive_avg_pool1d' (adaptive_avg_pool) changes the size of the gated axis"


def test_a_parameter_as_x():
    class M(nn.Module):
        def __init__(self, p_shape, twice=False):
            super().__init__()
            self.p, self.twice = nn.Parameter(torch.rand(p_shape)), twice
            self.v = nn.Parameter(torch.rand(1, 6, 1, 1))

        def forward(self, x):
            y = x.sum() + self.p * self.v
            return y + self.p if self.twice else y

    plan, _ = producer(M((1, 6, 4, 4)), IMG)
    assert targets(plan) == [("p", "parameter", "output", Span(1, 0, 6, 0), 6, (), False, (), None)]
    plan, _ = producer(M((1, 6, 4, 4), twice=True), IMG)
    assert refused(plan) == "'p' is also read unscaled by 'add_1'"
    # the same parameter read by a second get_attr node (graphs edited or exported)
    gm = fx.symbolic_trace(M((1, 6, 4, 4)))
    out = [n for n in gm.graph.nodes if n.op == "output"][0]
    with gm.graph.inserting_before(out):
        again = gm.graph.get_attr("p")
        extra = gm.graph.call_function(torch.add, (out.args[0], again))
    out.args = (extra,)
    gm.recompile()
    ShapeProp(gm).propagate(torch.randn(IMG))
    combine = _combine(gm)
    plan = plan_producer(combine.args[0], combine, 1, "mul", _sign(True), LayerIndex(gm))
    assert refused(plan) == "parameter 'p' is read elsewhere too"
    plan, _ = producer(M((1, 1, 4, 4)), IMG)
    assert refused(plan) == "'p' is broadcast along the gated axis: one value of it meets several gate entries"


# -- producer side: gates over two axes (split attention) -----------------------------------------


def test_a_gate_over_a_reshaped_channel_axis_reaches_the_whole_axis():
    body = lambda s, x: s.conv(x).view(2, 2, 3, 6, 6)  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 2, 3, 1, 1), conv=conv()), IMG, axes=(1, 2))
    assert targets(plan) == [("conv", "conv", "output", Span(1, 0, 6, 0), 6, ("view",), False, ("weight", "bias"),
                              None)]


def test_a_gate_over_stacked_branches_gives_each_branch_its_entries():
    body = lambda s, x: torch.stack([s.a(x), s.b(x)], 1)  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 2, 6, 1, 1), a=conv(), b=conv()), IMG, axes=(1, 2))
    assert [t[:5] for t in targets(plan)] == [("a", "conv", "output", Span(1, 0, 6, 0), 6),
                                              ("b", "conv", "output", Span(1, 6, 12, 0), 6)]
    body = lambda s, x: torch.stack([s.a(x), s.b(x)], 2)  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 6, 2, 1, 1), a=conv(), b=conv()), IMG, axes=(1, 2))
    assert refused(plan) == ("the gate spans axes 1..2 of 'stack', which no reshape or stack made from one "
                             "channel axis")


def test_a_gate_over_two_axes_that_no_reshape_made_from_one():
    body = lambda s, x: s.conv(x).view(2, 6, 6, 6)  # noqa: E731  (H and W merged into nothing: axes 1..2 = C, H)
    plan, _ = producer(Gated(body, v_shape=(1, 6, 6, 1), conv=conv()), IMG, axes=(1, 2))
    assert refused(plan) == "the gate spans axes 1..2 of 'view', which its reshape did not make from one axis"

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.v = conv(), nn.Parameter(torch.rand(1, 2, 3, 1, 1))

        def forward(self, x):
            y = self.conv(x)
            return y.view(2, 2, 3, 6, 6) * self.v, y

    plan, _ = producer(M(), IMG, axes=(1, 2))
    assert refused(plan) == "'conv' is also read by others than 'view'"
    plan, _ = consumers(Gated(body, v_shape=(1, 6, 6, 1), conv=conv()), IMG, axes=(1, 2))
    assert refused(plan) == "the gate spans axes 1..2: its readers see no single channel axis"


# -- consumer side --------------------------------------------------------------------------------


def test_a_conv_reading_the_gated_tensor_takes_the_scale_in_its_input_columns():
    plan, modules = consumers(Reads(lambda s, g: s.conv(g), conv=conv(padding=1)), IMG)
    assert targets(plan) == [("conv", "conv", "input", Span(1, 0, 3, 0), 3, (), False, ("weight",), None)]
    assert plan.side == "consumers" and plan.describe(modules) == "consumers Conv2d 'conv'"


def test_a_shift_into_a_consumer_conv_needs_no_padding_and_a_bias_or_a_batchnorm_after():
    plan, _ = consumers(Reads(lambda s, g: s.conv(g), shift=True, conv=conv(padding=1)), IMG)
    assert refused(plan) == "'conv' (Conv2d): it pads its input, and the padded zeros would not be shifted"
    plan, _ = consumers(Reads(lambda s, g: s.conv(g), shift=True, conv=conv()), IMG)
    assert targets(plan) == [("conv", "conv", "input", Span(1, 0, 3, 0), 3, (), False, ("bias",), None)]
    plan, _ = consumers(Reads(lambda s, g: s.bn(s.conv(g)), shift=True, conv=conv(bias=False), bn=bn()), IMG)
    assert targets(plan)[0][-1] == "bn"
    plan, _ = consumers(Reads(lambda s, g: s.bn(s.conv(g)), shift=True, conv=conv(bias=False), bn=bn().train()),
                        IMG)
    assert targets(plan)[0][-1] is None  # batch statistics: the shift has nowhere to go but a new bias
    plan, _ = consumers(Reads(lambda s, g: s.bn(s.conv(g)), shift=True, conv=conv(bias=False), bn=bn(affine=False)),
                        IMG)
    assert targets(plan)[0][-1] is None
    plan, _ = consumers(Reads(lambda s, g: F.relu(s.conv(g)), shift=True, conv=conv(bias=False)), IMG)
    assert targets(plan)[0][-1] is None

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.v = conv(bias=False), bn(), nn.Parameter(torch.rand(1, 3, 1, 1))

        def forward(self, x):
            y = self.conv(x + self.v)
            return self.bn(y), y

    plan, _ = consumers(Twice(), IMG)
    assert targets(plan)[0][-1] is None


def test_a_batchnorm_reading_the_gated_tensor():
    plan, _ = consumers(Reads(lambda s, g: s.bn(g), bn=bn(3)), IMG)
    assert targets(plan) == [("bn", "batch_norm", "input", Span(1, 0, 3, 0), 3, (), False,
                              ("running_mean", "weight", "bias"), None)]
    plan, _ = consumers(Reads(lambda s, g: s.bn(g), shift=True, bn=bn(3)), IMG)
    assert targets(plan)[0][7] == ("bias",)
    plan, _ = consumers(Reads(lambda s, g: s.bn(g), bn=bn(3).train()), IMG)
    assert refused(plan) == ("'bn' (BatchNorm2d): it normalizes with batch statistics, which a constant scale or "
                             "shift does not pass")
    plan, _ = consumers(Reads(lambda s, g: s.bn(g), bn=bn(3, track_running_stats=False)), IMG)
    assert refused(plan).endswith("it normalizes with batch statistics, which a constant scale or shift does not pass")
    plan, _ = consumers(Reads(lambda s, g: s.bn(g), bn=bn(3, affine=False)), IMG)
    assert refused(plan) == "'bn' (BatchNorm2d): it has no affine weight to absorb a scale"
    plan, _ = consumers(Reads(lambda s, g: s.gn(g), gn=nn.GroupNorm(1, 3)), IMG)
    assert refused(plan) == "'gn' (GroupNorm): group_norm cannot absorb a per-channel constant of its input"


def test_consumers_through_relu_and_pooling():
    plan, _ = consumers(Reads(lambda s, g: s.conv(F.relu(g)), conv=conv()), IMG)
    assert targets(plan) == [("conv", "conv", "input", Span(1, 0, 3, 0), 3, ("relu",), True, ("weight",), None)]
    plan, _ = consumers(Reads(lambda s, g: s.conv(F.relu(g)), conv=conv()), IMG, known=False)
    assert refused(plan) == "'relu': relu commutes with a non-negative scale only, and the gate has negative entries"
    plan, _ = consumers(Reads(lambda s, g: s.conv(F.max_pool2d(g, 2)), conv=conv(c_out=4, kernel_size=1)
                              if False else nn.Conv2d(3, 4, 1)), IMG)
    assert targets(plan)[0][5:7] == (("max_pool2d",), True)
    plan, _ = consumers(Reads(lambda s, g: s.conv(torch.sigmoid(g)), conv=conv()), IMG)
    assert refused(plan) == "'sigmoid' (sigmoid) reads the gated tensor and cannot absorb the gate"


def test_a_sum_reading_the_gated_tensor_stops_the_consumer_walk():
    plan, _ = consumers(Reads(lambda s, g: s.conv(g) + g.mean(), conv=conv(3, 3, padding=1)), IMG)
    assert refused(plan) == "'mean' (mean) reduces the gated axis" or "mean" in refused(plan)
    plan, _ = consumers(Reads(lambda s, g: s.conv(g + 1.0), conv=conv()), IMG)
    assert refused(plan) == "'add' (add) reads the gated tensor and cannot absorb the gate"


def test_nothing_but_the_output_reads_the_gated_tensor():
    plan, _ = consumers(Reads(lambda s, g: g), IMG)
    assert refused(plan) == "'output' (output) reads the gated tensor and cannot absorb the gate"


def test_a_concatenation_places_the_gate_at_its_offset():
    # g read twice by the concatenation, once through a slice: each part takes its own entries
    plan, _ = consumers(Reads(lambda s, g: s.conv(torch.cat([g[:, :2], g], 1)), conv=conv(5, 4)), IMG)
    assert targets(plan) == [
        ("conv", "conv", "input", Span(1, 0, 2, 0), 5, ("getitem", "cat"), False, ("weight",), None),
        ("conv", "conv", "input", Span(1, 0, 3, 2), 5, ("cat",), False, ("weight",), None)]

    class M(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.a = nn.Conv2d(3, 2 if dim == 1 else 3, 1)
            self.conv, self.dim = nn.Conv2d(5, 4, 1) if dim == 1 else nn.Conv2d(3, 4, 1), dim
            self.v = nn.Parameter(torch.rand(1, 3, 1, 1))

        def forward(self, x):
            return self.conv(torch.cat([self.a(x), x * self.v], self.dim))

    plan, _ = consumers(M(1), IMG)
    assert targets(plan) == [("conv", "conv", "input", Span(1, 0, 3, 2), 5, ("cat",), False, ("weight",), None)]
    plan, _ = consumers(M(2), IMG)  # along the rows: the other input's rows would be scaled too
    assert refused(plan) == "'cat' concatenates the gated tensor with others along axis 2, not along the gated axis 1"
    plan, _ = consumers(Reads(lambda s, g: s.conv(torch.cat([g, g], 1)), conv=nn.Conv2d(6, 4, 1)), IMG)
    assert refused(plan) == "'cat' concatenates the gated tensor more than once"


def test_slices_of_a_concatenation_reach_the_consumers_of_their_channels():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c1, self.c2 = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(2, 4, 1)
            self.v = nn.Parameter(torch.rand(1, 3, 1, 1))

        def forward(self, x):
            c = torch.cat([x * self.v, self.a(x)], 1)
            return self.c1(c[:, :3]), self.c2(c[:, 3:])

    plan, _ = consumers(M(), IMG)
    assert targets(plan) == [("c1", "conv", "input", Span(1, 0, 3, 0), 3, ("cat", "getitem"), False, ("weight",),
                              None)]


def test_split_pieces_each_take_their_part():
    class M(nn.Module):
        def __init__(self, dim, how="split"):
            super().__init__()
            self.dim, self.how = dim, how
            self.a = nn.Conv2d(1 if dim == 1 else 3, 4, 1)
            self.b = nn.Conv2d(2 if dim == 1 else 3, 4, 1)
            self.v = nn.Parameter(torch.rand(1, 3, 1, 1))

        def forward(self, x):
            g = x * self.v
            pieces = torch.split(g, [1, 2] if self.dim == 1 else [3, 5], self.dim) if self.how == "split" \
                else torch.tensor_split(g, [1] if self.dim == 1 else [3], self.dim)
            return self.a(pieces[0]), self.b(pieces[1])

    for how in ("split", "tensor_split"):
        plan, _ = consumers(M(1, how), IMG)
        assert targets(plan) == [
            ("a", "conv", "input", Span(1, 0, 1, 0), 1, (how, "getitem"), False, ("weight",), None),
            ("b", "conv", "input", Span(1, 1, 3, 0), 2, (how, "getitem_1"), False, ("weight",), None)], how
        plan, _ = consumers(M(2, how), IMG)
        assert [t[3:5] for t in targets(plan)] == [(Span(1, 0, 3, 0), 3), (Span(1, 0, 3, 0), 3)], how


def test_a_split_read_whole_or_unbound_along_the_gated_axis():
    plan, _ = consumers(Reads(lambda s, g: torch.stack(torch.split(g, 1, 1)).sum()), IMG)
    assert refused(plan) == "'split' (split) is read other than piece by piece"
    plan, _ = consumers(Reads(lambda s, g: s.fc(torch.unbind(g, 1)[0]), fc=nn.Linear(8, 4)), IMG)
    assert refused(plan) == "'unbind' (unbind) removes the gated axis"

    class Unbind(nn.Module):  # [N, L, C] unbound along L: each piece [N, C] keeps the gate on its axis 1
        def __init__(self):
            super().__init__()
            self.fc, self.v = nn.Linear(6, 4), nn.Parameter(torch.rand(1, 1, 6))

        def forward(self, x):
            return self.fc(torch.unbind(x * self.v, 1)[2])

    plan, _ = consumers(Unbind(), SEQ, axes=2)
    assert targets(plan) == [("fc", "linear", "input", Span(1, 0, 6, 0), 6, ("unbind", "getitem"), False,
                              ("weight",), None)]


def test_consumer_slices_cut_the_span():
    plan, _ = consumers(Reads(lambda s, g: s.conv(g[:, 1:3]), conv=nn.Conv2d(2, 4, 1)), IMG)
    assert targets(plan) == [("conv", "conv", "input", Span(1, 1, 3, 0), 2, ("getitem",), False, ("weight",), None)]
    plan, _ = consumers(Reads(lambda s, g: s.conv(g.narrow(1, 1, 2)), conv=nn.Conv2d(2, 4, 1)), IMG)
    assert targets(plan)[0][3:6] == (Span(1, 1, 3, 0), 2, ("narrow",))
    plan, _ = consumers(Reads(lambda s, g: s.conv(g[:, :, 1:]), conv=nn.Conv2d(3, 4, 1)), IMG)
    assert targets(plan)[0][3:5] == (Span(1, 0, 3, 0), 3)
    plan, _ = consumers(Reads(lambda s, g: s.conv(g[:, ::2]), conv=nn.Conv2d(2, 4, 1)), IMG)
    assert refused(plan) == "'getitem' (getitem) steps over the gated axis"
    plan, _ = consumers(Reads(lambda s, g: s.fc(g[:, 0]), fc=nn.Linear(8, 4)), IMG)
    assert refused(plan) == "'getitem' (getitem) picks one channel of the gated axis"

    class First(nn.Module):  # an index before the gated axis: it moves to axis 1 of the piece
        def __init__(self):
            super().__init__()
            self.fc, self.v = nn.Linear(6, 4), nn.Parameter(torch.rand(1, 1, 6))

        def forward(self, x):
            return self.fc((x * self.v)[0])

    plan, _ = consumers(First(), SEQ, axes=2)
    assert targets(plan)[0][:4] == ("fc", "linear", "input", Span(1, 0, 6, 0))


def test_consumers_through_reshapes_and_reductions():
    plan, _ = consumers(Reads(lambda s, g: s.fc(g.flatten(1)), fc=nn.Linear(3, 4)), (2, 3, 1, 1))
    assert targets(plan)[0][:6] == ("fc", "linear", "input", Span(1, 0, 3, 0), 3, ("flatten",))
    plan, _ = consumers(Reads(lambda s, g: s.fc(g.mean((2, 3))), fc=nn.Linear(3, 4)), IMG)
    assert targets(plan)[0][:6] == ("fc", "linear", "input", Span(1, 0, 3, 0), 3, ("mean",))
    plan, _ = consumers(Reads(lambda s, g: s.fc(g.mean((-1, -2), keepdim=True).flatten(1)), fc=nn.Linear(3, 4)), IMG)
    assert targets(plan)[0][:4] == ("fc", "linear", "input", Span(1, 0, 3, 0))
    plan, _ = consumers(Reads(lambda s, g: s.fc(g.permute(0, 2, 3, 1)), fc=nn.Linear(3, 4)), IMG)
    assert targets(plan)[0][:4] == ("fc", "linear", "input", Span(3, 0, 3, 0))
    plan, _ = consumers(Reads(lambda s, g: s.fc(g.reshape(2, -1)), fc=nn.Linear(192, 4)), IMG)
    assert refused(plan) == "'reshape' (reshape) reduces or splits the gated axis"
    plan, _ = consumers(Reads(lambda s, g: s.fc(g.mean(1)), fc=nn.Linear(8, 4)), IMG)
    assert refused(plan) == "'mean' (mean) reduces the gated axis"

    class Seq(nn.Module):  # [N, L, C] mean over L: the gated axis moves from 2 to 1
        def __init__(self):
            super().__init__()
            self.fc, self.v = nn.Linear(6, 4), nn.Parameter(torch.rand(1, 1, 6))

        def forward(self, x):
            return self.fc((x * self.v).mean(1))

    plan, _ = consumers(Seq(), SEQ, axes=2)
    assert targets(plan)[0][:4] == ("fc", "linear", "input", Span(1, 0, 6, 0))


def test_a_product_reading_the_gated_tensor_passes_a_scale_not_a_shift():
    class M(nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.a, self.conv, self.shift = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 4, 1), shift
            self.v = nn.Parameter(torch.rand(1, 3, 1, 1))

        def forward(self, x):
            g = x + self.v if self.shift else x * self.v
            return self.conv(g * torch.sigmoid(self.a(x)))

    plan, _ = consumers(M(False), IMG)
    assert targets(plan) == [("conv", "conv", "input", Span(1, 0, 3, 0), 3, ("mul_1",), False, ("weight",), None)]
    plan, _ = consumers(M(True), IMG)
    assert refused(plan) == "'mul' (mul) reads the gated tensor and cannot absorb the gate"


def test_a_layer_reading_the_gated_tensor_twice_or_not_as_its_input():
    plan, _ = consumers(Reads(lambda s, g: F.linear(s.fc.weight, g.flatten(1)), fc=nn.Linear(3, 3)), (3, 3, 1, 1))
    assert refused(plan).startswith("'flatten'") or "cannot absorb" in refused(plan)
    plan, _ = consumers(Reads(lambda s, g: F.conv2d(g, g)), (3, 3, 1, 1))
    assert refused(plan) == "'conv2d' (conv) reads the gated tensor and cannot absorb the gate"


def test_a_layer_that_is_called_twice_cannot_take_the_gate():
    plan, _ = consumers(Reads(lambda s, g: s.conv(g) + s.conv(s.c0(g)), conv=nn.Conv2d(3, 3, 1),
                              c0=nn.Conv2d(3, 3, 1)), IMG)
    assert refused(plan) == "'conv' is called more than once (shared weights)"


# -- the rule table itself ------------------------------------------------------------------------


def test_scale_rules():
    assert scale_passes("relu", True) is None
    assert scale_passes("relu", False) == "relu commutes with a non-negative scale only, and the gate has negative entries"
    assert scale_passes("relu", None) == "relu commutes with a non-negative scale only, and the gate may be negative"
    assert scale_passes("max_pool", None) is not None and scale_passes("adaptive_max_pool", True) is None
    for name in ("mul", "sum", "mean", "cat", "add", "sub", "view", "getitem", "avg_pool", "interpolate", "pad"):
        assert scale_passes(name, None) is None, name
    assert scale_passes("pad", True) is None and scale_passes("pad", None, {"value": 0}) is None
    assert scale_passes("pad", None, {"value": 2.0}) == "pad pads with the constant 2.0, which a per-channel scale would not scale"
    assert scale_passes("pad", None, {"mode": "constant", "value": -1}) is not None
    assert scale_passes("pad", None, {"mode": "reflect", "value": 2.0}) is None
    assert scale_passes("relu", True, {"value": 2.0}) is None  # conditions belong to their op only
    for name in ("sigmoid", "hardswish", "softmax", "exp", "nonsense"):
        assert scale_passes(name, True) == f"{name} does not commute with a per-channel scale", name


def test_shift_rules():
    for name in ("relu", "leaky_relu", "sum", "mul", "sigmoid", "nonsense"):
        assert shift_passes(name) == f"{name} does not commute with a per-channel shift", name
    for name in ("add", "sub", "mean", "max_pool", "interpolate", "cat", "permute", "getitem", "identity"):
        assert shift_passes(name) is None, name
    assert shift_passes("avg_pool") is None  # no arguments: no padding, no ceil_mode
    assert shift_passes("avg_pool", {"padding": 1}) == "avg_pool averages padded zeros"
    assert shift_passes("avg_pool", {"padding": [0, 2]}) == "avg_pool averages padded zeros"
    assert shift_passes("avg_pool", {"padding": (0, 0)}) is None
    assert shift_passes("avg_pool", {"padding": 1, "count_include_pad": False}) is None
    assert shift_passes("avg_pool", {"ceil_mode": True}) == "avg_pool uses ceil_mode (windows running past the border)"
    assert shift_passes("avg_pool", {"padding": 1, "count_include_pad": False, "ceil_mode": True}) == \
        "avg_pool uses ceil_mode (windows running past the border)"
    assert shift_passes("avg_pool", {"divisor_override": 4}) == \
        "avg_pool divides by a fixed divisor, not by the window's size"
    assert shift_passes("avg_pool", {"divisor_override": None}) is None
    assert shift_passes("pad") == "pad pads with constants that are not shifted"
    assert shift_passes("pad", {"mode": "constant"}) == "pad pads with constants that are not shifted"
    for mode in ("reflect", "replicate", "circular"):
        assert shift_passes("pad", {"mode": mode}) is None


def test_the_table_entries_that_the_planner_relies_on():
    assert rules.commute_rule("relu") == rules.Commute(rules.Needs.NON_NEGATIVE, rules.Needs.NEVER, rules.Axes.SAME)
    assert rules.commute_rule("sigmoid") is None
    assert rules.commute_rule("mul").axes is rules.Axes.FACTOR and rules.commute_rule("cat").axes is rules.Axes.CONCAT
    assert {"sigmoid", "hardsigmoid", "softmax"} <= rules.NON_NEGATIVE_OUTPUT and "tanh" not in rules.NON_NEGATIVE_OUTPUT


def _layer(**kw):
    base = dict(has_weight=True, has_bias=True, normalized_shape=None, padded=False, running_var=torch.ones(1),
                training=False)
    return SimpleNamespace(**{**base, **kw})


def test_output_absorb_rules():
    assert output_absorbs("conv", _layer(), 1, 4, 6, False) is None
    assert output_absorbs("conv", _layer(has_bias=False), 1, 4, 6, True) is None  # a bias is created
    assert output_absorbs("conv", _layer(), 2, 4, 6, False) == "it has its channels on axis 1, the gate is on axis 2"
    assert output_absorbs("conv_transpose", _layer(), 1, 4, 6, True) is None
    assert output_absorbs("linear", _layer(), 2, 3, 6, False) is None
    assert output_absorbs("linear", _layer(), 1, 2, 6, False) is None
    assert output_absorbs("linear", _layer(), 1, 3, 6, False) == \
        "it has its channels on the last axis, the gate is on axis 1"
    assert output_absorbs("batch_norm", _layer(has_bias=False), 1, 4, 6, True) == "it has no bias for the shift"
    assert output_absorbs("batch_norm", _layer(has_bias=False), 1, 4, 6, False) is None
    assert output_absorbs("batch_norm", _layer(has_weight=False), 1, 4, 6, True) is None
    for name in ("batch_norm", "group_norm", "instance_norm"):
        assert output_absorbs(name, _layer(has_weight=False), 1, 4, 6, False) == \
            "it has no affine weight to absorb a scale", name
    assert output_absorbs("layer_norm", _layer(normalized_shape=(6,)), 2, 3, 6, False) is None
    assert output_absorbs("layer_norm", _layer(normalized_shape=(6,), has_weight=False), 2, 3, 6, False) == \
        "it has no affine weight to absorb a scale"
    assert output_absorbs("layer_norm", _layer(normalized_shape=(4, 6)), 2, 3, 6, False) == \
        "it normalizes (4, 6), not the gated axis alone"
    assert output_absorbs("layer_norm", _layer(normalized_shape=None), 2, 3, 6, False) == \
        "it normalizes (), not the gated axis alone"
    assert output_absorbs("sigmoid", _layer(), 1, 4, 6, False) == "sigmoid cannot absorb a per-channel constant"


def test_input_absorb_rules():
    assert input_absorbs("conv", _layer(), 1, 4, False) is None
    assert input_absorbs("conv", _layer(padded=True), 1, 4, False) is None  # a scale: padding does not matter
    assert input_absorbs("conv", _layer(padded=True), 1, 4, True) == \
        "it pads its input, and the padded zeros would not be shifted"
    assert input_absorbs("conv", _layer(has_bias=False), 1, 4, True) is None
    assert input_absorbs("conv", _layer(), 2, 4, False) == "it reads channels on another axis (1) than the gate's (2)"
    assert input_absorbs("linear", _layer(), 2, 3, False) is None
    assert input_absorbs("linear", _layer(padded=True), 2, 3, True) is None
    assert input_absorbs("linear", _layer(), 1, 3, False) == "it reads channels on another axis (2) than the gate's (1)"
    assert input_absorbs("conv_transpose", _layer(), 1, 4, False) is None
    assert input_absorbs("conv_transpose", _layer(), 1, 4, True) == "a shift of its input cannot fold into it"
    batch_stats = "it normalizes with batch statistics, which a constant scale or shift does not pass"
    assert input_absorbs("batch_norm", _layer(training=True), 1, 4, False) == batch_stats
    assert input_absorbs("batch_norm", _layer(running_var=None), 1, 4, True) == batch_stats
    assert input_absorbs("conv", _layer(training=True, running_var=None), 1, 4, False) is None  # convs need no stats
    assert input_absorbs("batch_norm", _layer(), 1, 4, False) is None
    assert input_absorbs("batch_norm", _layer(has_weight=False), 1, 4, False) == \
        "it has no affine weight to absorb a scale"
    assert input_absorbs("batch_norm", _layer(has_weight=False), 1, 4, True) is None
    assert input_absorbs("batch_norm", _layer(has_bias=False), 1, 4, True) == "it has no bias for the shift"
    assert input_absorbs("batch_norm", _layer(has_bias=False), 1, 4, False) is None
    for name in ("group_norm", "layer_norm", "instance_norm", "relu"):
        assert input_absorbs(name, _layer(), 1, 4, False) == f"{name} cannot absorb a per-channel constant of its input"


# -- spans, signs, the residual gate --------------------------------------------------------------


def test_span_cut_and_moved():
    span = Span(1, 2, 6, 3)  # entries 2..5 at channels 3..6
    assert span.cut(0, 10) == Span(1, 2, 6, 3)
    assert span.cut(4, 10) == Span(1, 3, 6, 0)  # channel 4 holds entry 3, now at 0
    assert span.cut(0, 5) == Span(1, 2, 4, 3)
    assert span.cut(4, 6) == Span(1, 3, 5, 0)
    assert span.cut(7, 9) is None and span.cut(0, 3) is None
    assert span.cut(6, 7) == Span(1, 5, 6, 0)
    assert span.moved() == span
    assert span.moved(axis=3) == Span(3, 2, 6, 3)
    assert span.moved(offset=0) == Span(1, 2, 6, 0)
    assert span.moved(axis=0, offset=1) == Span(0, 2, 6, 1)


def test_value_and_static_signs():
    sign = value_sign(torch.tensor([0.5, 0.0, -1.0, 2.0]))
    assert sign(0, 2) is True and sign(0, 3) is False and sign(3, 4) is True and sign(2, 3) is False

    class G(nn.Module):
        def __init__(self, act):
            super().__init__()
            self.act = act

        def forward(self, x):
            return self.act(x.mean((2, 3))).view(2, 3, 1, 1).contiguous()

    for act, want in ((torch.sigmoid, True), (F.hardsigmoid, True), (torch.tanh, None), (F.relu, True)):
        gm, modules = _graph(G(act), IMG)
        gate = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        assert static_sign(gate, modules)(0, 3) is want, act


def test_residual_gate_add():
    class M(nn.Module):
        def __init__(self, other):
            super().__init__()
            self.v, self.other = nn.Parameter(torch.rand(1, 3, 1, 1)), other

        def forward(self, x):
            return (x if self.other == "x" else x.relu()) + x * self.v

    gm, modules = _graph(M("x"), IMG)
    combine = _combine(gm)
    assert residual_add(combine.args[0], combine, modules) is next(iter(combine.users))
    gm, modules = _graph(M("relu"), IMG)
    combine = _combine(gm)
    assert residual_add(combine.args[0], combine, modules) is None


# -- arguments by keyword and by default (every reader of an op's arguments) -----------------------


def test_keyword_and_default_arguments_of_cuts():
    body = lambda s, x: s.conv(x).narrow(dim=1, start=2, length=3)  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 3, 1, 1), conv=conv()), IMG)
    assert targets(plan)[0][3] == Span(1, 0, 3, 2)
    body = lambda s, x: s.conv(x).narrow(1, 0, 3)  # noqa: E731  start 0 is not counted from the end
    plan, _ = producer(Gated(body, v_shape=(1, 3, 1, 1), conv=conv()), IMG)
    assert targets(plan)[0][3] == Span(1, 0, 3, 0)
    body = lambda s, x: torch.ops.aten.slice.Tensor(s.conv(x), dim=1, start=2, end=5, step=1)  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 3, 1, 1), conv=conv()), IMG)
    assert targets(plan)[0][3] == Span(1, 0, 3, 2)
    body = lambda s, x: torch.ops.aten.slice.Tensor(s.conv(x), 1, 2)  # noqa: E731  to the end
    plan, _ = producer(Gated(body, v_shape=(1, 4, 1, 1), conv=conv()), IMG)
    assert targets(plan)[0][3] == Span(1, 0, 4, 2)
    body = lambda s, x: torch.ops.aten.slice.Tensor(s.conv(x), start=1, end=2)  # noqa: E731  dim 0 by default
    plan, _ = producer(Gated(body, conv=conv()), IMG)
    assert targets(plan)[0][3] == Span(1, 0, 6, 0)
    body = lambda s, x: torch.ops.aten.slice.Tensor(s.conv(x), 1, 0, 6, step=2)  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 3, 1, 1), conv=conv()), IMG)
    assert refused(plan).endswith("cuts with steps or arguments computed at run time")


def test_consumer_side_aten_slices_and_keyword_narrow():
    plan, _ = consumers(Reads(lambda s, g: s.conv(torch.ops.aten.slice.Tensor(g, 1, 1, 2)), conv=nn.Conv2d(1, 4, 1)),
                        IMG)
    assert targets(plan)[0][3:5] == (Span(1, 1, 2, 0), 1)
    plan, _ = consumers(Reads(lambda s, g: s.conv(torch.ops.aten.slice.Tensor(g, dim=1, start=1, end=3)),
                              conv=nn.Conv2d(2, 4, 1)), IMG)
    assert targets(plan)[0][3:5] == (Span(1, 1, 3, 0), 2)
    plan, _ = consumers(Reads(lambda s, g: s.conv(torch.ops.aten.slice.Tensor(g, dim=1, start=0, end=2)),
                              conv=nn.Conv2d(2, 4, 1)), IMG)
    assert targets(plan)[0][3:5] == (Span(1, 0, 2, 0), 2)
    plan, _ = consumers(Reads(lambda s, g: s.conv(g.narrow(dim=1, start=-2, length=2)), conv=nn.Conv2d(2, 4, 1)), IMG)
    assert targets(plan)[0][3:5] == (Span(1, 1, 3, 0), 2)


def test_getitem_with_new_axes_and_an_ellipsis():
    # y[None, ..., 2:5, :, :]: the ellipsis stands for axis 0, the new axis comes first
    body = lambda s, x: s.conv(x)[None, ..., 2:5, :, :]  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 1, 3, 1, 1), conv=conv()), IMG, axes=2)
    assert targets(plan)[0][3] == Span(1, 0, 3, 2)
    body = lambda s, x: s.conv(x)[..., 2:5, :, :]  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 3, 1, 1), conv=conv()), IMG)
    assert targets(plan)[0][3] == Span(1, 0, 3, 2)
    body = lambda s, x: s.conv(x)[:, None, 1:4]  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 1, 3, 1, 1), conv=conv()), IMG, axes=2)
    assert targets(plan)[0][3] == Span(1, 0, 3, 1)
    plan, _ = consumers(Reads(lambda s, g: s.conv(g[None, ..., 1:3, :, :][0]), conv=nn.Conv2d(2, 4, 1)), IMG)
    assert targets(plan)[0][3:5] == (Span(1, 1, 3, 0), 2)


def test_keyword_and_default_arguments_of_concatenations_and_splits():
    body = lambda s, x: torch.cat(tensors=[s.a(x), s.b(x)], dim=1)  # noqa: E731
    plan, _ = producer(Gated(body, a=conv(3, 4), b=conv(3, 2)), IMG)
    assert [t[3] for t in targets(plan)] == [Span(1, 0, 4, 0), Span(1, 4, 6, 0)]
    body = lambda s, x: torch.cat([s.a(x), s.b(x)])  # noqa: E731  along the batch by default
    plan, _ = producer(Gated(body, a=conv(), b=conv()), IMG)
    assert [t[3] for t in targets(plan)] == [Span(1, 0, 6, 0), Span(1, 0, 6, 0)]
    plan, _ = consumers(Reads(lambda s, g: s.conv(torch.cat(tensors=[s.a(g), g], dim=1)), a=nn.Conv2d(3, 2, 1),
                              conv=nn.Conv2d(5, 4, 1)), IMG)
    # g read by a conv and by the concatenation: both take it, the second at offset 2
    assert [t[:5] for t in targets(plan)] == [("a", "conv", "input", Span(1, 0, 3, 0), 3),
                                              ("conv", "conv", "input", Span(1, 0, 3, 2), 5)]

    class Pieces(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.conv, self.how = conv(), how
            self.v = nn.Parameter(torch.rand(1, 6, 1, 1))

        def forward(self, x):
            y = self.conv(x)
            if self.how == "chunk":
                return torch.chunk(y, 2)[1] * self.v  # along the batch by default
            if self.how == "split":
                return torch.split(y, 1)[1] * self.v
            if self.how == "aten":
                return torch.ops.aten.split_with_sizes.default(y, [1, 1])[1] * self.v
            a, b = torch.split(y, [2, 4], dim=2)  # a is never read
            return b * self.v

    for how in ("chunk", "split", "aten", "unread"):
        plan, _ = producer(Pieces(how), IMG)
        assert targets(plan)[0][3] == Span(1, 0, 6, 0), how

    class ChannelPieces(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.v = conv(), nn.Parameter(torch.rand(1, 4, 1, 1))

        def forward(self, x):
            return torch.ops.aten.split_with_sizes.default(self.conv(x), [2, 4], 1)[1] * self.v

    plan, _ = producer(ChannelPieces(), IMG)
    assert targets(plan)[0][3] == Span(1, 0, 4, 2)


def test_products_keep_their_factor_order_and_skip_numbers():
    plan, _ = producer(Gated(lambda s, x: (2.0 * s.a(x)), a=conv()), IMG)
    assert [t[0] for t in targets(plan)] == ["a"]

    class Late(nn.Module):  # b is computed first, a is the first factor: a is tried first
        def __init__(self):
            super().__init__()
            self.a, self.b, self.v = conv(), conv(), nn.Parameter(torch.rand(1, 6, 1, 1))

        def forward(self, x):
            yb = self.b(x)
            ya = self.a(x)
            return ya * yb * self.v

    plan, _ = producer(Late(), IMG)
    assert [t[0] for t in targets(plan)] == ["a"]
    # a one-channel factor is broadcast along the gated axis: it cannot take six entries
    plan, _ = producer(Gated(lambda s, x: s.b(x) * s.a(x), a=conv(), b=conv(3, 1)), IMG)
    assert [t[0] for t in targets(plan)] == ["a"]


def test_gates_over_two_axes_by_keyword_default_and_deeper_axes():
    body = lambda s, x: torch.stack(tensors=[s.a(x), s.b(x)], dim=1)  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 2, 6, 1, 1), a=conv(), b=conv()), IMG, axes=(1, 2))
    assert [t[3] for t in targets(plan)] == [Span(1, 0, 6, 0), Span(1, 6, 12, 0)]
    body = lambda s, x: torch.stack([s.a(x), s.b(x)])  # noqa: E731  stacked on a new axis 0
    plan, _ = producer(Gated(body, v_shape=(2, 2, 1, 1, 1), a=conv(), b=conv()), IMG, axes=(0, 1))
    assert refused(plan) == "'a' (Conv2d): it has its channels on axis 1, the gate is on axis 0"
    for reshape in (lambda y: y.reshape(2, 2, 3, 6, 6), lambda y: y.unflatten(1, (2, 3))):
        plan, _ = producer(Gated(lambda s, x: reshape(s.conv(x)), v_shape=(1, 2, 3, 1, 1), conv=conv()), IMG,
                           axes=(1, 2))
        assert targets(plan)[0][3] == Span(1, 0, 6, 0)
    # the merged axes sit after two others: [N, L, 2C] viewed as [N, L, 2, C]
    body = lambda s, x: s.fc(x).view(2, 5, 2, 3)  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 1, 2, 3), fc=nn.Linear(6, 6)), SEQ, axes=(2, 3))
    assert targets(plan)[0][:4] == ("fc", "linear", "output", Span(2, 0, 6, 0))
    body = lambda s, x: F.relu(s.conv(x).view(2, 2, 3, 6, 6))  # noqa: E731
    plan, _ = producer(Gated(body, v_shape=(1, 2, 3, 1, 1), conv=conv()), IMG, axes=(1, 2))
    assert refused(plan) == "the gate spans axes 1..2 of 'relu', which no reshape or stack made from one channel axis"

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.v = conv(), conv(), nn.Parameter(torch.rand(1, 2, 6, 1, 1))

        def forward(self, x):
            ya = self.a(x)
            return torch.stack([ya, self.b(x)], 1) * self.v, ya

    plan, _ = producer(Shared(), IMG, axes=(1, 2))
    assert refused(plan) == "a branch stacked by 'stack' is also read elsewhere"


# -- padding and pooling: what the rule table's conditions read, from modules, functions and aten ops


def test_a_scale_passes_padding_with_zeros_or_copies_but_not_another_constant():
    def scale_through(body, **layers):
        plan, _ = producer(Gated(body, conv=conv(), **layers), IMG)
        return plan.reason or [t[0] for t in targets(plan)]

    assert scale_through(lambda s, x: F.pad(s.conv(x), (1, 1, 1, 1))) == ["conv"]
    assert scale_through(lambda s, x: F.pad(s.conv(x), (1, 1, 1, 1), value=0.0)) == ["conv"]
    assert scale_through(lambda s, x: F.pad(s.conv(x), (1, 1, 1, 1), value=1.5)) == \
        "'pad': pad pads with the constant 1.5, which a per-channel scale would not scale"
    assert scale_through(lambda s, x: s.pad(s.conv(x)), pad=nn.ConstantPad2d(1, 3.5)) == \
        "'pad': pad pads with the constant 3.5, which a per-channel scale would not scale"
    assert scale_through(lambda s, x: s.pad(s.conv(x)), pad=nn.ZeroPad2d(1)) == ["conv"]
    assert scale_through(lambda s, x: s.pad(s.conv(x)), pad=nn.ReflectionPad2d(1)) == ["conv"]
    assert scale_through(lambda s, x: torch.ops.aten.constant_pad_nd.default(s.conv(x), [1, 1, 1, 1], 2.0)) == \
        "'constant_pad_nd_default': pad pads with the constant 2.0, which a per-channel scale would not scale"
    assert scale_through(lambda s, x: torch.ops.aten.constant_pad_nd.default(s.conv(x), [1, 1, 1, 1])) == ["conv"]
    assert scale_through(lambda s, x: torch.ops.aten.pad.default(s.conv(x), [1, 1, 1, 1], "constant", 2.0)) == \
        "'pad_default': pad pads with the constant 2.0, which a per-channel scale would not scale"
    # the same on the consumer side
    plan, _ = consumers(Reads(lambda s, g: s.conv(F.pad(g, (1, 1, 1, 1), value=-1.0)), conv=conv()), IMG)
    assert refused(plan) == "'pad': pad pads with the constant -1.0, which a per-channel scale would not scale"
    plan, _ = consumers(Reads(lambda s, g: s.conv(F.pad(g, (1, 1, 1, 1))), conv=conv()), IMG)
    assert targets(plan)[0][:2] == ("conv", "conv")


def test_a_shift_passes_padding_that_copies_values_in_every_spelling():
    def shift_through(body, **layers):
        plan, _ = producer(Gated(body, shift=True, conv=conv(), **layers), IMG)
        return plan.reason or [t[0] for t in targets(plan)]

    class BorderPad(nn.ReflectionPad2d):  # a user's subclass: its kind, not its name, says how it pads
        pass

    for pad in (nn.ReflectionPad2d(1), nn.ReplicationPad2d(1), nn.CircularPad2d(1), BorderPad(1)):
        assert shift_through(lambda s, x: s.pad(s.conv(x)), pad=pad) == ["conv"], pad
    for pad in (nn.ZeroPad2d(1), nn.ConstantPad2d(1, 0.5)):
        assert shift_through(lambda s, x: s.pad(s.conv(x)), pad=pad) == \
            "'pad': pad pads with constants that are not shifted", pad
    assert shift_through(lambda s, x: torch.ops.aten.pad.default(s.conv(x), [1, 1, 1, 1], "reflect")) == ["conv"]
    assert shift_through(lambda s, x: torch.ops.aten.pad.default(s.conv(x), [1, 1, 1, 1])) == \
        "'pad_default': pad pads with constants that are not shifted"
    assert shift_through(lambda s, x: torch.ops.aten.reflection_pad2d.default(s.conv(x), [1, 1, 1, 1])) == ["conv"]
    assert shift_through(lambda s, x: torch.ops.aten.replication_pad2d.default(s.conv(x), [1, 1, 1, 1])) == ["conv"]
    assert shift_through(lambda s, x: torch.ops.aten.constant_pad_nd.default(s.conv(x), [1, 1, 1, 1])) == \
        "'constant_pad_nd_default': pad pads with constants that are not shifted"


def test_a_shift_through_average_pooling_in_every_spelling():
    def shift_through(body, **layers):
        plan, _ = producer(Gated(body, shift=True, conv=conv(), **layers), IMG)
        return plan.reason or [t[0] for t in targets(plan)]

    padded = "averages padded zeros"
    assert shift_through(lambda s, x: F.avg_pool2d(s.conv(x), 2, 2, 0, True)) == \
        "'avg_pool2d': avg_pool uses ceil_mode (windows running past the border)"
    assert shift_through(lambda s, x: F.avg_pool2d(s.conv(x), 3, 1, padding=1, count_include_pad=False)) == ["conv"]
    assert shift_through(lambda s, x: F.avg_pool2d(s.conv(x), 3, 1, 1, False, True)) == f"'avg_pool2d': avg_pool {padded}"
    assert shift_through(lambda s, x: F.avg_pool2d(s.conv(x), 2, divisor_override=3)) == \
        "'avg_pool2d': avg_pool divides by a fixed divisor, not by the window's size"
    assert shift_through(lambda s, x: F.avg_pool2d(s.conv(x), 2, 2, 0, False, True, 3)) == \
        "'avg_pool2d': avg_pool divides by a fixed divisor, not by the window's size"
    assert shift_through(lambda s, x: s.pool(s.conv(x)), pool=nn.AvgPool2d(2, ceil_mode=True)) == \
        "'pool': avg_pool uses ceil_mode (windows running past the border)"
    assert shift_through(lambda s, x: s.pool(s.conv(x)), pool=nn.AvgPool2d(3, 1, 1, count_include_pad=False)) == \
        ["conv"]
    assert shift_through(lambda s, x: s.pool(s.conv(x)), pool=nn.AvgPool2d(2, divisor_override=3)) == \
        "'pool': avg_pool divides by a fixed divisor, not by the window's size"
    assert shift_through(lambda s, x: torch.ops.aten.avg_pool2d.default(s.conv(x), [3, 3], [1, 1], [1, 1])) == \
        f"'avg_pool2d_default': avg_pool {padded}"
    assert shift_through(lambda s, x: torch.ops.aten.avg_pool2d.default(s.conv(x), [2, 2], [2, 2])) == ["conv"]


# -- the consumer walk's arguments, and sums with numbers and broadcast parameters ---------------


def test_consumer_reductions_by_keyword_and_keepdim():
    class Seq(nn.Module):  # [N, L, C], gate on C
        def __init__(self, read):
            super().__init__()
            self.fc, self.read, self.v = nn.Linear(6, 4), read, nn.Parameter(torch.rand(1, 1, 6))

        def forward(self, x):
            return self.read(self, x * self.v)

    # [N, L, C] -> [N, 1, C]: the gated axis stays axis 2
    for read in (lambda s, g: s.fc(g.mean(1, keepdim=True)), lambda s, g: s.fc(g.mean(dim=1, keepdim=True)),
                 lambda s, g: s.fc(g.mean(1, True))):
        plan, _ = consumers(Seq(read), SEQ, axes=2)
        assert targets(plan)[0][:4] == ("fc", "linear", "input", Span(2, 0, 6, 0))
    # [N, L, C] -> [N, 1, L, C]: it moves to axis 3
    plan, _ = consumers(Seq(lambda s, g: s.fc(g.unsqueeze(1))), SEQ, axes=2)
    assert targets(plan)[0][:4] == ("fc", "linear", "input", Span(3, 0, 6, 0))
    plan, _ = consumers(Seq(lambda s, g: g.mean()), SEQ, axes=2)
    assert refused(plan) == "'mean' (mean) reduces every axis"
    plan, _ = consumers(Seq(lambda s, g: s.fc(F.adaptive_avg_pool1d(g, 3).repeat(1, 1, 2))), SEQ, axes=2)
    assert refused(plan) == "'adaptive_avg_pool1d' (adaptive_avg_pool) changes the size of the gated axis"


def test_consumers_reading_by_keyword_or_without_shapes():
    gm, modules = _graph(Reads(lambda s, g: s.conv(F.dropout(g, p=0.0, training=False)), conv=conv()), IMG)
    dropout = next(n for n in gm.graph.nodes if n.name == "dropout")
    dropout.kwargs, dropout.args = {"input": dropout.args[0], **dropout.kwargs}, ()  # a tracer that keeps keywords
    plan = plan_consumers(_combine(gm), 1, "mul", _sign(True), modules)
    assert refused(plan) == "'dropout' (dropout) reads the gated tensor in another place than its input"
    gm, modules = _graph(Gated(lambda s, x: F.interpolate(s.conv(x), scale_factor=2.0), conv=conv()), IMG)
    resize = next(n for n in gm.graph.nodes if n.name == "interpolate")
    resize.kwargs, resize.args = {"input": resize.args[0], **resize.kwargs}, ()
    combine = _combine(gm)
    plan = plan_producer(combine.args[0], combine, 1, "mul", _sign(True), modules)
    assert refused(plan) == "'interpolate' (interpolate) has no tensor input"
    gm, modules = _graph(Reads(lambda s, g: s.conv(F.relu(g)), conv=conv()), IMG)
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    del relu.meta["tensor_meta"]
    plan = plan_consumers(_combine(gm), 1, "mul", _sign(True), modules)
    assert refused(plan) == "'relu' (relu) has no shape information"
    gm, modules = _graph(Gated(lambda s, x: F.relu(s.conv(x)), conv=conv()), IMG)
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    del relu.meta["tensor_meta"]
    combine = _combine(gm)
    plan = plan_producer(combine.args[0], combine, 1, "mul", _sign(True), modules)
    assert refused(plan) == "'relu' (relu) has no shape information"


def test_consumer_cuts_of_other_axes_and_tensor_indexes():
    plan, _ = consumers(Reads(lambda s, g: s.conv(g.narrow(2, 1, 4)), conv=conv()), IMG)
    assert targets(plan)[0][3:5] == (Span(1, 0, 3, 0), 3)
    plan, _ = consumers(Reads(lambda s, g: s.conv(torch.ops.aten.slice.Tensor(g, 1, 0, 3, 2)), conv=nn.Conv2d(2, 4, 1)),
                        IMG)
    assert refused(plan) == "'slice_tensor' (slice) cuts with steps or arguments computed at run time"

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.v = nn.Conv2d(2, 4, 1), nn.Parameter(torch.rand(1, 3, 1, 1))
            self.register_buffer("idx", torch.tensor([0, 2]))

        def forward(self, x):
            return self.conv((x * self.v)[:, self.idx])

    plan, _ = consumers(M(), IMG)
    assert refused(plan) == "'getitem' (getitem) indexes with tensors or lists"


def test_consumer_pieces_by_keyword_default_and_empty():
    class Pieces(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.how, self.fc = how, nn.Linear(5, 4)
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.v = nn.Parameter(torch.rand(1, 3, 1, 1) if how not in ("unbind2", "unbind0") else torch.rand(1, 3, 1))

        def forward(self, x):
            if self.how == "unbind2":  # [N, C, L] unbound along L: each piece [N, C]
                return nn.functional.linear(torch.unbind(x * self.v, dim=2)[0], torch.ones(4, 3))
            if self.how == "unbind0":  # along N by default: each piece [C, L]
                return self.fc(torch.unbind(x * self.v)[0])
            g = x * self.v
            if self.how == "batch":  # along N: each piece keeps the gate on axis 1
                a, b = torch.split(g, 1)
            elif self.how == "keyword":
                a, b = torch.split(g, [1, 2], dim=1)
                return nn.functional.conv2d(a, torch.ones(4, 1, 1, 1)), nn.functional.conv2d(b, torch.ones(4, 2, 1, 1))
            else:  # cat then split: the first piece holds none of the gate
                a, b = torch.split(torch.cat([self.a(x), g], 1), [4, 3], 1)
                return nn.functional.conv2d(a, torch.ones(2, 4, 1, 1)), self.b(b)
            return self.a(a), self.b(b)

    plan, _ = consumers(Pieces("batch"), IMG)
    assert [t[:4] for t in targets(plan)] == [("a", "conv", "input", Span(1, 0, 3, 0)),
                                              ("b", "conv", "input", Span(1, 0, 3, 0))]
    plan, _ = consumers(Pieces("keyword"), IMG)
    assert [t[3] for t in targets(plan)] == [Span(1, 0, 1, 0), Span(1, 1, 3, 0)]
    plan, _ = consumers(Pieces("empty"), IMG)  # the first piece sees none of the gate; the second all of it
    assert [t[:4] for t in targets(plan)] == [("b", "conv", "input", Span(1, 0, 3, 0))]
    plan, _ = consumers(Pieces("unbind2"), (2, 3, 5), axes=1)
    assert targets(plan)[0][1:4] == ("linear", "input", Span(1, 0, 3, 0))
    plan, _ = consumers(Pieces("unbind0"), (2, 3, 5), axes=1)
    assert refused(plan) == "'fc' (Linear): it reads channels on another axis (1) than the gate's (0)"


def test_a_shift_into_a_consumer_without_bias_goes_to_the_batchnorm_after_it():
    plan, _ = consumers(Reads(lambda s, g: s.bn(s.fc(g)), shift=True, v_shape=(1, 6), fc=nn.Linear(6, 4, bias=False),
                              bn=nn.BatchNorm1d(4).eval()), (2, 6))
    assert targets(plan) == [("fc", "linear", "input", Span(1, 0, 6, 0), 6, (), False, ("bias",), "bn")]
    # a scale needs no bias: nothing goes to the BatchNorm
    plan, _ = consumers(Reads(lambda s, g: s.bn(s.conv(g)), conv=conv(bias=False), bn=bn()), IMG)
    assert targets(plan)[0][-1] is None

    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.gain = nn.Parameter(torch.rand(4, 3, 1, 1)), nn.Parameter(torch.rand(4, 1, 1, 1))
            self.v = nn.Parameter(torch.rand(1, 3, 1, 1))

        def forward(self, x):
            return F.conv2d(x * self.v, self.w * self.gain)

    plan, _ = consumers(Computed(), IMG)
    assert refused(plan) == "'conv2d' (conv) computes its weight in the graph"


def test_sums_with_integer_constants_and_broadcast_bias_parameters():
    plan, _ = producer(Gated(lambda s, x: s.a(x) + 1, a=conv()), IMG)
    assert refused(plan) == "'add' adds the constant 1, which a per-channel scale would change"
    plan, _ = producer(Gated(lambda s, x: s.a(x) + 1.0, a=conv()), IMG)
    assert refused(plan) == "'add' adds the constant 1.0, which a per-channel scale would change"
    plan, _ = producer(Gated(lambda s, x: 1.0 - s.a(x), shift=True, a=conv()), IMG)
    assert refused(plan) == "no branch of 'sub' can take the shift"

    class Bias(nn.Module):  # [N, L, C] + a bias of shape [C]: the bias's axis 0 is the gated axis 2
        def __init__(self):
            super().__init__()
            self.fc, self.b = nn.Linear(6, 6, bias=False), nn.Parameter(torch.rand(6))
            self.v = nn.Parameter(torch.rand(1, 1, 6))

        def forward(self, x):
            return (self.fc(x) + self.b) * self.v

    plan, _ = producer(Bias(), SEQ, axes=2)
    assert targets(plan) == [
        ("fc", "linear", "output", Span(2, 0, 6, 0), 6, ("add",), False, ("weight", "bias"), None),
        ("b", "parameter", "output", Span(0, 0, 6, 0), 6, ("add",), False, (), None)]

    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.v = conv(), conv(), nn.Parameter(torch.rand(1, 6, 1, 1))

        def forward(self, x):
            y = self.a(x)
            return (y + torch.sigmoid(self.b(x))) + self.v, y

    plan, _ = producer(Shift(), IMG)
    assert refused(plan) == "no branch of 'add' can take the shift: x is a sum ('add'), and its branch 'a' is also read elsewhere"


def test_a_concatenation_of_three_places_each_part():
    body = lambda s, x: torch.cat([s.a(x), s.b(x), s.c(x)], 1)  # noqa: E731
    plan, _ = producer(Gated(body, a=conv(3, 2), b=conv(3, 3), c=conv(3, 1)), IMG)
    assert [t[3:5] for t in targets(plan)] == [(Span(1, 0, 2, 0), 2), (Span(1, 2, 5, 0), 3), (Span(1, 5, 6, 0), 1)]


def test_an_index_by_a_list_is_not_a_cut():
    plan, _ = producer(Gated(lambda s, x: s.conv(x)[:, [0, 2, 4]], v_shape=(1, 3, 1, 1), conv=conv()), IMG)
    assert refused(plan) == "'getitem' (getitem) indexes with tensors or lists"


def test_consumer_concatenations_of_three_and_by_default_along_the_batch():
    class M(nn.Module):
        def __init__(self, where):
            super().__init__()
            self.a, self.b, self.where = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 1, 1), where
            self.conv = nn.Conv2d(6, 4, 1) if where != "batch" else nn.Conv2d(3, 4, 1)
            self.v = nn.Parameter(torch.rand(1, 3, 1, 1))

        def forward(self, x):
            g = x * self.v
            if self.where == "batch":
                return self.conv(torch.cat([g, x]))
            return self.conv(torch.cat([self.a(x), self.b(x), g], 1))

    plan, _ = consumers(M("last"), IMG)  # after 2 + 1 other channels
    assert targets(plan)[0][3:5] == (Span(1, 0, 3, 3), 6)
    plan, _ = consumers(M("batch"), IMG)
    assert refused(plan) == "'cat' concatenates the gated tensor with others along axis 0, not along the gated axis 1"


def test_consumer_pieces_of_aten_split_with_sizes():
    class M(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dim, self.a, self.b = dim, nn.Conv2d(1 if dim else 3, 4, 1), nn.Conv2d(2 if dim else 3, 4, 1)
            self.v = nn.Parameter(torch.rand(1, 3, 1, 1))

        def forward(self, x):
            g = x * self.v
            if self.dim:
                pieces = torch.ops.aten.split_with_sizes.default(g, [1, 2], 1)
            else:  # along the batch, by default
                pieces = torch.ops.aten.split_with_sizes.default(g, [1, 1])
            return self.a(pieces[0]), self.b(pieces[1])

    plan, _ = consumers(M(1), IMG)
    assert [t[3] for t in targets(plan)] == [Span(1, 0, 1, 0), Span(1, 1, 3, 0)]
    plan, _ = consumers(M(0), IMG)
    assert [t[3] for t in targets(plan)] == [Span(1, 0, 3, 0), Span(1, 0, 3, 0)]


def test_a_product_that_adds_axes_moves_the_gated_axis():
    class M(nn.Module):  # an unbatched [C, H, W] gated tensor times a batch [N, C, H, W]
        def __init__(self):
            super().__init__()
            self.conv, self.v = nn.Conv2d(3, 4, 1), nn.Parameter(torch.rand(3, 1, 1))
            self.register_buffer("y", torch.rand(2, 3, 8, 8))

        def forward(self, x):
            return self.conv((x * self.v) * self.y)

    plan, _ = consumers(M(), (3, 8, 8), axes=0)
    assert targets(plan)[0][:4] == ("conv", "conv", "input", Span(1, 0, 3, 0))


def test_producer_reductions_with_keepdim_and_over_every_axis():
    for body in (lambda s, x: s.fc(x).mean(1, keepdim=True), lambda s, x: s.fc(x).mean(1, True)):
        plan, _ = producer(Gated(body, v_shape=(1, 1, 6), fc=nn.Linear(6, 6)), SEQ, axes=2)
        assert targets(plan)[0][:4] == ("fc", "linear", "output", Span(2, 0, 6, 0))
    plan, _ = producer(Gated(lambda s, x: s.conv(x).mean(dim=None, keepdim=True), v_shape=(1, 1, 1, 1), conv=conv()),
                       IMG)
    assert refused(plan) == "'mean' (mean) reduces every axis"


def test_a_gated_tensor_nothing_reads():
    gm, modules = _graph(Reads(lambda s, g: g), IMG)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (next(n for n in gm.graph.nodes if n.op == "placeholder"),)  # the gate's result is dead
    plan = plan_consumers(_combine(gm), 1, "mul", _sign(True), modules)
    assert refused(plan) == "nothing reads 'mul'"


def test_the_sign_of_each_part_of_the_gate_is_what_passes_relu():
    """A concatenation gives each input its entries of the gate; ReLU on one input asks the sign of
    those entries only (value_sign over start:stop)."""
    class M(nn.Module):
        def __init__(self, relu_first):
            super().__init__()
            self.a, self.b, self.relu_first = conv(3, 4), conv(3, 2), relu_first
            self.v = nn.Parameter(torch.ones(1, 6, 1, 1))

        def forward(self, x):
            a, b = self.a(x), self.b(x)
            parts = [F.relu(a), b] if self.relu_first else [b, F.relu(a)]
            return torch.cat(parts, 1) * self.v

    for relu_first, vector in ((True, [1.0] * 4 + [-1.0] * 2), (False, [-1.0] * 2 + [1.0] * 4)):
        gm, modules = _graph(M(relu_first), IMG)
        combine = _combine(gm)
        plan = plan_producer(combine.args[0], combine, 1, "mul", value_sign(torch.tensor(vector)), modules)
        assert [t[:4] for t in targets(plan)] == ([("a", "conv", "output", Span(1, 0, 4, 0)),
                                                   ("b", "conv", "output", Span(1, 4, 6, 0))] if relu_first else
                                                  [("b", "conv", "output", Span(1, 0, 2, 0)),
                                                   ("a", "conv", "output", Span(1, 2, 6, 0))]), relu_first


def test_a_shift_through_an_op_needs_no_sign():
    plan, _ = producer(Gated(lambda s, x: F.max_pool2d(s.conv(x), 2), shift=True, conv=conv()), IMG)
    assert targets(plan)[0][5:7] == (("max_pool2d",), False)


def test_optimism_and_ignored_readers_on_both_sides():
    plan, _ = consumers(Reads(lambda s, g: s.conv(F.relu(g)), conv=conv()), IMG, known=None, optimistic=True)
    assert targets(plan)[0][5:7] == (("relu",), True)
    gm, modules = _graph(Reads(lambda s, g: s.conv(F.relu(g)), conv=conv()), IMG)
    plan = plan_consumers(_combine(gm), 1, "mul", _sign(None), modules)  # not optimistic by default
    assert refused(plan) == "'relu': relu commutes with a non-negative scale only, and the gate may be negative"

    class Stat(nn.Module):  # x is also read by a statistic that the caller will remove (ignore)
        def __init__(self):
            super().__init__()
            self.conv, self.head, self.v = conv(), nn.Conv2d(6, 4, 1), nn.Parameter(torch.rand(1, 6, 1, 1))

        def forward(self, x):
            y = self.conv(x)
            g = y * self.v
            return self.head(g), y.mean(), g.amax()

    gm, modules = _graph(Stat(), IMG)
    combine = _combine(gm)
    stat = next(n for n in gm.graph.nodes if n.name == "mean")
    peek = next(n for n in gm.graph.nodes if n.name == "amax")
    assert refused(plan_producer(combine.args[0], combine, 1, "mul", _sign(True), modules)) == \
        "'conv' is also read unscaled by 'mean'"
    plan = plan_producer(combine.args[0], combine, 1, "mul", _sign(True), modules, ignore=frozenset({stat}))
    assert [t[0] for t in targets(plan)] == ["conv"]
    plan = plan_consumers(combine, 1, "mul", _sign(True), modules, ignore=frozenset({peek}))
    assert [t[0] for t in targets(plan)] == ["head"]


def test_no_layer_reads_the_gated_channels():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.conv, self.v = nn.Conv2d(3, 2, 1), nn.Conv2d(2, 4, 1), nn.Parameter(torch.rand(1, 3, 1, 1))

        def forward(self, x):
            return self.conv(torch.cat([x * self.v, self.a(x)], 1)[:, 3:])

    plan, _ = consumers(M(), IMG)
    assert refused(plan) == "no layer reads the gated tensor"


def test_computed_weights_and_biases_of_a_producer():
    class M(nn.Module):
        def __init__(self, computed):
            super().__init__()
            self.w, self.g = nn.Parameter(torch.rand(6, 3, 3, 3)), nn.Parameter(torch.rand(6, 1, 1, 1))
            self.b, self.k = nn.Parameter(torch.rand(6)), nn.Parameter(torch.rand(6))
            self.wt = nn.Parameter(torch.rand(3, 6, 3, 3))
            self.computed, self.v = computed, nn.Parameter(torch.rand(1, 6, 1, 1))

        def forward(self, x):
            if self.computed == "weight":
                y = F.conv2d(x, self.w * self.g, self.b)
            elif self.computed == "bias":
                y = F.conv2d(x, self.w, self.b * self.k)
            else:
                y = F.conv_transpose2d(x, self.wt * 2.0)
            return y * self.v

    plan, _ = producer(M("weight"), IMG)
    assert targets(plan) == [
        ("conv2d", "conv", "output", Span(1, 0, 6, 0), 6, (), False, ("bias",), None),
        ("w", "parameter", "output", Span(0, 0, 6, 0), 6, ("conv2d", "mul"), False, (), None)]
    plan, _ = producer(M("bias"), IMG)
    assert targets(plan) == [
        ("conv2d", "conv", "output", Span(1, 0, 6, 0), 6, (), False, ("weight",), None),
        ("b", "parameter", "output", Span(0, 0, 6, 0), 6, ("conv2d", "mul"), False, (), None)]
    plan, _ = producer(M("transpose"), IMG)
    assert refused(plan) == "'conv_transpose2d' (conv_transpose) computes its weight in the graph"


@pytest.mark.parametrize("spelling", ["reshape", "view", "expand", "expand_as", "flatten", "unsqueeze", "squeeze",
                                      "contiguous", "permute", "transpose"])
def test_a_gate_is_known_non_negative_through_every_broadcast_spelling(spelling):
    class G(nn.Module):
        def forward(self, x):
            e = torch.sigmoid(x.mean((2, 3), keepdim=True))  # [N, C, 1, 1]
            return {"reshape": lambda: e.reshape(2, 3, 1, 1), "view": lambda: e.view(2, 3, 1, 1),
                    "expand": lambda: e.expand(2, 3, 8, 8), "expand_as": lambda: e.expand_as(x),
                    "flatten": lambda: e.flatten(1), "unsqueeze": lambda: e.unsqueeze(0),
                    "squeeze": lambda: e.squeeze(-1), "contiguous": lambda: e.contiguous(),
                    "permute": lambda: e.permute(0, 1, 3, 2), "transpose": lambda: e.transpose(2, 3)}[spelling]()

    gm, modules = _graph(G(), IMG)
    gate = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert static_sign(gate, modules)(0, 3) is True


@pytest.mark.parametrize("how", ["plain", "alpha", "product", "twice"])
def test_the_residual_gate_is_only_x_plus_x_times_the_gate(how):
    gm, modules = _graph(_Residual(how), IMG)
    combine = _combine(gm)
    add = residual_add(combine.args[0], combine, modules)
    assert (add is not None) == (how == "plain"), how


class _Residual(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.v = how, nn.Parameter(torch.rand(1, 3, 1, 1))

    def forward(self, x):
        g = x * self.v
        if self.how == "alpha":
            return torch.add(x, g, alpha=2.0)  # x + 2 * x * v is not x * (1 + v)
        if self.how == "product":
            return x * g
        if self.how == "twice":
            return x + g, g
        return x + g


def test_describe_names_the_ops_worth_naming():
    plan, modules = producer(Gated(lambda s, x: s.idn(s.conv(x)).contiguous(), conv=conv(), idn=nn.Identity()), IMG)
    assert plan.describe(modules) == "Conv2d 'conv'"
    body = lambda s, x: F.max_pool2d(F.relu(s.bn(s.conv(x))), 2)  # noqa: E731
    plan, modules = producer(Gated(body, conv=conv(), bn=bn()), IMG)
    assert plan.describe(modules) == "BatchNorm2d 'bn' through max_pool, relu (if the gate is non-negative)"


def test_padding_arguments_by_keyword():
    def shift_through(body):
        plan, _ = producer(Gated(body, shift=True, conv=conv()), IMG)
        return plan.reason or [t[0] for t in targets(plan)]

    assert shift_through(lambda s, x: F.avg_pool2d(s.conv(x), 3, 1, padding=1)) == \
        "'avg_pool2d': avg_pool averages padded zeros"
    plan, _ = producer(Gated(lambda s, x: torch.ops.aten.constant_pad_nd.default(s.conv(x), [1, 1, 1, 1], value=2.0),
                             conv=conv()), IMG)
    assert refused(plan) == \
        "'constant_pad_nd_default': pad pads with the constant 2.0, which a per-channel scale would not scale"
