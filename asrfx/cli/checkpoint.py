"""Checkpoint files: loading them safely, and the asrfx formats the command line writes.

Every file is read with ``torch.load(path, weights_only=True)``: tensors and plain data
only, never code. A file holding pickled Python objects (a whole ``nn.Module`` saved with
``torch.save(model)``) is refused unless the caller passes ``trust_pickle=True``, since
unpickling it runs code from the file.

What a file can hold:

* a **state_dict** (or a training checkpoint with one under ``state_dict`` /
  ``model_state_dict`` / ``model``), plus a model spec naming the architecture;
* an **asrfx.asr/1** checkpoint (written by ``asrfx convert``): plain data,
  ``{"format", "model", "model_kwargs", "input_shape", "method", "options", "state_dict"}``.
  The converted GraphModule is rebuilt deterministically: build the architecture from
  the spec, convert (or insert) with the same options on an input of ``input_shape``,
  then ``load_state_dict(strict=True)``;
* an **asrfx.fused/1** checkpoint (``asrfx fuse -o deployed.pt``): the same recipe plus
  ``asr_state_dict`` and the fused ``state_dict``. What fuse produces depends on the gate
  values (a gate folds through ReLU only if it is non-negative, a gate that cannot fold is
  kept as a constant), so the fused model is rebuilt through the ASR weights: rebuild the
  ASR form, ``.eval()``, fuse, and check that the stored fused weights load strictly;
* a **torch.export program** (``asrfx fuse -o deployed.pt2``): loaded only with
  ``trust_pickle=True``, because ``torch.export.load`` unpickles parts of it;
* with ``trust_pickle=True`` only: a pickled ``nn.Module``.

Every malformed file (damaged or truncated archive, a recipe edited to negative or
absurd sizes, tensors of the wrong shape) raises :class:`CheckpointError` with one line
saying what is wrong. Files are written to a temporary file in the same folder, flushed to
disk, then renamed over the target: a process killed while saving leaves the previous
file intact, never a half-written one under the target's name.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import secrets
import warnings
import zipfile
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..errors import AsrfxError, AsrfxWarning
from .specs import build_model, default_input_shape, parse_spec

__all__ = ["FORMAT_ASR", "FORMAT_FUSED", "CheckpointError", "UnsafeFileError", "ArchitectureNeededError",
           "Recipe", "Loaded",
           "example_input", "read_file", "load", "load_weights", "apply_recipe", "save_asr", "save_fused",
           "save_export", "input_shape_problem", "MAX_INPUT_ELEMENTS", "MAX_REPEATS", "MAX_CLASSES"]

FORMAT_ASR = "asrfx.asr/1"
FORMAT_FUSED = "asrfx.fused/1"
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")  # where training scripts nest it
# Limits on what a recipe may ask to build: a file edited to absurd sizes is refused, not allocated.
MAX_INPUT_ELEMENTS = 2**26  # example input elements (256 MB in float32; 1x3x4096x4096 is 50M)
MAX_REPEATS = 16  # attention modules in a row at one place (the paper's delta is 1 to 4)
MAX_CLASSES = 100_000  # num_classes (ImageNet-21k has 21,841)


class CheckpointError(AsrfxError):
    """A file that is missing, unreadable, or not a checkpoint asrfx understands."""


class UnsafeFileError(CheckpointError):
    """A file whose loading would execute pickled code, refused without trust_pickle."""


class ArchitectureNeededError(CheckpointError):
    """A state_dict given without the model spec that says which architecture it belongs to."""


def example_input(shape: tuple[int, ...], batch: int | None = None) -> torch.Tensor:
    """A fixed random input of ``shape`` (the passes read only its shape), optionally another batch size."""
    shape = (batch, *shape[1:]) if batch else tuple(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class Recipe:
    """How an ASR-form model was made: enough to rebuild it from plain data."""

    model: str | None  # model spec; None: the architecture is a pickled module stored alongside
    input_shape: tuple[int, ...]
    method: str = "convert"  # "convert" (existing attention) or "insert" (added to a plain backbone)
    options: dict[str, Any] = field(default_factory=dict)  # convert: keep, psi_init; insert: attention, repeats, psi_init
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # builder arguments, e.g. num_classes

    def example(self, batch: int | None = None) -> torch.Tensor:
        return example_input(self.input_shape, batch)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "model_kwargs": dict(self.model_kwargs),
                "input_shape": list(self.input_shape), "method": self.method, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> Recipe:
        try:
            shape = data["input_shape"]
            if not isinstance(shape, (list, tuple)) or not all(_is_int(s) for s in shape):
                raise TypeError(f"input_shape must be a list of integers, got {shape!r}")
            recipe = cls(model=data["model"], input_shape=tuple(shape),
                         method=data.get("method", "convert"), options=dict(data.get("options", {})),
                         model_kwargs=dict(data.get("model_kwargs", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where} is an asrfx checkpoint with a broken recipe ({type(exc).__name__}: "
                                  f"{exc}); re-create it with asrfx convert") from exc
        problem = recipe.problem()
        if problem:
            raise CheckpointError(f"{where} has a recipe asrfx cannot rebuild: {problem} (was the file edited?); "
                                  "re-create it with asrfx convert")
        return recipe

    def problem(self) -> str | None:
        """What makes this recipe unbuildable or unsafe to build, or None."""
        from ..nn.attention import ATTENTION

        if self.model is not None and not isinstance(self.model, str):
            return f"model spec {self.model!r} is not a string"
        if self.method not in ("convert", "insert"):
            return f"unknown method {self.method!r} (convert or insert)"
        shape = input_shape_problem(self.input_shape)
        if shape:
            return f"input_shape {list(self.input_shape)}: {shape}"
        unknown = sorted(set(self.model_kwargs) - {"num_classes"})
        if unknown:
            return f"builder argument(s) {unknown}: asrfx writes only num_classes"
        classes = self.model_kwargs.get("num_classes", 1)
        if not _is_int(classes) or not 1 <= classes <= MAX_CLASSES:
            return f"num_classes {classes!r} is not an integer in [1, {MAX_CLASSES:,}]"
        known = {"convert": {"keep", "psi_init"}, "insert": {"attention", "repeats", "psi_init"}}[self.method]
        unknown = sorted(set(self.options) - known)
        if unknown:
            return f"{self.method} option(s) {unknown} unknown (expected {sorted(known)})"
        psi = self.options.get("psi_init", 0.1)
        if not isinstance(psi, (int, float)) or isinstance(psi, bool) or not math.isfinite(psi):
            return f"psi_init {psi!r} is not a finite number"
        if self.method == "convert" and not isinstance(self.options.get("keep", False), bool):
            return f"keep {self.options['keep']!r} is not true or false"
        if self.method == "insert":
            if self.options.get("attention") not in ATTENTION:
                return f"attention {self.options.get('attention')!r} is not one of {sorted(ATTENTION)}"
            repeats = self.options.get("repeats", 1)
            if not _is_int(repeats) or not 1 <= repeats <= MAX_REPEATS:
                return f"repeats {repeats!r} is not an integer in [1, {MAX_REPEATS}]"
        return None

    def describe(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        if self.method == "insert":
            how = f"insert {self.options.get('attention')} x{self.options.get('repeats', 1)}"
        else:
            how = "keep mode (ASR(k) + k)" if self.options.get("keep") else "replace mode"
        kwargs = "".join(f", {k}={v}" for k, v in self.model_kwargs.items())
        return f"{self.model or 'pickled module'}{kwargs}, input {shape}, {how}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def input_shape_problem(shape: tuple[int, ...]) -> str | None:
    """Why ``shape`` cannot be an example input (sizes not positive, too many elements), or None."""
    if not shape or len(shape) > 8:
        return "expected 1 to 8 sizes"
    if any(not _is_int(s) or s < 1 for s in shape):
        return "sizes must be positive integers"
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        return f"{math.prod(shape):,} elements, more than the {MAX_INPUT_ELEMENTS:,} asrfx allocates for an example"
    return None


@dataclass
class Loaded:
    """A model read from a spec or a file."""

    model: nn.Module
    kind: str  # "model" (spec, state_dict), "module" (trusted pickle), "asr", "fused", "export"
    input_shape: tuple[int, ...]
    source: str  # the spec or the path, for messages
    spec: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    recipe: Recipe | None = None
    asr_state_dict: dict[str, torch.Tensor] | None = None  # fused checkpoints: the weights fuse started from
    extra: dict[str, Any] | None = None  # asr checkpoints: training state saved alongside (save_asr(extra=...))

    def example(self, batch: int | None = None) -> torch.Tensor:
        return example_input(self.input_shape, batch)


# -- reading files ------------------------------------------------------------------------


def _is_export_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path} is a damaged zip archive (truncated or corrupted: {exc}); "
                              "use an intact copy of the file") from None
    return any(n.endswith("/archive_format") for n in names) and not any(n.endswith("/data.pkl") for n in names)


def read_file(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` unless ``trust_pickle``; one-line errors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such file: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if _is_export_archive(path):
        if not trust_pickle:
            raise UnsafeFileError(
                f"{path} is a torch.export program; torch.export.load unpickles parts of it, so asrfx "
                "loads it only with --trust-pickle (only if you trust the file), or run it directly with "
                "torch.export.load(path).module()")
        return torch.export.load(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        text = str(exc)
        if not trust_pickle and "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            if found:
                raise UnsafeFileError(
                    f"{path} holds pickled Python objects ({found.group(1)}), and loading them would run "
                    "code from the file: re-save the weights with torch.save(model.state_dict(), path) and "
                    "pass --model <spec>, or pass --trust-pickle if you trust this file") from None
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise CheckpointError(f"{path} is not a PyTorch checkpoint asrfx can read "
                              f"(torch.load failed: {type(exc).__name__}: {first[:200]})") from None


def _state_dict_in(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state_dict in ``obj``: itself, or nested under a usual key; DataParallel's 'module.' removed."""
    candidates = [obj] + [obj[k] for k in _STATE_DICT_KEYS if isinstance(obj, Mapping) and k in obj]
    for sd in candidates:
        if isinstance(sd, Mapping) and sd and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in sd.items()):
            if all(k.startswith("module.") for k in sd):
                return {k[len("module."):]: v for k, v in sd.items()}
            return dict(sd)
    return None


def _check_named_tensors(state_dict: Mapping[Any, Any], what: str) -> None:
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} entry(ies) are not named tensors "
                              f"(e.g. {bad[0]!r}: {type(state_dict[bad[0]]).__name__})")


def load_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)``, with a one-line summary of any mismatch."""
    _check_named_tensors(state_dict, f"the weights in {what}")
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    kinds = [k for k in own if k in state_dict and k not in wrong
             and own[k].is_floating_point() != state_dict[k].is_floating_point()]
    if missing or unexpected or wrong or kinds:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es) (e.g. {k}: file {tuple(state_dict[k].shape)}, "
                         f"model {tuple(own[k].shape)})")
        if kinds:
            k = kinds[0]
            parts.append(f"{len(kinds)} dtype mismatch(es) (e.g. {k}: file {state_dict[k].dtype}, "
                         f"model {own[k].dtype})")
        raise CheckpointError(f"the weights in {what}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


# -- rebuilding -----------------------------------------------------------------------------


def apply_recipe(module: nn.Module, recipe: Recipe) -> fx.GraphModule:
    """Convert (or insert into) ``module`` as the recipe says; the caller checks the report."""
    from ..api import convert, insert

    example = (recipe.example(),)
    opts = recipe.options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AsrfxWarning)  # "nothing converted" is the caller's to report
        if recipe.method == "insert":
            return insert(module, opts["attention"], example, repeats=int(opts.get("repeats", 1)),
                          psi_init=float(opts.get("psi_init", 0.1)))
        return convert(module, example, keep=bool(opts.get("keep", False)),
                       psi_init=float(opts.get("psi_init", 0.1)))


def _architecture(recipe: Recipe, ckpt: Mapping[str, Any], where: str) -> nn.Module:
    if recipe.model is not None:
        return build_model(recipe.model, **recipe.model_kwargs)
    module = ckpt.get("module")
    if not isinstance(module, nn.Module):
        raise CheckpointError(f"{where} names no model spec and holds no module to rebuild from")
    return copy.deepcopy(module)


def _rebuild_asr(recipe: Recipe, state_dict: Mapping[str, torch.Tensor], ckpt, where: str) -> fx.GraphModule:
    try:
        gm = apply_recipe(_architecture(recipe, ckpt, where), recipe)
    except AsrfxError:
        raise
    except Exception as exc:  # a recipe that passed the checks and still fails names the file, in one line
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{where}: rebuilding {recipe.describe()} failed ({type(exc).__name__}: {first}); "
                              "the file may be damaged or edited, re-create it with asrfx convert") from exc
    load_weights(gm, state_dict, f"{where} do not fit its recipe ({recipe.describe()})")
    return gm


def _from_asrfx(ckpt: Mapping[str, Any], where: str, input_shape) -> Loaded:
    fmt = ckpt["format"]
    if fmt not in (FORMAT_ASR, FORMAT_FUSED):
        raise CheckpointError(f"{where} has format {fmt!r}, which this asrfx does not know "
                              f"(it reads {FORMAT_ASR} and {FORMAT_FUSED}); upgrade asrfx")
    recipe = Recipe.from_dict(ckpt, where)
    if input_shape is not None:
        recipe = Recipe(recipe.model, tuple(input_shape), recipe.method, recipe.options, recipe.model_kwargs)
    common = dict(input_shape=recipe.input_shape, source=where, spec=recipe.model,
                  model_kwargs=recipe.model_kwargs, recipe=recipe)
    needed = ("state_dict",) if fmt == FORMAT_ASR else ("state_dict", "asr_state_dict")
    missing = [k for k in needed if not isinstance(ckpt.get(k), Mapping)]
    if missing:
        raise CheckpointError(f"{where} is an {fmt} checkpoint without {' and '.join(missing)}; "
                              "re-create it with asrfx convert / fuse")
    for key in needed:  # before anything is built
        _check_named_tensors(ckpt[key], f"the weights in {where} ('{key}')")
    if fmt == FORMAT_ASR:
        extra = ckpt.get("extra")
        if extra is not None and not isinstance(extra, Mapping):
            raise CheckpointError(f"{where}: its training state ('extra') is a {type(extra).__name__}, not a dict")
        gm = _rebuild_asr(recipe, ckpt["state_dict"], ckpt, where)
        return Loaded(gm, "asr", extra=None if extra is None else dict(extra), **common)
    from ..api import fuse

    asr = _rebuild_asr(recipe, ckpt["asr_state_dict"], ckpt, where).eval()
    fused = fuse(asr, (recipe.example(),))
    load_weights(fused, ckpt["state_dict"], f"{where} do not fit the model fused from its ASR weights")
    return Loaded(fused, "fused", asr_state_dict=dict(ckpt["asr_state_dict"]), **common)


def load(
    path: str | Path | None = None,
    *,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
    trust_pickle: bool = False,
) -> Loaded:
    """A model from a spec (``model='torchvision:resnet50'``), a file, or a state_dict file plus a spec.

    asrfx checkpoints come back rebuilt: the ASR-form GraphModule (``kind='asr'``) or the
    fused one (``kind='fused'``). ``input_shape`` overrides the default (the checkpoint's,
    or the model's own size).
    """
    kwargs = dict(model_kwargs or {})
    problem = input_shape_problem(tuple(input_shape)) if input_shape is not None else None
    if problem:
        raise CheckpointError(f"input shape {list(input_shape)}: {problem}")
    if path is None:
        if model is None:
            raise CheckpointError("give a checkpoint file or a model spec (--model torchvision:resnet50)")
        spec = parse_spec(model)
        shape = tuple(input_shape) if input_shape else default_input_shape(spec)
        return Loaded(build_model(spec, **kwargs), "model", shape, str(spec), str(spec), kwargs)
    where = str(path)
    obj = read_file(path, trust_pickle=trust_pickle)
    if isinstance(obj, Mapping) and isinstance(obj.get("format"), str) and obj["format"].startswith("asrfx."):
        if model is not None:
            raise CheckpointError(f"{where} is an asrfx checkpoint that names its own model "
                                  f"({obj.get('model')}); leave out --model")
        return _from_asrfx(obj, where, input_shape)
    if isinstance(obj, torch.export.ExportedProgram):
        shape = tuple(input_shape) if input_shape else tuple(obj.example_inputs[0][0].shape)
        return Loaded(obj.module(), "export", shape, where)
    if isinstance(obj, nn.Module):
        if model is not None:
            raise CheckpointError(f"{where} holds a whole module ({type(obj).__name__}); leave out --model")
        return Loaded(obj, "module", tuple(input_shape) if input_shape else (1, 3, 224, 224), where)
    state_dict = _state_dict_in(obj)
    if state_dict is None:
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state_dict, an asrfx checkpoint "
                              "or a module")
    if model is None:
        raise ArchitectureNeededError(f"{where} is a state_dict ({len(state_dict)} tensors): name its architecture "
                              "with --model, e.g. --model torchvision:resnet50")
    spec = parse_spec(model)
    built = build_model(spec, **kwargs)
    load_weights(built, state_dict, f"{where} do not fit {spec} (check the model spec and num_classes)")
    shape = tuple(input_shape) if input_shape else default_input_shape(spec)
    return Loaded(built, "model", shape, where, str(spec), kwargs)


# -- writing --------------------------------------------------------------------------------


def _atomic_write(path: str | Path, write: Callable[[Any], Any]) -> Any:
    """``write(file)`` into a temporary file next to ``path``, flushed to disk, then renamed over
    ``path``: whoever reads ``path`` sees the old file or the complete new one. Returns what
    ``write`` returns."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # "x": a new file, created with the usual permissions
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return result


def _check_recipe(recipe: Recipe) -> None:
    problem = recipe.problem()
    if problem:
        raise CheckpointError(f"cannot save a checkpoint whose recipe could not be rebuilt: {problem}")


def save_asr(path: str | Path, gm: nn.Module, recipe: Recipe, module: nn.Module | None = None, *,
             extra: Mapping[str, Any] | None = None) -> None:
    """Write an asrfx.asr/1 checkpoint, atomically. ``module``: the architecture, when there is no
    spec (it is pickled into the file, which then needs trust_pickle to load). ``extra``: training
    state to resume from (plain data: an optimizer's state_dict, the step, ...), returned by
    :func:`load` as ``Loaded.extra``."""
    _check_recipe(recipe)
    data = {"format": FORMAT_ASR, **recipe.to_dict(), "state_dict": gm.state_dict()}
    if extra is not None:
        data["extra"] = dict(extra)
    if recipe.model is None:
        data["module"] = module
    _atomic_write(path, lambda f: torch.save(data, f))


def save_fused(path: str | Path, fused: nn.Module, asr_state_dict: Mapping[str, torch.Tensor], recipe: Recipe,
               module: nn.Module | None = None) -> None:
    """Write an asrfx.fused/1 checkpoint, atomically: recipe, the ASR weights fuse started from,
    fused weights."""
    _check_recipe(recipe)
    data = {"format": FORMAT_FUSED, **recipe.to_dict(), "asr_state_dict": dict(asr_state_dict),
            "state_dict": fused.state_dict()}
    if recipe.model is None:
        data["module"] = module
    _atomic_write(path, lambda f: torch.save(data, f))


def save_export(path: str | Path, fused: nn.Module, input_shape: tuple[int, ...]) -> str:
    """Write a torch.export program of ``fused`` with a dynamic batch size; returns a note.

    Falls back to the exact input shape when the model pins its batch size.
    """
    example = example_input(input_shape, batch=2)
    try:  # a batch of 2 in the example: torch.export specialises sizes 0 and 1
        program = torch.export.export(fused, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        note = f"input [batch, {', '.join(map(str, input_shape[1:]))}], any batch size"
    except Exception:
        program = torch.export.export(fused, (example_input(input_shape),))
        note = f"input {list(input_shape)} (the model fixes its batch size)"
    _atomic_write(path, lambda f: torch.export.save(program, f))
    return note
