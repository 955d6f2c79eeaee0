"""Pass speed on a 50-block SE-ResNet (timm seresnet152: 3 + 8 + 36 + 3 blocks).

    python benchmarks/detect_speed.py [--repeats 15] [--model seresnet152]

Times each phase of find_attention, interleaved and repeated, and prints medians
plus the ratio to one eager forward pass of the same model at batch 1, 224x224
(a yardstick that moves with the machine). Goals: the detection pass well under a second
(issue #2); find_attention within 2x and convert within 3x one forward (issue #13).
*copy* is ``copy.deepcopy(model)``, the part of convert that leaves the caller's model alone
(every parameter cloned).

``--baseline DIR`` also times find_attention and convert of another checkout's asrfx (DIR holds
its ``asrfx`` package, loaded as ``asrfx_baseline``) in the same rounds: a before/after that
machine noise hits alike.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

import asrfx
from asrfx.passes.detect import detect
from asrfx.graph.layout import infer_layouts
from asrfx.graph.capture import propagate_shapes, trace


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _baseline(checkout: str):
    """The asrfx package of another checkout, imported as ``asrfx_baseline`` (its imports are relative)."""
    package = Path(checkout) / "asrfx"
    spec = importlib.util.spec_from_file_location("asrfx_baseline", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["asrfx_baseline"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seresnet152")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--baseline", help="another checkout whose find_attention and convert are timed too")
    args = parser.parse_args()
    base = _baseline(args.baseline) if args.baseline else None
    import timm

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved rounds")
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    blocks = sum(1 for name, _ in model.named_modules() if name.count(".") == 1 and name.startswith("layer"))
    for lib in (asrfx, base) if base else (asrfx,):
        lib.find_attention(model, x)  # warm up imports and caches

    phases = {"trace": [], "shapes": [], "detect": [], "find_attention": [], "copy": [], "convert": [], "forward": []}
    if base:
        phases.update({"find (baseline)": [], "convert (baseline)": []})
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
        if base:
            t, _ = _timed(lambda: base.find_attention(model, x))
            phases["find (baseline)"].append(t)
            t, _ = _timed(lambda: base.convert(model, x))
            phases["convert (baseline)"].append(t)
        n_sites, n_nodes = len(found.sites), len(gm.graph.nodes)
        assert len(table) == n_sites

    forward = statistics.median(phases["forward"])
    print(f"{args.model}: {blocks} residual blocks, {n_nodes} graph nodes, {n_sites} sites found")
    print(f"{'phase':<20}{'median s':>10}{'min s':>10}{'x forward':>11}")
    for name, times in phases.items():
        med = statistics.median(times)
        print(f"{name:<20}{med:>10.3f}{min(times):>10.3f}{med / forward:>11.2f}")


if __name__ == "__main__":
    main()
