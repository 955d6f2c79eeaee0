"""Train the ASR form with synchronized gated BatchNorms on GPU; prints PASS or FAIL (SKIP without CUDA).

    python benchmarks/syncbn_gpu.py            # exit status 0 on PASS or SKIP, 1 on FAIL

Two processes train ResNet-8 + ASR(SE) in float64, converted by ``asrfx.convert_sync_batchnorm``
and wrapped in DistributedDataParallel, each on half of every batch (NCCL with one GPU per
process when there are two GPUs, otherwise gloo with both processes on GPU 0). One process then
trains the same model, with unsynchronized gated norms, on the whole batches. BatchNorm
synchronized over two halves is BatchNorm over the whole batch, and DDP averages the halves'
gradients, so both runs must end with the same weights and BatchNorm statistics; a gated norm
that normalized its half alone would not. Finally the synchronized model is fused and must give
the outputs of its ASR form.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's asrfx
import asrfx  # noqa: E402

WORLD, STEPS, BATCH, SIZE = 2, 4, 8, 16
TOL = dict(rtol=1e-8, atol=1e-9)  # float64: only the order of the reductions differs


def _model() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    gm = asrfx.insert(asrfx.models.cifar_resnet(8, "basic", 10), "se", torch.randn(2, 3, SIZE, SIZE))
    return gm.double().train()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=gen, dtype=torch.float64), torch.randint(0, 10, (BATCH,), generator=gen)


def _train(model, device, rank: int = 0, world: int = 1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, y = (t.chunk(world)[rank].to(device) for t in _batch(step))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _rank(rank: int, backend: str, folder: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = torch.device("cuda", rank if backend == "nccl" else 0)
    torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=WORLD)
    try:
        model = asrfx.convert_sync_batchnorm(_model()).to(device)
        gated = sum(isinstance(m, asrfx.GatedSyncBatchNorm) for m in model.modules())
        _train(DDP(model, device_ids=[device.index]), device, rank, WORLD)
        if rank == 0:
            torch.save({"gated": gated, "state": {k: v.cpu() for k, v in model.state_dict().items()}},
                       Path(folder) / "synced.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device (torch's SyncBatchNorm synchronizes GPU tensors only)")
        return 0
    backend = "nccl" if torch.cuda.device_count() >= WORLD and dist.is_nccl_available() else "gloo"
    print(f"{WORLD} processes, {backend}, {torch.cuda.get_device_name(0)}")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_rank, args=(backend, folder), nprocs=WORLD, join=True)
            synced = torch.load(Path(folder) / "synced.pt", weights_only=True)
        device = torch.device("cuda", 0)
        reference = _model().to(device)  # GatedBatchNorm: whole batches in one process
        _train(reference, device)
        problems = [] if synced["gated"] == 3 else [f"{synced['gated']} GatedSyncBatchNorm(s), expected 3"]
        for name, want in reference.state_dict().items():
            got = synced["state"][name].to(device)
            if not torch.allclose(got.double(), want.double(), **TOL):
                problems.append(f"{name}: max difference {(got.double() - want.double()).abs().max().item():.3g}")
        model = asrfx.convert_sync_batchnorm(copy.deepcopy(reference))
        model.load_state_dict(synced["state"])
        model.eval()
        fused = asrfx.fuse(model)
        x = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64, device=device)
        with torch.no_grad():
            if not torch.allclose(fused(x), model(x), **TOL):
                problems.append("the fused model's outputs differ from its ASR form's")
    except Exception:
        traceback.print_exc()
        print("FAIL: the run raised (traceback above)")
        return 1
    if problems:
        print(f"FAIL: {len(problems)} difference(s): " + "; ".join(problems[:5]))
        return 1
    print(f"PASS: {STEPS} steps of synchronized gated BatchNorm over {WORLD} processes equal one process on "
          "whole batches; the fused model gives the ASR form's outputs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
