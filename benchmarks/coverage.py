"""Coverage harness: asrfx on real third-party models the tests never use (issue #11).

For every model of the table in benchmarks/coverage_models.py (pytorchcv, MONAI,
efficientnet_pytorch, pretrainedmodels, HF transformers, segmentation_models_pytorch,
geffnet, speechbrain; random weights, nothing downloaded), one worker process measures:

1. capture: ``asrfx.find_attention`` called as a new user would (``example_kwargs`` too
   when the API has it); if that raises, a library flag, then an ``x -> model(x)`` wrapper
   that returns the first tensor of the output (the *workaround*), so detection can still
   be scored;
2. detection against ground truth (attention-module calls counted with forward hooks):
   found, missed (each with a diagnosis from asrfx's own layout/dataflow analysis when its
   internals are importable), false positives, rejections, warnings;
3. convert + one SGD training step: every psi gets a nonzero gradient;
4. fuse in float64 with randomized BatchNorm statistics/affines and psi, eval mode: max
   relative error against the converted model (target 1e-10), parameter count against the
   model without its attention modules, gates folded vs kept (with reasons);
5. a failure class for everything that went wrong.

Usage (asrfx is imported from the tree on PYTHONPATH, never installed in the venv)::

    PYTHONPATH=/work/main /work/venv-cov/bin/python benchmarks/coverage.py [--only SUBSTR] [--json out.json]
        [--compare docs/coverage-baseline.json]      # rows that changed since the baseline

Install (the venv for the third-party libraries; see benchmarks/requirements-coverage.txt)::

    python -m venv /work/venv-cov
    /work/venv-cov/bin/pip install torch==2.14.1 torchvision==0.29.1 timm networkx pytest hypothesis
    /work/venv-cov/bin/pip install pytorchcv monai efficientnet_pytorch pretrainedmodels transformers \
        segmentation_models_pytorch geffnet hyperpyyaml joblib sentencepiece scipy cffi six
    /work/venv-cov/bin/pip install --no-deps speechbrain torchaudio soundfile  # torchaudio would pull another torch
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coverage_models import SPECS, Spec, example_input  # noqa: E402

STEP_TIMEOUT = 300  # seconds per step inside a worker
MODEL_TIMEOUT = 1200  # seconds per worker process
EXACT = 1e-10  # float64 relative error that counts as exact


# -- small helpers --------------------------------------------------------------------------


class StepTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def handler(signum, frame):
        raise StepTimeout(f"step took more than {seconds}s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def error_text(exc: BaseException) -> str:
    """Type and message, one line, plus the innermost frame of the library that raised."""
    msg = " ".join(str(exc).split())[:400]
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    for f in reversed(frames):
        if "site-packages" in f.filename or "/asrfx/" in f.filename:
            where = f" [{os.path.basename(f.filename)}:{f.lineno} {f.name}]"
            break
    return f"{type(exc).__name__}: {msg}{where}"


def inside(path: str, outer: str) -> bool:
    return outer == "" or path == outer or path.startswith(outer + ".")


def first_tensor(out: Any) -> torch.Tensor:
    """The tensor a user would train on: logits, else the first tensor of the output.

    Also used while torch.fx traces the wrapper, where tensors are Proxies.
    """
    tensor = (torch.Tensor, torch.fx.Proxy)
    if isinstance(out, tensor):
        return out
    if isinstance(out, dict):  # dict and HF ModelOutput (an OrderedDict)
        for key in ("logits", "last_hidden_state"):
            if isinstance(out.get(key), tensor):
                return out[key]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            with contextlib.suppress(TypeError):
                return first_tensor(item)
    raise TypeError(f"no tensor in output of type {type(out).__name__}")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class FirstTensor(nn.Module):
    """The hand-written workaround: x -> the first tensor of model(x) (or model(kw=x))."""

    def __init__(self, model: nn.Module, kwarg: str | None):
        super().__init__()
        self.model = model
        self.kwarg = kwarg

    def forward(self, x):
        out = self.model(**{self.kwarg: x}) if self.kwarg else self.model(x)
        return first_tensor(out)


# -- ground truth -----------------------------------------------------------------------------


@dataclass
class Truth:
    paths: dict[str, int]  # attention block path -> calls in one forward
    owned_params: int  # parameters of the attention blocks (what the backbone does not have)
    live_params: int  # parameters of the modules the forward calls (dead branches excluded)
    output: str  # type of the natural output


def ground_truth(model: nn.Module, spec: Spec, x: torch.Tensor) -> Truth:
    gt = spec.gt
    units: dict[str, nn.Module] = {}  # block path -> the module whose calls are counted
    owned: dict[str, list[nn.Module]] = {}
    for path, mod in model.named_modules():
        if any(inside(path, u) for u in units):
            continue  # outermost attention module only
        cls = type(mod).__name__
        if cls in gt.classes:
            units[path] = mod
            names = gt.owned.get(cls)
            owned[path] = [getattr(mod, n) for n in names] if names else [mod]
        elif gt.marker and hasattr(mod, gt.marker) and isinstance(getattr(mod, gt.marker), nn.Module):
            units[path] = getattr(mod, gt.marker)
            owned[path] = [getattr(mod, n) for n in gt.owned.get("*", (gt.marker,)) if hasattr(mod, n)]
    calls: dict[str, int] = defaultdict(int)
    hooks = [m.register_forward_hook(lambda *_, p=p: calls.__setitem__(p, calls[p] + 1)) for p, m in units.items()]
    called: dict[int, nn.Module] = {}  # every module the forward enters: its own parameters are live
    hooks += [m.register_forward_pre_hook(lambda mod, _: called.__setitem__(id(mod), mod)) for m in model.modules()]
    try:
        with torch.no_grad():
            out = natural_call(model, spec, x)
    finally:
        for h in hooks:
            h.remove()
    seen = set()
    owned_params = 0
    for path in calls:
        for m in owned[path]:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    owned_params += p.numel()
    live = {id(p): p.numel() for m in called.values() for p in m.parameters(recurse=False)}
    return Truth(dict(calls), owned_params, sum(live.values()), type(out).__name__)


def natural_call(model: nn.Module, spec: Spec, x: torch.Tensor):
    return model(**{spec.kwarg: x}) if spec.kwarg else model(x)


# -- capture routes ------------------------------------------------------------------------------


@dataclass
class Route:
    label: str  # "natural", "flag", "concrete", "wrapper", "flag+concrete", "flag+wrapper"
    subject: nn.Module  # what asrfx is given
    prefix: str  # module-path prefix of the model inside the subject
    by_keyword: bool  # inputs given as example_kwargs
    concrete: dict | None = None  # concrete_args: the forward's optional arguments at their defaults

    def api_inputs(self, spec: Spec, x) -> dict:
        extra = {"concrete_args": self.concrete} if self.concrete else {}
        if self.by_keyword:
            return {"example_inputs": (), "example_kwargs": {spec.kwarg: x}, **extra}
        return {"example_inputs": (x,), **extra}

    def call(self, gm, spec: Spec, x):
        return gm(**{spec.kwarg: x}) if self.by_keyword else gm(x)


def has_kwargs_api() -> bool:
    import asrfx
    return "example_kwargs" in inspect.signature(asrfx.find_attention).parameters


def optional_arguments(model: nn.Module) -> dict:
    """The forward's arguments after the first that have defaults: what a user pins with concrete_args."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params
            if p.default is not inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def make_route(label: str, model: nn.Module, spec: Spec) -> Route:
    """Build the subject of one route from ``model`` (flags go on a copy)."""
    if "flag" in label:
        model = copy.deepcopy(model)
        spec.flags(model)
    if "wrapper" in label:
        return Route(label, FirstTensor(model, spec.kwarg), "model.", False)
    concrete = optional_arguments(model) if "concrete" in label else None
    return Route(label, model, "", bool(spec.kwarg) and has_kwargs_api(), concrete)


def route_labels(spec: Spec, model: nn.Module) -> list[str]:
    """Natural first, then the workarounds in the order a user would try them."""
    flags = ["", "flag+"] if spec.flags else [""]
    labels = ["natural"] + (["flag"] if spec.flags else [])
    if optional_arguments(model):
        labels += [f + "concrete" for f in flags]
    return labels + [f + "wrapper" for f in flags]


# -- measuring one model ----------------------------------------------------------------------------


class Result(dict):
    """One model's measurements; ``step`` runs one stage with a time limit and records its failure."""

    def step(self, name: str, fn: Callable[[], Any]):
        t0 = time.perf_counter()
        try:
            with time_limit(STEP_TIMEOUT):
                return fn()
        except Exception as exc:  # noqa: BLE001 - every failure is a data point
            self["errors"][name] = error_text(exc)
            return None
        finally:
            self["timings"][name] = round(time.perf_counter() - t0, 2)


def measure(spec: Spec) -> dict:
    r = Result(name=spec.name, library=spec.library, negative=spec.negative, note=spec.note,
               unfoldable=spec.unfoldable, errors={}, timings={})
    torch.manual_seed(0)
    model = r.step("build", spec.build)
    if model is None:
        return r
    model.eval()
    x = example_input(spec)
    truth = r.step("ground_truth", lambda: ground_truth(model, spec, x))
    if truth is None:
        return r
    r.update(params=n_params(model), gt=sorted(truth.paths), gt_calls=sum(truth.paths.values()), output=truth.output)
    captured = capture(r, model, spec, x, truth)
    if captured is None:
        return r
    table, route = captured
    score_detection(r, table, route, truth)
    if spec.negative or not len(table):
        return r
    r["trained"] = bool(r.step("convert+train", lambda: train_check(r, model, route, spec, x, truth)))
    r.step("fuse", lambda: fuse_check(r, model, route, spec, x, truth))
    return r


def capture(r: Result, model: nn.Module, spec: Spec, x, truth: Truth):
    """find_attention by the natural call, then by each workaround; the (table, route) that found most."""
    import asrfx
    table, route, found = None, None, set()
    for label in route_labels(spec, model):
        cand = make_route(label, model, spec)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = r.step(f"find[{label}]", lambda: asrfx.find_attention(cand.subject, **cand.api_inputs(spec, x)))
        if got is None:
            continue
        got_found, _ = score(got, {cand.prefix + p for p in truth.paths})
        r.setdefault("route_found", {})[label] = f"{len(got_found)} found, {len(got.leaves)} leaves"
        if table is not None and len(got_found) <= len(found):
            continue
        if table is not None:  # natural capture worked but silently lost sites in opaque leaves
            r["natural_found"] = len(found)
        table, route, found = got, cand, got_found
        r["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught
                                if "asrfx" in (w.filename or "") or "asrfx" in w.category.__name__.lower()})
        if len(found) == len(truth.paths) or not table.leaves or "concrete" in label or "wrapper" in label:
            break  # a leaf-free natural capture is what the user gets; else try pinning optional args
    if table is None:
        return None
    r["route"] = route.label
    r["workaround"] = route.label != "natural"
    return table, route


def score_detection(r: Result, table, route: Route, truth: Truth) -> None:
    gt_paths = {route.prefix + p: p for p in truth.paths}
    found, fps = score(table, set(gt_paths))
    r["sites"] = len(table)
    r["kinds"] = sorted({str(s.kind) for s in table})
    r["found"] = len(found)
    r["missed"] = sorted(gt_paths[g] for g in gt_paths if g not in found)
    r["false_positives"] = fps
    r["rejections"] = [f"{j.module_path}: {j.reason}" for j in table.rejections]
    r["leaves"] = [f"{leaf.path} ({leaf.module_type}): {leaf.reason}" for leaf in table.leaves]
    if r["missed"]:
        r["miss_diagnosis"] = r.step("diagnose", lambda: diagnose(table, [route.prefix + p for p in r["missed"]]))


def psi_parameters(gm: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in gm.named_parameters() if n.rsplit(".", 1)[-1].startswith("psi")]


def train_check(r: Result, model: nn.Module, route: Route, spec: Spec, x, truth: Truth) -> bool:
    """convert, then one SGD step in train mode: does every psi get a gradient?"""
    import asrfx
    gm = asrfx.convert(copy.deepcopy(route.subject), **route.api_inputs(spec, x))
    psi = psi_parameters(gm)
    r["psi"] = len(psi)
    r["convert_skipped"] = [f"{p}: {why}" for p, why in getattr(asrfx.report_of(gm), "skipped", [])]
    gm.train()
    r["psi_no_grad"] = without_gradient(gm, psi, lambda: route.call(gm, spec, x))
    torch.optim.SGD(gm.parameters(), lr=1e-3).step()
    if r["psi_no_grad"]:  # does the same loss reach the attention in the original model?
        ref = copy.deepcopy(model).train()
        out = first_tensor(natural_call(ref, spec, x))
        (out * torch.randn_like(out)).sum().backward()
        r["reference_reaches"] = any(p.grad is not None and bool(p.grad.abs().max() > 0)
                                     for path in truth.paths for p in ref.get_submodule(path).parameters())
    return True


def fuse_check(r: Result, model: nn.Module, route: Route, spec: Spec, x, truth: Truth) -> None:
    """float64, random BN statistics and psi, eval: fuse vs the converted model, sizes, folds."""
    import asrfx
    m64 = copy.deepcopy(model).double()
    randomize_norms(m64)
    sub = make_route(route.label, m64, spec)
    x64 = x.double()
    gm = asrfx.convert(sub.subject, **sub.api_inputs(spec, x64))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in psi_parameters(gm):
            p.copy_(0.05 + 0.45 * torch.rand(p.shape, generator=g, dtype=p.dtype))
    gm.eval()
    with torch.no_grad():
        ref = first_tensor(sub.call(gm, spec, x64))
        fused = asrfx.fuse(gm)
        out = first_tensor(sub.call(fused, spec, x64))
    r["fuse_rel_err"] = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
    r["fused_params"] = n_params(fused)
    r["backbone_params"] = truth.live_params - truth.owned_params
    folds = list(getattr(asrfx.report_of(fused), "folds", []))
    r["gates"] = len(folds)
    r["kept"] = [f"{f.site}: {f.reason}" for f in folds if f.where == "kept"]
    r["psi_left"] = [n for n, _ in psi_parameters(fused)]


def without_gradient(gm: nn.Module, psi: list, run: Callable[[], Any], tries: int = 3) -> list[str]:
    """psi names that get no gradient from a random-projection loss.

    A psi whose gradient is exactly zero is retried with psi drawn from N(0, 1): with a
    1-channel bottleneck (CIFAR SE-ResNets, reduction 16 of 16 channels) the default 0.1
    can leave the excitation's ReLU dead, which says nothing about the graph.
    """
    missing = [n for n, _ in psi]
    g = torch.Generator().manual_seed(3)
    for attempt in range(tries):
        gm.zero_grad(set_to_none=True)
        out = first_tensor(run())
        (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum().backward()
        grads = {n: p.grad for n, p in psi}
        missing = [n for n in missing if grads[n] is None or not bool(grads[n].abs().max() > 0)]
        if not missing or any(grads[n] is None for n in missing):
            break
        with torch.no_grad():
            for n, p in psi:
                if n in missing:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return missing


def score(table, gt_paths: set[str]) -> tuple[set[str], list[str]]:
    """GT blocks matched by a site (its module path inside the block), and the unmatched sites."""
    found: set[str] = set()
    fps = []
    for s in table:
        hits = [g for g in gt_paths if inside(s.module_path, g)]
        if not hits:
            hits = [g for g in gt_paths if any(inside(p, g) for p in s.module_paths)]
        if hits:
            found.update(hits)
        else:
            fps.append(f"{s.module_path} [{s.kind}]")
    return found, fps


def randomize_norms(model: nn.Module, seed: int = 2) -> None:
    """Random running statistics and affines (never the defaults, which hide folding bugs)."""
    g = torch.Generator().manual_seed(seed)

    def rand(t, lo, hi):
        return lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=t.dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "running_mean", None), torch.Tensor):
                m.running_mean.copy_(rand(m.running_mean, -0.3, 0.3))
            if isinstance(getattr(m, "running_var", None), torch.Tensor):
                m.running_var.copy_(rand(m.running_var, 0.5, 2.0))
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(rand(m.weight, 0.5, 1.5))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(rand(m.bias, -0.3, 0.3))


# -- diagnosis of a missed site (uses asrfx internals when they are importable) --------------------


def _internals():
    """asrfx's layout, dataflow and op vocabulary, wherever the tree keeps them (or None)."""
    import importlib
    found = {}
    for name, places in {
        "infer_layouts": ("asrfx.layout", "asrfx.graph.layout", "asrfx.passes.layout"),
        "detect": ("asrfx.detect", "asrfx.passes.detect"),
        "module_path_of": ("asrfx.detect", "asrfx.passes.detect", "asrfx.graph.paths"),
        "op_of": ("asrfx.ops", "asrfx.graph.ops"),
    }.items():
        for place in places:
            with contextlib.suppress(ImportError, AttributeError):
                found[name] = getattr(importlib.import_module(place), name)
                break
    return found if len(found) == 4 else None


def _layout_str(lay) -> str:
    if isinstance(lay, tuple) and all(isinstance(t, str) for t in lay):
        return "[" + ",".join(lay) + "]"
    return str(lay)


def _unknown(lay) -> bool:
    return isinstance(lay, tuple) and any(isinstance(t, str) and "?" in t for t in lay)


def _shape(node) -> tuple | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if hasattr(tm, "shape") else None


def _describe(node, api) -> str:
    modules = dict(node.graph.owning_module.named_modules())
    op = api["op_of"](node, modules).name
    path = api["module_path_of"](node) or "(top level)"
    target = type(modules[node.target]).__name__ if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))
    return f"'{node.name}' ({op}: {target}, in {path}, shape {_shape(node)})"


def first_layout_loss(gm, layouts, api, leaves=()) -> str | None:
    """The first input-dependent node (graph order) whose layout is unknown while its inputs' are known."""
    data: set = set()
    leaf_paths = {lf.path: lf for lf in leaves}
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in data and isinstance(layouts.get(a), tuple) for a in n.all_input_nodes):
            data.add(n)  # computed from input tensors (not only from their sizes)
        if n not in data or n.op in ("placeholder", "output") or not _unknown(layouts.get(n)):
            continue
        ins = [a for a in n.all_input_nodes if a in data and isinstance(layouts.get(a), tuple)]
        if all(not _unknown(layouts.get(a)) for a in ins):
            src = ", ".join(f"{a.name}{_layout_str(layouts.get(a))}" for a in ins) or "no tensor input"
            leaf = leaf_paths.get(str(n.target)) if n.op == "call_module" else None
            tag = f" [opaque leaf: {leaf.reason[:120]}]" if leaf else ""
            return f"{_describe(n, api)}{tag} -> {_layout_str(layouts.get(n))} from {src}"
    return None


def diagnose(table, missed: list[str]) -> dict[str, str]:
    """Per missed attention block: why asrfx did not report it, in its own terms."""
    api = _internals()
    out: dict[str, str] = {}
    leaves = list(getattr(table, "leaves", ()))
    for g in missed:
        leaf = next((lf for lf in leaves if inside(g, lf.path)), None)
        if leaf is not None:
            out[g] = f"inside opaque leaf '{leaf.path}' ({leaf.module_type}): {leaf.reason}"
    gm = getattr(table, "graph_module", None)
    if api is None or gm is None:
        return {g: out.get(g, "silent miss (no asrfx internals to diagnose)") for g in missed}
    layouts = api["infer_layouts"](gm)
    flows = api["detect"](gm, layouts).flows
    modules = dict(gm.named_modules())
    loss = first_layout_loss(gm, layouts, api, leaves)
    for g in missed:
        if g in out:
            continue
        rej = [j for j in table.rejections if inside(j.module_path, g)]
        if rej:
            out[g] = f"rejected: {rej[0].reason}"
            continue
        nodes = [n for n in gm.graph.nodes if inside(api["module_path_of"](n) or "", g)]
        if not nodes:
            out[g] = "no node of this block in the traced graph"
            continue
        pools = [n for n in nodes if api["op_of"](n, modules).name in
                 {"mean", "sum", "amax", "max", "std", "var", "adaptive_avg_pool", "adaptive_max_pool", "avg_pool"}]
        combines = [n for n in nodes if api["op_of"](n, modules).name == "mul"]
        parts = []
        for p in pools[:1]:
            src = p.args[0] if p.args else None
            lay = layouts.get(src)
            fl = flows.get(p)
            parts.append(f"pool {_describe(p, api)} reads {getattr(src, 'name', src)}{_layout_str(lay)}; "
                         f"counted as global pool: {bool(fl and fl.pools)}")
            if _unknown(lay) and loss:
                parts.append(f"layout first lost at {loss}")
        for c in combines[-1:]:
            ops = [a for a in c.args if hasattr(a, "op")]
            desc = []
            for a in ops:
                fl = flows.get(a)
                desc.append(f"{a.name}{_layout_str(layouts.get(a))} spatial={getattr(fl, 'spatial', None)} "
                            f"pooled={getattr(fl, 'pooled', None)} learned={getattr(fl, 'learned', None)}")
            parts.append(f"combine '{c.name}': " + "; ".join(desc))
        if not pools and not combines:
            parts.append(f"block nodes: {', '.join(n.name for n in nodes[:8])}")
        out[g] = " | ".join(parts)
    return out


# -- failure classes ----------------------------------------------------------------------------------

# (regex over the text of an error/diagnosis/kept reason, class name); first match wins.
CLASSES: list[tuple[str, str]] = [
    (r"inside opaque leaf", "detect: the attention module itself became an opaque leaf (silent)"),
    (r"layout first lost at '[^']*' \(module: (\w+).*?\[opaque leaf", "detect: layout lost at an opaque leaf ({0})"),
    (r"layout first lost at '[^']*' \((\w+): (\w+)", "detect: layout lost at {0}: {1}"),
    (r"Proxy object cannot be iterated", "capture: Proxy iterated (HF ModelOutput / **kwargs forward)"),
    (r"does not support item assignment", "capture: Proxy item assignment (HF kwargs decorator)"),
    (r"check_input_shape|h % output_stride", "capture: input-size check in forward (smp)"),
    (r"cannot be used as inputs to control flow.*return_dict", "capture: optional flag argument traced as a Proxy (HF return_dict)"),
    (r"cannot be used as inputs to control flow", "capture: data-dependent control flow in the model's forward"),
    (r"and it contains attention at", "capture: untraceable block containing attention (refused)"),
    (r"has no attribute `[^`]*@\d+`", "capture: crash on a tracer module_stack key 'path@N'"),
    (r"counted as global pool: False", "detect: pool not recognised as global"),
    (r"rejected: ", "detect: rejected"),
    (r"no node of this block", "detect: block not in the graph"),
    (r"psi parameters behind|psi left", "fuse: psi left behind"),
    (r"to\(\) received an invalid combination", "fuse: constant evaluator crash on .to()"),
    (r"shape '\[2, \d+(, 1)*\]' is invalid for input of size", "convert: batch size kept in the psi branch (view(b, c) from x.shape[:2])"),
    (r"StepTimeout", "timeout"),
]


def classify(text: str) -> str:
    for pattern, name in CLASSES:
        m = re.search(pattern, text)
        if m:
            return name.format(*m.groups())
    return "other: " + re.sub(r"'[^']*'|\d+", "_", text)[:90]


def kept_class(reason: str) -> str:
    return "fuse kept: " + re.sub(r"'[^']*'|\(\d[\d, ]*\)|\d+", "_", reason)[:100]


def failures(r: dict) -> list[tuple[str, int, str]]:
    """(class, sites it cost, detail) for everything that failed in one model's result."""
    out = []
    n_gt = len(r.get("gt", []))
    for name, err in r["errors"].items():
        if name.startswith("find[") and name != "find[natural]":
            continue  # the natural call is the one a user meets; workaround errors are in the JSON
        if name == "fuse" and classify(err) == classify(r["errors"].get("convert+train", "")):
            continue  # the same failure as convert's, met again by fuse's own convert
        lost = n_gt if (name.startswith("find") and "route" not in r) or name in ("build", "ground_truth", "worker") else 0
        out.append((f"{name.split('[')[0]}: {classify(err)}", lost, err))
    for path, why in (r.get("miss_diagnosis") or {}).items():
        out.append((classify(why), 1, f"{path}: {why}"))
    if r.get("missed") and not r.get("miss_diagnosis"):
        out.extend(("detect: silent miss", 1, p) for p in r["missed"])
    for fp in r.get("false_positives", []):
        out.append(("detect: false positive", 0, fp))
    for k in r.get("kept", []):
        out.append((kept_class(k.split(": ", 1)[-1]), 0, k))
    if r.get("psi_no_grad") and r.get("reference_reaches", True):
        out.append(("train: psi without gradient", 0, ", ".join(r["psi_no_grad"][:3])))
    if r.get("psi_left"):
        out.append(("fuse: psi left behind", 0, ", ".join(r["psi_left"][:3])))
    if "fuse_rel_err" in r and not r["fuse_rel_err"] <= EXACT:
        out.append(("fuse: not exact", 0, f"rel err {r['fuse_rel_err']:.2e}"))
    if "fused_params" in r and r["fused_params"] != r["backbone_params"]:
        out.append(("fuse: parameter count differs from the backbone", 0,
                    f"{r['fused_params'] - r['backbone_params']:+d} params"))
    return out


# -- running and reporting ------------------------------------------------------------------------------


def run_worker(name: str, out_path: str) -> None:
    torch.set_num_threads(int(os.environ.get("COVERAGE_THREADS", "1")))
    warnings.filterwarnings("ignore", category=FutureWarning)
    spec = next(s for s in SPECS if s.name == name)
    result = measure(spec)
    with open(out_path, "w") as f:
        json.dump(result, f)


def run_one(spec: Spec) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        path = tmp.name
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec.name, "--out", path],
                              capture_output=True, text=True, timeout=MODEL_TIMEOUT)
        with open(path) as f:
            result = json.load(f)
    except subprocess.TimeoutExpired:
        result = {"name": spec.name, "library": spec.library, "negative": spec.negative,
                  "errors": {"worker": f"StepTimeout: worker ran past {MODEL_TIMEOUT}s"}}
    except (OSError, ValueError):
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        result = {"name": spec.name, "library": spec.library, "negative": spec.negative,
                  "errors": {"worker": f"worker crashed (exit {proc.returncode}): {' '.join(tail)[:400]}"}}
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def row(r: dict) -> str:
    gt = len(r.get("gt", []))
    found = r.get("found", "-")
    fp = len(r.get("false_positives", [])) if "sites" in r else "-"
    route = r.get("route", "FAIL")
    err = r.get("fuse_rel_err")
    exact = "-" if err is None else ("exact" if err <= EXACT else f"{err:.0e}")
    params = "-"
    if "fused_params" in r:
        d = r["fused_params"] - r["backbone_params"]
        params = "=" if d == 0 else f"{d:+d}"
    gates = r.get("gates")
    folded = "-" if gates is None else f"{gates - len(r['kept'])}/{gates}"
    train = "-" if "trained" not in r else ("ok" if r["trained"] and not r.get("psi_no_grad") else
                                           "n/a" if r["trained"] and not r.get("reference_reaches", True) else "FAIL")
    return (f"{r['name'][:44]:44} {gt:>4} {found!s:>5} {fp!s:>3} {len(r.get('rejections', [])):>4} "
            f"{route:>12} {train:>5} {exact:>7} {params:>8} {folded:>7} {r.get('seconds', 0):>6.0f}s")


HEADER = (f"{'model':44} {'gt':>4} {'found':>5} {'fp':>3} {'rej':>4} {'route':>12} {'train':>5} "
          f"{'fuse':>7} {'params':>8} {'folded':>7} {'time':>7}")


def summary(results: list[dict]) -> str:
    att = [r for r in results if not r["negative"]]
    neg = [r for r in results if r["negative"]]
    gt = sum(len(r.get("gt", [])) for r in att)
    found = sum(r.get("found", 0) for r in att)
    natural = sum(r.get("natural_found", r.get("found", 0) if r.get("route") == "natural" else 0) for r in att)
    fps = sum(len(r.get("false_positives", [])) for r in results)
    zero = [r["name"] for r in att if r.get("found", 0) == 0]
    exact = [r for r in att if r.get("fuse_rel_err") is not None and r["fuse_rel_err"] <= EXACT
             and r.get("fused_params") == r.get("backbone_params")]
    gates = sum(r.get("gates", 0) for r in att)
    kept = sum(len(r.get("kept", [])) for r in att)
    unfoldable = {s.name for s in SPECS if s.unfoldable}  # also for results of older runs
    foldable = [r for r in att if not r.get("unfoldable", r["name"] in unfoldable)]
    f_gates = sum(r.get("gates", 0) for r in foldable)
    f_kept = sum(len(r.get("kept", [])) for r in foldable)
    work = [r["name"] for r in results if r.get("workaround")]
    failed = [r["name"] for r in results if "route" not in r]
    trained = [r for r in att if r.get("trained") and (not r.get("psi_no_grad") or not r.get("reference_reaches", True))]
    lines = [
        f"models: {len(att)} with attention ({gt} attention blocks by ground truth), {len(neg)} negatives",
        f"recall: {found}/{gt} = {100 * found / max(gt, 1):.1f}%   (goal >= 98%)",
        f"recall as a new user gets it (natural call, no workaround): {natural}/{gt} = {100 * natural / max(gt, 1):.1f}%",
        f"false positives: {fps}   (goal 0)",
        f"attention models with zero sites found: {len(zero)}" + (f"  ({', '.join(zero)})" if zero else ""),
        f"convert + train step with every psi reached: {len(trained)}/{len(att)}",
        f"fuse exact (float64 <= {EXACT:g}) with the backbone's parameter count: {len(exact)}/{len(att)} = "
        f"{100 * len(exact) / max(len(att), 1):.1f}%   (goal >= 95%)",
        f"gates folded: {gates - kept}/{gates} = {100 * (gates - kept) / max(gates, 1):.1f}%   (goal >= 90%); "
        f"without the models whose gates cannot fold exactly (scSE, BAM): {f_gates - f_kept}/{f_gates} = "
        f"{100 * (f_gates - f_kept) / max(f_gates, 1):.1f}%",
        f"needed a workaround to capture: {len(work)}" + (f"  ({', '.join(work)})" if work else ""),
        f"could not be captured at all: {len(failed)}" + (f"  ({', '.join(failed)})" if failed else ""),
    ]
    return "\n".join(lines)


def failure_table(results: list[dict]) -> str:
    by: dict[str, dict] = defaultdict(lambda: {"models": [], "sites": 0, "count": 0, "example": ""})
    for r in results:
        for cls, cost, detail in failures(r):
            e = by[cls]
            e["count"] += 1
            e["sites"] += cost
            if r["name"] not in e["models"]:
                e["models"].append(r["name"])
            e["example"] = e["example"] or f"{r['name']}: {detail}"
    lines = ["failure classes (sites lost, models, occurrences):"]
    for cls, e in sorted(by.items(), key=lambda kv: (-kv[1]["sites"], -len(kv[1]["models"]), kv[0])):
        lines.append(f"  {cls}\n      sites {e['sites']}, models {len(e['models'])}, occurrences {e['count']}: "
                     f"{', '.join(e['models'][:6])}{' ...' if len(e['models']) > 6 else ''}\n"
                     f"      e.g. {e['example'][:400]}")
    return "\n".join(lines)


def markdown(results: list[dict]) -> str:
    """The per-model table in Markdown (for docs/coverage.md)."""
    lines = ["| model | GT | found | FP | rej | route | train | fuse (f64) | params vs backbone | folded |",
             "|---|---:|---:|---:|---:|---|---|---|---|---:|"]
    for r in results:
        cells = row(r).split()
        lines.append(f"| {r['name']} | " + " | ".join(cells[1:-1]) + " |")
    return "\n".join(lines)


def compare(results: list[dict], base_path: str) -> str:
    """Rows that changed against an earlier --json run (e.g. docs/coverage-baseline.json)."""
    with open(base_path) as f:
        base = {r["name"]: r for r in json.load(f)["results"]}
    lines = [f"changed against {base_path}:", f"  {'':9} {HEADER}"]
    for r in results:
        old = base.get(r["name"])
        if old is None:
            lines.append(f"  {'new':9} {row(r)}")
        elif row(old).split()[:-1] != row(r).split()[:-1]:  # everything but the time
            lines += [f"  {'before':9} {row(old)}", f"  {'after':9} {row(r)}"]
    return "\n".join(lines) if len(lines) > 2 else f"nothing changed against {base_path}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", help="run models whose name contains this (repeatable)")
    ap.add_argument("--json", help="write every result to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    ap.add_argument("--from-json", help="print the report of an earlier --json run instead of running")
    ap.add_argument("--markdown", action="store_true", help="print the per-model table as Markdown")
    ap.add_argument("--compare", help="also list the models whose row changed against this earlier --json run")
    args = ap.parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.out)
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)["results"]
        results = [r for r in results if not args.only or any(o in r["name"] for o in args.only)]
        table = markdown(results) if args.markdown else "\n".join([HEADER] + [row(r) for r in results])
        print(f"{table}\n\n{summary(results)}\n\n{failure_table(results)}")
        if args.compare:
            print("\n" + compare(results, args.compare))
        return 0
    specs = [s for s in SPECS if not args.only or any(o in s.name for o in args.only)]
    if args.list:
        print("\n".join(f"{s.name:48} {'negative' if s.negative else 'attention'} {s.shape}" for s in specs))
        return 0
    import asrfx
    print(f"asrfx from {os.path.dirname(os.path.dirname(asrfx.__file__))}, torch {torch.__version__}, "
          f"{len(specs)} models, example_kwargs in API: {has_kwargs_api()}")
    print(HEADER, flush=True)
    t0 = time.perf_counter()
    results = []
    for spec in specs:
        r = run_one(spec)
        results.append(r)
        print(row(r), flush=True)
    print(f"\n{summary(results)}\n\n{failure_table(results)}")
    print(f"\ntotal time {time.perf_counter() - t0:.0f}s")
    if args.compare:
        print("\n" + compare(results, args.compare))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"asrfx": os.path.dirname(os.path.dirname(asrfx.__file__)), "torch": torch.__version__,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
