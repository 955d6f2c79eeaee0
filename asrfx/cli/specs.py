"""Model specs: ``torchvision:<name>``, ``timm:<name>``, ``asrfx:<name>`` -> a freshly built model.

Models are always built with random weights (torchvision ``weights=None``, timm
``pretrained=False``): nothing is downloaded. Trained weights come from a file
(:mod:`asrfx.checkpoint`). torchvision and timm are imported only when a spec names them.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import AsrfxError

__all__ = ["ModelSpec", "SpecError", "UnknownModelError", "parse_spec", "build_model", "default_input_shape",
           "SOURCES"]

SOURCES = ("torchvision", "timm", "asrfx")
_ASRFX_MODELS = ("resnet56", "resnet110", "resnet83", "resnet164")  # asrfx.models, 32x32 inputs


class SpecError(AsrfxError, ValueError):
    """A spec that is malformed: no known ``source:`` prefix (a command-line mistake)."""


class UnknownModelError(AsrfxError, LookupError):
    """A well-formed spec naming a model its library does not have."""


@dataclass(frozen=True)
class ModelSpec:
    source: str  # torchvision, timm or asrfx
    name: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


def parse_spec(text: str) -> ModelSpec:
    source, sep, name = text.partition(":")
    if not sep or not name or source not in SOURCES:
        hint = f" (did you mean torchvision:{text}?)" if not sep and text else ""
        raise SpecError(f"model spec {text!r} must be <source>:<name> with source one of "
                        f"{', '.join(SOURCES)}, e.g. torchvision:mobilenet_v3_large{hint}")
    return ModelSpec(source, name)


def _library(source: str):
    module = {"torchvision": "torchvision", "timm": "timm"}[source]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise AsrfxError(f"{source} models need the {module} package, which is not installed: "
                         f"pip install 'asrfx[vision]' ({exc})") from exc


def _unknown(spec: ModelSpec, names: list[str]) -> UnknownModelError:
    close = difflib.get_close_matches(spec.name, names, n=4, cutoff=0.5)
    hint = ("; close names: " + ", ".join(f"{spec.source}:{n}" for n in close)) if close else ""
    return UnknownModelError(f"{spec.source} has no model named {spec.name!r}{hint}")


def build_model(spec: ModelSpec | str, **kwargs: Any) -> nn.Module:
    """A randomly initialised model (train mode, as its builder returns it).

    ``kwargs`` go to the builder (``num_classes=10``).
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.source == "asrfx":
        if spec.name not in _ASRFX_MODELS:
            raise _unknown(spec, list(_ASRFX_MODELS))
        from ..nn import models

        return getattr(models, spec.name)(**kwargs)
    if spec.source == "torchvision":
        tv = _library("torchvision")
        names = tv.models.list_models()
        if spec.name not in names:
            raise _unknown(spec, names)
        return tv.models.get_model(spec.name, weights=None, **kwargs)
    timm = _library("timm")
    names = timm.list_models()
    if spec.name not in names:
        raise _unknown(spec, names)
    return timm.create_model(spec.name, pretrained=False, **kwargs)


def default_input_shape(spec: ModelSpec | str) -> tuple[int, ...]:
    """One input of the size the model was designed for.

    timm: its pretrained config's ``input_size``; torchvision: its weights' crop size
    (299 for inception_v3), else 224; asrfx's CIFAR ResNets: 32x32.
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.source == "asrfx":
        return (1, 3, 32, 32)
    if spec.source == "timm":
        cfg = _library("timm").get_pretrained_cfg(spec.name)
        size = getattr(cfg, "input_size", None) if cfg is not None else None
        return (1, *size) if size else (1, 3, 224, 224)
    tv = _library("torchvision")
    try:  # the weights enum is metadata only: reading it downloads nothing
        transforms = tv.models.get_model_weights(spec.name).DEFAULT.transforms
        crop = getattr(transforms, "keywords", {}).get("crop_size", 224)
    except Exception:
        crop = 224
    crop = crop[0] if isinstance(crop, (list, tuple)) else crop
    return (1, 3, int(crop), int(crop))
