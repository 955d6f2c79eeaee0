"""Cost of the passes against model depth: find_attention, convert, fuse (issue #6, item 4).

    python benchmarks/pass_cost.py [--blocks 25 50 100 200 400 800 1200]

A chain of N residual blocks (conv-BN-ReLU-conv-BN + SE + add) with 16 channels on an
8x8 input, so the model's own compute is negligible and the passes dominate. Prints
seconds and milliseconds per block for each N: flat per-block times mean linear growth.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import asrfx
from asrfx.attention import SE


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.se = SE(c, reduction=4)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(self.se(out) + x)


def chain(blocks: int, c: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *[Block(c) for _ in range(blocks)])


def _time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[25, 50, 100, 200, 400, 800, 1200])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    x = torch.randn(1, 3, 8, 8)
    asrfx.fuse(asrfx.convert(chain(2), x).eval())  # warm up imports
    print(f"{'blocks':>7}{'nodes':>8}{'find s':>9}{'convert s':>11}{'fuse s':>9}"
          f"{'find ms/blk':>13}{'convert ms/blk':>16}{'fuse ms/blk':>13}")
    for n in args.blocks:
        model = chain(n).eval()
        t_find, sites = _time(lambda: asrfx.find_attention(model, x), args.repeats)
        t_convert, gm = _time(lambda: asrfx.convert(model, x).eval(), args.repeats)
        t_fuse, fused = _time(lambda: asrfx.fuse(gm), args.repeats)
        assert len(sites) == n and len(asrfx.report_of(fused).folds) == n
        print(f"{n:>7}{len(gm.graph.nodes):>8}{t_find:>9.2f}{t_convert:>11.2f}{t_fuse:>9.2f}"
              f"{1e3 * t_find / n:>13.2f}{1e3 * t_convert / n:>16.2f}{1e3 * t_fuse / n:>13.2f}")


if __name__ == "__main__":
    main()
