"""SiteTable: the result of find_attention, printable as a table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import fx

from ..graph.capture import CaptureRoute
from .site import AttentionSite, LayoutLoss, LeafRecord, Rejection, Verdict

__all__ = ["SiteTable", "detection_notes"]


def _where(path: str, node: fx.Node) -> str:
    return f"'{path or '(top level)'}' [{node.name}]"


def detection_notes(sites: int, rejections: Sequence[Rejection], losses: Sequence[LayoutLoss]) -> list[str]:
    """What a user must hear about a detection beyond its sites (warned by find_attention and
    convert, and written into convert's report): where the axis layout was lost, attention-like
    patterns asrfx could not decide, and attention-like patterns refused when nothing was found."""
    notes = []
    if losses:
        first, more = losses[0], len(losses) - 1
        tensors = sum(loss.tensors for loss in losses)
        notes.append(
            f"the axis layout is unknown from {_where(first.module_path, first.node)} ({first.op}) on"
            + (f" and from {more} more place(s)" if more else "")
            + f" ({tensors} tensor(s)): asrfx cannot tell channels from positions there, so channel "
            "attention computed from those tensors may be missed (it is listed in rejections as undecided)")
    undecided = [r for r in rejections if r.verdict is Verdict.UNDECIDED]
    refused = [r for r in rejections if r.verdict is Verdict.NOT_CHANNEL]
    if undecided:
        first = undecided[0]
        notes.append(
            ("no channel-attention site found, but " if not sites else "")
            + f"{len(undecided)} pattern(s) look like channel attention but could not be read as sites, "
            f"so they may be missed (first at {_where(first.module_path, first.combine)}: {first.reason})")
    elif refused and not sites:
        first = refused[0]
        notes.append(f"no channel-attention site found; {len(refused)} attention-like pattern(s) are not channel "
                     f"attention (first at {_where(first.module_path, first.combine)}: {first.reason})")
    return notes


@dataclass(frozen=True)
class SiteTable(Sequence[AttentionSite]):
    """The channel-attention sites of a model, in graph order.

    A sequence of :class:`AttentionSite`; ``print(table)`` shows module path,
    kind, channels, gate shape and fold target of each.
    """

    sites: tuple[AttentionSite, ...]  # the detected sites
    rejections: tuple[Rejection, ...]  # combines that looked like attention but are not, and why
    leaves: tuple[LeafRecord, ...]  # submodules traced as single calls
    graph_module: fx.GraphModule  # the traced graph the nodes belong to
    model_name: str  # class name of the model, for the header
    layout_losses: tuple[LayoutLoss, ...] = ()  # where the axis layout became unknown (detection is blind there)
    capture: CaptureRoute = CaptureRoute("fx")  # how the model became graph_module, and why

    def __getitem__(self, index):
        return self.sites[index]

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"SiteTable({self.model_name}: {len(self.sites)} sites)"

    @property
    def notes(self) -> list[str]:
        """The warnings find_attention gave: lost layout, undecided or refused attention-like patterns."""
        return detection_notes(len(self.sites), self.rejections, self.layout_losses)

    def format(self, *, rejections: bool = True) -> str:
        """The table as text."""
        n_nodes = len(self.graph_module.graph.nodes)
        lines = [f"{self.model_name}: {len(self.sites)} channel-attention site(s) "
                 f"in a graph of {n_nodes} nodes"]
        if self.capture.name == "export":
            lines.append(str(self.capture))
        if self.sites:
            rows = [("#", "module", "kind", "channels", "gate shape", "fold target")]
            for i, site in enumerate(self.sites, 1):
                uses = f" x{len(site.uses)}" if len(site.uses) > 1 else ""
                rows.append((str(i), site.module_path or "(top level)", f"{site.kind}{uses}",
                             str(site.channels), str(tuple(site.gate_shape)), site.absorption.reason))
            widths = [max(len(r[c]) for r in rows) for c in range(5)]
            for r in rows:
                lines.append("  " + "  ".join(r[c].ljust(widths[c]) for c in range(5)) + "  " + r[5])
        if rejections and self.rejections:
            lines.append(f"not reported as sites ({len(self.rejections)}):")
            for rej in self.rejections:
                lines.append(f"  {rej.module_path or '(top level)'} [{rej.combine.name}] {rej.verdict}: {rej.reason}")
        for loss in self.layout_losses:
            lines.append(f"layout unknown from {_where(loss.module_path, loss.node)} ({loss.op}) on: "
                         f"{loss.tensors} tensor(s) whose channels and positions asrfx cannot tell apart")
        if self.leaves:
            lines.append(f"traced as single calls ({len(self.leaves)}), checked for hidden attention:")
            for leaf in self.leaves:
                lines.append(f"  {leaf.path} ({leaf.module_type}): {leaf.reason}"
                             + (f"; NOT searched: {leaf.unsearched}" if leaf.unsearched else ""))
        return "\n".join(lines)
