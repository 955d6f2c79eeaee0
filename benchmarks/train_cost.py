"""Training step time: ASR form vs the original attention model vs the plain backbone.

    python benchmarks/train_cost.py [--rounds 15] [--batch 16] [--resolution 128]

For each model: the backbone is the model with every detected attention module
replaced by identity; the ASR form is asrfx.convert(model). One SGD step (forward,
backward, optimizer) of each variant runs in turn, round after round (interleaved, so
machine noise hits all three alike); the table prints medians and ratios to the
backbone. Goal (issue #3): ASR form at most 3% slower than the backbone.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch import nn

import asrfx
from timing import interleaved


def _models():
    import timm
    import torchvision

    yield "seresnet50 (timm)", timm.create_model("seresnet50", pretrained=False)
    yield "mobilenet_v3_large (torchvision)", torchvision.models.mobilenet_v3_large(weights=None)


def _step(model, opt, x, y) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.resolution}x{args.resolution}, {args.rounds} interleaved rounds, median step time")
    print(f"{'model':<34}{'backbone s':>11}{'attention s':>12}{'ASR form s':>11}"
          f"{'attn/bb':>9}{'ASR/bb':>8}  gates in BN")
    for name, model in _models():
        x = torch.randn(args.batch, 3, args.resolution, args.resolution)
        y = torch.randint(0, 1000, (args.batch,))
        example = x[:2]
        variants = {
            "backbone": asrfx.backbone(model, example).train(),
            "attention": copy.deepcopy(model).train(),
            "asr": asrfx.convert(model, example).train(),
        }
        gated = sum(s.gated_norm is not None for s in asrfx.report_of(variants["asr"]).sites)
        total = len(asrfx.report_of(variants["asr"]).sites)
        opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in variants.items()}
        steps = {k: (lambda inputs, k=k: _step(variants[k], opts[k], inputs, y)) for k in variants}
        med = interleaved(steps, x, args.warmup, args.rounds)
        print(f"{name:<34}{med['backbone']:>11.3f}{med['attention']:>12.3f}{med['asr']:>11.3f}"
              f"{med['attention'] / med['backbone']:>9.3f}{med['asr'] / med['backbone']:>8.3f}  {gated}/{total}")


if __name__ == "__main__":
    main()
