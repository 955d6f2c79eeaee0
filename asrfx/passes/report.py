"""SiteTable: the result of find_attention, printable as a table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import fx

from ..graph.capture import CaptureRoute
from .site import AttentionSite, LeafRecord, Rejection

__all__ = ["SiteTable"]


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
    capture: CaptureRoute = CaptureRoute("fx")  # how the model became graph_module, and why

    def __getitem__(self, index):
        return self.sites[index]

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"SiteTable({self.model_name}: {len(self.sites)} sites)"

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
            lines.append(f"not attention ({len(self.rejections)}):")
            for rej in self.rejections:
                lines.append(f"  {rej.module_path or '(top level)'} [{rej.combine.name}]: {rej.reason}")
        if self.leaves:
            lines.append(f"traced as single calls ({len(self.leaves)}), checked for hidden attention:")
            for leaf in self.leaves:
                lines.append(f"  {leaf.path} ({leaf.module_type}): {leaf.reason}"
                             + (f"; NOT searched: {leaf.unsearched}" if leaf.unsearched else ""))
        return "\n".join(lines)
