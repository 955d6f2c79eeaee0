"""Property test of the gate algebra: random structures around a gate.

Before the gate: a sum of branches (conv+BN, conv, BN of the input, the input itself), or a
concatenation of branches, then ReLU / SiLU / nothing. After it: one conv, a split into pieces
each read by its own conv (then concatenated), an eval BatchNorm then a conv, global pooling
then a Linear head, a grouped conv. The gate scales (sigmoid, or tanh: possibly negative) or
shifts (GC-style add). Random widths, batch, resolution, parameters and BatchNorm statistics.

Properties, in float64: the fused model equals the ASR form within 1e-10; a scale gate never
stays a multiply (every consumer structure here can absorb one); detect's fold side is fuse's
when the gate's sign is known to it; every fold has a reason.
"""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import asrfx
from asrfx.graph.ops import op_of
from helpers import examples, randomize


from strategies import Around, structures


@settings(max_examples=examples(40))
@given(structures(), st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 7))
@example(dict(before="sum", branches=("conv_bn", "conv_bn", "bn"), act="relu", after="conv", gate="sigmoid",
              c=3, pieces=2), 0, 2, 5)  # RepVGG: folds into the three BatchNorms
@example(dict(before="cat", branches=("identity", "conv"), act="none", after="split", gate="tanh",
              c=4, pieces=3), 1, 1, 4)  # an identity part: the gate goes to the split's convs
@example(dict(before="cat", branches=("conv_bn", "conv_bn"), act="relu", after="conv", gate="sigmoid",
              c=2, pieces=2), 0, 1, 1)  # found: each BatchNorm of a concatenation gets its part while training
def test_folds_around_the_gate(structure, seed, batch, size):
    model = randomize(Around(**structure), seed).double().eval()
    x = torch.randn(batch, structure["c"], size, size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    gm = asrfx.convert(model, x, psi_init=lambda site, shape: torch.randn(shape, generator=gen,
                                                                          dtype=torch.float64)).eval()
    fused = asrfx.fuse(gm)
    with torch.no_grad():
        want, got = gm(x), fused(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * max(want.abs().max().item(), 1.0))
    report = asrfx.report_of(fused)
    assert len(report.folds) >= 1 and all(f.reason for f in report.folds)
    if structure["gate"] != "add":
        assert not report.kept, str(report)
        assert not any(op_of(n, {}).name in ("sigmoid", "tanh") for n in fused.graph.nodes)
    (site,) = asrfx.find_attention(model, x)
    fold = report.folds[0]
    if structure["gate"] != "tanh":  # a tanh gate's sign is known at fuse time only
        assert site.absorption.side == fold.where, f"{site.absorption.reason!r} vs {fold}"
