"""GateRecorder: the gates of every attention site on fixed probe images, epoch after epoch.

The paper's Fig. 1c: the first-order difference ``|v^(t+1) - v^t|`` of the gates over
epochs goes to zero early in training. Call ``record()`` after each epoch of your own
training loop; the recorder reads the gates through a graph traced once at construction,
which shares the live model's parameters and buffers, so it always sees the current weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..passes.find import find_sites
from ..errors import AsrfxError, AsrfxWarning
from .stripe import gate_probes, input_batches, measure

__all__ = ["GateRecorder"]


class GateRecorder:
    """Record the gates of every attention site of ``model`` on ``probe`` images.

    Args:
        model: the model being trained (``nn.Module`` or ``GraphModule``; a model from
            :func:`asrfx.convert` records its psi-driven gates). It is never modified.
        probe: a fixed batch of inputs [P, ...] (or an (inputs, labels) pair).
        example_inputs: inputs giving the shapes; default: ``probe``.
        leaf_modules: as for :func:`asrfx.find_attention`.

    ``record(epoch)`` runs the probe once (eval mode, no grad; the model's modes are
    restored) and stores each site's gates [P, C]. ``history()`` stacks them per site
    ([epochs, P, C]), ``differences()`` gives ``|v^(t+1) - v^t|`` ([epochs - 1, P, C]),
    and ``plot(path)`` draws them as the paper's Fig. 1c.
    """

    def __init__(self, model: nn.Module, probe: Any, example_inputs: Any = None, *,
                 leaf_modules: Sequence[str | type] = ()):
        batches = list(input_batches(probe, 1))
        if not batches:
            raise AsrfxError("GateRecorder needs a probe batch: a tensor of fixed inputs [P, ...]")
        # a copy: later edits of the caller's tensor must not change the probe
        self._inputs = tuple(t.detach().clone() for t in batches[0])
        table = find_sites(model, self._inputs if example_inputs is None else example_inputs,
                           leaf_modules=leaf_modules)
        for note in table.notes:
            warnings.warn(note, AsrfxWarning, stacklevel=2)
        self._gm = table.graph_module
        self._model = model
        self._probes = gate_probes(self._gm, table.sites)
        if not self._probes:
            raise AsrfxError(f"no channel-attention site found in {table.model_name}: there is no gate to record")
        self.model_name = table.model_name
        self.epochs: list[Any] = []  # the epoch label of each record, in order
        self._gates: list[list[torch.Tensor]] = [[] for _ in self._probes]  # per site, per record: [P, C]

    @property
    def labels(self) -> tuple[str, ...]:
        """The site labels (module paths; " [asr]" for psi-driven gates), in graph order."""
        return tuple(p.label for p in self._probes)

    def record(self, epoch: Any = None) -> dict[str, torch.Tensor]:
        """Read every site's gates on the probe now; ``epoch`` labels the record (default: its index).
        Returns the gates just recorded, per site label ([P, C], float64)."""
        result = measure(self._gm, self._probes, [self._inputs], keep_rows=self._inputs[0].shape[0],
                         also=(self._model,))
        for store, site in zip(self._gates, result.sites):
            store.append(site.gate_rows)
        self.epochs.append(len(self.epochs) if epoch is None else epoch)
        return {p.label: site.gate_rows for p, site in zip(self._probes, result.sites)}

    def history(self) -> dict[str, torch.Tensor]:
        """Per site label: the recorded gates, [records, P, C]."""
        if not self.epochs:
            raise AsrfxError("GateRecorder: nothing recorded yet; call record() after each epoch")
        return {p.label: torch.stack(g) for p, g in zip(self._probes, self._gates)}

    def differences(self) -> dict[str, torch.Tensor]:
        """Per site label: the first-order difference |v^(t+1) - v^t| over records, [records - 1, P, C]."""
        if len(self.epochs) < 2:
            raise AsrfxError(f"GateRecorder: first-order differences need two records, have {len(self.epochs)}")
        return {label: (h[1:] - h[:-1]).abs() for label, h in self.history().items()}

    def plot(self, path: str | Path, *, images: int = 3, channels: int = 20,
             sites: Sequence[int | str] | None = None, seed: int = 0) -> Path:
        """Save the paper's Fig. 1c: per site (rows) and probe image (columns), |v^(t+1) - v^t| for
        ``channels`` randomly chosen channels (``seed``) over epochs. Needs matplotlib."""
        from .plots import plot_differences

        return plot_differences(self, path, images=images, channels=channels, sites=sites, seed=seed)
