"""Property tests: convert on random architectures (the generator of test_detect_properties)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import asrfx

from strategies import networks
from helpers import carried_shapes, examples, fresh_shapes


def _placeholder_ancestor(node) -> bool:
    seen, stack = set(), [node]
    while stack:
        for i in stack.pop().all_input_nodes:
            if i.op == "placeholder":
                return True
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return False


@settings(max_examples=examples(25))
@given(networks(with_attention=True), st.booleans(), st.integers(1, 3), st.integers(1, 9), st.integers(1, 4), st.integers(1, 9))
def test_convert_random_networks(net_expected, keep, batch, size, run_batch, run_size):
    """
    Every inserted attention module is converted; its gate reads no input; new parameters
    are psi only; dropped parameters belong to attention pooling branches; the backbone
    is bitwise unchanged; the result runs at other batch sizes and resolutions.
    """
    net, expected = net_expected
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gm = asrfx.convert(net, torch.randn(batch, 3, size, size), keep=keep).eval()
    report = asrfx.report_of(gm)
    assert [s.module_path for s in report.sites] == [path for path, _, _ in expected]
    assert all(s.mode == ("keep" if keep else "replace") for s in report.sites)
    gates = [n for n in gm.graph.nodes if n.meta.get("asrfx", {}).get("role") == "gate"]
    assert len(gates) >= len(expected)
    assert not any(_placeholder_ancestor(g) for g in gates)
    after = gm.state_dict()
    attention_paths = tuple(path + "." for path, _, _ in expected)
    new = set(after) - set(before)
    psi = {n for s in report.sites for n in s.psi}
    if keep:  # psi plus the copies of the excitations, each under <attention path>_asr
        assert psi <= new and all(k.startswith(tuple(p[:-1] + "_asr." for p in attention_paths)) for k in new)
    else:
        assert new == psi
    for key in set(before) - set(after):
        assert key.startswith(attention_paths), key  # e.g. GC's mask conv, no longer used
    for key in set(before) & set(after):
        assert torch.equal(after[key], before[key]), key
    with torch.no_grad():
        out = gm(torch.randn(run_batch, 3, run_size, run_size))
    assert out.shape == (run_batch, 5)


@settings(max_examples=examples(25))
@given(networks(with_attention=True), st.booleans(), st.integers(1, 3), st.integers(1, 9), st.booleans())
def test_converted_shapes_equal_a_fresh_propagation(net_expected, keep, batch, size, in_layers):
    """convert propagates shapes again over the rewritten nodes only: every node carrying metadata
    carries what a propagation over the whole converted graph gives; without the gates moved into
    layers (which add a few nodes of their own), every node carries it."""
    net, _ = net_expected
    x = torch.randn(batch, 3, size, size)
    gm = asrfx.convert(net, x, keep=keep, gate_in_norm=in_layers, gate_in_consumers=in_layers)
    carried, fresh = carried_shapes(gm), fresh_shapes(gm, (x,))
    if in_layers:
        carried, fresh = zip(*[(c, f) for c, f in zip(carried, fresh) if c[0] is not None])
    assert carried == fresh
