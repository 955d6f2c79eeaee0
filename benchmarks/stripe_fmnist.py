"""Stripe Observation on a model trained offline, and converting it with calibrated psi.

    python benchmarks/stripe_fmnist.py [--epochs 8] [--train-limit 12000] [--out docs/images]

Trains a small SE-CNN on Fashion-MNIST (CPU, local files: asrfx.data; by default on
12000 training images, about 10 minutes on 2 cores) while an
asrfx.GateRecorder records the gates of 64 fixed test images after every epoch (Fig. 1c);
then runs asrfx.stripe on the test set (Fig. 1a/1b), converts the trained model to ASR
form with psi_init="calibrate" (no training) and with the default psi_init=0.1, fine-tunes
both for one epoch, fuses, and prints test accuracies and parameter counts as a markdown
table (the numbers in docs/stripe.md).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import asrfx
from asrfx.attention import SE
from asrfx.data import load_fashion_mnist

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics


class SECNN(nn.Module):
    """conv-BN-ReLU-SE stages (16, 32, 64 channels; stride 2 after the first), GAP, linear."""

    def __init__(self, widths=(16, 32, 64), classes: int = 10, attention: bool = True):
        super().__init__()
        layers, cin = [], 1
        for i, cout in enumerate(widths):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(),
                       nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            layers.append(SE(cout, reduction=4) if attention else nn.Identity())
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy."""
    model.eval()
    right = total = 0
    loss = 0.0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            right += int((logits.argmax(1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            total += len(y)
    return right / total, loss / total


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float, milestones=(), after_epoch=None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.1)
    for epoch in range(epochs):
        model.train()
        start, seen, loss_sum = time.perf_counter(), 0, 0.0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
        sched.step()
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f}, {time.perf_counter() - start:.0f} s",
              flush=True)
        if after_epoch is not None:
            after_epoch(epoch + 1)


def print_usage(model: nn.Module, stats, images: torch.Tensor) -> None:
    """Is the SE used? Per site: how far the mean gates spread across channels (a constant 0.5 for
    every channel only halves the activations) and how many hidden units of the excitation (fc1,
    then ReLU) are positive on at least one test image (none: the gate ignores its input)."""
    active = {}
    handles = [m.fc1.register_forward_hook(lambda mod, i, out, path=path: active.__setitem__(
        path, (out > 0).any(0) | active.get(path, torch.zeros(out.shape[1], dtype=torch.bool))))
        for path, m in model.named_modules() if isinstance(m, SE)]
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    print("site: mean gate, spread across channels (std, min..max), hidden units used")
    for s in stats:
        mean = s.gate_mean
        used = active.get(s.module_path)
        print(f"  {s.module_path}: {float(mean.mean()):.3f}, {float(mean.std(unbiased=False)):.4f} "
              f"({float(mean.min()):.3f}..{float(mean.max()):.3f}), "
              f"{int(used.sum()) if used is not None else '?'} of {len(used) if used is not None else '?'}")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--calibrate-images", type=int, default=5000)
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=12000,
                        help="train on the first N training images (0: all 60000; CPU time)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=asrfx.AsrfxWarning)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    began = time.perf_counter()

    images, labels = load_fashion_mnist("train", limit=args.train_limit or None)
    test_images, test_labels = load_fashion_mnist("test")
    images, test_images = (images - MEAN) / STD, (test_images - MEAN) / STD
    train_loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch, shuffle=True)
    test_loader = DataLoader(TensorDataset(test_images, test_labels), batch_size=500)
    calib = DataLoader(TensorDataset(images[:args.calibrate_images], labels[:args.calibrate_images]), batch_size=500)
    probe = test_images[:64]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Fashion-MNIST "
          f"{len(images)} train / {len(test_images)} test images")

    model = SECNN()
    recorder = asrfx.GateRecorder(model, probe)
    recorder.record(0)  # at initialisation
    untrained = asrfx.stripe(model, test_loader, max_batches=4, progress=False)
    print(f"training {type(model).__name__} ({n_params(model)} parameters) for {args.epochs} epochs")
    decay = (round(args.epochs * 0.6), round(args.epochs * 0.85))
    train(model, train_loader, args.epochs, args.lr, milestones=decay, after_epoch=recorder.record)
    recorder.plot(out / "stripe_fmnist_epochs.png", images=3, channels=20)

    stats = asrfx.stripe(model, test_loader, progress=False)
    print(stats)
    print_usage(model, stats, test_images)
    stats.plot(out / "stripe_fmnist.png")
    print("at initialisation (2000 test images):")
    print(untrained)
    diffs = recorder.differences()
    print("mean |v(t+1) - v(t)| over probe images and channels, per epoch:")
    for label, d in diffs.items():
        print(f"  {label}: " + " ".join(f"{float(v):.4f}" for v in d.mean((1, 2))))

    x = test_images[:2]
    calibrated = asrfx.convert(model, x, psi_init="calibrate", data=calib)
    constant = asrfx.convert(model, x)  # psi_init=0.1, the paper's C_0.1
    rows = [("original SE model", model), ("backbone: SE removed, same weights", asrfx.backbone(model, x)),
            ("convert, psi_init=0.1 (no training)", constant),
            ("convert, psi_init='calibrate' (no training)", calibrated),
            ("fuse(calibrated)", asrfx.fuse(copy.deepcopy(calibrated).eval()))]
    tuned = {}
    for name, gm in (("psi_init=0.1", constant), ("psi_init='calibrate'", calibrated)):
        tuned[name] = copy.deepcopy(gm)
        print(f"fine-tuning the {name} conversion for 1 epoch")
        train(tuned[name], train_loader, 1, args.lr * 0.01)
        rows.append((f"convert, {name}, + 1 epoch fine-tune", tuned[name]))
        rows.append((f"fuse({name} + fine-tune)", asrfx.fuse(copy.deepcopy(tuned[name]).eval())))

    with torch.no_grad():
        ref = model.eval()(test_images)
        for name, gm in (("psi_init=0.1", constant), ("psi_init='calibrate'", calibrated)):
            got = gm.eval()(test_images)
            agree = float((ref.argmax(1) == got.argmax(1)).float().mean())
            print(f"{name} conversion (no training) vs the original on the test set: same prediction for "
                  f"{agree:.2%} of images, mean |logit difference| {float((ref - got).abs().mean()):.4f}")
    print("\n| model | test accuracy | test loss | parameters |\n|---|---:|---:|---:|")
    for name, m in rows:
        acc, loss = evaluate(m, test_loader)
        print(f"| {name} | {acc:.2%} | {loss:.4f} | {n_params(m):,} |")
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
