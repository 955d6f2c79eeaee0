"""Figures of the Stripe Observation (paper Fig. 1), drawn with matplotlib (the ``plot`` extra).

matplotlib is imported inside the functions: asrfx itself needs only torch and networkx.
Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no GUI backend, no global
state) and saved to a file, whose format follows the suffix (PNG, SVG, PDF ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .stripe import StripeStats
    from .recorder import GateRecorder

__all__ = ["plot_stripes", "plot_differences"]

_MAX_SITES = 6  # rows drawn when the caller does not choose sites


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("asrfx's plots need matplotlib: pip install 'asrfx[plot]'") from exc
    return Figure(**kwargs)


def _choose(labels: Sequence[str], sites: Sequence[int | str] | None) -> list[int]:
    """Indices of the sites to draw: the caller's (indices or labels), or up to _MAX_SITES evenly spaced."""
    if sites is None:
        n = len(labels)
        if n <= _MAX_SITES:
            return list(range(n))
        return sorted({round(i * (n - 1) / (_MAX_SITES - 1)) for i in range(_MAX_SITES)})
    chosen = []
    for s in sites:
        if isinstance(s, str):
            if s not in labels:
                raise KeyError(f"no site {s!r}; sites: {list(labels)}")
            chosen.append(labels.index(s))
        else:
            chosen.append(range(len(labels))[s])  # IndexError names a bad index
    if not chosen:
        raise ValueError("sites=... chose no site to draw")
    return chosen


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _heatmap(fig, ax, rows: torch.Tensor, title: str, cmap: str = "viridis", **kwargs) -> None:
    image = ax.imshow(rows.float().numpy(), aspect="auto", interpolation="nearest", cmap=cmap, **kwargs)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("channel")
    ax.set_ylabel("sample")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)


def plot_stripes(stats: StripeStats, path: str | Path, *, sites: Sequence[int | str] | None = None) -> Path:
    """Fig. 1a/1b: per site, the pooled statistic and the gate as samples x channels heatmaps,
    and histograms of their per-channel standard deviations over the samples."""
    chosen = _choose([s.label for s in stats], sites)
    fig = _figure(figsize=(15, 3.1 * len(chosen) + 0.6), layout="constrained")
    axes = fig.subplots(len(chosen), 3, squeeze=False)
    for row, index in zip(axes, chosen):
        site = stats[index]
        before, after, hist = row
        if site.pooled_rows:
            name = site.pooled_names[0]
            which = "" if name == "psi" else f", {name.removeprefix('psi_')}"  # psi_avg -> avg
            _heatmap(fig, before, site.pooled_rows[0],
                     f"{site.label}: before (pooled x{which}), score {site.pooled_score:.3g}")
        else:
            before.text(0.5, 0.5, f"{site.label}\npsi-driven gate: no pooled statistic",
                        ha="center", va="center", transform=before.transAxes)
            before.set_axis_off()
        _heatmap(fig, after, site.gate_rows, f"{site.label} [{site.kind}]: after (gate), score {site.score:.3g}")
        gate_std = site.gate_std.float().numpy()
        series = [(gate_std, "gate (after)", "tab:orange")]
        if site.pooled_std:
            series.insert(0, (site.pooled_std[0].flatten().float().numpy(), "pooled x (before)", "tab:blue"))
        top = max(float(s.max()) for s, _, _ in series)
        bins = torch.linspace(0.0, top if top > 0 else 1.0, 41).numpy()
        for values, name, color in series:
            hist.hist(values, bins=bins, alpha=0.6, color=color, label=name)
        hist.set_title(f"per-channel std over {site.samples} samples", fontsize=9)
        hist.set_xlabel("std of the channel's value")
        hist.set_ylabel("channels")
        hist.legend(fontsize=8)
    fig.suptitle(f"{stats.model_name}: stripe observation (rows: samples, columns: channels; "
                 "score = relative variation, 0 = constant)", fontsize=11)
    return _save(fig, path)


def plot_differences(recorder: GateRecorder, path: str | Path, *, images: int = 3, channels: int = 20,
                     sites: Sequence[int | str] | None = None, seed: int = 0) -> Path:
    """Fig. 1c: |v^(t+1) - v^t| per site (rows) and probe image (columns), channels x epochs."""
    diffs = recorder.differences()
    labels = list(diffs)
    chosen = _choose(labels, sites)
    epochs = recorder.epochs
    first = diffs[labels[chosen[0]]]
    images = max(1, min(images, first.shape[1]))
    gen = torch.Generator().manual_seed(seed)
    fig = _figure(figsize=(4.2 * images + 1.0, 3.0 * len(chosen) + 0.6), layout="constrained")
    axes = fig.subplots(len(chosen), images, squeeze=False)
    for row, index in zip(axes, chosen):
        label = labels[index]
        d = diffs[label]  # [epochs - 1, P, C]
        n_channels = d.shape[2]
        picked = torch.randperm(n_channels, generator=gen)[:min(channels, n_channels)].sort().values
        panel = d[:, :images][:, :, picked]  # [epochs - 1, images, channels]
        vmax = float(panel.max()) or 1.0
        for i, ax in enumerate(row):
            image = ax.imshow(panel[:, i].T.float().numpy(), aspect="auto", interpolation="nearest",
                              cmap="magma", vmin=0.0, vmax=vmax)
            ax.set_title(f"{label}, image {i}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylabel("channel")
            ticks = range(d.shape[0])
            step = max(1, len(ticks) // 10)
            ax.set_xticks(list(ticks)[::step], [str(epochs[t + 1]) for t in ticks][::step])
            ax.set_yticks(range(len(picked)), [str(int(c)) for c in picked], fontsize=6)
        fig.colorbar(image, ax=list(row), fraction=0.046, pad=0.02, label="|v(t) - v(t-1)|")
    fig.suptitle(f"{recorder.model_name}: first-order difference of the gates over epochs "
                 f"(black = no change; up to {channels} random channels per site)", fontsize=11)
    return _save(fig, path)
