"""Catalog of small real-world models for asrfx tests.

Every entry builds a randomly initialised model (``pretrained=False`` / ``weights=None``;
never downloads anything) in **eval mode**.  Eval mode matters: several attention blocks
(SelectiveKernelAttn, SplitAttn, CoordAttn) apply BatchNorm to a pooled ``(B, C, 1, 1)``
tensor, which raises in train mode with batch size 1.

Facts below were measured with torch 2.15 (CPU), torchvision 0.29.2, timm 1.0.31 on a
2-core machine.  Build + ``torch.fx.symbolic_trace`` + one forward at ``input_shape`` takes
< 0.7 s for every entry except tv:vgg11 (1.3-2.3 s to initialise 133M parameters), which is
the only entry marked ``slow``.  Importing torch+timm+torchvision costs ~3 s once.

``attention_classes`` holds fully qualified class names (``cls.__module__ + "." +
cls.__qualname__``).  ``count_attention_modules`` matches the *exact* type (not isinstance):
``timm.layers.cbam.LightChannelAttn`` subclasses ``ChannelAttn``, and timm has three unrelated
SE classes with similar names, so subclass matching would miscount.  A public alias such as
``"timm.layers.SEModule"`` is also accepted (it is resolved by import at count time).

One attention *site* == one gate computation:

* CBAM / LightCBAM: the channel gate lives in ``ChannelAttn`` / ``LightChannelAttn`` (one per
  ``CbamModule`` / ``LightCbamModule``; the sibling ``SpatialAttn`` is a spatial gate, not a site).
* SelectiveKernel: count ``SelectiveKernel`` (it performs ``x * attn``); the nested
  ``SelectiveKernelAttn`` only computes the softmax weights (1:1 with the block).
* SplitAttn: count ``SplitAttn``; the nested ``RadixSoftmax`` is 1:1 with it.
* GlobalContext: one site per instance whatever the fusion.  NOTE ``gcresnext26ts`` /
  ``gcresnet33ts`` use ``attn_layer='gca'`` = **add fusion only** (``mlp_scale is None``:
  ``x + mlp(context)``, no multiplicative gate at all), whereas ``gc_efficientnetv2_rw_t`` and
  ``attn_layer='gc'`` use scale fusion only.  See ``GC_FUSION``.

SE class paths:

* timm generic:          ``timm.layers.squeeze_excite.SEModule`` (seresnet*, regnety*, byobnet)
* timm legacy senet:     ``timm.models.senet.SEModule`` (legacy_seresnet*; a *different* class)
* timm EfficientNet/MBv3: ``timm.models._efficientnet_blocks.SqueezeExcite``  (not
  ``timm.layers.squeeze_excite.SqueezeExcite``, which is another class used by ghostnetv2/repvit...)
* torchvision:           ``torchvision.ops.misc.SqueezeExcitation`` (= ``torchvision.ops.SqueezeExcitation``)

Negatives live in NEGATIVE_MODELS (torchvision and timm), ``attention_classes == ()`` and
``expected_sites == 0``; most contain a look-alike ("trap") described in ``notes``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch.nn as nn

__all__ = [
    "CatalogModel",
    "count_attention_modules",
    "TORCHVISION_MODELS",
    "TIMM_MODELS",
    "NEGATIVE_MODELS",
    "ALL_MODELS",
    "GC_FUSION",
    "get_model",
]


@dataclass(frozen=True)
class CatalogModel:
    name: str                           # pytest id, e.g. "timm:seresnet18"
    build: Callable[[], nn.Module]      # lazy imports inside; pretrained=False / weights=None; returns eval()
    input_shape: tuple[int, ...]
    attention_classes: tuple[str, ...]  # qualified class names; one instance == one attention site
    expected_sites: int                 # number of instances of attention_classes
    traces_plainly: bool                # torch.fx.symbolic_trace(model) succeeds as is
    slow: bool                          # build + trace + forward takes more than ~3 s
    notes: str = ""                     # traps, failure point of plain tracing, etc.


# --------------------------------------------------------------------------- counting


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve(spec: str) -> type | None:
    module_name, _, attr = spec.rpartition(".")
    if not module_name:
        return None
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def count_attention_modules(model: nn.Module, attention_classes: Iterable[Union[str, type]]) -> int:
    """Number of submodules (including ``model`` itself) whose exact type is one of
    ``attention_classes`` (qualified names or class objects)."""
    names: set[str] = set()
    types: set[type] = set()
    for spec in attention_classes:
        if isinstance(spec, type):
            types.add(spec)
        else:
            names.add(spec)
            cls = _resolve(spec)
            if cls is not None:
                types.add(cls)
    if not names and not types:
        return 0
    return sum(1 for m in model.modules() if type(m) in types or _qualname(type(m)) in names)


# --------------------------------------------------------------------------- builders


def _timm(model_name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(model_name, pretrained=False, **kwargs).eval()

    build.__name__ = f"build_timm_{model_name}"
    return build


def _tv(model_name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, model_name)(weights=None, **kwargs).eval()

    build.__name__ = f"build_tv_{model_name}"
    return build


def _build_test_resnet_gc_scale_add() -> nn.Module:
    from functools import partial

    import timm
    from timm.layers import GlobalContext

    attn = partial(GlobalContext, fuse_add=True, fuse_scale=True)
    return timm.create_model("test_resnet", pretrained=False, block_args=dict(attn_layer=attn)).eval()


def _timm_no_se(model_name: str) -> Callable[[], nn.Module]:
    """EfficientNet-family model with SE stripped: ``se_layer=None`` does NOT work
    (EfficientNet does ``se_layer or SqueezeExcite``); nn.Identity swallows the SE kwargs."""

    def build() -> nn.Module:
        import timm

        return timm.create_model(model_name, pretrained=False, se_layer=nn.Identity).eval()

    build.__name__ = f"build_timm_{model_name}_no_se"
    return build


# --------------------------------------------------------------------------- class names

TV_SE = "torchvision.ops.misc.SqueezeExcitation"
TIMM_SE = "timm.layers.squeeze_excite.SEModule"
TIMM_LEGACY_SE = "timm.models.senet.SEModule"
TIMM_ESE = "timm.layers.squeeze_excite.EffectiveSEModule"
TIMM_ECA = "timm.layers.eca.EcaModule"
TIMM_CECA = "timm.layers.eca.CecaModule"
TIMM_EFF_SE = "timm.models._efficientnet_blocks.SqueezeExcite"
TIMM_CBAM_CH = "timm.layers.cbam.ChannelAttn"
TIMM_LCBAM_CH = "timm.layers.cbam.LightChannelAttn"
TIMM_GC = "timm.layers.global_context.GlobalContext"
TIMM_SK = "timm.layers.selective_kernel.SelectiveKernel"
TIMM_SPLAT = "timm.layers.split_attn.SplitAttn"

S64 = (1, 3, 64, 64)
S224 = (1, 3, 224, 224)

SAME_PAD_FAIL = (
    "plain trace fails in Conv2dSame.forward -> timm/layers/conv2d_same.py:27 conv2d_same -> "
    "padding.py:61 pad_same -> padding.py:28 get_same_padding: 'TraceError: symbolically traced "
    "variables cannot be used as inputs to control flow' (max((ceil(x/s)-1)*s + (k-1)*d + 1 - x, 0) "
    "on x.size()). Conv2dSame modules: 5 (stem + strided depthwise convs)."
)

# --------------------------------------------------------------------------- positives

TORCHVISION_MODELS: list[CatalogModel] = [
    CatalogModel("tv:mobilenet_v3_small", _tv("mobilenet_v3_small"), S64, (TV_SE,), 9, True, False,
                 "2.5M params; SE gate = Hardsigmoid, SE act ReLU; pooling via adaptive_avg_pool2d"),
    CatalogModel("tv:mobilenet_v3_large", _tv("mobilenet_v3_large"), S64, (TV_SE,), 8, True, False,
                 "5.5M params; Hardsigmoid gate"),
    CatalogModel("tv:efficientnet_b0", _tv("efficientnet_b0"), S64, (TV_SE,), 16, True, False,
                 "5.3M params; Sigmoid gate, SiLU squeeze act; StochasticDepth in residuals"),
    CatalogModel("tv:regnet_y_400mf", _tv("regnet_y_400mf"), S64, (TV_SE,), 16, True, False,
                 "4.3M params; Sigmoid gate"),
]

TIMM_MODELS: list[CatalogModel] = [
    # --- SE (timm.layers.SEModule and friends)
    CatalogModel("timm:seresnet18", _timm("seresnet18"), S64, (TIMM_SE,), 8, True, False, "11.8M params"),
    CatalogModel("timm:legacy_seresnet18", _timm("legacy_seresnet18"), S64, (TIMM_LEGACY_SE,), 8, True, False,
                 "11.8M; legacy senet SEModule (fc1/fc2 convs, x.mean((2,3))) is a different class from timm.layers.SEModule"),
    CatalogModel("timm:regnety_002", _timm("regnety_002"), S64, (TIMM_SE,), 13, True, False, "3.2M params"),
    CatalogModel("timm:test_byobnet", _timm("test_byobnet"), S64, (TIMM_SE,), 4, True, False,
                 "0.46M; byobnet blocks also hold nn.Identity placeholders named attn / attn_last"),
    # --- Effective SE
    CatalogModel("timm:ese_vovnet19b_slim_dw", _timm("ese_vovnet19b_slim_dw"), S64, (TIMM_ESE,), 4, True, False,
                 "1.9M params; eSE = single fc (1x1 conv), hard_sigmoid gate"),
    # --- ECA / CECA
    CatalogModel("timm:ecaresnet26t", _timm("ecaresnet26t"), S64, (TIMM_ECA,), 8, True, False,
                 "16M params; smallest named ecaresnet*; ECA = Conv1d over channels"),
    CatalogModel("timm:test_resnet[eca]", _timm("test_resnet", block_args=dict(attn_layer="eca")), S64,
                 (TIMM_ECA,), 4, True, False, "0.47M; tiny ResNet with ECA in every block"),
    CatalogModel("timm:test_resnet[ceca]", _timm("test_resnet", block_args=dict(attn_layer="ceca")), S64,
                 (TIMM_CECA,), 4, True, False, "CecaModule: ECA with circular F.pad before the Conv1d"),
    # --- EfficientNet / MobileNetV3 SqueezeExcite
    CatalogModel("timm:mobilenetv3_small_050", _timm("mobilenetv3_small_050"), S64, (TIMM_EFF_SE,), 9, True, False,
                 "1.6M; hard_sigmoid gate; blocks.1.* have nn.Identity at .se (no SE)"),
    CatalogModel("timm:efficientnet_b0", _timm("efficientnet_b0"), S64, (TIMM_EFF_SE,), 16, True, False, "5.3M params"),
    CatalogModel("timm:test_efficientnet", _timm("test_efficientnet"), S64, (TIMM_EFF_SE,), 2, True, False,
                 "0.36M; 2 of 4 IR/ER blocks have SE, others hold nn.Identity at .se"),
    CatalogModel("timm:ghostnet_050", _timm("ghostnet_050"), S64, (TIMM_EFF_SE,), 7, True, False,
                 "2.6M; ghostnet uses _efficientnet_blocks.SqueezeExcite with hard_sigmoid gate"),
    CatalogModel("timm:lcnet_035", _timm("lcnet_035"), S64, (TIMM_EFF_SE,), 2, True, False,
                 "1.6M; only the last 2 DepthwiseSeparableConv blocks have SE (11 nn.Identity .se placeholders)"),
    # --- tf_* ports with 'same' padding (not plainly traceable)
    CatalogModel("timm:tf_efficientnet_b0", _timm("tf_efficientnet_b0"), S64, (TIMM_EFF_SE,), 16, False, False,
                 SAME_PAD_FAIL),
    CatalogModel("timm:tf_mobilenetv3_small_100", _timm("tf_mobilenetv3_small_100"), S64, (TIMM_EFF_SE,), 9, False,
                 False, SAME_PAD_FAIL),
    # --- CBAM (no registered timm model uses cbam; enabled through block_args)
    CatalogModel("timm:test_resnet[cbam]", _timm("test_resnet", block_args=dict(attn_layer="cbam")), S64,
                 (TIMM_CBAM_CH,), 4, True, False,
                 "channel gate = sigmoid(mlp(avgpool) + mlp(maxpool)) in ChannelAttn; 4 CbamModule, 4 SpatialAttn (not sites)"),
    CatalogModel("timm:resnet18[cbam]", _timm("resnet18", block_args=dict(attn_layer="cbam")), S64,
                 (TIMM_CBAM_CH,), 8, True, False, "11.8M; 8 CbamModule"),
    CatalogModel("timm:test_resnet[lcbam]", _timm("test_resnet", block_args=dict(attn_layer="lcbam")), S64,
                 (TIMM_LCBAM_CH,), 4, True, False,
                 "LightChannelAttn (subclass of ChannelAttn): pool = 0.5*avg + 0.5*max, single mlp; 4 LightCbamModule"),
    # --- Global Context
    CatalogModel("timm:gcresnext26ts", _timm("gcresnext26ts"), S64, (TIMM_GC,), 8, True, False,
                 "10.5M; all 8 GC blocks are attn_layer='gca': ADD fusion only (no sigmoid gate), softmax attention pooling"),
    CatalogModel("timm:test_resnet[gc]", _timm("test_resnet", block_args=dict(attn_layer="gc")), S64,
                 (TIMM_GC,), 4, True, False, "GC with scale fusion only (default): x * sigmoid(mlp(context))"),
    CatalogModel("timm:test_resnet[gc_scale_add]", _build_test_resnet_gc_scale_add, S64, (TIMM_GC,), 4, True, False,
                 "GC with both scale and add fusion: one site per block"),
    CatalogModel("timm:gc_efficientnetv2_rw_t", _timm("gc_efficientnetv2_rw_t"), S64, (TIMM_GC,), 29, True, False,
                 "13.7M; se_layer='gc' -> GlobalContext with scale fusion only, inside EfficientNetV2 blocks"),
    # --- Selective kernel / split attention
    CatalogModel("timm:skresnet18", _timm("skresnet18"), S64, (TIMM_SK,), 8, True, False,
                 "12M; each SelectiveKernel holds one SelectiveKernelAttn (softmax over 2 paths, BN on pooled)"),
    CatalogModel("timm:resnest14d", _timm("resnest14d"), S64, (TIMM_SPLAT,), 4, True, False,
                 "10.6M; radix=2 SplitAttn, RadixSoftmax nested 1:1"),
    # --- positives that also contain traps
    CatalogModel("timm:efficientnet_cc_b0_4e", _timm("efficientnet_cc_b0_4e"), S64, (TIMM_EFF_SE,), 16, True, False,
                 "13.3M; TRAP: 8 CondConvResidual blocks compute sigmoid(Linear(avgpool(x))) routing weights "
                 "for expert mixing (24 CondConv2d) - not channel attention"),
    CatalogModel("timm:test_efficientnet_evos", _timm("test_efficientnet_evos"), S64, (TIMM_EFF_SE,), 2, True, False,
                 "0.36M; TRAP: 13 EvoNorm2dS0 compute x * sigmoid(v * x) / group_std (elementwise gate)"),
]

# --------------------------------------------------------------------------- negatives

NEGATIVE_MODELS: list[CatalogModel] = [
    # torchvision
    CatalogModel("tv:resnet18", _tv("resnet18"), S64, (), 0, True, False, "plain"),
    CatalogModel("tv:resnet50", _tv("resnet50"), S64, (), 0, True, False, "plain"),
    CatalogModel("tv:vgg11", _tv("vgg11"), S64, (), 0, True, True,
                 "133M params: 1.3-2.3 s just to initialise here (marked slow to be safe on a busy 2-core box); "
                 "AdaptiveAvgPool2d(7) before the classifier"),
    CatalogModel("tv:convnext_tiny", _tv("convnext_tiny"), S64, (), 0, True, False,
                 "28.6M; TRAP: CNBlock.layer_scale parameter (C,1,1) multiplies the branch (constant per-channel scale)"),
    # timm
    CatalogModel("timm:test_resnet", _timm("test_resnet"), S64, (), 0, True, False, "0.47M plain tiny ResNet"),
    CatalogModel("timm:vit_tiny_patch16_224", _timm("vit_tiny_patch16_224"), S224, (), 0, True, False,
                 "5.7M; FIXED input size 224 (PatchEmbed asserts); TRAP: softmax token self-attention"),
    CatalogModel("timm:vit_tiny_patch16_224[img64,depth2,layerscale]",
                 _timm("vit_tiny_patch16_224", img_size=64, depth=2, init_values=1e-5), S64, (), 0, True, False,
                 "1.2M; TRAP: 4 timm.layers.layer_scale.LayerScale (x * gamma over last dim); fixed input 64"),
    CatalogModel("timm:test_vit", _timm("test_vit"), S64, (), 0, False, False,
                 "0.37M, dynamic_img_size=True; plain trace fails in vision_transformer.py:1102 _pos_embed -> "
                 "pos_embed.py:34 resample_abs_pos_embed: 'TraceError: symbolically traced variables cannot be "
                 "used as inputs to control flow'"),
    CatalogModel("timm:xcit_nano_12_p16_224", _timm("xcit_nano_12_p16_224"), S64, (), 0, True, False,
                 "3.1M; works at 64x64; TRAP: 12 XCA blocks = softmax attention over channels (C/h x C/h) on "
                 "(B, N, C) tokens; also 2 ClassAttn"),
    CatalogModel("timm:convnextv2_atto", _timm("convnextv2_atto"), S64, (), 0, True, False,
                 "3.7M; TRAP: 12 GlobalResponseNorm (channels-last): x + gamma * x * (||x||_HW / mean_C ||x||_HW) + beta "
                 "- a pooled per-channel multiplier without sigmoid"),
    CatalogModel("timm:convnext_atto", _timm("convnext_atto"), S64, (), 0, True, False,
                 "3.7M; TRAP: layer scale as raw parameter: x.mul(self.gamma.reshape(1, -1, 1, 1))"),
    CatalogModel("timm:test_efficientnet_evos[no_se]", _timm_no_se("test_efficientnet_evos"), S64, (), 0, True, False,
                 "0.35M; se_layer=nn.Identity; TRAP: 13 EvoNorm2dS0 (x * sigmoid(v * x) / group_std)"),
    CatalogModel("timm:resnetv2_50d_evos", _timm("resnetv2_50d_evos"), S64, (), 0, True, False,
                 "25.6M (builds in ~0.2 s); TRAP: 51 EvoNorm2dS0"),
    CatalogModel("timm:resnetv2_50d_frn", _timm("resnetv2_50d_frn"), S64, (), 0, True, False,
                 "25.6M (builds in ~0.2 s); TRAP: 51 FilterResponseNormTlu2d (x * rsqrt(mean(x^2, HW)) per channel, "
                 "then max(x, tau))"),
    CatalogModel("timm:efficientnet_cc_b0_4e[no_se]", _timm_no_se("efficientnet_cc_b0_4e"), S64, (), 0, True, False,
                 "12.7M; se_layer=nn.Identity; TRAP: CondConv routing sigmoid(Linear(avgpool(x))) mixes expert "
                 "weights"),
    CatalogModel("timm:test_resnet[coord]", _timm("test_resnet", block_args=dict(attn_layer="coord")), S64, (), 0,
                 True, False, "TRAP: 4 CoordAttn: x * sigmoid(a_w) * sigmoid(a_h), gates shaped (B,C,H,1)/(B,C,1,W)"),
    CatalogModel("timm:test_resnet[ela]", _timm("test_resnet", block_args=dict(attn_layer="ela")), S64, (), 0,
                 True, False, "TRAP: 4 EfficientLocalAttn: strip pooling + depthwise 1D conv + GroupNorm + sigmoid, "
                 "gates shaped (B,C,H,1)/(B,C,1,W)"),
    CatalogModel("timm:tf_mobilenetv3_small_minimal_100", _timm("tf_mobilenetv3_small_minimal_100"), S64, (), 0,
                 False, False, "2.0M; no SE at all (11 nn.Identity .se placeholders); " + SAME_PAD_FAIL),
]

ALL_MODELS: list[CatalogModel] = TORCHVISION_MODELS + TIMM_MODELS + NEGATIVE_MODELS

# GlobalContext fusion per catalog entry: (scale fusion, add fusion)
GC_FUSION: dict[str, tuple[bool, bool]] = {
    "timm:gcresnext26ts": (False, True),
    "timm:test_resnet[gc]": (True, False),
    "timm:test_resnet[gc_scale_add]": (True, True),
    "timm:gc_efficientnetv2_rw_t": (True, False),
}


def get_model(name: str) -> CatalogModel:
    for entry in ALL_MODELS:
        if entry.name == name:
            return entry
    raise KeyError(name)


assert len({m.name for m in ALL_MODELS}) == len(ALL_MODELS), "duplicate catalog names"
