"""Compiled speed: backbone vs original attention vs fused ASR, eager, inductor and onnxruntime.

    python benchmarks/compiled_speed.py inference [--models seresnet50 ...] [--rounds 30]

(The compiled training step moved to benchmarks/train_cost.py, with the eager one and memory.)

Inference (eval, batch 1, 224x224, no grad). For each model three variants: *backbone*
(attention modules replaced by identity; also traced by torch.fx, *backbone (fx)*, a GraphModule
like the fused model), *attention* (the original model), *fused*
(``fuse(convert(model).eval())``, a GraphModule) and *fused, model class* (its weights loaded
into the backbone: ``asrfx.backbone(model, x, state_dict=fused.state_dict())``), each run

* eager,
* compiled by inductor (``torch.compile``), without and with ``freezing`` (set in
  ``torch._inductor.config`` while Dynamo traces: ``options={"freezing": True}`` alone leaves
  the parameters as graph inputs, which inductor cannot fold),
* in onnxruntime (``torch.onnx.export(..., dynamo=True)``) when the ``onnx`` extra is installed;

plus the ASR model compiled by the asrfx backend (``torch.compile(asr, backend="asrfx")``,
without and with freezing; the backend always folds the gates): the route a user takes without calling fuse. Every runner
of a model runs once per round, in alternating order (interleaved: machine noise hits all
alike); the table prints median latencies and the ratios to the backbone in the same
column. Goal (issue #6): fused / backbone = 1.00 +- 0.03 in every column.

"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import asrfx
import asrfx.dynamo
from timing import interleaved

MODELS = ("seresnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf")


def build(name: str) -> nn.Module:
    import timm
    import torchvision

    if name == "seresnet50":
        return timm.create_model("seresnet50", pretrained=False)
    return getattr(torchvision.models, name)(weights=None)


def onnx_runner(model: nn.Module, x: torch.Tensor, folder: Path, label: str):
    """An onnxruntime session of ``model`` (None without the onnx extra)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    path = folder / f"{label}.onnx"
    torch.onnx.export(model, (x,), dynamo=True).save(str(path))
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy threads between runs
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed_name = session.get_inputs()[0].name
    return lambda t: session.run(None, {feed_name: t.numpy()})[0]


def frozen(compiled):
    """Run ``compiled`` with inductor's freezing on. It must be on while Dynamo traces (not only
    in inductor's options): Dynamo then installs the parameters as graph constants to fold."""
    def run(x):
        with torch._inductor.config.patch(freezing=True):
            return compiled(x)
    return run


@torch.no_grad()
def inference(names, warmup: int, rounds: int) -> None:
    x = torch.randn(1, 3, 224, 224)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, eval, batch 1, 224x224, "
          f"{rounds} interleaved rounds, median latency in ms; ratios to the backbone in the same column")
    columns = ("eager", "inductor", "inductor+freezing", "onnxruntime")
    for name in names:
        model = build(name).eval()
        asr = asrfx.convert(model, x).eval()
        fused = asrfx.fuse(asr)
        plain = asrfx.backbone(model, x).eval()
        variants = {"backbone": plain, "backbone (fx)": asrfx.trace(plain).gm.eval(), "attention": model,
                    "fused": fused,
                    # the fused weights in the model's own class: no GraphModule in eager mode
                    "fused, model class": asrfx.backbone(model, x, state_dict=fused.state_dict()).eval()}
        runners, compile_s = {}, {}
        with tempfile.TemporaryDirectory() as folder:
            for label, module in variants.items():
                runners[(label, "eager")] = module
                # a copy per compiled runner: no two runners share Dynamo cache entries
                runners[(label, "inductor")] = torch.compile(copy.deepcopy(module))
                runners[(label, "inductor+freezing")] = frozen(torch.compile(copy.deepcopy(module)))
                ort_run = onnx_runner(module, x, Path(folder), label)
                if ort_run is not None:
                    runners[(label, "onnxruntime")] = ort_run
            runners[("asr via backend", "inductor")] = torch.compile(copy.deepcopy(asr), backend="asrfx")
            runners[("asr via backend", "inductor+freezing")] = frozen(
                torch.compile(copy.deepcopy(asr), backend="asrfx"))
            # what each runner must compute: fused and the backend equal the ASR model
            references = {"backbone": plain(x), "backbone (fx)": plain(x), "attention": model(x), "fused": asr(x),
                          "fused, model class": asr(x), "asr via backend": asr(x)}
            for key, fn in runners.items():  # compile (first call) and check every runner's output
                start = time.perf_counter()
                out = torch.as_tensor(fn(x))
                compile_s[key] = time.perf_counter() - start
                reference = references[key[0]]
                err = (out - reference).abs().max().item() / reference.abs().max().item()
                if err > 1e-3:
                    raise SystemExit(f"{name} {key}: output differs from eager by {err:.2e} (relative)")
            backend_reports = [r for r in asrfx.dynamo.reports if r.folded]
            med = interleaved(runners, x, warmup, rounds)
        folded = f"{len(backend_reports[-1].fuse.folds)} gates folded" if backend_reports else "NOT FOLDED"
        print(f"\n{name} ({sum(p.numel() for p in variants['fused'].parameters()) / 1e6:.2f}M params fused = "
              f"{sum(p.numel() for p in variants['backbone'].parameters()) / 1e6:.2f}M backbone; backend: {folded})")
        print(f"  {'':<20}" + "".join(f"{c:>19}" for c in columns))
        for label in ("backbone", "backbone (fx)", "attention", "fused", "fused, model class", "asr via backend"):
            cells = []
            for c in columns:
                if (label, c) not in med:
                    cells.append(f"{'-':>19}")
                    continue
                ms, ratio = med[(label, c)] * 1e3, med[(label, c)] / med[("backbone", c)]
                cells.append(f"{ms:>10.2f} ({ratio:.3f})")
            print(f"  {label:<20}" + "".join(cells))
        slowest = max(compile_s.items(), key=lambda kv: kv[1])
        print(f"  first call (compile) up to {slowest[1]:.0f} s ({slowest[0][0]}, {slowest[0][1]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("inference",))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    for key in ("recompile_limit", "cache_size_limit"):  # many compiled variants of one model class
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)
    inference(args.models, args.warmup, args.rounds or 30)


if __name__ == "__main__":
    main()
