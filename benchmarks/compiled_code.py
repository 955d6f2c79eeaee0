"""What inductor makes of the fused model, against the backbone: the generated code, then an A/A/B timing.

    cd benchmarks && python compiled_code.py [--models seresnet50 mobilenet_v3_large] [--rounds 60]

For each model, three graphs are compiled by ``torch.compile`` (inductor, no freezing): the backbone
traced by torch.fx (*backbone (fx)*, the GraphModule the fused model is compared with), the fused model
(``fuse(convert(model).eval())``) and the ASR form through the asrfx backend (``backend="asrfx"``, no
fuse call). The script prints, per graph, what inductor generated (cpp kernels, extern calls, lines)
and whether the generated program is the backbone's, character for character once kernel hash names
are blanked. Then it times, in one interleaved run, two separately compiled copies of the backbone
(an A/A pair: the same program twice, so their ratio is what placement and noise alone produce),
the fused model and the backend route; medians and ratios to the first backbone copy.
"""

from __future__ import annotations

import argparse
import collections
import copy
import difflib
import re
import warnings

import torch
from torch._inductor.utils import run_and_get_code

import asrfx
from compiled_speed import build
from timing import interleaved

MODELS = ("seresnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf")


def generated(fn, x) -> str:
    """Every source file inductor wrote while compiling ``fn``, hash names blanked."""
    torch._dynamo.reset()
    with torch.no_grad():
        _, code = run_and_get_code(fn, x)
    text = "\n".join(code)
    text = re.sub(r"[0-9a-z]{20,}", "#", text)  # kernel and cache hashes
    return re.sub(r"/tmp/\S+|AOT ID: \S+", "#", text)


# lines that only say in which order the graph's inputs come and go (the unpacking of the
# arguments, ``del`` after an input's last use, the benchmark harness's declarations, list and
# call of them), and comments (they name the fx nodes a kernel came from)
_ORDER_ONLY = re.compile(r"\s*(del arg\d+_1|arg\d+_1 = rand_strided\(.*\)|(arg\d+_1, )*arg\d+_1,? = args"
                         r"|fn = lambda: call\(\[.*\]\)|return \[(arg\d+_1, )*arg\d+_1\]|#.*)")


def _kernels_and_calls(code: str) -> str:
    """The program with its inputs renamed in order of first use and the order-only lines left out:
    the backend route passes the data input and the parameters in another order than a GraphModule."""
    text = "\n".join(line for line in code.splitlines() if not _ORDER_ONLY.fullmatch(line))
    names: dict[str, str] = {}
    return re.sub(r"\barg\d+_1\b", lambda m: names.setdefault(m.group(0), f"in{len(names)}"), text)


def _changed_lines(a: str, b: str) -> int:
    return sum(1 for line in difflib.unified_diff(a.splitlines(), b.splitlines(), n=0)
               if line[:1] in "+-" and line[:3] not in ("+++", "---"))


def summary(code: str) -> str:
    kernels = len(set(re.findall(r"cpp_fused_\w+", code)))
    externs = collections.Counter(re.findall(r"extern_kernels\.(\w+)", code))
    return f"{kernels} cpp kernels, externs {dict(sorted(externs.items()))}, {len(code.splitlines())} lines"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["seresnet50", "mobilenet_v3_large"], choices=MODELS)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, eval, batch 1, 224x224, inductor "
          f"without freezing, {args.rounds} interleaved rounds after {args.warmup}, median")
    for name in args.models:
        model = build(name).eval()
        asr = asrfx.convert(model, x).eval()
        fused = asrfx.fuse(asr)
        bbfx = asrfx.trace(asrfx.backbone(model, x).eval()).gm.eval()
        compiled = {"backbone (fx)": torch.compile(copy.deepcopy(bbfx)),
                    "backbone (fx), 2nd copy": torch.compile(copy.deepcopy(bbfx)),
                    "fused": torch.compile(copy.deepcopy(fused)),
                    "asr via backend": torch.compile(copy.deepcopy(asr), backend="asrfx")}
        print(f"\n{name}: generated code")
        codes = {}
        for label in ("backbone (fx)", "fused", "asr via backend"):
            codes[label] = generated(compiled[label], x)
            base = codes["backbone (fx)"]
            if codes[label] == base:
                same = "the backbone's program"
            elif _kernels_and_calls(codes[label]) == _kernels_and_calls(base):
                same = "the backbone's program, its inputs passed and freed in another order"
            else:
                same = f"DIFFERS from the backbone's in {_changed_lines(base, codes[label])} lines"
            print(f"  {label:<24} {summary(codes[label])}; {same}")
        torch._dynamo.reset()
        with torch.no_grad():
            for fn in compiled.values():  # compile again after the reset, outside the timing
                fn(x)
            med = interleaved(compiled, x, args.warmup, args.rounds)
        base = med["backbone (fx)"]
        print(f"{name}: latency")
        for label, t in med.items():
            print(f"  {label:<24} {t * 1e3:8.2f} ms  ({t / base:.3f})")


if __name__ == "__main__":
    main()
