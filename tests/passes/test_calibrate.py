"""convert(psi_init="calibrate", data=...): each psi starts at the mean of its pooled statistic.

Oracles: forward hooks on the original model's pooling modules (the means over all data,
computed without asrfx), and the original model itself where every input is the same image
(the mean statistic is then each sample's statistic, so the outputs must agree).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import asrfx
from asrfx import AsrfxError

import zoo
from helpers import randomize


def _pool_means(model, paths: dict[str, str], batches) -> dict[str, torch.Tensor]:
    """Mean over every sample of each named module's output, with forward hooks (eval mode)."""
    sums, counts, handles = {}, {}, []
    for key, path in paths.items():
        def hook(_m, _args, out, _key=key):
            out = out.detach().to(torch.float64)
            sums[_key] = sums.get(_key, 0) + out.sum(0, keepdim=True)
            counts[_key] = counts.get(_key, 0) + out.shape[0]
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return {k: sums[k] / counts[k] for k in sums}


@pytest.mark.parametrize("name", ["se_resnet_classic", "srm_resnet_official", "spa_resnet_official",
                                  "cbam_official", "gc_add_official", "token_se_patch_model"])
def test_identical_inputs_give_the_original_outputs(name):
    """Every sample is one image: the calibrated gate is that image's gate, outputs match."""
    case = zoo.get_case(name)
    model = randomize(case.build(), 11).eval()
    image = torch.randn((1,) + case.input_shape[1:])
    same = image.expand((4,) + case.input_shape[1:]).contiguous()
    gm = asrfx.convert(model, psi_init="calibrate", data=[same, same[:2]]).eval()
    report = asrfx.report_of(gm)
    assert len(report.sites) == len(case.expected_kinds)
    assert any("6 samples" in n for n in report.notes)
    default = asrfx.convert(model, same[:2]).eval()
    with torch.no_grad():
        expected, got, uncalibrated = model(same), gm(same), default(same)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(uncalibrated, expected, rtol=1e-5, atol=1e-6)  # psi = 0.1 does not


def test_psi_is_the_mean_pooled_statistic_over_all_batches():
    torch.manual_seed(0)
    model = randomize(zoo.get_case("mixed_srm_cbam_spa").build(), 12)
    batches = [torch.randn(n, 3, 32, 32) for n in (3, 5, 2)]
    loader = DataLoader(TensorDataset(torch.cat(batches), torch.zeros(10)), batch_size=4)
    gm = asrfx.convert(model, batches[0], psi_init="calibrate", data=loader)
    oracle = _pool_means(model, {"avg1": "layer3.0.spa.avg_pool1", "avg2": "layer3.0.spa.avg_pool2",
                                 "avg4": "layer3.0.spa.avg_pool4"}, batches)
    spa = gm.get_submodule("layer3.0.spa")
    for key in ("avg1", "avg2", "avg4"):
        psi = getattr(spa, f"psi_{key}")
        assert psi.shape == oracle[key].shape
        torch.testing.assert_close(psi.detach().double(), oracle[key], rtol=1e-5, atol=1e-6)
    # SRM's statistics are functional (no module to hook): its input x, captured by a pre-hook
    xs = []
    handle = model.get_submodule("layer1.0.srm").register_forward_pre_hook(lambda m, a: xs.append(a[0].double()))
    with torch.no_grad():
        model.eval()
        for x in batches:
            model(x)
    handle.remove()
    flat = torch.cat(xs).flatten(2)
    srm = gm.get_submodule("layer1.0.srm")
    torch.testing.assert_close(srm.psi_avg.detach().double(), flat.mean(2, keepdim=True).mean(0, keepdim=True),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(srm.psi_var.detach().double(), flat.var(2, keepdim=True).mean(0, keepdim=True),
                               rtol=1e-5, atol=1e-6)


def test_calibrate_batches_and_keep_mode():
    model = randomize(zoo.get_case("se_resnet_classic").build(), 13)
    batches = [torch.randn(3, 3, 32, 32) for _ in range(3)]
    oracle = _pool_means(model, {"u": "layer2.0.se.avg_pool"}, batches[:2])["u"]
    gm = asrfx.convert(model, psi_init="calibrate", data=batches, max_batches=2)
    torch.testing.assert_close(gm.get_submodule("layer2.0.se").psi.detach().double(), oracle, rtol=1e-5, atol=1e-6)
    kept = asrfx.convert(model, batches[0], keep=True, psi_init="calibrate", data=batches, max_batches=2)
    psi = dict(kept.named_parameters())
    names = [n for n in psi if n.endswith("psi")]
    assert len(names) == 3
    torch.testing.assert_close(psi["layer2.0.se_asr.psi"].detach().double(), oracle, rtol=1e-5, atol=1e-6)


def test_fused_calibrated_model_equals_the_converted_one():
    model = randomize(zoo.get_case("mixed_se_eca_gc").build(), 14)
    data = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    gm = asrfx.convert(model, psi_init="calibrate", data=data).eval()
    fused = asrfx.fuse(gm)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), gm(x), rtol=1e-5, atol=1e-5)
    assert not any("psi" in n for n, _ in fused.named_parameters())


def test_caller_model_untouched_and_mode_kept():
    model = randomize(zoo.get_case("srm_resnet_official").build(), 15).train()
    state = copy.deepcopy(model.state_dict())
    gm = asrfx.convert(model, psi_init="calibrate", data=[torch.randn(4, 3, 32, 32)])
    assert gm.training and model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_refusals():
    model = zoo.get_case("se_resnet_classic").build()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match="pass data="):
        asrfx.convert(model, x, psi_init="calibrate")
    with pytest.raises(TypeError, match="only with psi_init='calibrate'"):
        asrfx.convert(model, x, data=[x])
    with pytest.raises(TypeError, match="only with psi_init='calibrate'"):
        asrfx.convert(model, x, calibrate_batches=3)
    with pytest.raises(TypeError, match="'calibrate'"):
        asrfx.convert(model, x, psi_init="mean")
    with pytest.raises(AsrfxError, match="no batches"):
        asrfx.convert(model, x, psi_init="calibrate", data=[])
    with pytest.raises(ValueError, match="max_batches"):
        asrfx.convert(model, x, psi_init="calibrate", data=[x], calibrate_batches=0)
    plain = zoo.get_case("neg_plain_resnet_gap").build()
    with pytest.warns(asrfx.AsrfxWarning, match="nothing was converted"):
        asrfx.convert(plain, psi_init="calibrate", data=[x])


def test_the_old_name_calibrate_batches_still_works_and_warns():
    model = randomize(zoo.get_case("se_resnet_classic").build(), 13)
    batches = [torch.randn(3, 3, 32, 32) for _ in range(3)]
    new = asrfx.convert(model, psi_init="calibrate", data=batches, max_batches=2)
    with pytest.warns(FutureWarning, match="max_batches"):
        old = asrfx.convert(model, psi_init="calibrate", data=batches, calibrate_batches=2)
    torch.testing.assert_close(old.get_submodule("layer2.0.se").psi, new.get_submodule("layer2.0.se").psi)
    with pytest.raises(TypeError, match="pass max_batches only"):
        asrfx.convert(model, psi_init="calibrate", data=batches, max_batches=2, calibrate_batches=2)
