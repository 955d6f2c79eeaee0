"""The ASR form in distributed training: two processes on gloo (loopback), launched by torchrun
as the README shows, with DistributedDataParallel (find_unused_parameters=False, static_graph)
and FSDP2's fully_shard. Each rank trains on its own data; the trained weights and psi must be
the same on both ranks and equal to the same training done in one process, and fusing them
must give the same deployed model on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline_workers as workers  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


def torchrun(mode: str, out: Path) -> list[dict]:
    """``torchrun --standalone --nproc-per-node 2 tests/training/pipeline_workers.py MODE OUT``; each rank's results."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           str(ROOT / "tests" / "training" / "pipeline_workers.py"), mode, str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    """The same training in one process: each step, the mean of the ranks' losses (what DDP's and
    FSDP's gradient averaging computes), each rank's batch through the model on its own (its own
    BatchNorm batch statistics)."""
    gm = workers.asr_model()
    start = {k: v.clone() for k, v in gm.state_dict().items()}
    opt = torch.optim.SGD(gm.parameters(), lr=workers.LR, momentum=0.9)
    for step in range(workers.STEPS):
        losses = [F.cross_entropy(gm(x), y) for x, y in (workers.batch(step, r) for r in range(WORLD))]
        opt.zero_grad()
        (sum(losses) / WORLD).backward()
        opt.step()
    return start, dict(gm.named_parameters())


def _check_run(ranks: list[dict], reference) -> None:
    start, params = reference
    first = ranks[0]
    # every rank holds the same trained state (weights, psi and BatchNorm buffers), bit for bit
    for other in ranks[1:]:
        assert first["state"].keys() == other["state"].keys()
        for k in first["state"]:
            assert torch.equal(first["state"][k], other["state"][k]), k
    # ... which is the training done in one process
    psi = [k for k in params if k.rsplit(".", 1)[-1] == "psi"]
    assert len(psi) == 3
    for name, p in params.items():
        torch.testing.assert_close(first["state"][name], p.detach(), rtol=1e-10, atol=1e-10, msg=name)
    assert all(not torch.allclose(first["state"][k], start[k]) for k in psi)  # psi trained
    # fusing gives the same deployed model on every rank: the plain backbone with the ASR outputs
    for other in ranks[1:]:
        assert first["fused"].keys() == other["fused"].keys()
        for k in first["fused"]:
            assert torch.equal(first["fused"][k], other["fused"][k]), k
    for r in ranks:
        assert not any("psi" in k or ".asr." in k for k in r["fused"])
        assert r["report"].startswith("asrfx.fuse: 3 gate(s) folded, 0 kept")
        torch.testing.assert_close(r["fused_out"], r["asr_out"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["ddp", "ddp_static"])
def test_ddp_trains_the_asr_form_identically_on_every_rank(mode, reference, tmp_path):
    """DistributedDataParallel(find_unused_parameters=False), and with static_graph=True: every
    parameter, psi included, takes part in each step (the gate is computed from psi every forward)."""
    ranks = torchrun(mode, tmp_path)
    _check_run(ranks, reference)
    for r in ranks:  # fuse took the DDP wrapper itself and said it unwrapped it
        assert any("DistributedDataParallel" in w and "model.module" in w for w in r["warnings"]), r["warnings"]


def test_fsdp2_fully_shard_gathers_the_same_full_state(reference, tmp_path):
    """fully_shard shards psi with the weights; the full state dict gathered on each rank is the
    same, equal to the one-process training, and fuses to the same model. Fusing the sharded
    model itself is refused with the way to gather it."""
    ranks = torchrun("fsdp", tmp_path)
    _check_run(ranks, reference)
    for r in ranks:
        assert "sharded by FSDP" in r["refusal"] and "full_state_dict=True" in r["refusal"]
        assert not r["warnings"]

