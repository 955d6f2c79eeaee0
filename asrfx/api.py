"""The public entry points, each a short table of named steps."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from .errors import AsrfxError, AsrfxWarning
from .graph.capture import as_input_tuple, as_kwargs, propagate_shapes, repropagate_shapes, trace
from .graph.shapes import node_records
from .graph.layout import infer_layouts
from .graph.state import ModuleState
from .graph.wrappers import unwrap
from .observe.stripe import StripeStats, calibrated_psi, gate_probes, input_batches, measure, peek, total_batches
from .passes.contract import attach_report, check_fused, report_of
from .passes.convert import ConvertReport, PsiInit, convert_sites
from .passes.detect import detect
from .passes.find import capture_model, find_sites, has_shapes
from .passes.fuse import PLACEMENTS, fuse_graph
from .passes.gate_in_layers import move_gates_into_layers
from .passes.report import SiteTable, detection_notes

__all__ = ["find_attention", "convert", "fuse", "insert", "report_of", "stripe", "backbone"]


def find_attention(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
) -> SiteTable:
    """Find every channel-attention block of ``model`` by graph structure.

    Args:
        model: an ``nn.Module`` or a ``torch.fx.GraphModule``. Captured with torch.fx, or, where
            torch.fx cannot get through its forward (or a submodule it keeps whole holds
            attention), with torch.export; the table says which (``table.capture``).
        example_inputs: a tensor or tuple of inputs; shapes come from them. May be
            omitted for a GraphModule whose nodes already carry shape metadata.
        example_kwargs: keyword inputs: the model is called as
            ``model(*example_inputs, **example_kwargs)``, whatever its signature and outputs.
        leaf_modules: module paths or classes to keep as single calls when tracing.
        concrete_args: passed to torch.fx for flags of the model's forward.

    Returns a :class:`SiteTable` (a sequence of :class:`AttentionSite`). The model
    is not modified.
    """
    model, _ = _unwrapped(model, "find_attention", rewrap=False)
    table = find_sites(model, example_inputs, example_kwargs, leaf_modules, concrete_args)
    for note in table.notes:
        warnings.warn(note, AsrfxWarning, stacklevel=2)
    return table


def convert(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    keep: bool = False,
    psi_init: PsiInit = 0.1,
    data: Iterable[Any] | None = None,
    max_batches: int | None = None,
    inplace: bool = False,
    gate_in_norm: bool = True,
    gate_in_consumers: bool = True,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    calibrate_batches: int | None = None,
) -> fx.GraphModule:
    """Rewrite every channel-attention block of ``model`` into ASR form for training.

    Args:
        model: an ``nn.Module`` or ``torch.fx.GraphModule``.
        example_inputs: a tensor or tuple of inputs giving the shapes.
        example_kwargs: keyword inputs (``model(*example_inputs, **example_kwargs)``); the
            GraphModule is called the same way and returns what the model returns.
        keep: False (default) replaces each pooled statistic by a learnable psi;
            True keeps the original attention and adds a psi-driven copy before it
            ("ASR(k) + k", paper Tables 4-5).
        psi_init: the initial psi: a constant (default 0.1, the paper's C_0.1), a tensor
            broadcastable to psi's shape, ``fn(site, shape) -> tensor``, or "calibrate": each
            psi starts at the mean over ``data`` of the pooled statistic it replaces, so a
            trained attention model converts with outputs close to the original's.
        data: with psi_init="calibrate", the batches to measure on (a DataLoader, an iterable
            of tensors or of (inputs, labels) pairs); run in eval mode, without gradients.
            ``example_inputs`` may then be omitted (the first batch gives the shapes).
        max_batches: read at most this many batches of ``data`` (as in :func:`stripe`;
            ``calibrate_batches``, its old name, still works and warns).
        inplace: share the model's modules and parameters instead of copying them
            (training the result then trains the model's own parameters).
        gate_in_norm: apply a gate inside the BatchNorm that produced x when nothing else
            reads it (same math, no extra pass over the feature map).
        gate_in_consumers: otherwise, apply it to the input-channel weights of the convs and
            linear layers that read the gated tensor (``W * v`` instead of ``x * v``: same math,
            a weight-sized multiply instead of a feature-map-sized one).
        leaf_modules, concrete_args: as for :func:`find_attention`.

    Returns a GraphModule; :func:`report_of` tells what was converted and why not.
    """
    if not isinstance(keep, bool):
        raise TypeError(f"convert(keep=...) takes True or False, got {keep!r}")
    calibrate = isinstance(psi_init, str) and psi_init == "calibrate"
    if isinstance(psi_init, str) and not calibrate:
        raise TypeError(f"convert(psi_init=...) takes a number, a tensor, fn(site, shape) -> tensor or "
                        f"'calibrate'; got {psi_init!r}")
    if not (calibrate or isinstance(psi_init, (int, float, torch.Tensor)) or callable(psi_init)) \
            or isinstance(psi_init, bool):
        raise TypeError("convert(psi_init=...) takes a number, a tensor, fn(site, shape) -> tensor or "
                        f"'calibrate'; got {type(psi_init).__name__}")
    if calibrate and data is None:
        raise TypeError("convert(psi_init='calibrate') measures psi on data: pass data=a DataLoader or "
                        "an iterable of input batches (e.g. a few hundred training images)")
    if calibrate_batches is not None:
        if max_batches is not None:
            raise TypeError("convert(max_batches=..., calibrate_batches=...): pass max_batches only")
        warnings.warn("convert(calibrate_batches=...) is now convert(max_batches=...), as in asrfx.stripe; "
                      "the old name will be removed in the next release", FutureWarning, stacklevel=2)
        max_batches = calibrate_batches
    if not calibrate and (data is not None or max_batches is not None):
        raise TypeError("convert(data=..., max_batches=...) are read only with psi_init='calibrate'")
    model, wrapper_note = _unwrapped(model, "convert")
    module_state = ModuleState.of(model)
    batches = None
    if calibrate:
        batches = input_batches(data, max_batches)
        first, batches = peek(batches)
        example_inputs = first if example_inputs is None else example_inputs
    work = model if inplace else copy.deepcopy(model)
    traced = capture_model(work, example_inputs, example_kwargs, leaf_modules, concrete_args, require_inputs=True)
    gm, inputs, kwargs = traced.gm, as_input_tuple(example_inputs), as_kwargs(example_kwargs)
    # the steps, in order
    layouts = infer_layouts(gm)
    found = detect(gm, layouts)
    psi = (calibrated_psi(gm, found.sites, batches, also=(work,), kwargs=kwargs)  # measured before the rewrite
           if calibrate and found.sites else psi_init)
    before, in_layers = node_records(gm), gate_in_norm or gate_in_consumers
    _, report = convert_sites(gm, found.sites, layouts, found.flows, keep=keep, psi_init=psi, recompile=not in_layers)
    repropagate_shapes(gm, before, inputs, kwargs)  # the graph outside the sites keeps its shapes
    if in_layers:  # training fast path: gates applied inside layers
        move_gates_into_layers(gm, report, producers=gate_in_norm, consumers=gate_in_consumers)
    module_state.apply(gm)  # the caller's frozen norms, dropout flags and requires_grad, by name
    # what the user must hear
    report.applications.clear()  # graph nodes: only for the passes above, not to be kept or copied
    report.capture = traced.route
    report.notes.extend(n for n in (wrapper_note, traced.mode_note) if n)
    report.notes.extend(f"'{leaf.path}' ({leaf.module_type}) was kept as a single call and not searched for "
                        f"attention: {leaf.unsearched}" for leaf in traced.leaves if leaf.unsearched)
    _tell(report, detection_notes(len(found.sites), found.rejections, found.layout_losses))
    if calibrate and report.sites:
        report.notes.append(f"psi calibrated: the mean pooled statistics over {psi.samples} samples "
                            f"({psi.batches} batches)")
    if not report.sites:
        _tell(report, [f"no channel-attention site found in {type(model).__name__}: nothing was converted, "
                       "the GraphModule computes the same function as the model"])
    attach_report(gm, report)
    return gm


_convert_fn = convert  # insert's keyword ``convert`` shadows the function inside insert


def stripe(
    model: nn.Module,
    data: Iterable[Any],
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    max_batches: int | None = None,
    keep_rows: int = 64,
    progress: bool = True,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
) -> StripeStats:
    """Measure how constant each attention gate is over ``data`` (the paper's Stripe Observation).

    Args:
        model: an ``nn.Module`` or ``torch.fx.GraphModule``; a model from :func:`convert` also
            works (its psi-driven gates are measured too, kind "asr").
        data: a DataLoader, or an iterable of input tensors or of (inputs, labels) pairs, or
            one tensor (a single batch). Streamed once: memory does not grow with its size.
        example_inputs: inputs giving the shapes; default: the first batch.
        example_kwargs: keyword inputs passed with every batch (``model(*batch, **example_kwargs)``).
        max_batches: read at most this many batches.
        keep_rows: samples whose gates and pooled statistics are kept for heatmaps.
        progress: show a progress bar (when tqdm is installed).
        leaf_modules, concrete_args: as for :func:`find_attention`.

    For every site, the gate (before broadcasting, flattened per sample) and each pooled
    statistic feeding the excitation are read off the traced graph, which shares the model's
    parameters; the model runs in eval mode without gradients, its modes are restored after,
    and nothing is added to it (no hooks, no code changes). Returns a :class:`StripeStats`:
    per site, per-channel mean and std of the gate and of the pooled statistics, the first
    ``keep_rows`` samples of each, and a score (the gate's relative variation: 0 when the gate
    is the same vector for every input). ``stats.plot(path)`` draws Fig. 1a/1b.
    """
    model, _ = _unwrapped(model, "stripe", rewrap=False)
    batches = input_batches(data, max_batches)
    first, batches = peek(batches)
    table = find_attention(model, first if example_inputs is None else example_inputs,
                           example_kwargs=example_kwargs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    probes = gate_probes(table.graph_module, table.sites)
    if not probes:
        why = f" ({len(table.rejections)} look-alike(s) refused: {table.rejections[0].reason})" \
            if table.rejections else ""
        raise AsrfxError(f"no channel-attention site found in {table.model_name}{why}: there is no gate to "
                         "measure. print(asrfx.find_attention(model, example_inputs)) shows what was examined.")
    result = measure(table.graph_module, probes, batches, keep_rows=keep_rows, progress=progress,
                     total=total_batches(data, max_batches), also=(model,), kwargs=as_kwargs(example_kwargs))
    return StripeStats(result.sites, table.model_name, result.samples, result.batches)


def fuse(
    gm: nn.Module | torch.export.ExportedProgram,
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    inplace: bool = False,
    dynamic_shapes: Any = None,
    placement: str = "producer",
) -> fx.GraphModule | torch.export.ExportedProgram:
    """Fold every constant (ASR) gate into the backbone, for deployment.

    ``gm`` is the result of :func:`convert` after training, in eval mode (BatchNorm
    statistics and gates are folded as constants, as in ``torch.nn.utils.fusion``).
    ``example_inputs`` (and ``example_kwargs``) are needed only if ``gm``'s nodes carry no
    shape metadata. The result is called as ``gm`` is and returns what it returns.
    Returns a GraphModule with no psi, no excitation and no pooling of the attention
    blocks; :func:`report_of` lists every gate as folded (into which layers) or kept (why).

    ``gm`` may also be a ``torch.export.ExportedProgram`` of an eval-mode ASR model: the
    result is then the exported program of the fused backbone, exported again from the
    program's example inputs (pass ``dynamic_shapes`` as for ``torch.export.export`` to
    keep dimensions dynamic). The recommended route is ``torch.export.export(fuse(gm), ...)``.

    ``placement``: "producer" (default) folds each gate where the report says; "balanced" then
    shares each gate folded into one producer layer with the convs and linear layers that read
    it, so that both have equal per-channel weight ranges (cross-layer equalization: exact, the
    same ops and parameter shapes), for INT8 quantization with per-tensor weight scales
    (docs/performance.md, INT8).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"fuse(placement=...) takes one of {PLACEMENTS}, got {placement!r}")
    if isinstance(gm, torch.export.ExportedProgram):
        if placement != "producer":
            raise TypeError("fuse(placement=...) applies to a GraphModule; fuse it, then export it")
        from .deploy.export import fuse_exported

        return fuse_exported(gm, dynamic_shapes)
    if dynamic_shapes is not None:
        raise TypeError("fuse(dynamic_shapes=...) applies to an ExportedProgram only; "
                        "for a GraphModule, pass dynamic_shapes to torch.export.export(fuse(gm), ...)")
    gm, _ = _unwrapped(gm, "fuse", rewrap=False)
    if gm.training or any(m.training for m in gm.modules()):
        raise AsrfxError(
            f"fuse folds BatchNorm statistics and gates as constants, so it needs an eval-mode model: "
            f"call .eval() on {type(gm).__name__} first (as torch.nn.utils.fusion requires)."
        )
    work = gm if inplace else copy.deepcopy(gm)
    if not isinstance(work, fx.GraphModule):
        work = trace(work).gm
    inputs, kwargs = as_input_tuple(example_inputs), as_kwargs(example_kwargs)
    if inputs or kwargs:
        propagate_shapes(work, inputs, kwargs)
    elif not has_shapes(work):
        raise AsrfxError("fuse needs the shapes of the graph's tensors: pass example_inputs=(x,)")
    state = ModuleState.of(work)
    work, report = fuse_graph(work, placement)
    state.apply(work)  # requires_grad=False stays off on the folded parameters
    check_fused(work)
    attach_report(work, report)
    return work


def insert(
    model: nn.Module,
    attention: str | type | Callable[..., nn.Module] = "se",
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    where: Callable[[str, nn.Module], bool] | None = None,
    repeats: int = 1,
    psi_init: PsiInit = 0.1,
    inplace: bool = False,
    convert: bool = True,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    **attention_kwargs: Any,
) -> fx.GraphModule:
    """Add ASR(k) to a plain backbone: insert attention k, in psi form, ready to train.

    Args:
        model: a plain backbone (``nn.Module``).
        attention: a name from ``asrfx.attention.ATTENTION`` ("se", "eca", "srm", "ie",
            "spa", "cbam_channel", "gc"), an attention class taking the channel count, or
            ``fn(channels, tokens=..., dims=...) -> module``.
        example_inputs: inputs giving the shapes (channel counts come from them).
        example_kwargs: keyword inputs, as for :func:`convert`.
        where: ``fn(path, module) -> bool`` choosing the modules to insert after; default:
            after the last normalization layer of each residual branch (before the add),
            or after every BatchNorm when the model has no residual adds.
        repeats: the paper's delta (Table 7): modules in a row at each place, each with its
            own parameters.
        psi_init, inplace, leaf_modules, concrete_args: as for :func:`convert`; ``attention_kwargs``
            go to the module.
        convert: False returns the backbone with the original, input-dependent attention
            modules inserted at the same places (the paper's "backbone + k" baseline); it can
            be converted later, e.g. ``asrfx.convert(result, x, keep=True)`` for ASR(k) + k.

    Returns the converted GraphModule; ``fuse(result.eval())`` gives the backbone back.
    """
    from .nn.attention import ATTENTION
    from .passes.insert import insert_modules, insertion_points

    if isinstance(attention, str):
        if attention not in ATTENTION:
            raise ValueError(f"unknown attention {attention!r}; choose from {sorted(ATTENTION)}, "
                             "or pass a module class or factory")
        attention = ATTENTION[attention]
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    model, wrapper_note = _unwrapped(model, "insert")
    state = ModuleState.of(model)
    work = model if inplace else copy.deepcopy(model)
    traced = capture_model(work, example_inputs, example_kwargs, leaf_modules, concrete_args, require_inputs=True)
    gm = traced.gm
    points = insertion_points(gm, infer_layouts(gm), where, work)
    device = next((t.device for t in itertools.chain(work.parameters(), work.buffers())), None)

    def factory(point):
        kwargs = dict(attention_kwargs)
        if point.tokens:
            kwargs["tokens"] = True
        elif point.dims != 2:
            kwargs["dims"] = point.dims
        meta = point.node.meta.get("tensor_meta")
        dtype = meta.dtype if meta is not None and meta.dtype.is_floating_point else None
        try:  # on the feature map's device and in its dtype (a float64 or GPU model)
            return attention(point.channels, **kwargs).to(device=device, dtype=dtype)
        except TypeError as exc:
            raise AsrfxError(f"cannot build {getattr(attention, '__name__', attention)} for '{point.path}' "
                             f"({point.channels} channels, {'tokens' if point.tokens else f'{point.dims}-d maps'}): "
                             f"{exc}") from exc

    insert_modules(gm, points, factory, repeats)
    state.apply(gm, new_modules=model.training)  # the inserted modules follow the model's mode
    if not convert:
        return gm
    converted = _convert_fn(gm, example_inputs, example_kwargs=example_kwargs, psi_init=psi_init, inplace=True)
    report_of(converted).capture = traced.route
    report_of(converted).notes.extend(n for n in (wrapper_note,) if n)
    return converted


def backbone(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
) -> nn.Module:
    """The plain backbone of an attention model: a copy with every attention block replaced by identity.

    What ``fuse(convert(model))`` must equal in size and ops, and the baseline of the speed
    benchmarks. Each detected site's module (``site.module_path``) must compute the gate and
    apply it to its own input, as SE/ECA/CBAM-style modules do. A module that also computes
    the gated tensor itself (IEBN wraps its BatchNorm) cannot become identity: AsrfxError
    names it. The model is not modified.

    ``state_dict``: load these weights, strictly, e.g. ``fuse(gm).state_dict()``: the deployed
    model is then the model's own class (plain eager code, no GraphModule) with the gates
    folded in. Fuse keeps every parameter's name, so the keys match unless a gate had to stay
    as a constant or a shift created a bias; AsrfxError then says which keys differ.
    """
    from .passes.detect import module_path_of
    from .graph.edit import set_module

    model, _ = _unwrapped(model, "backbone", rewrap=False)
    plain = copy.deepcopy(model)
    for site in find_attention(model, example_inputs, example_kwargs=example_kwargs, leaf_modules=leaf_modules,
                               concrete_args=concrete_args):
        path = site.module_path
        inside = module_path_of(site.x) or ""
        if not path or inside == path or inside.startswith(path + "."):
            where = f"'{path}'" if path else "the model's own forward"
            raise AsrfxError(f"{where} ({site.kind}) computes the tensor it gates ('{site.x.name}') as well as "
                             "the gate: replacing it by identity would drop backbone layers. Build the backbone "
                             "by hand for this model.")
        set_module(plain, path, nn.Identity())
    if state_dict is not None:
        missing, unexpected = plain.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise AsrfxError(f"the weights do not map onto {type(model).__name__}'s backbone: missing "
                             f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                             f"{'...' if len(unexpected) > 3 else ''} (a gate kept as a constant, or a bias "
                             "fuse created). Deploy the fused GraphModule itself instead.")
    return plain


def _tell(report: ConvertReport, notes: list[str]) -> None:
    """Notes the user must hear: warned now, and kept in the report."""
    for note in notes:
        warnings.warn(note, AsrfxWarning, stacklevel=3)
        report.notes.append(note)


def _unwrapped(model, verb: str, rewrap: bool = True):
    """The model inside a DataParallel / DDP / torch.compile wrapper, and a warning saying so."""
    if not isinstance(model, nn.Module):
        return model, ""
    model, note = unwrap(model, verb, rewrap=rewrap)
    if note:
        warnings.warn(note, AsrfxWarning, stacklevel=3)
    return model, note


