"""The model table of the coverage harness (benchmarks/coverage.py).

Each `Spec` says how to build one third-party model with random weights (nothing is
downloaded), how it is called, and its ground truth: which module classes (or which
inline excitation layers) are channel attention in that library. Ground truth may use
class names; asrfx's detector never does. Libraries are imported inside the builders,
so a missing library only skips its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class GT:
    """Ground truth: which submodules are channel-attention blocks.

    classes: class names of attention modules; each such module (outermost only) is one site.
    marker: for attention written inline in a block (lukemelas/MONAI EfficientNet's
        ``_se_reduce``/``_se_expand``): a child name whose presence makes its parent one site.
    owned: per class name (or for the marker parent, key ``"*"``), the child names whose
        parameters belong to the attention (the rest is backbone: SK/split-attention
        branches, scSE's spatial gate); absent means the whole module is attention.
    """

    classes: tuple[str, ...] = ()
    marker: str | None = None
    owned: dict[str, tuple[str, ...]] = field(default_factory=dict)


NONE = GT()


@dataclass(frozen=True)
class Spec:
    name: str  # "library:model"
    build: Callable[[], nn.Module]  # random weights, nothing downloaded
    shape: tuple[int, ...]  # example input shape (batch 2)
    gt: GT  # ground truth; NONE for a plain negative
    kwarg: str | None = None  # the model is naturally called as model(**{kwarg: x}) (HF: pixel_values)
    flags: Callable[[nn.Module], None] | None = None  # a library switch a user may need (workaround)
    note: str = ""
    unfoldable: bool = False  # its gates cannot fold exactly (scSE's sSE reads x unscaled; BAM): kept is right

    @property
    def library(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def negative(self) -> bool:
        return not self.gt.classes and not self.gt.marker


# -- builders -----------------------------------------------------------------------------


def pytorchcv(name: str, **kw) -> Callable[[], nn.Module]:
    def build():
        from pytorchcv.model_provider import get_model
        return get_model(name, pretrained=False, **kw)
    return build


def monai(cls: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import monai.networks.nets as nets
        return getattr(nets, cls)(**kw)
    return build


def lukemelas(name: str, image_size: int) -> Callable[[], nn.Module]:
    def build():
        from efficientnet_pytorch import EfficientNet
        return EfficientNet.from_name(name, image_size=image_size, num_classes=10)
    return build


def pretrainedmodels(name: str) -> Callable[[], nn.Module]:
    def build():
        import pretrainedmodels as pm
        return pm.__dict__[name](num_classes=1000, pretrained=None)
    return build


def hf(model_cls: str, config_cls: str, **config) -> Callable[[], nn.Module]:
    def build():
        import transformers
        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg)
    return build


def smp(arch: str, encoder: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import segmentation_models_pytorch as s
        return getattr(s, arch)(encoder_name=encoder, encoder_weights=None, classes=2, **kw)
    return build


def geffnet(name: str) -> Callable[[], nn.Module]:
    def build():
        import geffnet as g
        return g.create_model(name, pretrained=False)
    return build


def speechbrain(module: str, cls: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import importlib
        return getattr(importlib.import_module(f"speechbrain.lobes.models.{module}"), cls)(**kw)
    return build


def smp_no_shape_check(model: nn.Module) -> None:
    """smp raises in forward unless H, W divide the output stride (a data-dependent check)."""
    model.requires_divisible_input_shape = False


# -- ground truth per library ---------------------------------------------------------------

PCV_SE = GT(("SEBlock",))
PCV_CBAM = GT(("ChannelGate",))
PCV_SK = GT(("SKConvBlock",), owned={"SKConvBlock": ("fc1", "fc2")})
PCV_SPLIT = GT(("SABlock",))
MONAI_SE = GT(("ChannelSELayer", "ResidualSELayer"))
MONAI_EFF = GT(marker="_se_expand", owned={"*": ("_se_reduce", "_se_expand")})
LUKE_EFF = GT(marker="_se_expand", owned={"*": ("_se_reduce", "_se_expand")})
PM_SE = GT(("SEModule",))
HF_EFF = GT(("EfficientNetSqueezeExciteLayer",))
HF_ALIGN = GT(("AlignVisionSqueezeExciteLayer",))
HF_REGNET = GT(("RegNetSELayer",))
HF_LCNET = GT(("PPLCNetSqueezeExcitationModule",))
HF_LCNET3 = GT(("PPLCNetV3SqueezeExcitationModule",))
HF_OCRV5 = GT(("PPOCRV5MobileDetSqueezeExcitationModule", "PPLCNetV3SqueezeExcitationModule"))
SMP_SCSE = GT(("SCSEModule",), owned={"SCSEModule": ("cSE",)})
GEFF_SE = GT(("SqueezeExcite",))
TIMM_SE = GT(("SEModule", "SqueezeExcite", "EffectiveSEModule"))
SB_SE = GT(("SEBlock",))

IMG = (2, 3, 224, 224)
SMALL = (2, 3, 64, 64)

# fmt: off
SPECS: list[Spec] = [
    # pytorchcv: (the ImageNet models end in a fixed 7x7 average pool: 224x224 inputs)
    Spec("pytorchcv:seresnet18", pytorchcv("seresnet18"), IMG, PCV_SE),
    Spec("pytorchcv:seresnet50", pytorchcv("seresnet50"), IMG, PCV_SE),
    Spec("pytorchcv:sepreresnet18", pytorchcv("sepreresnet18"), IMG, PCV_SE),
    Spec("pytorchcv:seresnext50_32x4d", pytorchcv("seresnext50_32x4d"), IMG, PCV_SE),
    Spec("pytorchcv:senet16", pytorchcv("senet16"), IMG, PCV_SE),
    Spec("pytorchcv:seresnet20_cifar10", pytorchcv("seresnet20_cifar10"), (2, 3, 32, 32), PCV_SE),
    Spec("pytorchcv:sepreresnet20_cifar10", pytorchcv("sepreresnet20_cifar10"), (2, 3, 32, 32), PCV_SE),
    Spec("pytorchcv:cbam_resnet18", pytorchcv("cbam_resnet18"), IMG, PCV_CBAM),
    Spec("pytorchcv:sknet50", pytorchcv("sknet50"), IMG, PCV_SK),
    Spec("pytorchcv:resnesta18", pytorchcv("resnesta18"), IMG, PCV_SPLIT),
    Spec("pytorchcv:efficientnet_b0", pytorchcv("efficientnet_b0"), IMG, PCV_SE),
    Spec("pytorchcv:efficientnet_b0b", pytorchcv("efficientnet_b0b"), IMG, PCV_SE, note="TF 'same' padding (F.pad)"),
    Spec("pytorchcv:mobilenetv3_small_w1", pytorchcv("mobilenetv3_small_w1"), IMG, PCV_SE),
    Spec("pytorchcv:mobilenetv3_large_w1", pytorchcv("mobilenetv3_large_w1"), IMG, PCV_SE),
    Spec("pytorchcv:ghostnet", pytorchcv("ghostnet"), IMG, PCV_SE),
    Spec("pytorchcv:mnasnet_a1", pytorchcv("mnasnet_a1"), IMG, PCV_SE),
    Spec("pytorchcv:mixnet_s", pytorchcv("mixnet_s"), IMG, PCV_SE),
    Spec("pytorchcv:regnety002", pytorchcv("regnety002"), IMG, PCV_SE),
    Spec("pytorchcv:bam_resnet18", pytorchcv("bam_resnet18"), IMG, GT(("ChannelGate",)), note="BAM: channel gate times spatial gate, then 1 + sigmoid", unfoldable=True),
    Spec("pytorchcv:tresnet_m", pytorchcv("tresnet_m"), IMG, PCV_SE),
    # MONAI (2-d and 3-d)
    Spec("monai:SEResNet50-2d", monai("SEResNet50", spatial_dims=2, in_channels=3, num_classes=10), SMALL, MONAI_SE),
    Spec("monai:SEResNet50-3d", monai("SEResNet50", spatial_dims=3, in_channels=1, num_classes=10), (2, 1, 32, 32, 32), MONAI_SE),
    Spec("monai:SEResNext50-2d", monai("SEResNext50", spatial_dims=2, in_channels=3, num_classes=10), SMALL, MONAI_SE),
    Spec("monai:SENet154-3d-small", monai("SENet", spatial_dims=3, in_channels=1, block="se_bottleneck", layers=(1, 1, 1, 1), groups=8, reduction=16, dropout_prob=None, num_classes=10, inplanes=32, downsample_kernel_size=1, input_3x3=False), (2, 1, 32, 32, 32), MONAI_SE),
    Spec("monai:EfficientNetBN-b0-2d", monai("EfficientNetBN", model_name="efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=3, num_classes=10), SMALL, MONAI_EFF),
    Spec("monai:EfficientNetBN-b0-3d", monai("EfficientNetBN", model_name="efficientnet-b0", pretrained=False, spatial_dims=3, in_channels=1, num_classes=10), (2, 1, 32, 32, 32), MONAI_EFF),
    Spec("monai:QuickNAT-cSE", monai("Quicknat", num_classes=3, num_channels=1, num_filters=16, se_block="CSE"), (2, 1, 64, 64), MONAI_SE),
    # lukemelas efficientnet_pytorch (static same padding: nn.ZeroPad2d in every conv)
    Spec("lukemelas:efficientnet-b0", lukemelas("efficientnet-b0", 64), SMALL, LUKE_EFF),
    Spec("lukemelas:efficientnet-b2", lukemelas("efficientnet-b2", 64), SMALL, LUKE_EFF),
    # Cadene pretrainedmodels (SENet ports; fixed 7x7 average pool)
    Spec("pretrainedmodels:se_resnet50", pretrainedmodels("se_resnet50"), IMG, PM_SE),
    Spec("pretrainedmodels:se_resnext50_32x4d", pretrainedmodels("se_resnext50_32x4d"), IMG, PM_SE),
    # HF transformers v5 (config objects, random weights; called as model(pixel_values=x))
    Spec("hf:EfficientNetForImageClassification", hf("EfficientNetForImageClassification", "EfficientNetConfig", width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280, image_size=64, num_labels=10), SMALL, HF_EFF, kwarg="pixel_values"),
    Spec("hf:AlignVisionModel", hf("AlignVisionModel", "AlignVisionConfig", width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280, image_size=64), SMALL, HF_ALIGN, kwarg="pixel_values"),
    Spec("hf:RegNetForImageClassification-y", hf("RegNetForImageClassification", "RegNetConfig", layer_type="y", embedding_size=32, hidden_sizes=[24, 56, 152, 368], depths=[1, 1, 4, 7], groups_width=8, num_labels=10), SMALL, HF_REGNET, kwarg="pixel_values"),
    Spec("hf:PPLCNetForImageClassification", hf("PPLCNetForImageClassification", "PPLCNetConfig"), SMALL, HF_LCNET, kwarg="pixel_values"),
    Spec("hf:PPLCNetV3Backbone", hf("PPLCNetV3Backbone", "PPLCNetV3Config"), SMALL, HF_LCNET3, kwarg="pixel_values"),
    Spec("hf:PPOCRV5MobileDetForObjectDetection", hf("PPOCRV5MobileDetForObjectDetection", "PPOCRV5MobileDetConfig"), SMALL, HF_OCRV5, kwarg="pixel_values"),
    # segmentation_models_pytorch
    Spec("smp:Unet-resnet18-scse", smp("Unet", "resnet18", decoder_attention_type="scse"), SMALL, SMP_SCSE, flags=smp_no_shape_check, unfoldable=True),
    Spec("smp:Unet-se_resnet50", smp("Unet", "se_resnet50"), SMALL, PM_SE, flags=smp_no_shape_check),
    Spec("smp:Unet-efficientnet-b0", smp("Unet", "efficientnet-b0"), SMALL, LUKE_EFF, flags=smp_no_shape_check),
    Spec("smp:Unet-timm-efficientnet-b0", smp("Unet", "timm-efficientnet-b0"), SMALL, TIMM_SE, flags=smp_no_shape_check),
    Spec("smp:FPN-tu-regnety_002", smp("FPN", "tu-regnety_002"), SMALL, TIMM_SE, flags=smp_no_shape_check),
    Spec("smp:Unet-tu-mobilenetv3_large_100", smp("Unet", "tu-mobilenetv3_large_100"), SMALL, TIMM_SE, flags=smp_no_shape_check),
    Spec("smp:DeepLabV3Plus-timm-skresnet18", smp("DeepLabV3Plus", "timm-skresnet18"), SMALL, GT(("SelectiveKernelAttn",)), flags=smp_no_shape_check),
    # geffnet (gen-efficientnet-pytorch)
    Spec("geffnet:efficientnet_b0", geffnet("efficientnet_b0"), SMALL, GEFF_SE),
    Spec("geffnet:tf_efficientnet_b0", geffnet("tf_efficientnet_b0"), SMALL, GEFF_SE, note="TF 'same' padding"),
    Spec("geffnet:mixnet_s", geffnet("mixnet_s"), SMALL, GEFF_SE),
    Spec("geffnet:mobilenetv3_large_100", geffnet("mobilenetv3_large_100"), SMALL, GEFF_SE),
    Spec("geffnet:mnasnet_a1", geffnet("mnasnet_a1"), SMALL, GEFF_SE),
    # speechbrain: [N, T, F] input, transposed inside, Conv1d + 1-d SE over time
    Spec("speechbrain:ECAPA_TDNN", speechbrain("ECAPA_TDNN", "ECAPA_TDNN", input_size=40, lin_neurons=64, channels=[64, 64, 64, 64, 192]), (2, 50, 40), SB_SE),
    Spec("speechbrain:ResNet-SE", speechbrain("ResNet", "ResNet", input_size=40, channels=[16, 16, 32, 64], block_sizes=[1, 1, 1, 1], strides=[1, 2, 2, 2], lin_neurons=64), (2, 50, 40), SB_SE),

    # plain negatives (and look-alikes that are not channel attention)
    Spec("pytorchcv:resnet18", pytorchcv("resnet18"), IMG, NONE),
    Spec("pytorchcv:mobilenetv2_wd2", pytorchcv("mobilenetv2_wd2"), IMG, NONE),
    Spec("pytorchcv:squeezenet_v1_1", pytorchcv("squeezenet_v1_1"), IMG, NONE),
    Spec("monai:DenseNet121-2d", monai("DenseNet121", spatial_dims=2, in_channels=3, out_channels=10), SMALL, NONE),
    Spec("monai:UNet-3d", monai("UNet", spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2)), (2, 1, 32, 32, 32), NONE),
    Spec("monai:SegResNet-2d", monai("SegResNet", spatial_dims=2, in_channels=1, out_channels=2, init_filters=8), (2, 1, 64, 64), NONE),
    Spec("hf:ResNetForImageClassification", hf("ResNetForImageClassification", "ResNetConfig", num_labels=10), SMALL, NONE, kwarg="pixel_values"),
    Spec("hf:ConvNextForImageClassification", hf("ConvNextForImageClassification", "ConvNextConfig", num_labels=10), SMALL, NONE, kwarg="pixel_values"),
    Spec("hf:ViTForImageClassification", hf("ViTForImageClassification", "ViTConfig", image_size=64, patch_size=16, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192, num_labels=10), SMALL, NONE, kwarg="pixel_values"),
    Spec("hf:MobileNetV2ForImageClassification", hf("MobileNetV2ForImageClassification", "MobileNetV2Config", image_size=64, num_labels=10), SMALL, NONE, kwarg="pixel_values"),
    Spec("smp:Unet-resnet18", smp("Unet", "resnet18"), SMALL, NONE, flags=smp_no_shape_check),
    Spec("geffnet:spnasnet_100", geffnet("spnasnet_100"), SMALL, NONE),
    Spec("lukemelas:efficientnet-b0-no-se", lambda: _lukemelas_no_se(), SMALL, NONE, note="se_ratio=None"),
    Spec("speechbrain:Xvector", speechbrain("Xvector", "Xvector", in_channels=40, lin_neurons=64), (2, 50, 40), NONE),
]
# fmt: on


def _lukemelas_no_se() -> nn.Module:
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import get_model_params
    blocks, params = get_model_params("efficientnet-b0", {"image_size": 64, "num_classes": 10})
    blocks = [b._replace(se_ratio=None) for b in blocks]
    return EfficientNet(blocks, params)


def example_input(spec: Spec, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.shape, generator=g).to(dtype)
