"""The user's module state survives convert, insert and fuse: per-module training flags (frozen
eval-mode BatchNorms, dropout switched off) and requires_grad=False parameters. Shared modules
(one BatchNorm or conv called twice, gated on one call) convert and fuse correctly, and a
converted model pickles (torch.save(model), multiprocessing spawn)."""

from __future__ import annotations

import copy
import io

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import asrfx

import zoo
from helpers import examples, randomize

SETTINGS = settings(max_examples=examples(15), deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Net(nn.Module):
    """conv-BN-SE-ReLU stages (the gates go inside the BatchNorms), dropout and a classifier."""

    def __init__(self, widths=(8, 16, 16)):
        super().__init__()
        layers, cin = [], 3
        for i, cout in enumerate(widths):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 + (i > 0), padding=1, bias=False), nn.BatchNorm2d(cout),
                       zoo.SELayer(cout), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(cin, 10)

    def forward(self, x):
        return self.head(self.drop(self.features(x).mean((2, 3))))


def _freeze(model: nn.Module, norms: list[bool], params: list[bool], dropout_off: bool, root_train: bool):
    """A fine-tuning set-up: the chosen BatchNorms in eval mode, the chosen parameters frozen."""
    model.train(root_train)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn, frozen in zip(bns, norms):
        if frozen:
            bn.eval()
    if dropout_off:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
    for (name, p), frozen in zip(model.named_parameters(), params):
        p.requires_grad_(not frozen)
    return model


def _flags(model: nn.Module) -> dict[str, bool]:
    return {path: m.training for path, m in model.named_modules()}


def _frozen(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


STATE = st.tuples(st.lists(st.booleans(), min_size=3, max_size=3), st.lists(st.booleans(), min_size=20, max_size=20),
                  st.booleans(), st.booleans())


@SETTINGS
@given(STATE, st.integers(0, 2**16), st.integers(2, 4))
def test_convert_and_fuse_keep_flags_and_frozen_parameters(state, seed, batch):
    """Every module keeps its own flag, every frozen parameter stays frozen (psi, new, trains);
    training the ASR form moves no frozen BatchNorm's statistics and no frozen parameter, and the
    fused model keeps requires_grad=False where the user set it."""
    norms, params, dropout_off, root_train = state
    model = _freeze(randomize(Net(), seed), norms, params, dropout_off, root_train)
    original_flags, original_frozen = _flags(model), _frozen(model)
    gm = asrfx.convert(model, torch.randn(2, 3, 8, 8))
    assert _flags(model) == original_flags and _frozen(model) == original_frozen  # the caller's model untouched
    flags = _flags(gm)
    assert all(flags[path] == flag for path, flag in original_flags.items() if path in flags)
    assert gm.training == root_train
    psi = {n for n, _ in gm.named_parameters() if n.endswith("psi")}
    assert len(psi) == 3 and _frozen(gm) == original_frozen
    gated = {s.gated_norm for s in asrfx.report_of(gm).sites}
    assert gated == {"features.1", "features.5", "features.9"}  # frozen or not, each BatchNorm gates

    before = copy.deepcopy(gm.state_dict())
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(batch, 3, 8, 8)
    for _ in range(2):
        loss = F.cross_entropy(gm(x), torch.arange(batch) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = gm.state_dict()
    for path, frozen in zip(("features.1", "features.5", "features.9"), norms):
        stays = frozen or not root_train  # a BatchNorm in eval mode keeps its running statistics
        for stat in ("running_mean", "running_var"):
            assert torch.equal(after[f"{path}.{stat}"], before[f"{path}.{stat}"]) == stays, (path, stat)
    for name in original_frozen:
        assert torch.equal(after[name], before[name]), name
    if dropout_off or not root_train:  # no random mask anywhere: the same input gives the same output
        with torch.no_grad():
            torch.testing.assert_close(gm(x), gm(x), rtol=0, atol=0)

    fused = asrfx.fuse(gm.eval())
    assert _frozen(fused) == original_frozen & set(dict(fused.named_parameters()))
    assert {f"features.{i}.{w}" for i in (1, 5, 9) for w in ("weight", "bias")} <= set(dict(fused.named_parameters()))
    assert not any(m.training for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), gm(x), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(st.lists(st.booleans(), min_size=7, max_size=7), st.booleans(), st.sampled_from(["se", "eca", "srm"]))
def test_insert_keeps_frozen_norms_and_new_modules_follow_the_model(norms, root_train, kind):
    """insert: the backbone's modules keep their flags; the inserted ones take the model's mode."""
    model = asrfx.models.cifar_resnet(8, "basic", 10).train(root_train)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn, frozen in zip(bns, norms):
        if frozen:
            bn.eval()
    model.fc.weight.requires_grad_(False)
    original = _flags(model)
    gm = asrfx.insert(model, kind, torch.randn(2, 3, 16, 16))
    flags = _flags(gm)
    assert all(flags[path] == flag for path, flag in original.items() if path in flags)
    new = [path for path in flags if ".asr" in path]
    assert new and all(flags[path] == root_train for path in new)
    assert _frozen(gm) == {"fc.weight"}


def test_a_model_in_eval_mode_converts_to_eval_mode_everywhere():
    """No container fx creates is left in training mode (fuse refuses any module in training mode)."""
    model = Net().eval()
    gm = asrfx.convert(model, torch.randn(2, 3, 8, 8))
    assert not any(m.training for m in gm.modules())
    asrfx.fuse(gm)  # no .eval() needed


# -- shared modules -----------------------------------------------------------------------------


class SharedNorm(nn.Module):
    """One BatchNorm normalizes two branches; SE gates the first call's output only."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.se = zoo.SELayer(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.se(self.bn(self.c1(x))) + self.bn(self.c2(x)))


class SharedConv(nn.Module):
    """One conv applied twice in a row; SE gates its first output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.se = zoo.SELayer(8)

    def forward(self, x):
        return self.conv(self.se(self.conv(self.stem(x))))


@SETTINGS
@given(st.sampled_from([SharedNorm, SharedConv]), st.integers(0, 2**16), st.integers(1, 4), st.integers(4, 9),
       st.booleans())
def test_shared_modules_convert_and_fuse_correctly(cls, seed, batch, size, train):
    """The shared layer stays one layer called twice (no GatedBatchNorm, no fold that would scale the
    other call too); the ASR form is the original with psi in place of the pooled statistic, and
    the fused model gives its outputs (float64)."""
    torch.manual_seed(seed)
    model = randomize(cls(), seed).double().train(train)
    psi = torch.rand(1, 8, 1, 1, dtype=torch.float64) + 0.1
    gm = asrfx.convert(model, torch.randn(2, 3, 6, 6, dtype=torch.float64), psi_init=psi)
    (site,) = asrfx.report_of(gm).sites
    assert site.gated_norm is None
    shared = "bn" if cls is SharedNorm else "conv"
    assert sum(n.op == "call_module" and n.target == shared for n in gm.graph.nodes) == 2
    assert type(gm.get_submodule(shared)) in (nn.BatchNorm2d, nn.Conv2d)

    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    hook = model.se.avg_pool.register_forward_hook(lambda mod, inp, out: psi.expand_as(out))
    try:
        want = model.eval()(x)
    finally:
        hook.remove()
    got = gm.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    fused = asrfx.fuse(gm)
    assert not any(n.endswith("psi") for n, _ in fused.named_parameters())
    torch.testing.assert_close(fused(x), got, rtol=1e-10, atol=1e-10)
    if cls is SharedConv:  # folding into the shared conv would scale its second call too
        assert [f.where for f in asrfx.report_of(fused).folds] == ["kept"]


def test_a_converted_model_pickles():
    """torch.save(model) / multiprocessing spawn pickle the GraphModule; it loads, computes the same
    and trains (fx re-creates asrfx's tracer when it unpickles)."""
    gm = asrfx.insert(asrfx.models.cifar_resnet(8, "basic", 10), "se", torch.randn(2, 3, 16, 16))
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), gm.eval()(x), rtol=0, atol=0)
    loaded.train()
    F.cross_entropy(loaded(x), torch.tensor([1, 2, 3])).backward()
    assert all(p.grad is not None for n, p in loaded.named_parameters() if n.endswith("psi"))
    fused = asrfx.fuse(loaded.eval(), (x,))  # the node metadata does not survive pickling: shapes again
    assert [f.op for f in asrfx.report_of(fused).folds] == ["gated_bn"] * 3
    torch.testing.assert_close(fused(x), loaded(x), rtol=1e-5, atol=1e-5)
