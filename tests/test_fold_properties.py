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
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import asrfx
from asrfx.graph.ops import op_of
from helpers import examples, randomize


class Around(nn.Module):
    def __init__(self, before, branches, act, after, gate, c, pieces):
        super().__init__()
        self.before, self.act, self.after, self.gate, self.pieces = before, act, after, gate, pieces
        self.branch_kinds = branches
        width = c if before == "sum" else None
        self.branches = nn.ModuleList()
        for kind in branches:
            out = width if width is not None else 2 + len(self.branches)
            if kind == "conv_bn":
                self.branches.append(nn.Sequential(nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out)))
            elif kind == "conv":
                self.branches.append(nn.Conv2d(c, out, 1))
            elif kind == "bn":
                self.branches.append(nn.BatchNorm2d(c))
            else:
                self.branches.append(nn.Identity())
        w = c if before == "sum" else sum(2 + k if kind in ("conv_bn", "conv") else c
                                          for k, kind in enumerate(branches))
        self.w = w
        self.fc1, self.fc2 = nn.Conv2d(w, max(w // 2, 1), 1), nn.Conv2d(max(w // 2, 1), w, 1)
        if after == "conv":
            self.head = nn.Conv2d(w, 3, 3, padding=1)
        elif after == "split":
            pieces = min(pieces, w)
            sizes = [w // pieces] * (pieces - 1)
            self.sizes = sizes + [w - sum(sizes)]
            self.heads = nn.ModuleList([nn.Conv2d(s, 2, 1 + 2 * (k % 2), padding=k % 2)
                                        for k, s in enumerate(self.sizes)])
        elif after == "bn_conv":
            self.bn = nn.BatchNorm2d(w)
            self.head = nn.Conv2d(w, 3, 1)
        elif after == "pool_linear":
            self.head = nn.Linear(w, 3)
        else:  # grouped conv
            groups = next(g for g in (3, 2, 1) if w % g == 0)
            self.head = nn.Conv2d(w, w, 1, groups=groups)

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        y = sum(outs[1:], outs[0]) if self.before == "sum" else torch.cat(outs, dim=1)
        y = {"relu": F.relu, "silu": F.silu, "none": lambda t: t}[self.act](y)
        e = self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True))))
        y = y * torch.sigmoid(e) if self.gate == "sigmoid" else y * torch.tanh(e) if self.gate == "tanh" else y + e
        if self.after == "split":
            parts = torch.split(y, self.sizes, dim=1)
            return torch.cat([head(parts[k]) for k, head in enumerate(self.heads)], dim=1)
        if self.after == "bn_conv":
            return self.head(self.bn(y))
        if self.after == "pool_linear":
            return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))
        return self.head(y)


@st.composite
def structures(draw):
    before = draw(st.sampled_from(["sum", "cat"]))
    kinds = ["conv_bn", "conv", "bn", "identity"]
    branches = draw(st.lists(st.sampled_from(kinds), min_size=1 if before == "cat" else 2, max_size=3))
    return dict(before=before, branches=tuple(branches), act=draw(st.sampled_from(["relu", "silu", "none"])),
                after=draw(st.sampled_from(["conv", "split", "bn_conv", "pool_linear", "grouped"])),
                gate=draw(st.sampled_from(["sigmoid", "tanh", "add"])), c=draw(st.integers(2, 5)),
                pieces=draw(st.integers(2, 3)))


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
