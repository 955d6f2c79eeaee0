"""Stripe observation (paper sec. 1, Fig. 1): how constant is each attention gate over data?

The measurement behind ASR: after training, a channel-attention gate ``v = T(GAP(x))``
is nearly the same vector for every input (a "stripe" pattern in an images x channels
heatmap), while its input statistic ``u = GAP(x)`` is not. This module reads both off a
traced graph, without touching the model's code:

* :func:`gate_probes` says which nodes to read per site: the gate, and each pooled
  statistic feeding the excitation (the ones convert replaces by psi); in a converted
  model, the psi-driven gates too (tagged by convert).
* :func:`measure` runs the traced GraphModule (it shares the model's parameters) with an
  ``fx.Interpreter`` that copies those values as they are computed, and streams per-channel
  moments (:mod:`asrfx.moments`): memory is bounded by ``keep_rows`` sample rows kept
  for heatmaps, whatever the size of the data.
* :class:`StripeStats` is the printable result, with ``plot`` for Fig. 1a/1b.

The public entry point is :func:`asrfx.stripe` (api.py); :class:`asrfx.GateRecorder`
(recorder.py) reuses the probes to follow gates across training epochs (Fig. 1c).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..passes.contract import ASR_META, psi_names
from ..passes.convert import CalibratedPsi, pooled_statistics, why_not_convertible
from ..errors import AsrfxError
from ..graph.capture import GraphRunner, placeholder_values
from .moments import RunningMoments, relative_variation
from ..passes.site import AttentionSite

__all__ = ["SiteStripe", "StripeStats", "GateProbe", "Measurement", "gate_probes", "measure", "calibrated_psi",
           "input_batches", "peek", "total_batches", "evaluating"]


# -- records ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SiteStripe:
    """Gate statistics of one attention site over a dataset (paper Fig. 1a/1b).

    ``score`` is the gate's *relative variation*, ``sqrt(mean_c std_c^2 / mean_c mean_c^2)``
    over its channels c: how far the gate of one input strays from the per-channel mean
    gate, relative to the size of that mean (rms). 0 means the same vector for every input
    (an ASR gate); 0.05 means replacing the gate by its per-channel mean, which is what
    ``convert(psi_init="calibrate")`` approximates, changes it by about 5%. ``pooled_score``
    is the same number for the pooled statistics the gate is computed from: the paper's
    observation is ``score`` much smaller than ``pooled_score``.
    """

    module_path: str  # the attention block in the model ("" at top level)
    label: str  # unique display name: the module path, with " [asr]" for a psi-driven gate
    kind: str  # structural kind (se, eca, srm, ...), or "asr" for a psi-driven gate
    channels: int  # gate values per sample (C for a per-channel gate; flattened otherwise)
    samples: int  # samples measured
    gate_mean: torch.Tensor  # [channels] float64: per-channel mean of the gate over the samples
    gate_std: torch.Tensor  # [channels] float64: per-channel population std of the gate
    gate_rows: torch.Tensor  # [min(samples, keep_rows), channels]: the gates of the first samples
    pooled_names: tuple[str, ...]  # per pooled statistic, the psi convert makes of it: psi, psi_avg ...
    pooled_mean: tuple[torch.Tensor, ...]  # per statistic: mean, shaped like it without the batch axis
    pooled_std: tuple[torch.Tensor, ...]  # per statistic: population std, same shape
    pooled_rows: tuple[torch.Tensor, ...]  # per statistic [rows, values]: the first samples, flattened
    score: float  # relative variation of the gate (see above): 0 = the same gate for every input
    pooled_score: float | None  # the same for the pooled statistics together; None without pools

    @property
    def mean_std(self) -> float:
        """Mean over channels of the gate's per-channel std (the paper's Fig. 1b values)."""
        return float(self.gate_std.mean())

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (lists of floats), for JSON."""
        return {
            "module_path": self.module_path, "label": self.label, "kind": self.kind,
            "channels": self.channels, "samples": self.samples,
            "gate_mean": self.gate_mean.tolist(), "gate_std": self.gate_std.tolist(),
            "pooled": [{"name": n, "shape": list(m.shape), "mean": m.flatten().tolist(),
                        "std": s.flatten().tolist()}
                       for n, m, s in zip(self.pooled_names, self.pooled_mean, self.pooled_std)],
            "score": self.score, "pooled_score": self.pooled_score,
        }


@dataclass(frozen=True, eq=False)
class StripeStats(Sequence[SiteStripe]):
    """The result of :func:`asrfx.stripe`: a :class:`SiteStripe` per site, in graph order.

    ``print(stats)`` shows a table; ``stats.plot("stripes.png")`` draws the paper's
    Fig. 1a/1b (needs matplotlib); ``stats["layer1.0.se"]`` finds a site by label or path.
    """

    sites: tuple[SiteStripe, ...]  # one record per site
    model_name: str  # class name of the model, for the header
    samples: int  # samples measured
    batches: int  # batches read from the data

    def __getitem__(self, index):
        if isinstance(index, str):
            for s in self.sites:
                if index in (s.label, s.module_path):
                    return s
            raise KeyError(f"no site {index!r}; sites: {[s.label for s in self.sites]}")
        return self.sites[index]

    def __len__(self) -> int:
        return len(self.sites)

    def __repr__(self) -> str:
        return f"StripeStats({self.model_name}: {len(self.sites)} sites, {self.samples} samples)"

    def __str__(self) -> str:
        lines = [f"{self.model_name}: attention gates over {self.samples} samples ({self.batches} batches); "
                 "score = relative variation of the gate (0: the same vector for every input)"]
        rows = [("#", "module", "kind", "channels", "gate mean", "gate std", "score", "pooled score")]
        for i, s in enumerate(self.sites, 1):
            rows.append((str(i), s.label, s.kind, str(s.channels), f"{float(s.gate_mean.mean()):.4g}",
                         f"{s.mean_std:.3g}", f"{s.score:.3g}",
                         "-" if s.pooled_score is None else f"{s.pooled_score:.3g}"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines += ["  " + "  ".join(r[c].ljust(widths[c]) for c in range(len(r))).rstrip() for r in rows]
        return "\n".join(lines)

    def plot(self, path: str | Path, *, sites: Sequence[int | str] | None = None) -> Path:
        """Save the paper's Fig. 1a/1b as an image: per site, heatmaps (samples x channels) of
        the pooled statistic and of the gate, and histograms of their per-channel std.
        ``sites``: indices or labels (default: all, at most 6, evenly spaced). Needs matplotlib."""
        from .plots import plot_stripes

        return plot_stripes(self, path, sites=sites)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values, for JSON."""
        return {"model": self.model_name, "samples": self.samples, "batches": self.batches,
                "sites": [s.to_dict() for s in self.sites]}


# -- what to read ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GateProbe:
    """Where one site's gate and pooled statistics are computed in a traced graph."""

    module_path: str  # the attention block in the model
    label: str  # unique display name
    kind: str  # the site's kind, or "asr" for a psi-driven gate
    gate: fx.Node  # the gate before broadcasting
    batched: bool  # False for a psi-driven gate: batch 1, the same for every sample
    stats: tuple[fx.Node, ...]  # pooled statistics feeding the excitation (what convert replaces)
    stat_names: tuple[str, ...]  # the psi each statistic becomes
    stat_shapes: tuple[tuple[int, ...], ...]  # each statistic's shape without the batch axis


def gate_probes(gm: fx.GraphModule, sites: Sequence[AttentionSite], *, asr_gates: bool = True) -> list[GateProbe]:
    """A probe per detected site, then (``asr_gates``) per psi-driven gate convert tagged."""
    modules = dict(gm.named_modules())
    probes: list[GateProbe] = []
    for site in sites:
        stats, names, shapes = [], [], []
        if why_not_convertible(site) is None:
            for pool, name in zip(site.pools, psi_names(site, modules)):
                found = pooled_statistics(pool)
                for k, (stat, shape) in enumerate(found):
                    stats.append(stat)
                    names.append(name if len(found) == 1 else f"{name}_{k}")
                    shapes.append(tuple(shape[1:]))
        probes.append(GateProbe(site.module_path, site.module_path or "(top level)", site.kind.value,
                                site.gate, True, tuple(stats), tuple(names), tuple(shapes)))
    if asr_gates:
        seen: set[str] = set()
        for node in gm.graph.nodes:
            tag = node.meta.get(ASR_META) or {}
            if tag.get("role") != "gate" or tag.get("site") in seen:
                continue  # one probe per site: a gate shared by several branches is read once
            seen.add(tag["site"])
            path = tag["site"]
            probes.append(GateProbe(path, f"{path or '(top level)'} [asr]", "asr", node, False, (), (), ()))
    labels = [p.label for p in probes]
    return [p if labels.count(p.label) == 1 else
            GateProbe(p.module_path, f"{p.label} #{labels[:i].count(p.label) + 1}", p.kind, p.gate, p.batched,
                      p.stats, p.stat_names, p.stat_shapes)
            for i, p in enumerate(probes)]


# -- data -------------------------------------------------------------------------------------


def _inputs_of(batch: Any, index: int) -> tuple[torch.Tensor, ...]:
    """A batch as the model's positional inputs: a tensor, or the first element of a pair."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if isinstance(batch, torch.Tensor):
        return (batch,)
    raise AsrfxError(f"batch {index} of data is a {type(batch).__name__}: data must yield input tensors "
                     "or (inputs, labels) pairs, as a DataLoader over a TensorDataset does")


def input_batches(data: Any, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """The model inputs of each batch of ``data`` (a DataLoader, an iterable of tensors or of
    (inputs, labels) pairs, or one tensor: a single batch), at most ``max_batches``."""
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    if isinstance(data, torch.Tensor):
        data = (data,)
    try:
        iterator = iter(data)
    except TypeError:
        raise AsrfxError(f"data must be an iterable of batches (a DataLoader, a list of tensors), "
                         f"got {type(data).__name__}") from None
    return (_inputs_of(batch, i) for i, batch in enumerate(itertools.islice(iterator, max_batches)))


def peek(batches: Iterator[tuple[torch.Tensor, ...]]) -> tuple[tuple[torch.Tensor, ...], Iterator]:
    """The first batch (for shapes) and an iterator over all of them, the first included."""
    first = next(batches, None)
    if first is None:
        raise AsrfxError("data yielded no batches: pass a non-empty DataLoader or list of input tensors")
    return first, itertools.chain([first], batches)


def total_batches(data: Any, max_batches: int | None) -> int | None:
    """How many batches ``data`` will yield, when it knows (for the progress bar)."""
    try:
        n = len(data) if not isinstance(data, torch.Tensor) else 1
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def _progress(batches: Iterable, total: int | None, enabled: bool, desc: str) -> Iterable:
    """tqdm when it is installed and wanted; the plain iterable otherwise."""
    if not enabled:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return batches
    return tqdm(batches, total=total, desc=desc, unit="batch", leave=False)


# -- running ----------------------------------------------------------------------------------


@contextlib.contextmanager
def evaluating(*roots: nn.Module):
    """Every module under ``roots`` in eval mode for the block; each one's flag restored after."""
    flags = {m: m.training for root in roots for m in root.modules()}
    try:
        for root in roots:
            root.eval()
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


class _Done(Exception):
    """Every watched value is captured: the rest of the forward is not needed."""


class _Capture(GraphRunner):
    """Runs a GraphModule and copies the watched nodes' values (float64, CPU) as they appear.

    Copies are taken at once: a later in-place op (``x.mul_(g)``) cannot change them.
    """

    def __init__(self, gm: fx.GraphModule, watch: set[fx.Node]):
        super().__init__(gm)
        self.watch = watch
        self.values: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.watch:
            if not isinstance(result, torch.Tensor):
                raise AsrfxError(f"node '{n.name}' was expected to compute a tensor, got {type(result).__name__}")
            self.values[n] = result.detach().to(device="cpu", dtype=torch.float64, copy=True)
            if len(self.values) == len(self.watch):
                raise _Done
        return result

    def capture(self, *inputs) -> dict[fx.Node, torch.Tensor]:
        self.values = {}
        try:
            self.run(*inputs)
        except _Done:
            pass
        return self.values


class _SiteAccumulator:
    """Streaming moments and the first rows of one probe's gate and statistics."""

    def __init__(self, probe: GateProbe, keep_rows: int):
        self.probe = probe
        self.keep_rows = keep_rows
        self.gate = RunningMoments()
        self.stats = [RunningMoments() for _ in probe.stats]
        self.gate_rows: list[torch.Tensor] = []
        self.stat_rows: list[list[torch.Tensor]] = [[] for _ in probe.stats]
        self.kept = 0

    def add(self, values: dict[fx.Node, torch.Tensor], n: int) -> None:
        p = self.probe
        gate = values[p.gate]
        gate = gate.reshape(gate.shape[0], -1) if p.batched else gate.reshape(1, -1).expand(n, -1)
        self.gate.update(gate)
        stats = [values[s].reshape(values[s].shape[0], -1) for s in p.stats]
        for moments, rows in zip(self.stats, stats):
            moments.update(rows)
        room = self.keep_rows - self.kept
        if room > 0:
            self.gate_rows.append(gate[:room].clone())
            for kept, rows in zip(self.stat_rows, stats):
                kept.append(rows[:room].clone())
            self.kept += min(room, gate.shape[0])

    def record(self) -> SiteStripe:
        p = self.probe
        gate_mean, gate_std = self.gate.mean, self.gate.std()
        means = tuple(m.mean.reshape(shape) for m, shape in zip(self.stats, p.stat_shapes))
        stds = tuple(m.std().reshape(shape) for m, shape in zip(self.stats, p.stat_shapes))
        pooled_score = None
        if self.stats:
            pooled_score = relative_variation(torch.cat([m.flatten() for m in means]),
                                              torch.cat([s.flatten() for s in stds]))
        width = gate_mean.shape[0]
        return SiteStripe(
            module_path=p.module_path, label=p.label, kind=p.kind, channels=width, samples=self.gate.count,
            gate_mean=gate_mean, gate_std=gate_std,
            gate_rows=torch.cat(self.gate_rows) if self.gate_rows else torch.zeros(0, width, dtype=torch.float64),
            pooled_names=p.stat_names, pooled_mean=means, pooled_std=stds,
            pooled_rows=tuple(torch.cat(rows) if rows else torch.zeros(0, m.mean.shape[0], dtype=torch.float64)
                              for rows, m in zip(self.stat_rows, self.stats)),
            score=relative_variation(gate_mean, gate_std), pooled_score=pooled_score,
        )


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` returns: the records and how much data they cover."""

    sites: tuple[SiteStripe, ...]  # one per probe, in probe order
    samples: int  # samples seen
    batches: int  # batches seen


def measure(
    gm: fx.GraphModule,
    probes: Sequence[GateProbe],
    batches: Iterable[tuple[torch.Tensor, ...]],
    *,
    keep_rows: int = 64,
    progress: bool = False,
    total: int | None = None,
    also: Sequence[nn.Module] = (),
    kwargs: dict[str, Any] | None = None,
) -> Measurement:
    """Run ``gm`` over ``batches`` (eval mode, no grad) and stream each probe's statistics.

    ``gm`` and the modules in ``also`` (the caller's model, whose submodules ``gm`` shares)
    are in eval mode while running; every training flag is restored after. ``kwargs``: keyword
    inputs passed with every batch, as the graph was captured (``gm(*batch, **kwargs)``).
    """
    if not isinstance(keep_rows, int) or keep_rows < 0:
        raise ValueError(f"keep_rows must be a non-negative integer, got {keep_rows!r}")
    if not probes:
        raise AsrfxError("nothing to measure: no attention site")
    watch = {p.gate for p in probes} | {s for p in probes for s in p.stats}
    accumulators = [_SiteAccumulator(p, keep_rows) for p in probes]
    capture = _Capture(gm, watch)
    device = next((t.device for t in itertools.chain(gm.parameters(), gm.buffers())), None)
    count = n_batches = 0
    with evaluating(gm, *also), torch.no_grad():
        for inputs in _progress(batches, total, progress, "asrfx.stripe"):
            if device is not None:
                inputs = tuple(t.to(device) for t in inputs)
            n = inputs[0].shape[0] if inputs[0].dim() else 1
            values = capture.capture(*placeholder_values(gm, inputs, kwargs))
            missing = [node.name for node in watch if node not in values]
            if missing:
                raise AsrfxError(f"the forward did not compute {', '.join(sorted(missing))} on batch "
                                 f"{n_batches}: the traced graph does not follow this input")
            for acc in accumulators:
                acc.add(values, n)
            count += n
            n_batches += 1
    if n_batches == 0:
        raise AsrfxError("data yielded no batches: pass a non-empty DataLoader or list of input tensors")
    return Measurement(tuple(a.record() for a in accumulators), count, n_batches)


def calibrated_psi(gm: fx.GraphModule, sites: Sequence[AttentionSite],
                   batches: Iterable[tuple[torch.Tensor, ...]], *, also: Sequence[nn.Module] = (),
                   kwargs: dict[str, Any] | None = None) -> CalibratedPsi:
    """psi_init="calibrate": the mean of every pooled statistic of ``sites`` over ``batches``."""
    probes = gate_probes(gm, sites, asr_gates=False)
    result = measure(gm, probes, batches, keep_rows=0, also=also, kwargs=kwargs)
    means = {stat: mean for probe, rec in zip(probes, result.sites)
             for stat, mean in zip(probe.stats, rec.pooled_mean)}
    return CalibratedPsi(means, result.samples, result.batches)
