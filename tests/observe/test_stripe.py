"""asrfx.stripe and asrfx.GateRecorder, checked against independent oracles.

The oracles never look at the traced graph: forward hooks on the original model's own
submodules (an SE's ``fc``, a CBAM channel gate's pools) give the gate and the pooled
statistic; torch's mean/std over all values at once check the streaming moments.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import asrfx
from asrfx import AsrfxError
from asrfx.observe.moments import RunningMoments, relative_variation

import zoo
from helpers import randomize

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# small zoo models, one per kind family, that run in milliseconds
FAST_CASES = ["se_resnet_classic", "eca_timm_style", "srm_resnet_official", "ie_wrapper_module",
              "spa_resnet_official", "cbam_channel_host_mul", "gc_add_official", "token_se_patch_model"]


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    out, start = [], 0
    for s in sizes:
        out.append(x[start:start + s])
        start += s
    return [b for b in out if len(b)]


def _hooked(model: nn.Module, paths: dict[str, str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the named submodules on x (eval, no grad), through ordinary forward hooks."""
    seen, handles = {}, []
    for key, path in paths.items():
        def hook(_m, _args, out, _key=key):
            seen[_key] = out.detach().to(torch.float64)
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


# -- the streaming math -----------------------------------------------------------------------


@SETTINGS
@given(n=st.integers(1, 40), k=st.integers(1, 6), seed=st.integers(0, 10_000),
       cuts=st.lists(st.integers(0, 40), max_size=6), scale=st.sampled_from([1e-3, 1.0, 1e4]))
def test_running_moments_equal_torch_on_all_rows(n, k, seed, cuts, scale):
    gen = torch.Generator().manual_seed(seed)
    rows = (torch.randn(n, k, generator=gen, dtype=torch.float64) + 3.0) * scale
    bounds = sorted({0, n, *[c % (n + 1) for c in cuts]})
    moments = RunningMoments()
    for a, b in zip(bounds, bounds[1:]):
        moments.update(rows[a:b])
    assert moments.count == n
    torch.testing.assert_close(moments.mean, rows.mean(0), rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(moments.std(), rows.std(0, correction=0), rtol=1e-9, atol=1e-12 * scale)


def test_running_moments_refuse_bad_rows():
    m = RunningMoments()
    with pytest.raises(ValueError, match="no rows"):
        m.std()
    with pytest.raises(ValueError, match=r"\[n, k\]"):
        m.update(torch.zeros(3))
    m.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="width"):
        m.update(torch.zeros(2, 4))


def test_relative_variation():
    mean = torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert relative_variation(mean, torch.zeros(2, dtype=torch.float64)) == 0.0
    std = torch.tensor([0.05, 0.025], dtype=torch.float64)
    assert relative_variation(mean, std) == pytest.approx(0.1)  # every channel varies 10% of its mean
    assert relative_variation(torch.zeros(2, dtype=torch.float64), std) == float("inf")


# -- stripe on zoo models ----------------------------------------------------------------------


@SETTINGS
@given(name=st.sampled_from(FAST_CASES), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       seed=st.integers(0, 1000))
def test_streamed_statistics_equal_torch_over_the_captured_rows(name, sizes, seed):
    """Any split into batches: the moments equal torch's over every captured value at once,
    and equal a one-batch run's (same samples) up to float32 batch effects."""
    case = zoo.get_case(name)
    model = randomize(case.build(), seed)
    x = torch.randn((sum(sizes),) + case.input_shape[1:], generator=torch.Generator().manual_seed(seed))
    streamed = asrfx.stripe(model, _split(x, sizes), keep_rows=len(x), progress=False)
    whole = asrfx.stripe(model, [x], keep_rows=len(x), progress=False)
    assert len(streamed) == len(case.expected_kinds)
    assert streamed.samples == len(x) and streamed.batches == len(sizes)
    for s, w in zip(streamed, whole):
        assert s.samples == len(x) and s.gate_rows.shape == (len(x), s.channels)
        torch.testing.assert_close(s.gate_mean, s.gate_rows.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.gate_std, s.gate_rows.std(0, correction=0), rtol=1e-8, atol=1e-12)
        for mean, std, rows in zip(s.pooled_mean, s.pooled_std, s.pooled_rows):
            torch.testing.assert_close(mean.flatten(), rows.mean(0), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(std.flatten(), rows.std(0, correction=0), rtol=1e-8, atol=1e-12)
        # float32 kernels may round differently for another batch size: 1e-5 of the values' scale
        tol = 1e-5 * max(1.0, float(w.gate_rows.abs().max()))
        torch.testing.assert_close(s.gate_rows, w.gate_rows, rtol=1e-4, atol=tol)
        torch.testing.assert_close(s.gate_std, w.gate_std, rtol=1e-4, atol=tol)
        for a, b in zip(s.pooled_mean, w.pooled_mean):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


def test_gate_and_pooled_statistic_equal_forward_hooks():
    """SE: the gate is fc's output, u the pool's; CBAM channel: the gate is the module's output.
    (stripe reads two batches, the hooks one: float32 rounding may differ in the last bits.)"""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    se = randomize(zoo.get_case("se_resnet_classic").build(), 1)
    stats = asrfx.stripe(se, [x[:4], x[4:]], progress=False)
    for path in ("layer1.0.se", "layer2.0.se"):
        seen = _hooked(se, {"gate": f"{path}.fc", "u": f"{path}.avg_pool"}, x)
        site = stats[path]
        assert site.kind == "se" and site.pooled_names == ("psi",)
        torch.testing.assert_close(site.gate_rows, seen["gate"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(site.gate_mean, seen["gate"].mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(site.gate_std, seen["gate"].std(0, correction=0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(site.pooled_mean[0], seen["u"].mean(0), rtol=1e-5, atol=1e-6)
        assert site.pooled_mean[0].shape == seen["u"].shape[1:]
    cbam = randomize(zoo.get_case("cbam_channel_host_mul").build(), 2)
    stats = asrfx.stripe(cbam, x, progress=False)
    for site in stats:
        seen = _hooked(cbam, {"gate": site.module_path, "avg": f"{site.module_path}.avg_pool",
                              "max": f"{site.module_path}.max_pool"}, x)
        assert site.pooled_names == ("psi_avg", "psi_max")
        torch.testing.assert_close(site.gate_rows, seen["gate"].flatten(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(site.pooled_mean[0], seen["avg"].mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(site.pooled_std[1], seen["max"].std(0, correction=0), rtol=1e-5, atol=1e-6)


def test_model_is_not_mutated():
    case = zoo.get_case("mixed_srm_cbam_spa")
    model = randomize(case.build(), 3).train()
    model.layer1.eval()  # a mixed mode must come back as it was
    flags = {name: m.training for name, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    stats = asrfx.stripe(model, [torch.randn(4, 3, 32, 32) for _ in range(2)], progress=False)
    assert len(stats) == 3
    assert {name: m.training for name, m in model.named_modules()} == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # BatchNorm running statistics included
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), type(m).__name__
    assert all(p.grad is None for p in model.parameters())


def test_dataloader_pairs_max_batches_and_keep_rows():
    case = zoo.get_case("se_resnet_classic")
    model = randomize(case.build(), 4)
    x = torch.randn(10, 3, 32, 32)
    loader = DataLoader(TensorDataset(x, torch.zeros(10)), batch_size=3)
    from_loader = asrfx.stripe(model, loader, max_batches=2, keep_rows=4, progress=False)
    first = asrfx.stripe(model, [x[:6]], keep_rows=6, progress=False)
    assert from_loader.samples == 6 and from_loader.batches == 2
    for a, b in zip(from_loader, first):
        assert a.gate_rows.shape == (4, a.channels)
        torch.testing.assert_close(a.gate_rows, b.gate_rows[:4], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.gate_mean, b.gate_mean, rtol=1e-5, atol=1e-6)
    none_kept = asrfx.stripe(model, loader, keep_rows=0, progress=False)
    assert none_kept.samples == 10 and none_kept[0].gate_rows.shape == (0, 16)


def test_converted_model_gates_are_constant():
    """Replace mode: every gate is psi-driven (std 0, score 0); keep mode: the original
    attention still varies with the input, its ASR copy does not."""
    case = zoo.get_case("mixed_se_eca_gc")
    model = randomize(case.build(), 5)
    x = torch.randn(2, 3, 32, 32)
    data = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    replaced = asrfx.stripe(asrfx.convert(model, x), data, progress=False)
    assert [s.kind for s in replaced] == ["asr"] * 3
    for s in replaced:
        assert s.label.endswith("[asr]") and s.samples == 8 and s.pooled_score is None
        assert torch.count_nonzero(s.gate_std) == 0 and s.score == 0.0
        assert s.gate_mean.abs().sum() > 0
    kept = asrfx.stripe(asrfx.convert(model, x, keep=True), data, progress=False)
    assert sorted(s.kind for s in kept) == sorted(["se", "eca", "gc", "asr", "asr", "asr"])
    assert all(s.score > 0 for s in kept if s.kind != "asr")
    assert all(s.score == 0 for s in kept if s.kind == "asr")


def test_table_and_dict():
    model = randomize(zoo.get_case("srm_resnet_official").build(), 6)
    stats = asrfx.stripe(model, torch.randn(5, 3, 32, 32), progress=False)
    text = str(stats)
    assert "layer1.0.srm" in text and "layer2.0.srm" in text and "5 samples" in text
    d = json.loads(json.dumps(stats.to_dict()))
    assert d["samples"] == 5 and len(d["sites"]) == 2
    site = d["sites"][0]
    assert [p["name"] for p in site["pooled"]] == ["psi_avg", "psi_var"]
    assert site["gate_std"] == pytest.approx(stats[0].gate_std.tolist())
    assert site["score"] == stats[0].score
    with pytest.raises(KeyError, match="no site"):
        stats["nowhere"]


def test_refusals():
    plain = zoo.get_case("neg_plain_resnet_gap").build()
    with pytest.raises(AsrfxError, match="no channel-attention site found"):
        asrfx.stripe(plain, [torch.randn(2, 3, 32, 32)], progress=False)
    se = zoo.get_case("se_resnet_classic").build()
    with pytest.raises(AsrfxError, match="no batches"):
        asrfx.stripe(se, [], progress=False)
    with pytest.raises(AsrfxError, match="batch 0 of data is a str"):
        asrfx.stripe(se, ["image.png"], progress=False)
    with pytest.raises(AsrfxError, match="iterable of batches"):
        asrfx.stripe(se, 3, progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        asrfx.stripe(se, [torch.randn(2, 3, 32, 32)], max_batches=0, progress=False)
    with pytest.raises(ValueError, match="keep_rows"):
        asrfx.stripe(se, [torch.randn(2, 3, 32, 32)], keep_rows=-1, progress=False)
    fused = asrfx.fuse(asrfx.convert(se, torch.randn(2, 3, 32, 32)).eval())
    with pytest.raises(AsrfxError, match="no channel-attention site"):
        asrfx.stripe(fused, [torch.randn(2, 3, 32, 32)], progress=False)


# -- across training ---------------------------------------------------------------------------


def _train_steps(model, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(4, 3, 32, 32, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("converted", [False, True], ids=["attention", "asr_form"])
def test_recorder_follows_the_live_model(converted):
    """Each record equals stripe run on the probe at that moment; differences are |v(t+1) - v(t)|."""
    torch.manual_seed(0)
    model = randomize(zoo.get_case("se_resnet_classic").build(), 7)
    if converted:
        model = asrfx.convert(model, torch.randn(2, 3, 32, 32))
    probe = torch.randn(5, 3, 32, 32)
    recorder = asrfx.GateRecorder(model, (probe, torch.zeros(5)))
    expected = []
    for epoch in range(3):
        model.train()
        got = recorder.record(epoch=f"e{epoch}")
        assert model.training and all(m.training for m in model.modules())
        now = asrfx.stripe(model, probe, keep_rows=5, progress=False)
        assert list(got) == [s.label for s in now] == list(recorder.labels)
        for s in now:
            torch.testing.assert_close(got[s.label], s.gate_rows, rtol=0, atol=0)
        expected.append({s.label: s.gate_rows for s in now})
        _train_steps(model, 2, epoch)
    assert recorder.epochs == ["e0", "e1", "e2"]
    history, diffs = recorder.history(), recorder.differences()
    for label in recorder.labels:
        assert history[label].shape == (3, 5, expected[0][label].shape[1])
        manual = torch.stack([(expected[t + 1][label] - expected[t][label]).abs() for t in range(2)])
        torch.testing.assert_close(diffs[label], manual, rtol=0, atol=0)
        assert diffs[label].sum() > 0  # training changed the gates: the recorder saw the live weights
        if converted:  # a psi-driven gate is the same for every probe image
            assert torch.equal(history[label], history[label][:, :1].expand_as(history[label]))


def test_recorder_refusals():
    se = zoo.get_case("se_resnet_classic").build()
    recorder = asrfx.GateRecorder(se, torch.randn(2, 3, 32, 32))
    with pytest.raises(AsrfxError, match="nothing recorded"):
        recorder.history()
    recorder.record()
    with pytest.raises(AsrfxError, match="two records"):
        recorder.differences()
    with pytest.raises(AsrfxError, match="no channel-attention site"):
        asrfx.GateRecorder(zoo.get_case("neg_plain_resnet_gap").build(), torch.randn(2, 3, 32, 32))
    with pytest.raises(AsrfxError, match="probe batch"):
        asrfx.GateRecorder(se, [])


# -- plots -------------------------------------------------------------------------------------


def _check_png(path, min_bytes=20_000):
    image = pytest.importorskip("matplotlib.image").imread(str(path))
    assert path.stat().st_size > min_bytes, path.stat().st_size
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    assert float(image[..., :3].std()) > 0.05  # not a blank canvas
    return image


def test_plots_write_readable_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    model = randomize(zoo.get_case("mixed_srm_cbam_spa").build(), 8)
    stats = asrfx.stripe(model, [torch.randn(6, 3, 32, 32) for _ in range(2)], progress=False)
    out = stats.plot(tmp_path / "sub" / "stripes.png")
    assert out == tmp_path / "sub" / "stripes.png"
    full = _check_png(out)
    one = _check_png(stats.plot(tmp_path / "one.png", sites=["layer3.0.spa"]), min_bytes=8_000)
    assert one.shape[0] < full.shape[0]  # one row of panels instead of three
    with pytest.raises(KeyError, match="no site"):
        stats.plot(tmp_path / "bad.png", sites=["nowhere"])
    recorder = asrfx.GateRecorder(model, torch.randn(4, 3, 32, 32))
    for epoch in range(3):
        recorder.record(epoch)
        _train_steps(model, 1, epoch)
    _check_png(recorder.plot(tmp_path / "diff.png", images=2, channels=8))


def test_plots_without_matplotlib_say_what_to_install(tmp_path, monkeypatch):
    model = zoo.get_case("se_resnet_classic").build()
    stats = asrfx.stripe(model, torch.randn(2, 3, 32, 32), progress=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"asrfx\[plot\]"):
        stats.plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


class _Stream:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty

    def write(self, _text):
        pass

    def flush(self):
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_the_progress_bar_is_drawn_only_on_a_terminal(monkeypatch, tty):
    """A bar redrawn with carriage returns is noise in a log file: only a terminal gets one."""
    pytest.importorskip("tqdm")
    from asrfx.observe import stripe as stripe_module

    monkeypatch.setattr(sys, "stderr", _Stream(tty))
    batches = [torch.zeros(1)] * 3
    shown = stripe_module._progress(batches, 3, True, "stripe")
    assert (shown is not batches) is tty
    assert list(shown) == batches
    assert stripe_module._progress(batches, 3, False, "stripe") is batches
