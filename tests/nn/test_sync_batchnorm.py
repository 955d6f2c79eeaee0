"""SyncBatchNorm: ``asrfx.convert_sync_batchnorm`` keeps every gate (GatedSyncBatchNorm), repairs a
model torch's own conversion broke, and fuse deploys the result. torch's SyncBatchNorm trains
only on GPU: here structure and numerics on CPU (eval mode, and train mode without a process
group, where it normalizes locally); benchmarks/syncbn_gpu.py trains it on GPUs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import asrfx
from asrfx.nn.attention import ATTENTION

from helpers import examples, randomize

SETTINGS = settings(max_examples=examples(10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROOT = Path(__file__).resolve().parents[2]


def _asr(kind: str, seed: int, size: int = 16, depth: int = 8) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    model = randomize(asrfx.models.cifar_resnet(depth, "basic", 10), seed).double()
    gm = asrfx.insert(model, kind, torch.randn(2, 3, size, size, dtype=torch.float64),
                      psi_init=lambda site, shape: torch.rand(shape) + 0.1)
    return randomize(gm, seed + 1).train()


def _norms(model: nn.Module) -> dict[str, type]:
    return {path: type(m) for path, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@SETTINGS
@given(st.sampled_from(sorted(ATTENTION)), st.integers(0, 2**16), st.integers(2, 5), st.sampled_from([8, 12]))
def test_every_gate_survives_and_the_numbers_do_not_change(kind, seed, batch, size):
    """Every BatchNorm becomes synchronized; each gated one a GatedSyncBatchNorm sharing its tensors.
    Eval outputs, train-mode outputs, running statistics and gradients equal the ASR form's
    (no process group: synchronized norms normalize locally)."""
    gm = _asr(kind, seed)
    reference = copy.deepcopy(gm)  # plain BatchNorms and GatedBatchNorms
    gated = {s.gated_norm for s in asrfx.report_of(gm).sites if s.gated_norm}
    synced = asrfx.convert_sync_batchnorm(copy.deepcopy(gm))
    norms = _norms(synced)
    assert {p for p, t in norms.items() if t is asrfx.GatedSyncBatchNorm} == gated
    assert all(issubclass(t, nn.SyncBatchNorm) for t in norms.values())
    assert synced.state_dict().keys() == gm.state_dict().keys()
    # in place, like torch's: the tensors are the converted model's own
    before = gm.state_dict(keep_vars=True)
    assert asrfx.convert_sync_batchnorm(gm) is gm
    assert all(t is before[n] for n, t in gm.state_dict(keep_vars=True).items())

    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    for mode in ("eval", "train"):
        getattr(reference, mode)(), getattr(synced, mode)()
        want, got = reference(x), synced(x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        want.square().sum().backward()
        got.square().sum().backward()
    grads = dict(reference.named_parameters())
    for name, p in synced.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-9, atol=1e-10, msg=name)
    buffers = dict(reference.named_buffers())
    for name, b in synced.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=1e-10, atol=0, msg=name)


def test_torchs_conversion_breaks_the_gates_and_asrfx_repairs_it():
    """torch's convert_sync_batchnorm makes gated norms plain (their forward then fails, named in
    the README); asrfx.convert_sync_batchnorm on that model makes them gated again."""
    gm = _asr("se", 3).eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    want = gm(x)
    broken = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(gm))
    with pytest.raises(TypeError, match="positional argument"):
        broken(x)
    repaired = asrfx.convert_sync_batchnorm(broken)
    assert sum(isinstance(m, asrfx.GatedSyncBatchNorm) for m in repaired.modules()) == 3
    torch.testing.assert_close(repaired(x), want, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(st.sampled_from(["se", "eca", "srm", "spa"]), st.integers(0, 2**16), st.integers(1, 4))
def test_fuse_deploys_a_synchronized_asr_form(kind, seed, batch):
    """fuse folds a GatedSyncBatchNorm's gate like a GatedBatchNorm's: no gate module, no psi, the
    backbone's parameter count and the ASR form's outputs."""
    gm = asrfx.convert_sync_batchnorm(_asr(kind, seed)).eval()
    fused = asrfx.fuse(gm)
    report = asrfx.report_of(fused)
    assert [f.op for f in report.folds] == ["gated_bn"] * 3 and not report.kept
    assert not any(isinstance(m, asrfx.GatedBatchNorm) for m in fused.modules())
    assert not any("psi" in n for n, _ in fused.named_parameters())
    backbone = asrfx.models.cifar_resnet(8, "basic", 10)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in backbone.parameters())
    x = torch.randn(batch, 3, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(fused(x), gm(x), rtol=1e-10, atol=1e-10)


def test_training_on_cpu_in_a_process_group_is_refused_as_torch_does():
    """With a process group, a synchronized norm trains on GPU only (torch's SyncBatchNorm rule); the
    refusal says what to do. Eval mode normalizes with running statistics anywhere."""
    bn = asrfx.GatedSyncBatchNorm(nn.BatchNorm2d(4)).train()
    x, gate = torch.randn(2, 4, 3, 3), torch.rand(4)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="GPU tensors only.*keep GatedBatchNorm"):
            bn(x, gate)
        bn.eval()
        torch.testing.assert_close(bn(x, gate), F.batch_norm(x, bn.running_mean, bn.running_var,
                                                             bn.weight * gate, bn.bias * gate, False, 0.0, bn.eps))
    finally:
        dist.destroy_process_group()


def test_the_gpu_script_skips_cleanly_without_cuda():
    """benchmarks/syncbn_gpu.py is run on GPU machines; without CUDA it says so and succeeds."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/syncbn_gpu.py itself")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "syncbn_gpu.py")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("SKIP")
