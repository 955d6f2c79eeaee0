"""Training cost of the ASR form: step time (eager and compiled) and peak memory, against the backbone.

    python benchmarks/train_cost.py [--models seresnet50 ...] [--rounds 15] [--batch 16] [--resolution 128]

For each model, four variants: *backbone* (every detected attention module replaced by identity,
``asrfx.backbone``), *attention* (the original model, for reference), *ASR form*
(``asrfx.convert(model)``: gates applied inside the layers next to them while training, see
``asrfx/passes/gate_in_layers.py``) and *ASR, no fast path* (``gate_in_norm=False,
gate_in_consumers=False``: every gate a feature-map multiply). Each variant trains in two runners,
eager and ``torch.compile`` (inductor; forward and backward compiled, optimizer eager), each with
its own copy of the weights and its own SGD optimizer. All runners of a model take one SGD step per
round, in alternating order, in one interleaved run (benchmarks/timing.py); medians, and ratios
to the backbone in the same mode.

Memory: one step of each runner under ``torch.profiler`` (``profile_memory``): the peak, over the
step, of the bytes the CPU allocator has handed out since the step began (activations kept for
backward, gradients, temporaries; the parameters and optimizer state held before the step are not
in it, gradients are set to None before it). Deterministic for a given graph, so one step is enough.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import asrfx
from timing import interleaved

MODELS = ("seresnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf")
VARIANTS = ("backbone", "attention", "asr", "asr_plain")
LABELS = {"backbone": "backbone", "attention": "attention", "asr": "ASR form", "asr_plain": "ASR, no fast path"}


def build(name: str) -> nn.Module:
    import timm
    import torchvision

    if name == "seresnet50":
        return timm.create_model("seresnet50", pretrained=False)
    return getattr(torchvision.models, name)(weights=None)


def variants(model: nn.Module, example: torch.Tensor) -> dict[str, nn.Module]:
    return {
        "backbone": asrfx.backbone(model, example).train(),
        "attention": copy.deepcopy(model).train(),
        "asr": asrfx.convert(model, example).train(),
        "asr_plain": asrfx.convert(model, example, gate_in_norm=False, gate_in_consumers=False).train(),
    }


def make_step(module: nn.Module, y: torch.Tensor, compiled: bool):
    run = torch.compile(module) if compiled else module
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def step(x):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()

    def zero():
        opt.zero_grad(set_to_none=True)

    return step, zero


def step_peak_bytes(step, zero, x) -> int:
    """Peak bytes allocated during one step, above what was held when it began."""
    zero()  # gradients freed before profiling: their release would not be seen
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def where_gates_go(asr: nn.Module) -> str:
    sites = asrfx.report_of(asr).sites
    norm = sum(s.gated_norm is not None for s in sites)
    producers = sum(s.gated_producers is not None and s.gated_norm is None for s in sites)
    consumers = sum(s.gated_consumers is not None for s in sites)
    left = len(sites) - norm - producers - consumers
    return (f"{len(sites)} gates: {norm} inside BatchNorms, {producers} in producer weights, {consumers} in "
            f"consumer weights, {left} feature-map multiplies")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true", help="eager runners only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)
    modes = ("eager",) if args.no_compile else ("eager", "compiled")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, train, batch {args.batch}, "
          f"{args.resolution}x{args.resolution}, SGD step (compiled: forward and backward by inductor), "
          f"{args.rounds} interleaved rounds after {args.warmup}, median; ratios to the backbone in the same mode",
          flush=True)
    for name in args.models:
        model = build(name)
        x = torch.randn(args.batch, 3, args.resolution, args.resolution)
        y = torch.randint(0, 1000, (args.batch,))
        modules = variants(model, x[:2])
        runners, peaks, first = {}, {}, {}
        for label, module in modules.items():
            for mode in modes:
                step, zero = make_step(copy.deepcopy(module), y, mode == "compiled")
                start = time.perf_counter()
                step(x)  # compiles the compiled runner
                first[(label, mode)] = time.perf_counter() - start
                peaks[(label, mode)] = step_peak_bytes(step, zero, x)
                runners[(label, mode)] = step
        med = interleaved(runners, x, args.warmup, args.rounds)
        print(f"\n{name} ({where_gates_go(modules['asr'])}); first compiled step up to "
              f"{max(first[(v, 'compiled')] for v in VARIANTS) if 'compiled' in modes else 0:.0f} s")
        print(f"  {'':<20}" + "".join(f"{m + ' step s':>22}{m + ' peak MiB':>22}" for m in modes))
        for label in VARIANTS:
            cells = []
            for mode in modes:
                t, ratio = med[(label, mode)], med[(label, mode)] / med[("backbone", mode)]
                mib, mratio = peaks[(label, mode)] / 2**20, peaks[(label, mode)] / peaks[("backbone", mode)]
                cells.append(f"{t:>13.3f} ({ratio:.3f}){mib:>13.1f} ({mratio:.3f})")
            print(f"  {LABELS[label]:<20}" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
