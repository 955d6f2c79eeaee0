"""Pass speed on a 50-block SE-ResNet (timm seresnet152: 3 + 8 + 36 + 3 blocks).

    python benchmarks/detect_speed.py [--repeats 15] [--model seresnet152]

Times each phase of find_attention, interleaved and repeated, and prints medians
plus the ratio to one eager forward pass of the same model at batch 1, 224x224
(a yardstick that moves with the machine). Goals: the detection pass well under a second
(issue #2); find_attention within 2x and convert within 3x one forward (issue #13).
*copy* is ``copy.deepcopy(model)``, the part of convert that leaves the caller's model alone
(every parameter cloned).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import asrfx
from asrfx.passes.detect import detect
from asrfx.graph.layout import infer_layouts
from asrfx.graph.capture import propagate_shapes, trace


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seresnet152")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    import timm

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved rounds")
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    blocks = sum(1 for name, _ in model.named_modules() if name.count(".") == 1 and name.startswith("layer"))
    asrfx.find_attention(model, x)  # warm up imports and caches

    phases = {"trace": [], "shapes": [], "detect": [], "find_attention": [], "copy": [], "convert": [], "forward": []}
    n_sites = n_nodes = 0
    for _ in range(args.repeats):  # interleaved: each round measures every phase once
        t, traced = _timed(lambda: trace(model))
        phases["trace"].append(t)
        gm = traced.gm
        t, _ = _timed(lambda: propagate_shapes(gm, (x,)))
        phases["shapes"].append(t)
        t, found = _timed(lambda: detect(gm, infer_layouts(gm)))
        phases["detect"].append(t)
        t, table = _timed(lambda: asrfx.find_attention(model, x))
        phases["find_attention"].append(t)
        t, _ = _timed(lambda: copy.deepcopy(model))
        phases["copy"].append(t)
        t, _ = _timed(lambda: asrfx.convert(model, x))
        phases["convert"].append(t)
        with torch.no_grad():
            t, _ = _timed(lambda: model(x))
        phases["forward"].append(t)
        n_sites, n_nodes = len(found.sites), len(gm.graph.nodes)
        assert len(table) == n_sites

    forward = statistics.median(phases["forward"])
    print(f"{args.model}: {blocks} residual blocks, {n_nodes} graph nodes, {n_sites} sites found")
    print(f"{'phase':<16}{'median s':>10}{'min s':>10}{'x forward':>11}")
    for name, times in phases.items():
        med = statistics.median(times)
        print(f"{name:<16}{med:>10.3f}{min(times):>10.3f}{med / forward:>11.2f}")


if __name__ == "__main__":
    main()
