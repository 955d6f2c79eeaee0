"""Capture without workarounds: any signature and output structure, and the export route.

Each model below is called as ``model(*args, **kwargs)`` and trips torch.fx in one way a real
model does (keyword tensors in ``**kwargs``, starred unpacking of a shape, an ``if h % 8:
raise`` size check, an untraceable block holding SE) or not at all (optional arguments,
dict/tuple/dataclass outputs). For each: the sites found equal the SE calls counted by hooks;
convert and one training step reach every psi; on the export route ``.train()``/``.eval()``
switch BatchNorm and dropout as on the model; fuse is exact in float64 with random BatchNorm
statistics, leaves no gate, and has the parameter count of the model without its attention;
every result is called as the model and returns the same structure.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import asrfx
from asrfx import TracingError
from asrfx.passes.fuse import constant_gates

import zoo
from helpers import examples, randomize
from strategies import networks


class SE(nn.Module):
    def __init__(self, c, r=2):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Block(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.conv, self.bn, self.se = nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), SE(c)

    def forward(self, x):
        return self.se(F.relu(self.bn(self.conv(x))))


@dataclasses.dataclass
class Output:
    """Like HF's ModelOutput: a dataclass output, registered as a pytree node."""

    logits: torch.Tensor
    features: torch.Tensor | None = None


pytree.register_dataclass(Output)


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1, self.b2 = Block(3, 8), Block(8, 16)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, 5)

    def features(self, x):
        return self.b2(self.b1(x))

    def logits(self, f):
        return self.head(self.drop(f.mean((2, 3))))


class Optional(Base):
    """Optional arguments, a dict or a tuple out."""

    def forward(self, x, mask=None, scale: float = 1.0, return_dict=True):
        f = self.features(x) * scale
        if mask is not None:
            f = f * mask
        out = self.logits(f)
        return {"logits": out, "features": f} if return_dict else (out, f)


class Keywords(Base):
    """Keyword tensors read from ``**kwargs``."""

    def forward(self, x, scale: float = 1.0, **kwargs):
        f = self.features(x) * scale
        if kwargs.get("bias") is not None:
            f = f + kwargs["bias"]
        return {"logits": self.logits(f), "features": f}


class DataclassOut(Base):
    def forward(self, x):
        f = self.features(x)
        return Output(self.logits(f), f)


class Unpacks(Base):
    """HF style: starred unpacking of the input's shape ("Proxy object cannot be iterated")."""

    def forward(self, pixel_values):
        *_, height, width = pixel_values.shape
        f = self.features(pixel_values[..., :height, :width])
        return Output(self.logits(f), f)


class SizeCheck(Base):
    """Segmentation style: the forward refuses sizes its strides cannot divide."""

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % 8 or w % 8:
            raise ValueError(f"input size must be divisible by 8, got {h}x{w}")
        return self.logits(self.features(x))


class CheckedBlock(Block):
    """torch.fx cannot trace this block (control flow on a size), and it holds an SE."""

    def forward(self, x):
        if x.shape[1] != self.conv.in_channels:
            raise ValueError("wrong channel count")
        return super().forward(x)


class HiddenSE(Base):
    def __init__(self):
        super().__init__()
        self.b2 = CheckedBlock(8, 16)

    def forward(self, x):
        return self.logits(self.features(x))


class ValueFlow(Base):
    """Control flow on tensor values around (not inside) the attention blocks."""

    def forward(self, x):
        if x.abs().amax() > 1e3:
            x = x / x.abs().amax()
        return self.logits(self.features(x))


def _x(batch=2, size=16, dtype=torch.float32):
    return torch.randn(batch, 3, size, size, dtype=dtype)


# (model class, keyword inputs given the batch input, expected route, words of the reason)
CASES = {
    "optional-arguments-dict": (Optional, lambda x: {"mask": torch.rand(x.shape[0], 1, *x.shape[2:], dtype=x.dtype)},
                                "fx", ""),
    "optional-arguments-tuple": (Optional, lambda x: {"return_dict": False}, "fx", ""),
    "dataclass-output": (DataclassOut, lambda x: {}, "fx", ""),
    "kwargs": (Keywords, lambda x: {"bias": torch.randn(x.shape[0], 16, *x.shape[2:], dtype=x.dtype)},
               "export", "**kwargs"),
    "proxy-iteration": (Unpacks, lambda x: {}, "export", "cannot be iterated"),
    "size-check": (SizeCheck, lambda x: {}, "export", "control flow"),
    "untraceable-block-with-se": (HiddenSE, lambda x: {}, "export", "'b2.se'"),
}
EXPORTED = [name for name, case in CASES.items() if case[2] == "export"]


def _tensors(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _se_calls(model, args, kwargs) -> list[str]:
    """Ground truth: the SE modules the forward calls (class names are fine in tests)."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_, p=p: calls.append(p)) for p, m in model.named_modules()
             if isinstance(m, SE)]
    try:
        with torch.no_grad():
            copy.deepcopy(model).eval()(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _same_structure(a, b):
    assert type(a) is type(b)
    assert pytree.tree_structure(a) == pytree.tree_structure(b)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("case", sorted(CASES))
def test_sites_route_and_reason(case):
    cls, kwargs_of, route, words = CASES[case]
    model = cls()
    x = _x()
    kwargs = kwargs_of(x)
    table = asrfx.find_attention(model, (x,), example_kwargs=kwargs)
    assert [s.module_path for s in table] == _se_calls(model, (x,), kwargs) == ["b1.se", "b2.se"]
    assert table.capture.name == route
    assert words in table.capture.reason
    if route == "export":
        assert "captured by torch.export (training IR), because" in str(table)
        # the captured graph keeps the model's names: checkpoints load into it
        assert set(table.graph_module.state_dict()) == set(model.state_dict())
    else:
        assert table.capture.reason == "" and "captured by" not in str(table)


@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_trains_every_psi_and_keeps_the_calling_convention(case):
    cls, kwargs_of, route, _ = CASES[case]
    torch.manual_seed(0)
    model = cls()
    x = _x()
    kwargs = kwargs_of(x)
    gm = asrfx.convert(model, (x,), example_kwargs=kwargs)
    report = asrfx.report_of(gm)
    assert report.capture.name == route
    assert (str(report.capture) in str(report)) == (route == "export")
    psi = dict((n, p) for n, p in gm.named_parameters() if n.rpartition(".")[2].startswith("psi"))
    assert sorted(psi) == ["b1.se.psi", "b2.se.psi"]  # named as on the fx route
    assert [s.psi for s in report.sites] == [("b1.se.psi",), ("b2.se.psi",)]
    gm.train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    out = gm(x, **kwargs)
    _same_structure(out, model(x, **kwargs))
    sum(t.sum() for t in _tensors(out)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in psi.values())
    before = {n: p.detach().clone() for n, p in psi.items()}
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in psi.items())
    # another batch size and resolution: the captured graph is not specialised to the example
    other = _x(batch=3, size=24)
    _same_structure(gm(other, **kwargs_of(other)), model(other, **kwargs_of(other)))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_fuse_is_exact_in_float64_and_backbone_sized(case, seed):
    cls, kwargs_of, route, _ = CASES[case]
    model = randomize(cls().double(), seed).eval()
    gen = torch.Generator().manual_seed(seed)
    x = _x(batch=1 + seed, dtype=torch.float64)
    kwargs = kwargs_of(x)
    gm = asrfx.convert(model, (x,), example_kwargs=kwargs,
                       psi_init=lambda site, shape: torch.rand(shape, generator=gen, dtype=torch.float64)).eval()
    fused = asrfx.fuse(gm)
    report = asrfx.report_of(fused)
    assert len(report.folds) == 2 and report.kept == []
    assert constant_gates(fused) == [] and not any("psi" in n for n, _ in fused.named_parameters())
    for inputs in (x, _x(batch=3, size=24, dtype=torch.float64)):
        extra = kwargs_of(inputs)
        asrfx.verify(fused, gm, (inputs,), example_kwargs=extra)  # 1e-10 in float64, tensor by tensor
        _same_structure(fused(inputs, **extra), model(inputs, **extra))
    backbone = asrfx.backbone(model, (x,), example_kwargs=kwargs)
    assert _count(fused) == _count(backbone) == _count(model) - _count(model.b1.se) - _count(model.b2.se)


@pytest.mark.parametrize("case", EXPORTED)
def test_train_and_eval_switch_batchnorm_and_dropout_on_the_export_route(case):
    cls, kwargs_of, _, _ = CASES[case]
    model = randomize(cls(), 3).train()
    x = _x(batch=4)
    kwargs = kwargs_of(x)
    captured = asrfx.find_attention(model, (x,), example_kwargs=kwargs).graph_module
    captured, reference = copy.deepcopy(captured), copy.deepcopy(model)
    assert captured.training and not isinstance(captured, torch.export.ExportedProgram)
    bn = captured.get_submodule("b1.bn")
    # train mode: batch statistics, running statistics and the batch count move; dropout draws
    torch.manual_seed(7)
    got = captured(x, **kwargs)
    torch.manual_seed(7)
    want = reference(x, **kwargs)
    for g, w in zip(_tensors(got), _tensors(want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_mean, reference.b1.bn.running_mean)
    assert int(bn.num_batches_tracked) == int(reference.b1.bn.num_batches_tracked) == 1
    assert not torch.equal(_tensors(captured(x, **kwargs))[0], _tensors(captured(x, **kwargs))[0])
    reference(x, **kwargs), reference(x, **kwargs)  # the same statistics updates as the two calls above
    # eval mode: running statistics, nothing moves, no dropout
    captured.eval()
    reference.eval()
    stats = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    first, second = captured(x, **kwargs), captured(x, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(first), _tensors(second)))
    assert all(torch.equal(a, b) for a, b in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))
    for g, w in zip(_tensors(first), _tensors(reference(x, **kwargs))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # back to train mode: moves again
    captured.train()
    captured(x, **kwargs)
    assert int(bn.num_batches_tracked) == 4


def test_a_frozen_batchnorm_stays_frozen_on_the_export_route():
    """Per-module flags: a BatchNorm the user put in eval mode in a training model keeps its statistics."""
    model = SizeCheck().train()
    model.b1.bn.eval()
    x = _x(batch=4)
    captured = asrfx.find_attention(model, (x,)).graph_module
    frozen, training = captured.get_submodule("b1.bn"), captured.get_submodule("b2.bn")
    assert not frozen.training and training.training
    before = frozen.running_mean.clone(), training.running_mean.clone()
    captured(x)
    assert torch.equal(frozen.running_mean, before[0]) and int(frozen.num_batches_tracked) == 0
    assert not torch.equal(training.running_mean, before[1]) and int(training.num_batches_tracked) == 1


class SRM(nn.Module):
    """Style pooling with a BatchNorm inside the excitation: convert freezes it on either route."""

    def __init__(self, c):
        super().__init__()
        self.cfc = nn.Parameter(torch.randn(c, 2) * 0.5)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        b, c = x.shape[:2]
        u = torch.stack([x.mean((2, 3)), x.std((2, 3))], -1)
        z = (u * self.cfc).sum(-1).view(b, c, 1, 1)
        return x * torch.sigmoid(self.bn(z))


class SizeCheckSRM(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.srm = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), SRM(8)

    def forward(self, x):
        if x.shape[-1] % 4:
            raise ValueError("size")
        return self.srm(self.bn(self.conv(x)))


def test_excitation_batchnorm_is_frozen_on_the_export_route():
    """The aten graph's batch_norm in the psi branch gets training=False where aten's signature has
    it, and its batch count goes: batch 1 trains, and the excitation's running statistics stay."""
    model = randomize(SizeCheckSRM(), 0).train()
    gm = asrfx.convert(model, (_x(batch=1),))
    report = asrfx.report_of(gm)
    assert report.capture.name == "export" and len(report.sites) == 1 and report.sites[0].frozen_norms
    excitation = gm.get_submodule("srm.bn")
    stats = excitation.running_mean.clone(), excitation.num_batches_tracked.clone()
    gm.train()
    gm(_x(batch=1)).sum().backward()
    assert torch.equal(excitation.running_mean, stats[0]) and torch.equal(excitation.num_batches_tracked, stats[1])
    assert int(gm.get_submodule("bn").num_batches_tracked) == 1  # the backbone's BatchNorm still counts
    assert all(gm.get_parameter(f"srm.{name}").grad.abs().sum() > 0 for name in ("psi_avg", "psi_std"))


def test_value_dependent_control_flow_is_refused_with_both_reasons():
    """Neither route follows ``if x.abs().amax() > 1e3`` in the model's own forward: one error names
    the line, both failures, and what to do; nothing is half-converted."""
    model = ValueFlow()
    with pytest.raises(TracingError) as info:
        asrfx.convert(model, (_x(),))
    message = str(info.value)
    assert "torch.fx cannot trace the forward of ValueFlow" in message
    assert "torch.export cannot capture ValueFlow either" in message
    assert "test_capture.py" in message and "amax" in message
    assert "What to do" in message


def test_bad_calls_say_what_the_forward_takes():
    with pytest.raises(TracingError, match=r"Optional.forward\(x, mask=None"):
        asrfx.find_attention(Optional(), (_x(),), example_kwargs={"colour": 1})
    with pytest.raises(TypeError, match="example_kwargs takes a dict"):
        asrfx.find_attention(Optional(), (_x(),), example_kwargs=[("mask", None)])


def test_fixed_arguments_keep_their_names_and_defaults():
    """On the fx route the GraphModule takes the model's own keywords (not torch.fx's ``mask_1``),
    constants passed at capture are checked, and arguments left out keep their defaults."""
    model = Optional().eval()
    x = _x()
    table = asrfx.find_attention(model, (x,), example_kwargs={"scale": 2.0})
    gm = table.graph_module
    assert table.capture.name == "fx"
    torch.testing.assert_close(gm(x, scale=2.0)["logits"], model(x, scale=2.0)["logits"])
    with pytest.raises(AssertionError, match="scale has been specialized"):
        gm(x, scale=3.0)
    with pytest.raises(AssertionError, match="mask has been specialized"):
        gm(x, mask=torch.ones(2, 1, 16, 16), scale=2.0)


def test_stripe_and_insert_on_the_export_route():
    """stripe measures through the export-route graph (keywords passed with every batch); insert
    places modules after functional batch_norm calls and fuses back to the backbone."""
    model = Keywords().eval()
    x = _x()
    kwargs = {"bias": torch.zeros(2, 16, 16, 16)}
    stats = asrfx.stripe(model, [x, _x()], example_kwargs=kwargs, progress=False)
    assert [s.module_path for s in stats] == ["b1.se", "b2.se"] and stats.samples == 4

    plain = SizeCheck()
    plain.b1.se, plain.b2.se = nn.Identity(), nn.Identity()
    randomize(plain, 5)
    gm = asrfx.insert(plain, "se", (_x(),))
    report = asrfx.report_of(gm)
    assert report.capture.name == "export" and [s.module_path for s in report.sites] == ["b1.asr", "b2.asr"]
    fused = asrfx.fuse(gm.eval())
    asrfx.verify(fused, gm, (_x(),), backbone=plain)


class Checked(nn.Module):
    """A size check in front of a random network: torch.fx fails at the top, torch.export does not."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if x.shape[-1] < 1:
            raise ValueError("empty input")
        return self.net(x)


@settings(max_examples=examples(6), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(with_attention=True), st.integers(1, 3), st.integers(1, 9), st.integers(0, 2**16))
def test_export_route_follows_the_same_rules(net_expected, batch, size, seed):
    """
    Random architectures (attention kinds and decoys, norms, activations, residuals, random
    BatchNorm statistics), batch sizes and resolutions: the export route finds exactly the sites
    the fx route finds; its graph equals the model in train mode (outputs, running statistics)
    and in eval mode; and in float64 fuse(convert(.)) equals convert(.) within 1e-10 with the
    same folds as the fx route.
    """
    net, _ = net_expected
    wrapped = Checked(net.double())
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    fx_table = asrfx.find_attention(net, x)
    table = asrfx.find_attention(wrapped, x)
    assert table.capture.name == "export"
    assert [(s.module_path, s.kind, s.channels) for s in table] == \
        [("net." + s.module_path, s.kind, s.channels) for s in fx_table]
    captured, reference = copy.deepcopy(table.graph_module).train(), copy.deepcopy(wrapped).train()
    if batch > 1:  # train-mode BatchNorm needs more than one value per channel
        torch.manual_seed(seed)
        got = captured(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(got, reference(x), rtol=1e-9, atol=1e-9, equal_nan=True)
        torch.testing.assert_close(dict(captured.named_buffers()), equal_nan=True,
                                   expected={k: v for k, v in reference.named_buffers()
                                             if k in dict(captured.named_buffers())})
    # (std over a 1x1 map is NaN in both)
    torch.testing.assert_close(captured.eval()(x), reference.eval()(x), rtol=1e-9, atol=1e-9, equal_nan=True)
    gen = torch.Generator().manual_seed(seed)
    gm = asrfx.convert(wrapped, x, psi_init=lambda site, shape: torch.rand(shape, generator=gen) + 0.05).eval()
    assert not any("train and eval" in note for note in asrfx.report_of(gm).notes)
    fused = asrfx.fuse(gm)
    with torch.no_grad():
        want = gm(x)
    torch.testing.assert_close(fused(x), want, rtol=1e-10, atol=1e-10 * max(want.nan_to_num().abs().max().item(), 1.0),
                               equal_nan=True)
    assert not any("psi" in n for n, _ in fused.named_parameters())


def test_sizes_computed_in_other_places_still_follow_the_modes():
    """Found by the property test: export computes sizes ((h - 1) // 2 + 1 after a stride-2 conv,
    h * w for each of GC's two views) where each mode first needs them, and twice when asked twice;
    the train and eval graphs still merge, and the graph follows .eval()."""
    from strategies import RandomNet, Stage

    stages = [Stage(16, 16, 3, 2, False, "gn", "gelu", zoo.ChannelGate(16), False),
              Stage(16, 32, 3, 1, False, "none", "hardswish", None, False),
              Stage(32, 32, 3, 1, True, "none", "none", zoo.SEInplace(32), False),
              Stage(32, 16, 3, 1, False, "bn", "hardswish", zoo.CoordAtt(16, 16), False),
              Stage(16, 32, 1, 1, False, "none", "gelu", zoo.ContextBlock(32), False)]
    model = Checked(randomize(RandomNet(stages), 4).double()).train()
    x = torch.randn(3, 3, 9, 9, dtype=torch.float64)
    gm = asrfx.convert(model, (x,))
    report = asrfx.report_of(gm)
    assert report.capture.name == "export" and not report.notes
    captured = asrfx.find_attention(model, (x,)).graph_module
    torch.testing.assert_close(captured.eval()(x), copy.deepcopy(model).eval()(x), rtol=1e-10, atol=1e-10)


def test_merge_training_graphs_keeps_the_model_mode_when_paths_differ():
    """A forward that adds ops in train mode only cannot follow the flag: the graph keeps the
    model's mode and the report says so (same rule as the fx route)."""

    class Noisy(SizeCheck):
        def forward(self, x):
            if x.shape[-1] % 8:
                raise ValueError("size")
            f = self.features(x)
            if self.training:
                f = f + 0.1
            return self.logits(f)

    model = Noisy().eval()
    gm = asrfx.convert(model, (_x(),))
    notes = " ".join(asrfx.report_of(gm).notes)
    assert "takes different paths in train and eval mode" in notes and "(eval)" in notes
    torch.testing.assert_close(gm.eval()(_x(batch=2)).shape, torch.Size([2, 5]))


def test_call_signature_survives_graph_module_input():
    """A GraphModule from the export route goes through convert and fuse again (route 'given')."""
    model = SizeCheck().eval()
    x = _x()
    captured = asrfx.find_attention(model, (x,)).graph_module
    assert isinstance(captured, fx.GraphModule)
    gm = asrfx.convert(captured, (x,))
    assert asrfx.report_of(gm).capture.name == "given"
    torch.testing.assert_close(asrfx.fuse(gm.eval())(x), gm(x))


class GuardedSE(SE):
    """An SE whose own forward has control flow on tensor values: neither route can look inside."""

    def forward(self, x):
        if x.abs().amax() > 1e3:
            x = x / 1e3
        return super().forward(x)


class GuardedNet(Base):
    def __init__(self):
        super().__init__()
        self.b2.se = GuardedSE(16)

    def forward(self, x):
        return self.logits(self.features(x))


def test_a_leaf_no_route_can_search_is_never_counted_as_absent():
    """torch.fx keeps b2.se whole and torch.export cannot capture it: find_attention and convert
    warn, naming it, the table marks it NOT searched, and the convert report notes it."""
    model = GuardedNet()
    with pytest.warns(asrfx.AsrfxWarning, match=r"'b2.se' \(GuardedSE\) is kept as a single call and could not be"):
        table = asrfx.find_attention(model, (_x(),))
    assert [s.module_path for s in table] == ["b1.se"] and table.capture.name == "fx"
    assert [(leaf.path, bool(leaf.unsearched)) for leaf in table.leaves] == [("b2.se", True)]
    assert "b2.se (GuardedSE)" in str(table) and "NOT searched: torch.export cannot capture GuardedSE" in str(table)
    with pytest.warns(asrfx.AsrfxWarning, match="could not be searched"):
        gm = asrfx.convert(model, (_x(),))
    assert any("'b2.se' (GuardedSE) was kept as a single call and not searched" in n
               for n in asrfx.report_of(gm).notes)


def test_a_leaf_export_can_search_is_searched_whole():
    """The leaf's own forward holds the attention (no child does): captured alone by torch.export,
    it is found, and the model takes the export route."""

    class CheckedSE(SE):
        def forward(self, x):
            if x.shape[1] != self.fc1.in_channels:
                raise ValueError("channels")
            return super().forward(x)

    model = GuardedNet()
    model.b2.se = CheckedSE(16)
    table = asrfx.find_attention(model, (_x(),))
    assert table.capture.name == "export" and "'b2.se' (se)" in table.capture.reason
    assert [s.module_path for s in table] == ["b1.se", "b2.se"]


def test_the_export_route_result_compiles_fullgraph_in_train_and_eval_mode():
    """torch.compile(fullgraph=True) takes the converted export-route GraphModule: the training flags it
    reads are plain module attributes (guarded), so train and eval mode compile and match eager."""
    model = randomize(SizeCheck(), 2)
    x = _x(batch=4)
    gm = asrfx.convert(model, (x,)).train()
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    got = compiled(x)
    torch.manual_seed(0)
    torch.testing.assert_close(got, gm(x))
    got.sum().backward()
    assert gm.get_parameter("b1.se.psi").grad.abs().sum() > 0
    compiled.eval()
    torch.testing.assert_close(compiled(x), gm(x))


@dataclasses.dataclass
class _Output(dict):
    """A dict-like dataclass output, as HF's ModelOutput (torch.fx records it as a plain dict)."""

    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is not None:
                self[field.name] = getattr(self, field.name)


class _DictOutputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.se, self.head = nn.Conv2d(3, 8, 3), zoo.SELayer(8), nn.Linear(8, 4)

    def forward(self, x):
        y = self.se(self.body(x))
        return _Output(logits=self.head(y.mean((2, 3))))


def test_a_dict_dataclass_output_keeps_its_type_on_the_fx_route():
    model, x = _DictOutputNet().eval(), torch.randn(2, 3, 9, 9)
    gm = asrfx.convert(model, x)
    assert asrfx.report_of(gm).capture.name == "fx" and len(asrfx.report_of(gm).sites) == 1
    out = gm.eval()(x)
    assert type(out) is _Output and out.features is None and out.logits.shape == (2, 4)
    fused = asrfx.fuse(gm)
    assert type(fused(x)) is _Output
    torch.testing.assert_close(fused(x).logits, out.logits, rtol=1e-5, atol=1e-6)


class _DropPath(nn.Module):
    """timm's DropPath: its forward branches on self.training (no ops at all in eval mode)."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class _StochasticDepthNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv, self.bn, self.se = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), zoo.SELayer(8)
        self.drop_path = _DropPath()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.drop_path(self.se(self.bn(self.conv(x))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("training", [True, False])
def test_a_module_that_branches_on_its_mode_is_kept_whole_and_follows_eval(training):
    """The train and eval graphs differ in structure inside DropPath: instead of freezing the graph in
    the mode it was captured in (a stochastic deployed model), the module is kept as a single call,
    so the converted and fused models are deterministic in eval mode, as the model is."""
    model, x = randomize(_StochasticDepthNet(), 4).train(training), torch.randn(4, 3, 6, 6)
    table = asrfx.find_attention(model, x)
    assert [leaf.path for leaf in table.leaves] == ["drop_path"] and len(table) == 1
    gm = asrfx.convert(model, x)
    assert not any("train and eval" in note for note in asrfx.report_of(gm).notes)
    gm.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), gm(x))
        fused = asrfx.fuse(gm)
        torch.testing.assert_close(fused(x), gm(x), rtol=1e-5, atol=1e-6)
    gm.train()
    torch.manual_seed(0)
    a = gm(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, gm(x))  # paths are dropped while training


class _ReadsNoFlag(nn.Module):
    """Dropout and BatchNorm as modules (kept as calls, each following its own mode): tracing reads no
    training flag."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.se = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), zoo.SELayer(8)
        self.drop, self.head = nn.Dropout(0.5), nn.Linear(8, 3)

    def forward(self, x):
        x = self.se(torch.relu(self.bn(self.conv(x))))
        return self.head(self.drop(x.mean((2, 3))))


def _always_read(model):
    return contextlib.nullcontext(lambda: True)


@pytest.mark.parametrize("training", [True, False])
def test_one_trace_when_no_module_reads_its_mode(training, monkeypatch):
    """Nothing read ``self.training`` while tracing: the graph is traced once, and is the graph that
    tracing in both modes and merging gives."""
    from asrfx.graph import capture

    model = _ReadsNoFlag().train(training)
    calls = []
    trace_once = capture._LeafTracer.trace
    monkeypatch.setattr(capture._LeafTracer, "trace", lambda self, *a, **k: calls.append(1) or trace_once(self, *a, **k))
    once = capture.trace(model).gm
    assert len(calls) == 1 and "training" not in vars(nn.Module)
    monkeypatch.setattr(capture, "flag_reads", _always_read)
    assert capture.trace(model).gm.code == once.code and len(calls) == 3


class _IsTrue(nn.Module):
    def forward(self, x):
        return x + 1 if self.training is True else x - 1  # no bool() of the flag: only its read tells


class _ReadsChildFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return F.dropout(x, 0.5, getattr(self.bn, "training"))


class _FlagMixin:
    training = True  # a class attribute before nn.Module: reads never reach nn.Module


class _MixedIn(_FlagMixin, nn.Module):
    def forward(self, x):
        return x + 1 if self.training else x - 1


@pytest.mark.parametrize("model", [_IsTrue(), _ReadsChildFlag(), _MixedIn()], ids=["is_true", "child_flag", "mixin"])
@pytest.mark.parametrize("training", [True, False])
def test_any_read_of_a_mode_flag_traces_both_modes(model, training):
    """However the flag is read (``is True``, another module's, through getattr, a class that shadows
    it), both modes are traced: the graph follows the model's mode, or the flag itself."""
    from asrfx.graph.capture import trace
    from asrfx.graph.modes import flag_reads

    model.train(training)
    with flag_reads(model) as read:
        model(torch.zeros(2, 4))
    assert read() and "training" not in vars(nn.Module)
    traced = trace(model)
    x = torch.ones(64, 4)
    for mode in ([training] if traced.mode_note else [True, False]):
        traced.gm.train(mode)
        model.train(mode)
        if isinstance(model, _ReadsChildFlag):  # dropout, on in train mode only
            assert (traced.gm(x) == 0).any() if mode else torch.equal(traced.gm(x), x)
        else:
            assert torch.equal(traced.gm(x), model(x))
    assert bool(traced.mode_note) == (not isinstance(model, _ReadsChildFlag))  # the child flag merges


def test_the_flag_watch_ends_when_tracing_fails():
    class Fails(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on a tensor value
                return x
            return -x

    with pytest.raises(TracingError):
        asrfx.graph.capture.trace(Fails())
    assert "training" not in vars(nn.Module)
    assert nn.Linear(2, 2).training is True


class _TryKeywords(nn.Module):
    """speechbrain's pattern: each layer is offered a keyword, and the layers that do not take one
    are called again without it (`except TypeError`)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.LeakyReLU(),
                                     asrfx.attention.SE(8, dims=1)])

    def forward(self, x, lengths=None):
        for layer in self.layers:
            try:
                x = layer(x, lengths=lengths)
            except TypeError:
                x = layer(x)
        return x


def test_a_layer_kept_whole_refuses_arguments_its_forward_does_not_take_while_tracing():
    """torch.nn layers are not run while tracing: their arguments are bound to their forward's
    signature, so `try: layer(x, lengths=n) except TypeError` takes the eager path and the graph runs."""
    model, x = randomize(_TryKeywords(), 5).eval(), torch.randn(2, 8, 10)
    table = asrfx.find_attention(model, x)
    assert table.capture.name == "fx" and [s.module_path for s in table] == ["layers.3"]
    gm = asrfx.convert(model, x).eval()
    fused = asrfx.fuse(gm)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), gm(x), rtol=1e-5, atol=1e-6)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers.3"))
    assert asrfx.report_of(fused).verdict(sum(p.numel() for p in fused.parameters()), backbone) \
        .startswith("the plain backbone")
