"""Modules asrfx installs into converted graphs: BatchNorms that apply a gate inside their affine."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules._functions import SyncBatchNorm as _SyncBatchNormFunction

__all__ = ["GatedBatchNorm", "GatedSyncBatchNorm", "convert_sync_batchnorm"]


def _gated_affine(weight: torch.Tensor | None, bias: torch.Tensor | None, gate: torch.Tensor):
    """``gamma * v`` and ``beta * v`` in the parameters' dtype, each product formed in float32 or
    wider: a bfloat16 gate (autocast) meets a float32 gamma without being rounded first, and a
    bfloat16 model rounds each product once, as fuse's float64 fold does."""
    if weight is None:
        return gate, None if bias is None else bias * gate
    wide = torch.promote_types(torch.promote_types(weight.dtype, gate.dtype), torch.float32)
    g = gate.to(wide)
    scaled = (weight.to(wide) * g).to(weight.dtype)
    return scaled, None if bias is None else (bias.to(wide) * g).to(bias.dtype)


class GatedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose output is scaled per channel by a gate, inside the affine.

    ``GatedBatchNorm(x, v) == BatchNorm(x) * v.view(1, C, 1, ...)`` in training and in
    eval mode (paper eq. 7: ``BN(x; gamma * v, beta * v)``), without the extra pass over
    the feature map that a separate multiply costs. It takes over the parameters and
    buffers of the BatchNorm it replaces, under the same names, so state_dicts match.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.weight, self.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            self.running_mean, self.running_var = bn.running_mean, bn.running_var
            self.num_batches_tracked = bn.num_batches_tracked
        self.train(bn.training)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GatedBatchNorm expects at least 2D input, got {input.dim()}D")

    def _bookkeeping(self) -> tuple[float, bool, torch.Tensor | None, torch.Tensor | None]:
        """torch.nn.BatchNorm's forward preamble: (momentum factor, use batch statistics,
        running mean, running var to pass)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return factor, use_batch_stats, self.running_mean if keep else None, self.running_var if keep else None

    def forward(self, input: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # noqa: A002
        factor, use_batch_stats, mean, var = self._bookkeeping()
        weight, bias = _gated_affine(self.weight, self.bias, gate)
        return F.batch_norm(input, mean, var, weight, bias, use_batch_stats, factor, self.eps)


class GatedSyncBatchNorm(GatedBatchNorm, nn.SyncBatchNorm):
    """:class:`GatedBatchNorm` with batch statistics synchronized across processes, as
    ``torch.nn.SyncBatchNorm``: what :func:`convert_sync_batchnorm` puts where a gated norm was.

    It is a GatedBatchNorm (fuse folds its gate and deploys a plain BatchNorm) and a
    SyncBatchNorm (synchronized only in training, on GPU, with more than one process;
    otherwise it normalizes locally, like torch's).
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, process_group=None):
        super().__init__(bn)
        self.process_group = process_group

    def forward(self, input: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # noqa: A002
        self._check_non_zero_input_channels(input)
        factor, use_batch_stats, mean, var = self._bookkeeping()
        weight, bias = _gated_affine(self.weight, self.bias, gate)
        group, world = self._sync_group(input, use_batch_stats)
        if group is None:
            return F.batch_norm(input, mean, var, weight, bias, use_batch_stats, factor, self.eps)
        return _SyncBatchNormFunction.apply(input, weight, bias, mean, var, self.eps, factor, group, world)

    def _sync_group(self, input: torch.Tensor, use_batch_stats: bool):
        """(process group, world size) when this call synchronizes, else (None, 1): torch's rule."""
        if not (use_batch_stats and self.training and dist.is_available() and dist.is_initialized()):
            return None, 1
        if input.device.type not in ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name()):
            raise ValueError(f"GatedSyncBatchNorm synchronizes batch statistics of GPU tensors only (as "
                             f"torch.nn.SyncBatchNorm), got a {input.device.type} input: train on GPU, or "
                             "keep GatedBatchNorm (skip convert_sync_batchnorm) on CPU")
        group = self.process_group or dist.group.WORLD
        world = dist.get_world_size(group)
        return (group, world) if world > 1 else (None, 1)


def _install(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    if not path:
        return module
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
    return root


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` that keeps asrfx's gates.

    Every BatchNorm becomes a SyncBatchNorm, as with torch's function, except that each
    gated norm (:class:`GatedBatchNorm`, from ``asrfx.convert``) becomes a
    :class:`GatedSyncBatchNorm`, sharing its parameters and buffers. Torch's own function
    replaces a gated norm by a plain SyncBatchNorm, whose forward then fails ("takes 2
    positional arguments but 3 were given"); a GraphModule already converted that way is
    repaired here too (a norm called with a gate becomes gated again). Like torch's, it
    converts ``model`` in place and returns it.
    """
    gated = {path for path, m in model.named_modules() if isinstance(m, GatedBatchNorm)}
    if isinstance(model, fx.GraphModule):  # norms torch's function already made plain: called with a gate
        modules = dict(model.named_modules())
        gated |= {str(n.target) for n in model.graph.nodes if n.op == "call_module" and len(n.args) == 2
                  and isinstance(modules.get(str(n.target)), nn.modules.batchnorm._BatchNorm)}
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    for path in sorted(gated):
        plain = model.get_submodule(path) if path else model
        model = _install(model, path, GatedSyncBatchNorm(plain, process_group))
    return model
