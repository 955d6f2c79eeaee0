"""Processes that the pipeline tests start (``python tests/training/pipeline_workers.py MODE OUT ...``).

* ``ddp`` / ``ddp_static`` / ``fsdp``: one rank of a distributed run (gloo, env:// rendezvous
  as torchrun sets it up): each rank builds the ASR form of a CIFAR ResNet
  (:func:`asr_model`), trains it a few SGD steps on its own data, fuses the trained state
  and saves what the test compares.
* ``train``: a single-process training run that saves an ``asrfx.checkpoint`` after every
  step and resumes from it when started again (the fault test kills it with SIGKILL).

Everything is deterministic: the model from seed 0, the data of step s on rank r from seed
``1000 * s + r``, one thread per process.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the asrfx under test
torch.set_num_threads(1)

import asrfx  # noqa: E402

STEPS = 3
BATCH = 4
SIZE = 16  # 16x16 inputs: 4x4 maps after the last stage
LR = 0.1


def asr_model(dtype: torch.dtype = torch.float64) -> torch.fx.GraphModule:
    """ResNet-8 (one basic block per stage) + ASR(SE) in psi form: three gated BatchNorms."""
    torch.manual_seed(0)
    gm = asrfx.insert(asrfx.models.cifar_resnet(8, "basic", 10), "se", torch.randn(2, 3, SIZE, SIZE))
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.endswith("psi"):  # away from its constant start: every psi distinct
                p.copy_(torch.rand(p.shape) + 0.05)
            elif name.endswith("fc1.bias"):  # SE's hidden ReLU units active: every psi gets a gradient
                p.fill_(1.0)
    return gm.to(dtype).train()


def batch(step: int, rank: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=gen).to(dtype), torch.randint(0, 10, (BATCH,), generator=gen)


def probe(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(99)).to(dtype)


def _distributed(mode: str, out: Path) -> None:
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gm = asr_model()
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(gm, mesh=init_device_mesh("cpu", (world,)))
    else:
        model = DDP(gm, find_unused_parameters=False, static_graph=mode == "ddp_static")
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for step in range(STEPS):
        x, y = batch(step, rank)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = {}
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        try:
            asrfx.fuse(model.eval())
        except asrfx.AsrfxError as exc:  # a sharded model is refused with the way to gather it
            result["refusal"] = str(exc)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        trained = asr_model()
        trained.load_state_dict(state)
        # FSDP keeps BatchNorm buffers per rank; take rank 0's, as DDP's buffer broadcast does
        for buf in trained.buffers():
            dist.broadcast(buf, 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused = asrfx.fuse(trained.eval())
    else:
        model.eval()
        with torch.no_grad():
            model(probe())  # a validation pass; DDP broadcasts rank 0's buffers before it
        trained = gm
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused = asrfx.fuse(model)  # the DDP wrapper itself: unwrapped, with a warning
    result["warnings"] = [str(w.message) for w in caught]
    with torch.no_grad():
        result.update(state=trained.state_dict(), fused=fused.state_dict(), asr_out=trained(probe()),
                      fused_out=fused(probe()), report=str(asrfx.report_of(fused)))
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# -- the training run the fault test kills -----------------------------------------------------


def _stall_saves() -> None:
    """Make the next checkpoint write stop half way (a slow disk), so the test can kill the
    process while a file is being written."""
    real = torch.save

    def stalled(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        print("stalled", flush=True)
        time.sleep(600)

    torch.save = stalled


def _train(out: Path, steps: int, stall_at: int | None) -> None:
    from asrfx import checkpoint
    from asrfx.cli.specs import build_model

    path = out / "asr.pt"
    if path.exists():
        loaded = checkpoint.load(path)
        gm, recipe, start = loaded.model.train(), loaded.recipe, loaded.extra["step"]
        opt = torch.optim.SGD(gm.parameters(), lr=LR, momentum=0.9)
        opt.load_state_dict(loaded.extra["optimizer"])
        print(f"resumed {start}", flush=True)
    else:
        recipe = checkpoint.Recipe("asrfx:resnet56", (2, 3, SIZE, SIZE), "insert",
                                   {"attention": "se", "repeats": 1, "psi_init": 0.1}, {"num_classes": 10})
        torch.manual_seed(0)
        gm = checkpoint.apply_recipe(build_model(recipe.model, **recipe.model_kwargs), recipe)
        gm.train()
        opt = torch.optim.SGD(gm.parameters(), lr=LR, momentum=0.9)
        start = 0
    for step in range(start, steps):
        x, y = batch(step, 0, torch.float32)
        loss = F.cross_entropy(gm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if stall_at is not None and step + 1 == stall_at:
            _stall_saves()
        checkpoint.save_asr(path, gm, recipe, extra={"step": step + 1, "optimizer": opt.state_dict()})
        print(f"saved {step + 1}", flush=True)
    torch.save(gm.state_dict(), out / "final.pt")
    print("done", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("ddp", "ddp_static", "fsdp", "train"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--stall-at", type=int, default=None)
    args = parser.parse_args()
    if args.mode == "train":
        _train(args.out, args.steps, args.stall_at)
    else:
        _distributed(args.mode, args.out)


if __name__ == "__main__":
    main()
