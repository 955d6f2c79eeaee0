"""Models handed over inside a training wrapper: DataParallel, DistributedDataParallel, torch.compile.

The wrappers' forwards are not the model's (scatter, gradient hooks, a compiled frame), so
torch.fx cannot trace them and the error would name the wrapper. The passes work on the
module inside instead, and say so: what they return is not wrapped, and training it
distributed or compiled means wrapping it again. Sharded models (FSDP) are refused: their
parameters are shards, not the model's weights.
"""

from __future__ import annotations

import sys

from torch import nn

from ..errors import AsrfxError

__all__ = ["unwrap"]


def _sharded(model: nn.Module) -> str | None:
    """The fix for a model whose parameters are shards, or None."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # torch built without distributed support
        return None
    if isinstance(model, FSDPModule):
        return ("gather its full state first: build the model again unsharded and load "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True)) into it, or run asrfx before fully_shard")
    if isinstance(model, FullyShardedDataParallel):
        return ("gather its full state first (FullyShardedDataParallel.state_dict_type(model, "
                "StateDictType.FULL_STATE_DICT), load it into an unsharded copy), or run asrfx before wrapping")
    return None


def _inner(model: nn.Module) -> tuple[nn.Module, str, str] | None:
    """(the wrapped module, the attribute that reaches it, the wrapper's name) for one layer, or None."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # never imported: nothing was compiled
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return model._orig_mod, "._orig_mod", "torch.compile"
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module, ".module", type(model).__name__
    return None


def unwrap(model: nn.Module, verb: str, *, rewrap: bool = True) -> tuple[nn.Module, str]:
    """The model inside DataParallel / DistributedDataParallel / torch.compile wrappers
    (nested ones too) and a note saying so (empty when nothing was unwrapped).

    ``rewrap``: the note reminds the caller to wrap the result again (passes that return a
    model to train). A sharded (FSDP) model is refused with the way to get its full weights.
    """
    wrappers, reach = [], "model"
    while True:
        fix = _sharded(model)
        if fix:
            inside = "".join(f" inside {w}" for w in reversed(wrappers))
            raise AsrfxError(f"asrfx.{verb} got a model sharded by FSDP ({type(model).__name__}{inside}), whose "
                             f"parameters are shards of the weights: {fix}")
        inner = _inner(model)
        if inner is None:
            break
        model, step, name = inner
        wrappers.append(name)
        reach += step
    if not wrappers:
        return model, ""
    note = f"asrfx.{verb} worked on the {type(model).__name__} inside {' inside '.join(reversed(wrappers))} ({reach})"
    if rewrap:
        note += f"; the result is not wrapped: apply {', then '.join(reversed(wrappers))} to it again to train it so"
    return model, note
