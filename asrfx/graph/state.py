"""The caller's per-module state, carried over to what a pass returns.

Users freeze parts of a model for fine-tuning: BatchNorms kept in eval mode while the rest
trains (their running statistics must not move), dropout switched off, parameters with
``requires_grad=False``. A pass returns a new GraphModule whose modules and parameters keep
their qualified names, so that state is recorded by name before the pass and set again after
it; ``gm.train(flag)`` would reset every module at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ModuleState"]


@dataclass(frozen=True)
class ModuleState:
    """Training flags and frozen parameters of a model, by qualified name."""

    training: dict[str, bool]  # module path ("" the root) -> its training flag
    frozen: frozenset[str]  # names of parameters with requires_grad=False

    @classmethod
    def of(cls, model: nn.Module) -> ModuleState:
        return cls({path: m.training for path, m in model.named_modules(remove_duplicate=False)},
                   frozenset(name for name, p in model.named_parameters(remove_duplicate=False)
                             if not p.requires_grad))

    def apply(self, gm: nn.Module, new_modules: bool | None = None) -> nn.Module:
        """Set each module's flag and each parameter's requires_grad as recorded, by name.

        Modules with no recorded flag (fx's containers are recorded under the original's
        paths; new ones: inserted attention, keep-mode copies) get ``new_modules`` when it
        is given and keep their own flag otherwise. New parameters (psi) stay trainable.
        """
        for path, module in gm.named_modules(remove_duplicate=False):
            flag = self.training.get(path, new_modules)
            if flag is not None:
                module.training = flag
        for name, p in gm.named_parameters(remove_duplicate=False):
            if name in self.frozen:
                p.requires_grad_(False)
        return gm
