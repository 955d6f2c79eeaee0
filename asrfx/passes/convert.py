"""Convert pass: rewrite detected attention sites into ASR (psi-driven) form.

Replace mode (paper sec. 3.2, "Training phase"): every pooled statistic u that feeds a
site's excitation becomes a learnable parameter psi shaped like u with batch size 1,
so the gate ``v = act(F(psi))`` depends on parameters only. Keep mode ("ASR(k) + k",
Tables 4-5): a copy of the excitation with its own parameters, driven by psi, gates x
before the original attention sees it.

Two rewrites make the psi branch a pure function of parameters:

* sizes read off feature maps inside the excitation (``view(x.size(0), c, 1, 1)``)
  become constants, the batch size 1: the gate is computed once and broadcasts over
  the batch;
* BatchNorm inside an excitation cannot normalise a batch of one constant vector; it
  uses its running statistics, i.e. acts as a fixed per-channel affine whose weight and
  bias still train (the same thing it does in eval mode).

Each site is rewritten in three steps: pattern (the detected site), legality check
(:func:`why_not_convertible` returns a reason instead of raising), rewrite.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from .detect import pool_branch
from ..errors import AsrfxError
from ..graph.edit import copy_meta, shape_constants, finish, set_module, substitute, unique_attr_name
from ..graph.capture import CaptureRoute
from ..graph.layers import call_argument, set_call_argument
from ..graph.modes import is_counter
from ..graph.ops import is_shape_query, module_path_of, node_shape, node_shapes, op_of
from .contract import Role, mark, psi_names
from .site import AttentionSite, Combine

__all__ = ["ConvertedSite", "ConvertReport", "PsiInit", "CalibratedPsi", "convert_sites", "why_not_convertible",
           "pooled_statistics"]

# psi_init: a constant, a tensor broadcastable to psi's shape, fn(site, shape) -> tensor, or
# "calibrate" (api.convert measures the means of the pooled statistics on data: CalibratedPsi).
PsiInit = float | torch.Tensor | Callable[[AttentionSite, tuple[int, ...]], torch.Tensor] | Literal["calibrate"]


@dataclass(frozen=True, eq=False)
class CalibratedPsi:
    """``psi_init="calibrate"``, measured: each psi starts at the mean, over data, of the pooled
    statistic it replaces (so the gate starts at the gate of the average statistic)."""

    means: dict[fx.Node, torch.Tensor]  # pooled statistic node -> its mean, shaped like it without the batch axis
    samples: int  # samples the means are taken over
    batches: int  # batches read




@dataclass(frozen=True)
class ConvertedSite:
    """What convert did to one attention site."""

    module_path: str  # the attention block in the original model
    kind: str  # its structural kind
    mode: str  # "replace" or "keep"
    psi: tuple[str, ...]  # qualified names of the psi parameters created
    frozen_norms: tuple[str, ...]  # excitation BatchNorms now using running statistics
    gated_norm: str | None  # the BatchNorm that applies the gate inside its affine, if any
    gated_consumers: str | None = None  # convs / linear layers after it applying it to their input weights, if any
    gated_producers: str | None = None  # convs / linear layers before it applying it to their output weights, if any


@dataclass
class ConvertReport:
    """The result of a convert pass: converted and skipped sites, with reasons."""

    sites: list[ConvertedSite] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path, reason)
    notes: list[str] = field(default_factory=list)
    capture: CaptureRoute | None = None  # how the model was captured (torch.fx or torch.export), and why
    # (site path, x, gate, combine) of every gate application in the converted graph
    applications: list[tuple[str, fx.Node, fx.Node, fx.Node]] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        lines = [f"asrfx.convert: {len(self.sites)} site(s) converted, {len(self.skipped)} skipped"]
        for s in self.sites:
            extra = []
            if s.frozen_norms:
                extra.append("running-stats BN: " + ", ".join(s.frozen_norms))
            if s.gated_norm:
                extra.append(f"gate applied inside {s.gated_norm}")
            if s.gated_producers:
                extra.append(f"gate applied to the output weights of {s.gated_producers}")
            if s.gated_consumers:
                extra.append(f"gate applied to the input weights of {s.gated_consumers}")
            lines.append(f"  {s.module_path or '(top level)'} [{s.kind}, {s.mode}]: psi "
                         + ", ".join(s.psi) + ("; " + "; ".join(extra) if extra else ""))
        for path, reason in self.skipped:
            lines.append(f"  skipped {path or '(top level)'}: {reason}")
        if self.capture is not None and self.capture.name == "export":
            lines.append(f"  {self.capture}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def why_not_convertible(site: AttentionSite) -> str | None:
    """Legality check: a reason this site cannot be rewritten, or None."""
    for pool in site.pools:
        if node_shape(pool) is None and node_shapes(pool) is None:
            return f"no shape for pooled statistic '{pool.name}'"
        shape = node_shape(pool)
        if shape is not None and len(shape) == 0:
            return f"pooled statistic '{pool.name}' is a scalar over the whole batch"
    return None


# -- building blocks ----------------------------------------------------------------------


def _owner(gm: fx.GraphModule, path: str) -> nn.Module:
    return gm.get_submodule(path) if path else gm


def _psi_value(psi_init: PsiInit | CalibratedPsi, site: AttentionSite, shape: tuple[int, ...],
               like: torch.Tensor | None, stat: fx.Node):
    """The initial value of the psi that replaces ``stat`` (a pooled statistic of ``site``).

    Legality check: a value that is not finite, or that does not fit psi's shape, is refused
    naming the site and the shape (a NaN psi would train to NaN and fuse into the weights).
    """
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    where = f"psi for '{stat.name}' of '{site.module_path or '(top level)'}' ({site.kind}), shape {tuple(shape)}"
    if isinstance(psi_init, CalibratedPsi):
        if stat not in psi_init.means:
            raise AsrfxError(f"no calibrated value for the pooled statistic '{stat.name}' of "
                             f"'{site.module_path or '(top level)'}'")
        value, source = psi_init.means[stat], "the calibrated mean"
    elif callable(psi_init) and not isinstance(psi_init, torch.Tensor):
        value, source = psi_init(site, shape), "psi_init(site, shape)"
    elif isinstance(psi_init, torch.Tensor):
        value, source = psi_init, "the psi_init tensor"
    else:
        value, source = torch.full(shape, float(psi_init)), f"psi_init={psi_init!r}"
    try:
        value = torch.as_tensor(value, dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise AsrfxError(f"{where}: {source} gave {type(value).__name__}, not a tensor ({exc})") from None
    fitted = _fit_psi(value, shape)
    if fitted is None:
        raise AsrfxError(f"{where}: {source} has shape {tuple(value.shape)}, which neither broadcasts to "
                         f"{tuple(shape)} nor holds the same {math.prod(shape)} value(s); give a tensor of "
                         f"shape {tuple(shape)}")
    value = fitted
    if not bool(torch.isfinite(value).all()):
        raise AsrfxError(f"{where}: {source} is not finite ({int((~torch.isfinite(value)).sum())} NaN or "
                         "infinite value(s)); give finite initial values")
    return value.detach().clone()


def _fit_psi(value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``value`` as psi's shape: equal, the same values with other size-1 axes ((C,) for
    (1, C, 1, 1)), or broadcastable; None if it fits none of these."""
    if tuple(value.shape) == tuple(shape):
        return value
    squeezed = lambda s: tuple(d for d in s if d != 1)
    if value.numel() == math.prod(shape) and squeezed(value.shape) == squeezed(shape):
        return value.reshape(shape)
    try:
        return torch.broadcast_to(value, shape)
    except RuntimeError:
        return None


def pooled_statistics(pool: fx.Node) -> list[tuple[fx.Node, tuple[int, ...]]]:
    """The tensors a pool provides to its excitation: itself, or its getitem elements."""
    shape = node_shape(pool)
    if shape is not None:
        return [(pool, shape)]
    shapes = node_shapes(pool) or ()
    return [(u, shapes[u.args[1]]) for u in pool.users
            if u.target is operator.getitem and isinstance(u.args[1], int)
            and shapes[u.args[1]] is not None]


def _like_tensor(gm: fx.GraphModule) -> torch.Tensor | None:
    for p in gm.parameters():
        return p
    return None


def _new_psi(gm, owner_path, name, value, site, stat) -> tuple[str, fx.Node]:
    owner = _owner(gm, owner_path)
    attr = unique_attr_name(owner, name)
    owner.register_parameter(attr, nn.Parameter(value))
    qualified = f"{owner_path}.{attr}" if owner_path else attr
    with gm.graph.inserting_before(stat):
        node = gm.graph.get_attr(qualified)
    mark(node, Role.PSI, site.module_path)
    return qualified, node


def _freeze_norms(gm: fx.GraphModule, nodes: list[fx.Node], modules) -> list[str]:
    """BatchNorms in the psi branch use running statistics (a trainable affine).

    A module call becomes ``F.batch_norm(..., training=False)``; a functional call (timm's
    BatchNormAct2d, the aten graphs of the export route) gets ``training=False`` wherever its
    signature puts it, and the train-mode count of its module's batches (``num_batches_tracked
    += 1``, which a module call would no longer make either) goes. Without running statistics
    the call keeps normalizing with batch statistics.
    """
    frozen = []
    for node in nodes:
        op = op_of(node, modules)
        if op.name != "batch_norm":
            continue
        if node.op == "call_module":
            bn = op.module
            path = str(node.target)
            with gm.graph.inserting_before(node):
                get = lambda n: gm.graph.get_attr(f"{path}.{n}") if getattr(bn, n, None) is not None else None
                new = gm.graph.call_function(
                    F.batch_norm,
                    (node.args[0], get("running_mean"), get("running_var"), get("weight"), get("bias"),
                     bn.running_mean is None, 0.0, bn.eps),
                )
            copy_meta(node, new)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            frozen.append(path)
        elif node.op == "call_function":
            set_call_argument(node, "training", call_argument(node, "running_mean") is None)
            frozen.append(node.name)
    _drop_counters(gm, {module_path_of(n) for n in nodes if n.op == "call_function" and n.name in frozen}, modules)
    return frozen


def _drop_counters(gm: fx.GraphModule, paths: set[str | None], modules) -> None:
    """The batch counts of modules whose every batch_norm call now uses running statistics
    (keep mode's copies leave the original call counting)."""
    paths = paths - {None, ""}
    if not paths:  # the usual case: no functional batch_norm frozen (a scan of the graph per site)
        return
    norms = [n for n in gm.graph.nodes if n.op == "call_function" and op_of(n, modules).name == "batch_norm"]
    for path in paths:
        if all(call_argument(n, "training") is False for n in norms if module_path_of(n) == path):
            for counter in [n for n in gm.graph.nodes if is_counter(n) and module_path_of(n) == path]:
                gm.graph.erase_node(counter)


_INT_OPS = {operator.mul: operator.mul, operator.add: operator.add, operator.sub: operator.sub,
            operator.floordiv: operator.floordiv, operator.mod: operator.mod}


def _resolve(node: fx.Node, constants: dict[fx.Node, int]) -> int | list | None:
    """The value of a size expression when every size in it is known: ``4 * x.size(1)``, and
    shape lists built by arithmetic (MONAI: ``[b, c] + [1] * (x.ndim - 2)``)."""
    if node in constants:
        return constants[node]
    if node.op == "call_function" and node.target in _INT_OPS and len(node.args) == 2 and not node.kwargs:
        values = [_size_value(a, constants) for a in node.args]
        if all(v is not None for v in values):
            try:
                return _INT_OPS[node.target](*values)
            except TypeError:  # not size arithmetic after all
                return None
    return None


def _size_value(arg, constants) -> int | list | None:
    if isinstance(arg, bool):
        return None
    if isinstance(arg, int):
        return arg
    if isinstance(arg, fx.Node):
        return _resolve(arg, constants)
    if isinstance(arg, (list, tuple)):
        items = [_size_value(a, constants) for a in arg]
        return None if any(v is None for v in items) else list(items)
    return None


def _constant_shapes(nodes: list[fx.Node], constants: dict[fx.Node, int]) -> None:
    """Inside the psi branch, sizes read off feature maps become constants (batch: 1)."""
    for node in nodes:
        mapping = {}
        for arg in node.all_input_nodes:
            value = _resolve(arg, constants)
            if value is not None:
                mapping[arg] = value
        if mapping:
            node.args = substitute(node.args, mapping)
            node.kwargs = substitute(node.kwargs, mapping)


# -- the two modes -----------------------------------------------------------------------------


def _replace(gm, site, psi_init, constants, modules, flows, applications) -> ConvertedSite:
    names = psi_names(site, modules)
    excitation = set(site.excitation)
    like = _like_tensor(gm)
    created = []
    for pool, name in zip(site.pools, names):
        stats = pooled_statistics(pool)
        for k, (stat, shape) in enumerate(stats):
            psi_shape = (1,) + tuple(shape[1:])
            value = _psi_value(psi_init, site, psi_shape, like, stat)
            qualified, psi = _new_psi(gm, site.module_path, name if len(stats) == 1 else f"{name}_{k}",
                                      value, site, stat)
            for user in list(stat.users):
                if user in excitation:
                    user.replace_input_with(stat, psi)
            created.append(qualified)
    ordered = sorted(excitation)
    _constant_shapes(ordered, constants)
    frozen = _freeze_norms(gm, ordered, modules)
    for use in site.uses:
        mark(use.gate, Role.GATE, site.module_path)
        applications.append((site.module_path, use.x, use.gate, use.combine))
    return ConvertedSite(site.module_path, site.kind.value, "replace", tuple(created), tuple(frozen), None)


def _closure(site: AttentionSite, flows) -> list[fx.Node]:
    """Excitation nodes plus every data-free input they read (parameters, their views,
    shape arithmetic): what a copy of the excitation needs, short of the pools."""
    nodes = set(site.excitation)
    stack = list(site.excitation)
    while stack:
        for i in stack.pop().all_input_nodes:
            flow = flows.get(i)
            if i in nodes or i in site.pools or flow is None or flow.spatial or flow.pools:
                continue
            if i.op == "placeholder":
                continue
            nodes.add(i)
            stack.append(i)
    return nodes


def _keep(gm, site, psi_init, constants, modules, flows, applications) -> ConvertedSite:
    """ASR(k) + k: a psi-driven copy of the excitation gates x before the original attention."""
    graph = gm.graph
    closure = sorted(_closure(site, flows))  # fx nodes compare by their place in the graph
    # copies of every module / attribute the excitation uses, with their own parameters
    targets = sorted({str(n.target) for n in closure if n.op in ("call_module", "get_attr")})
    base = site.module_path
    if base and all(t == base or t.startswith(base + ".") for t in targets):
        parent, _, last = base.rpartition(".")
        copy_name = unique_attr_name(_owner(gm, parent), f"{last}_asr")
        copy_path = f"{parent}.{copy_name}" if parent else copy_name
        set_module(gm, copy_path, copy.deepcopy(gm.get_submodule(base)))
        retarget = {t: copy_path + t[len(base):] for t in targets}
    else:
        copy_path = ""
        retarget = {}
        for t in targets:
            name = unique_attr_name(gm, t.replace(".", "_") + "_asr")
            parent_path, _, attr = t.rpartition(".")
            value = getattr(_owner(gm, parent_path), attr)
            setattr(gm, name, copy.deepcopy(value))
            retarget[t] = name
    names = psi_names(site, modules)
    like = _like_tensor(gm)
    x_nodes = {u.x for u in site.uses}
    first = min(u for x in x_nodes for u in x.users if not is_shape_query(u, op_of(u, modules)))
    env: dict[fx.Node, fx.Node] = {}
    created = []
    with graph.inserting_before(first):
        for pool, name in zip(site.pools, names):
            stats = pooled_statistics(pool)
            for k, (stat, shape) in enumerate(stats):
                value = _psi_value(psi_init, site, (1,) + tuple(shape[1:]), like, stat)
                owner_path = copy_path
                attr = unique_attr_name(_owner(gm, owner_path), name if len(stats) == 1 else f"{name}_{k}")
                _owner(gm, owner_path).register_parameter(attr, nn.Parameter(value))
                qualified = f"{owner_path}.{attr}" if owner_path else attr
                env[stat] = graph.get_attr(qualified)
                mark(env[stat], Role.PSI, site.module_path)
                created.append(qualified)
        for node in closure:
            if node in constants:
                continue  # the psi branch has batch 1 and fixed channel counts
            new = graph.node_copy(node, lambda a: constants[a] if a in constants else env.get(a, a))
            if node.op in ("call_module", "get_attr"):
                new.target = retarget[str(node.target)]
            env[node] = new
        gated: dict[fx.Node, fx.Node] = {}
        for use in site.uses:
            fn = torch.mul if use.op is Combine.MUL else torch.add
            gated[use.x] = graph.call_function(fn, (use.x, env[use.operand]))
            copy_meta(use.combine, gated[use.x])
            applications.append((site.module_path, use.x, env[use.gate], gated[use.x]))
            mark(env[use.gate], Role.GATE, site.module_path)
    # the original attention now sees the ASR-gated x
    internal = set(site.pools) | set(site.excitation) | {u.combine for u in site.uses}
    internal |= pool_branch(site.uses, frozenset(site.pools))
    for x, new_x in gated.items():
        for user in list(x.users):
            if user is not new_x and user in internal and not is_shape_query(user, op_of(user, modules)):
                user.replace_input_with(x, new_x)
    copies = [env[n] for n in closure if n in env]
    modules = dict(gm.named_modules())
    frozen = _freeze_norms(gm, copies, modules)
    return ConvertedSite(site.module_path, site.kind.value, "keep", tuple(created), tuple(frozen), None)


def convert_sites(
    gm: fx.GraphModule,
    sites: list[AttentionSite],
    layouts,
    flows,
    *,
    keep: bool,
    psi_init: PsiInit | CalibratedPsi,
    recompile: bool = True,
) -> tuple[fx.GraphModule, ConvertReport]:
    """Rewrite ``sites`` of ``gm`` in place; returns ``gm`` and a report. ``recompile=False`` leaves
    ``gm``'s code to the pass that rewrites the graph next (:func:`asrfx.graph.edit.finish`)."""
    report = ConvertReport()
    constants = shape_constants(gm, layouts)
    modules = dict(gm.named_modules())
    for site in sites:
        reason = why_not_convertible(site)
        if reason:
            report.skipped.append((site.module_path, reason))
            continue
        if keep:  # keep mode adds copies of modules; replace mode adds only parameters
            modules = dict(gm.named_modules())
        rewrite = _keep if keep else _replace
        report.sites.append(rewrite(gm, site, psi_init, constants, modules, flows, report.applications))
    return finish(gm, recompile), report
