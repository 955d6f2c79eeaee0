"""Inference latency after fuse, and the time of the fuse pass itself.

    python benchmarks/fuse_speed.py [--rounds 30] [--resolution 224]

For each model, eval mode, batch 1: *backbone* (attention modules replaced by identity),
the same backbone traced by torch.fx (*bb fx*: a GraphModule, like the fused model),
*attention* (the original model) and *fused* (``fuse(convert(model).eval())``) run one
forward each, in turn, round after round; the table prints medians and ratios. Goal
(issue #4): fused / backbone = 1.00 +- 0.03. Then the convert and fuse passes are timed
on timm seresnet152 (50 SE blocks); goal: fuse under 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import asrfx
from timing import interleaved
from torch import fx


def _models():
    import timm
    import torchvision

    yield "seresnet50 (timm)", timm.create_model("seresnet50", pretrained=False)
    yield "mobilenet_v3_large", torchvision.models.mobilenet_v3_large(weights=None)
    yield "efficientnet_b0", torchvision.models.efficientnet_b0(weights=None)
    yield "regnet_y_400mf", torchvision.models.regnet_y_400mf(weights=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.resolution, args.resolution)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, "
          f"{args.resolution}x{args.resolution}, {args.rounds} interleaved rounds, median latency")
    print(f"{'model':<20}{'backbone ms':>12}{'bb fx ms':>9}{'attention ms':>13}{'fused ms':>9}"
          f"{'attn/bb':>8}{'fused/bb':>9}{'fused/bb fx':>12}{'same params':>12}")
    for name, model in _models():
        model.eval()
        backbone = asrfx.backbone(model, x).eval()
        variants = {
            "backbone": backbone,
            "bb_fx": fx.symbolic_trace(backbone),
            "attention": model,
            "fused": asrfx.fuse(asrfx.convert(model, x).eval()),
        }
        same_size = sum(p.numel() for p in variants["fused"].parameters()) == \
            sum(p.numel() for p in variants["backbone"].parameters())
        with torch.no_grad():
            med = {k: t * 1e3 for k, t in interleaved(variants, x, args.warmup, args.rounds).items()}
        print(f"{name:<20}{med['backbone']:>12.2f}{med['bb_fx']:>9.2f}{med['attention']:>13.2f}"
              f"{med['fused']:>9.2f}{med['attention'] / med['backbone']:>8.3f}"
              f"{med['fused'] / med['backbone']:>9.3f}{med['fused'] / med['bb_fx']:>12.3f}{str(same_size):>12}")

    import timm

    model = timm.create_model("seresnet152", pretrained=False)
    example = torch.randn(1, 3, 224, 224)
    convert_times, fuse_times = [], []
    for _ in range(5):
        start = time.perf_counter()
        gm = asrfx.convert(model, example).eval()
        convert_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        fused = asrfx.fuse(gm)
        fuse_times.append(time.perf_counter() - start)
    folds = len(asrfx.report_of(fused).folds)
    print(f"\nseresnet152 ({len(gm.graph.nodes)} nodes, {folds} gates): convert "
          f"{statistics.median(convert_times):.2f} s, fuse {statistics.median(fuse_times):.2f} s (median of 5)")


if __name__ == "__main__":
    main()
