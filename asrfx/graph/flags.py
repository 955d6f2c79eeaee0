"""Which training flags a torch.fx trace read, so one trace can serve train and eval mode.

torch.fx evaluates ``self.training`` while tracing. To make a traced graph follow
``.train()`` / ``.eval()``, :func:`asrfx.graph.capture.trace` traces the model in both modes
and compares the graphs. Most models never read the flag in traced code (BatchNorm, Dropout
and the like are leaf calls that read it at run time), and then the second trace is wasted.

:class:`FlagProbe` tells, from the first trace alone: while it is active, every module's
``training`` attribute is a :class:`Flag`, an ``int`` subclass that behaves as the bool it
stands for and records each use as a truth value (``if self.training``, ``and``, ``==``).
torch.fx keeps a flag passed as an argument (``F.dropout(x, p, self.training)``,
torchvision's ``stochastic_depth(..., self.training)``) in the node's arguments as it is.
After the trace:

* no flag was used as a truth value: the graph does not depend on the mode except through
  those arguments, which :meth:`FlagProbe.arguments` lists for the caller to replace by a read
  of the GraphModule's own flag; no second trace is needed;
* otherwise the structure may depend on the mode: :meth:`FlagProbe.materialize` puts plain
  bools back (the graph an ordinary trace gives) and the caller traces the other mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import fx, nn

__all__ = ["Flag", "FlagProbe", "probe_training_flags"]


class Flag(int):
    """A module's training flag during a probed trace: the bool it holds, recording truth-value uses."""

    def __new__(cls, value: bool, probe: FlagProbe):
        flag = super().__new__(cls, int(bool(value)))
        flag.value = bool(value)
        flag.probe = probe
        return flag

    def _read(self) -> bool:
        self.probe.truth_reads += 1
        return self.value

    def __bool__(self) -> bool:
        return self._read()

    def __eq__(self, other) -> bool:
        return self._read() == other

    def __ne__(self, other) -> bool:
        return self._read() != other

    def __and__(self, other):
        return self._read() & other

    def __or__(self, other):
        return self._read() | other

    def __xor__(self, other):
        return self._read() ^ other

    __rand__, __ror__, __rxor__ = __and__, __or__, __xor__

    def __int__(self) -> int:
        return int(self._read())

    def __index__(self) -> int:
        return int(self._read())

    def __float__(self) -> float:
        return float(self._read())

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:  # if one ever reached generated code, it would read as the bool itself
        return repr(self.value)


class FlagProbe:
    """The flags of one probed trace and how they were used."""

    def __init__(self):
        self.truth_reads = 0  # uses as a truth value: the graph's structure may depend on the mode

    @property
    def mode_free(self) -> bool:
        """No flag was used as a truth value while tracing."""
        return self.truth_reads == 0

    @staticmethod
    def arguments(graph: fx.Graph) -> list[fx.Node]:
        """Nodes holding a flag in their arguments (wrapped calls given ``self.training``)."""
        found = []
        for node in graph.nodes:
            hit = []
            fx.node.map_aggregate((node.args, node.kwargs), lambda a: hit.append(a) if isinstance(a, Flag) else a)
            if hit:
                found.append(node)
        return found

    @staticmethod
    def replace(graph: fx.Graph, value_of) -> None:
        """Every flag in the graph's arguments becomes ``value_of(flag)``."""
        swap = lambda a: value_of(a) if isinstance(a, Flag) else a
        for node in FlagProbe.arguments(graph):
            node.args = fx.node.map_aggregate(node.args, swap)
            node.kwargs = fx.node.map_aggregate(node.kwargs, swap)

    @staticmethod
    def materialize(graph: fx.Graph) -> None:
        """Plain bools where flags are: the graph an ordinary trace in this mode gives."""
        FlagProbe.replace(graph, lambda flag: flag.value)


@contextmanager
def probe_training_flags(model: nn.Module) -> Iterator[FlagProbe]:
    """Every module's ``training`` becomes a :class:`Flag` of the same value while the block runs;
    the flags are restored after, whatever happens."""
    probe = FlagProbe()
    saved = [(m, m.__dict__.get("training")) for m in model.modules()]
    try:
        for m, value in saved:
            if isinstance(value, bool):
                m.__dict__["training"] = Flag(value, probe)
        yield probe
    finally:
        for m, value in saved:
            m.__dict__["training"] = value
