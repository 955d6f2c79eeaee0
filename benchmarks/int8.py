"""INT8 post-training quantization of a fused ASR model against its ASR form (issue #13, item 4).

    python benchmarks/int8.py [--epochs 3] [--train-limit 12000] [--calibrate 500]

Trains the ASR form of benchmarks/stripe_fmnist.py's SE-CNN on Fashion-MNIST (CPU, local files;
``asrfx.convert(SECNN())`` trained from scratch, psi and all), then quantizes, with onnxruntime's
``quantize_static`` (QDQ format, int8 weights and activations, MinMax calibration on training
images, after ``quant_pre_process``), with per-channel and with per-tensor weight scales:

* *fused*: ``asrfx.fuse(asr)``, the deployed backbone (each gate folded into the BatchNorm before it);
* *ASR form*: the same weights with every gate applied at run time (``convert(...,
  gate_in_norm=False, gate_in_consumers=False)`` loaded with the trained state_dict: a multiply
  by a constant vector, which onnxruntime's graph optimizations constant-fold from psi);
* *fused, balanced* (``asrfx.fuse(asr, placement="balanced")``): each gate split between producer
  and consumer so that their per-channel weight ranges are equal (cross-layer equalization, exact
  for a non-negative gate through ReLU), when the consumer can take its part.

Prints test accuracy (10,000 images) in float and in INT8 for each, and the drop.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import asrfx
from asrfx.data import load_fashion_mnist
from stripe_fmnist import MEAN, SECNN, STD, evaluate, train


def export(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(model.eval(), (x,), dynamo=True).save(str(path))
    return path


class Reader:
    """onnxruntime calibration data: batches of training images."""

    def __init__(self, name: str, images: torch.Tensor, batch: int):
        self.batches = iter([{name: images[i:i + batch].numpy()} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


def quantize(path: Path, images: torch.Tensor, batch: int, per_channel: bool) -> Path:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = path.with_suffix(".pre.onnx")
    quant_pre_process(str(path), str(prepared))
    name = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    out = path.with_suffix(f".int8{'.pc' if per_channel else '.pt'}.onnx")
    quantize_static(str(prepared), str(out), Reader(name, images, batch), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return out


def onnx_accuracy(path: Path, images: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    right = 0
    for i in range(0, len(images), batch):
        logits = session.run(None, {name: images[i:i + batch].numpy()})[0]
        right += int((np.argmax(logits, 1) == labels[i:i + batch].numpy()).sum())
    return right / len(images)


def gate_spread(asr: torch.nn.Module, x: torch.Tensor) -> str:
    """Per site: the smallest and largest gate entry (what a per-tensor weight scale must cover)."""
    stats = asrfx.stripe(asr.eval(), [x], progress=False)
    parts = []
    for site in stats.sites:
        mean = site.gate_mean
        parts.append(f"{site.module_path}: {float(mean.min()):.3f}..{float(mean.max()):.3f}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--train-limit", type=int, default=12000)
    parser.add_argument("--calibrate", type=int, default=500, help="training images for INT8 calibration")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    images, labels = load_fashion_mnist("train", limit=args.train_limit or None)
    test_images, test_labels = load_fashion_mnist("test")
    images, test_images = (images - MEAN) / STD, (test_images - MEAN) / STD
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch, shuffle=True)
    test_loader = DataLoader(TensorDataset(test_images, test_labels), batch_size=500)
    x = images[:100]

    asr = asrfx.convert(SECNN(), x[:2])
    print(f"torch {torch.__version__}; training the ASR form of SECNN on {len(images)} Fashion-MNIST images, "
          f"{args.epochs} epochs", flush=True)
    decay = (round(args.epochs * 0.6), round(args.epochs * 0.85))
    train(asr, loader, args.epochs, args.lr, milestones=decay)
    asr.eval()
    runtime = asrfx.convert(SECNN(), x[:2], gate_in_norm=False, gate_in_consumers=False)
    runtime.load_state_dict(asr.state_dict())
    runtime.eval()
    variants = {"fused": asrfx.fuse(asr), "ASR form (gates at run time)": runtime}
    try:
        variants["fused, balanced"] = asrfx.fuse(asr, placement="balanced")
    except TypeError:  # a build without the placement option
        pass
    print(f"gates (min..max entry per site): {gate_spread(runtime, x)}")
    calib = images[-args.calibrate:]
    print("\n| model | float (torch) | float (onnxruntime) | INT8 per-channel | drop | INT8 per-tensor | drop |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for k, (label, model) in enumerate(variants.items()):
            acc, _ = evaluate(model, test_loader)
            path = export(copy.deepcopy(model), x, Path(folder) / f"m{k}.onnx")
            fp = onnx_accuracy(path, test_images, test_labels, 100)
            pc = onnx_accuracy(quantize(path, calib, 100, True), test_images, test_labels, 100)
            pt = onnx_accuracy(quantize(path, calib, 100, False), test_images, test_labels, 100)
            print(f"| {label} | {acc:.2%} | {fp:.2%} | {pc:.2%} | {100 * (pc - fp):+.2f} pt | {pt:.2%} | "
                  f"{100 * (pt - fp):+.2f} pt |", flush=True)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
