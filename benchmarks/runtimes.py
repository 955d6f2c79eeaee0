"""Deployment runtimes on the unfused ASR form: does the runtime fold the gates without asrfx.fuse?

    python benchmarks/runtimes.py [--models mobilenet_v3_large seresnet50] [--rounds 40]

For each model, four ONNX exports (``torch.onnx.export(..., dynamo=True)``, batch 1, 224x224):
*backbone* (``asrfx.backbone``), *fused* (``asrfx.fuse(convert(model).eval())``), *ASR form*
(``convert(model).eval()`` as it is: psi branch in the graph, gates inside BatchNorms and conv
weights as convert trains them) and *ASR form, multiplies* (``convert(..., gate_in_norm=False,
gate_in_consumers=False)``: every gate a multiply of the feature map by a value computed from
psi), each run by

* onnxruntime (CPU provider) with graph optimizations at their highest level (``ORT_ENABLE_ALL``);
* OpenVINO (``openvino.compile_model`` on the same file, CPU), where installed (``pip install
  "asrfx[deploy]"``).

All runners of a model take one inference per round, interleaved (benchmarks/timing.py); medians
and ratios to the backbone on the same runtime. Also printed: the ops each optimized onnxruntime
graph still runs (``optimized_model_filepath``), against the backbone's.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import warnings
from pathlib import Path

import torch

import asrfx
from compiled_speed import build
from timing import interleaved


def onnxruntime_runner(path: Path, optimized: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def openvino_runner(path: Path):
    try:
        import openvino as ov
    except ImportError:
        return None
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})  # not bf16 on CPUs that have it
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[compiled.output(0)]


def op_histogram(path: Path) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v3_large", "seresnet50"])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    print(f"torch {torch.__version__}, batch 1, 224x224, {args.rounds} interleaved rounds, median ms; "
          "ratios to the backbone on the same runtime")
    for name in args.models:
        model = build(name).eval()
        asr = asrfx.convert(model, x).eval()
        variants = {"backbone": asrfx.backbone(model, x).eval(), "fused": asrfx.fuse(asr), "ASR form": asr,
                    "ASR form, multiplies": asrfx.convert(model, x, gate_in_norm=False,
                                                          gate_in_consumers=False).eval()}
        runners, ops = {}, {}
        with tempfile.TemporaryDirectory() as folder, torch.no_grad():
            for k, (label, module) in enumerate(variants.items()):
                path = Path(folder) / f"v{k}.onnx"
                torch.onnx.export(module, (x,), dynamo=True).save(str(path))
                optimized = Path(folder) / f"v{k}.opt.onnx"
                runners[(label, "onnxruntime")] = onnxruntime_runner(path, optimized)
                ops[label] = op_histogram(optimized)
                ov_run = openvino_runner(path)
                if ov_run is not None:
                    runners[(label, "openvino")] = ov_run
            want = variants["fused"](x).numpy()
            for key, run in runners.items():  # every runner computes its model (ASR forms: the fused output)
                got = run(x.numpy())
                ref = variants["backbone"](x).numpy() if key[0] == "backbone" else want
                assert abs(got - ref).max() <= 1e-3 * abs(ref).max(), key
            med = interleaved(runners, x.numpy(), args.warmup, args.rounds)
        runtimes = [r for r in ("onnxruntime", "openvino") if ("backbone", r) in med]
        print(f"\n{name}")
        print(f"  {'':<24}" + "".join(f"{r:>20}" for r in runtimes) + "   optimized onnxruntime graph vs backbone's")
        for label in variants:
            cells = "".join(f"{1e3 * med[(label, r)]:>11.2f} ({med[(label, r)] / med[('backbone', r)]:.3f})"
                            for r in runtimes)
            extra = ops[label] - ops["backbone"]
            diff = ", ".join(f"+{n} {op}" for op, n in sorted(extra.items())) or "same ops"
            print(f"  {label:<24}{cells}   {diff}")


if __name__ == "__main__":
    main()
