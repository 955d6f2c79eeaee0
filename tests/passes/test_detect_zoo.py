"""Structural detection over the reference zoo (``tests/zoo.py``).

Each zoo case is a small host network (stem -> residual / inverted-residual /
token blocks -> GAP + Linear head) carrying zero or more channel-attention
blocks written in a variety of third-party coding styles. A site is a feature
map ``x`` combined (mul, or add for GC) with a per-sample, per-channel gate that
depends on the input only through global spatial pooling followed by at least
one learned op. ``asrfx.find_attention`` must report exactly the expected
sites, in graph order of their combine nodes, and nothing on the negatives.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pytest
import torch
import torch.fx

import asrfx

from zoo import ALL_CASES, NEGATIVE_CASES, POSITIVE_CASES, ZooCase


KNOWN_KINDS = {"se", "eca", "srm", "cbam_channel", "gc", "spa", "ie", "split", "other"}


def _ids(case: ZooCase) -> str:
    return case.name


def _example(input_shape, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*input_shape, generator=gen)


def _find(model, input_shape):
    return asrfx.find_attention(model, example_inputs=(_example(input_shape),))


@functools.lru_cache(maxsize=None)
def _detected(name: str):
    """Detection on a freshly built model (train mode, as built), cached per case."""
    case = next(c for c in ALL_CASES if c.name == name)
    return _find(case.build(), case.input_shape)


def _describe(sites) -> str:
    return ", ".join(
        f"{s.kind}@{s.module_path}(C={s.channels}, gate={tuple(s.gate_shape)})" for s in sites
    ) or "<none>"


# ---------------------------------------------------------------------------
# Zoo self-checks (no detector involved)
# ---------------------------------------------------------------------------


def test_zoo_registry_is_well_formed():
    """Registry: unique names; positives carry >= 1 known kind and per-site metadata
    of matching length; negatives expect ()."""
    names = [c.name for c in ALL_CASES]
    assert len(names) == len(set(names))
    for case in POSITIVE_CASES:
        n = len(case.expected_kinds)
        assert n >= 1, case.name
        assert set(case.expected_kinds) <= KNOWN_KINDS, case.name
        for field in ("expected_module_paths", "expected_channels", "expected_gate_shapes"):
            value = getattr(case, field)
            assert value is None or len(value) == n, (case.name, field)
    for case in NEGATIVE_CASES:
        assert case.expected_kinds == (), case.name
        assert case.doc, f"negative case {case.name} must say which trap it is"


@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_zoo_case_traces_and_runs(case):
    """model(x) -> logits [N, 10]; torch.fx.symbolic_trace(model) succeeds and the
    traced GraphModule reproduces the eager output (eval mode)."""
    model = case.build().eval()
    x = _example(case.input_shape)
    with torch.no_grad():
        eager = model(x)
        traced = torch.fx.symbolic_trace(model)(x)
    assert eager.shape == (case.input_shape[0], 10)
    torch.testing.assert_close(traced, eager)


# ---------------------------------------------------------------------------
# Positives
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", POSITIVE_CASES, ids=_ids)
class TestPositiveZoo:
    """Host net with k attention blocks -> exactly k sites.

    feature x --pool (GAP / mean / full-kernel avg+max / pyramid / mean+std /
    softmax-matmul) --> learned op(s) --> activation --> reshape --> gate g;
    x (*|+) g  ==>  one AttentionSite per combine node, in graph order.
    """

    def test_count_and_kinds(self, case):
        """sites == expected_kinds (same length, same kinds, graph order of combine)."""
        sites = _detected(case.name)
        assert isinstance(sites, Sequence)
        kinds = [s.kind for s in sites]
        assert kinds == list(case.expected_kinds), (
            f"{case.name}: expected {list(case.expected_kinds)}, got {_describe(sites)}\n{case.doc}"
        )
        assert [sites[i].kind for i in range(len(sites))] == kinds

    def test_channels(self, case):
        """site.channels == C of the gated feature map (e.g. 16, 32, expanded MBConv width,
        token embedding dim)."""
        if case.expected_channels is None:
            pytest.skip("no channel expectation for this case")
        sites = _detected(case.name)
        assert len(sites) == len(case.expected_kinds), _describe(sites)
        assert [s.channels for s in sites] == list(case.expected_channels), _describe(sites)

    def test_module_paths(self, case):
        """site.module_path == the attention module that owns the combine
        (e.g. "layer1.0.se", "layer1.0.bn2" for IEBN, "layer1.0.cbam.ChannelGate")."""
        if case.expected_module_paths is None:
            pytest.skip("module path ambiguous for this case (host block does the combine)")
        sites = _detected(case.name)
        assert len(sites) == len(case.expected_kinds), _describe(sites)
        assert [s.module_path for s in sites] == list(case.expected_module_paths), _describe(sites)

    def test_gate_shapes(self, case):
        """site.gate_shape == the gate before any broadcast (``y.expand_as(x)`` reports
        y's shape): [N, C, 1, 1] for conv features, [N, 1, C] for tokens."""
        if case.expected_gate_shapes is None:
            pytest.skip("no gate-shape expectation for this case")
        sites = _detected(case.name)
        assert len(sites) == len(case.expected_kinds), _describe(sites)
        for site, expected in zip(sites, case.expected_gate_shapes):
            if expected is not None:
                assert tuple(site.gate_shape) == tuple(expected), _describe(sites)

    def test_gate_is_per_sample_and_per_channel(self, case):
        """Every reported gate has the batch dim first and spans the channel count."""
        sites = _detected(case.name)
        batch = case.input_shape[0]
        for site in sites:
            shape = tuple(site.gate_shape)
            assert shape[0] == batch, _describe(sites)
            assert site.channels in shape[1:], _describe(sites)
            assert isinstance(site.module_path, str)
            assert site.kind in KNOWN_KINDS


# ---------------------------------------------------------------------------
# Negatives
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", NEGATIVE_CASES, ids=_ids)
def test_negative_case_detects_nothing(case):
    """Look-alike traps -> zero sites. Traps (see each case's ``doc``):
    spatial-only gates [N,1,H,W] (CBAM spatial), axis-wise pooling (coordinate
    attention), token / channel self-attention combined by matmul (ViT, XCiT),
    parameter-free normalisers shaped like a gate (FRN, EvoNorm-S0, GRN, manual
    instance norm, squeeze without excitation), routing that mixes kernels not
    features (CondConv), learned per-channel constants (layer scale, ASR's
    constant-input gate), full-spatial gates (GLU), per-sample scalar gates, and a
    plain GAP classifier head."""
    sites = _detected(case.name)
    assert len(sites) == 0, f"{case.name}: detected {_describe(sites)}\ntrap: {case.doc}"


# ---------------------------------------------------------------------------
# Invariances
# ---------------------------------------------------------------------------


def _signature(sites, batch):
    out = []
    for s in sites:
        shape = tuple(s.gate_shape)
        assert shape[0] == batch, f"gate batch dim {shape} for batch {batch}"
        out.append((s.kind, s.module_path, s.channels, shape[1:]))
    return out


@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_batch_size_does_not_change_detection(case):
    """Same model (eval mode), example batch 1 vs batch 3 -> identical sites
    (kind, module_path, channels, gate shape without the batch dim); gate batch dim
    follows the input. Covers `b, c, _, _ = x.size(); view(b, c)` style graphs."""
    model = case.build().eval()
    rest = tuple(case.input_shape[1:])
    one = _signature(_find(model, (1, *rest)), 1)
    three = _signature(_find(model, (3, *rest)), 3)
    assert one == three


@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_find_attention_does_not_mutate_model(case):
    """model (train mode, so any stray forward would move BN running stats) ->
    find_attention -> state_dict bitwise identical (all params and buffers, incl.
    num_batches_tracked), same Parameter objects, same requires_grad / grad, same
    module tree and training flags."""
    model = case.build()
    assert model.training
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    req_grad = {n: p.requires_grad for n, p in params.items()}
    modules = {n: (type(m), m.training) for n, m in model.named_modules()}

    _find(model, case.input_shape)

    after = model.state_dict()
    assert list(after.keys()) == list(before.keys())
    for key, old in before.items():
        new = after[key]
        assert new.dtype == old.dtype and new.shape == old.shape, key
        assert torch.equal(
            new.detach().reshape(-1).contiguous().view(torch.uint8),
            old.reshape(-1).contiguous().view(torch.uint8),
        ), f"{case.name}: {key} changed"
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for name, p in params.items():
        assert now[name] is p, f"{name} replaced"
        assert p.requires_grad == req_grad[name], f"{name} requires_grad changed"
        assert p.grad is None, f"{name} has a grad after detection"
    assert {n: (type(m), m.training) for n, m in model.named_modules()} == modules


@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_model_output_unchanged_after_detection(case):
    """eval model: y0 = model(x); find_attention(model); y1 = model(x) -> y0 == y1
    bitwise (no hooks, patches or swapped submodules left behind)."""
    model = case.build().eval()
    x = _example(case.input_shape, seed=1)
    with torch.no_grad():
        y0 = model(x)
    _find(model, case.input_shape)
    with torch.no_grad():
        y1 = model(x)
    assert torch.equal(y0, y1)


# ---------------------------------------------------------------------------
# Never a silent miss, and no noise
# ---------------------------------------------------------------------------

# Zoo cases with an attention-like gate that is not channel attention: find_attention warns once.
_WARNS = {"neg_per_sample_scalar_gate"}


@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_no_lost_layout_no_undecided_pattern_and_no_noise(case):
    """Every zoo graph keeps its layout, no attention-like pattern is left undecided, and
    find_attention warns only where an attention-like gate is refused with nothing found."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sites = _find(case.build().eval(), case.input_shape)
    warned = [str(w.message) for w in caught if issubclass(w.category, asrfx.AsrfxWarning)]
    assert not sites.layout_losses, sites.format()
    assert not [r for r in sites.rejections if r.verdict is asrfx.Verdict.UNDECIDED], sites.format()
    assert bool(warned) == (case.name in _WARNS), warned
