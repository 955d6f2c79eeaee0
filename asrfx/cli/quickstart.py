"""Quickstart: find the channel attention in a real torchvision model, convert it to ASR form, fuse it.

    python -m asrfx.quickstart [--model mobilenet_v3_large] [--resolution 224]

Needs torchvision (the ``vision`` or ``test`` extra). Builds the model with
random weights (``weights=None``): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asrfx.quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v3_large", help="a torchvision.models builder name")
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args(argv)
    try:
        import torchvision
    except ImportError:
        print("the quickstart needs torchvision: pip install 'asrfx[vision]'", file=sys.stderr)
        return 2
    import asrfx
    from asrfx.passes.contract import psi_parameters

    builder = getattr(torchvision.models, args.model, None)
    if builder is None or not callable(builder):
        print(f"torchvision.models has no model named {args.model!r}", file=sys.stderr)
        return 2
    model = builder(weights=None)
    example = torch.randn(1, 3, args.resolution, args.resolution)
    start = time.perf_counter()
    sites = asrfx.find_attention(model, example_inputs=(example,))
    elapsed = time.perf_counter() - start
    print(sites)
    absorbable = sum(site.absorbable for site in sites)
    foldable = sum(site.foldable for site in sites)
    print(f"\n{len(sites)} site(s) found in {elapsed:.2f} s; {absorbable} fold into the layers that computed "
          f"x, {foldable - absorbable} into the layers that read the gated map, {len(sites) - foldable} stay "
          "a multiply.\n")

    start = time.perf_counter()
    asr = asrfx.convert(model, example_inputs=(example,))
    elapsed = time.perf_counter() - start
    print(asrfx.report_of(asr))
    count = lambda m: sum(p.numel() for p in m.parameters())
    psi = sum(p.numel() for _, p in psi_parameters(asr))
    asr.eval()
    with torch.no_grad():
        out = asr(torch.randn(2, 3, args.resolution, args.resolution))
    print(f"\nconverted in {elapsed:.2f} s: {count(model):,} parameters -> {count(asr):,} "
          f"({psi:,} in psi); the ASR form runs: output {tuple(out.shape)}\n")

    # (train the ASR form here) ... then deploy:
    start = time.perf_counter()
    deployed = asrfx.fuse(asr)
    elapsed = time.perf_counter() - start
    print(asrfx.report_of(deployed))
    check = torch.randn(2, 3, args.resolution, args.resolution)
    with torch.no_grad():
        want, got = asr(check), deployed(check)
    error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    backbone = asrfx.backbone(model, (example,))  # each attention block replaced by identity
    print(f"\nfused in {elapsed:.2f} s: {count(deployed):,} parameters; plain backbone "
          f"{count(backbone):,}; max relative difference to the ASR form: {error:.1e}\n"
          f"the deployed model is {asrfx.report_of(deployed).verdict(count(deployed), count(backbone))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
