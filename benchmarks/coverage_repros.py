"""Minimal repros of the failure classes that benchmarks/coverage.py measures on real models.

Each repro is a few lines of plain torch showing the same graph pattern as the third-party
model it stands for (named in its docstring), and says what asrfx should report. Run:

    PYTHONPATH=<tree> python benchmarks/coverage_repros.py [--only NAME]

Each line reads `NAME: expected ... | got ...` and OK or FAIL: the FAIL lines are the open
work of issue #11. A repro may return a 4th value, True when keeping its gate is the right
answer (it cannot fold exactly): then a kept gate with a reason is OK. Only torch is needed
(no third-party model library).
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch
from torch import nn
import torch.nn.functional as F


class SE(nn.Module):
    """A plain SE block over any number of spatial axes: x * sigmoid(fc2(relu(fc1(mean(x)))))."""

    def __init__(self, c: int, dims: int = 2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.fc1, self.fc2 = conv(c, max(c // 4, 1), 1), conv(max(c // 4, 1), c, 1)
        self.axes = tuple(range(2, 2 + dims))

    def forward(self, x):
        s = x.mean(self.axes, keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


def bn_se(c: int, stem: nn.Module | None = None, cin: int = 3) -> nn.Sequential:
    layers = [stem] if stem is not None else []
    return nn.Sequential(*layers, nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), SE(c))


# -- class 1: layout lost, never recovered ------------------------------------------------------


def pad_stem():
    """lukemelas/HF/smp EfficientNet, HF ALIGN: nn.ZeroPad2d (static 'same' padding) before the stem conv."""
    return bn_se(16, nn.ZeroPad2d((0, 1, 0, 1))), (torch.randn(2, 3, 32, 32),), 1


def functional_pad():
    """pytorchcv TResNet (space-to-depth, then F.pad in the anti-aliased downsampling); MONAI uses ConstantPad3d."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = bn_se(16)

        def forward(self, x):
            return self.body(F.pad(x, (1, 1, 1, 1)))
    return Net(), (torch.randn(2, 3, 32, 32),), 1


def constant_pad_3d():
    """MONAI EfficientNetBN(spatial_dims=3): ConstantPad3d before every conv, 3-d SE."""
    net = nn.Sequential(nn.ConstantPad3d((0, 1, 0, 1, 0, 1), 0.0), nn.Conv3d(1, 8, 3, stride=2), nn.BatchNorm3d(8), SE(8, 3))
    return net, (torch.randn(2, 1, 16, 16, 16),), 1


def leaf_stem():
    """HF RegNet: RegNetEmbeddings checks the channel count in forward, becomes an opaque leaf, layout [B,?,?,?] after it."""
    class CheckedStem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)

        def forward(self, x):
            if x.shape[1] != 3:
                raise ValueError("expected 3 channels")
            return self.conv(x)
    return nn.Sequential(CheckedStem(), nn.BatchNorm2d(16), SE(16)), (torch.randn(2, 3, 32, 32),), 1


def leaf_mixconv():
    """pytorchcv MixNet: MixConv (16 -> 32 channels) iterates over torch.split (Proxy iteration),
    becomes a leaf, and its output layout is [B,?,S,S] (a leaf that keeps the channel count keeps it)."""
    class MixConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 5, padding=2)])

        def forward(self, x):
            return torch.cat([c(xi) for xi, c in zip(torch.split(x, 8, dim=1), self.convs)], dim=1)
    net = nn.Sequential(nn.Conv2d(3, 16, 1), MixConv(), nn.BatchNorm2d(32), SE(32))
    return net, (torch.randn(2, 3, 32, 32),), 1


# -- class 2: capture needs a hand-written workaround ---------------------------------------------


def optional_argument():
    """speechbrain ECAPA-TDNN: forward(x, lengths=None) passes lengths down; traced as a Proxy, the
    `if lengths is not None` branch runs, the SE module itself fails to trace and becomes a leaf:
    0 sites, no warning (also a [N, T, F] input transposed before Conv1d + 1-d SE)."""
    class SE1d(SE):
        def forward(self, x, lengths=None):
            if lengths is not None:
                x = x[..., : len(lengths)]
            return super().forward(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.se = nn.Conv1d(40, 16, 3, padding=1), nn.BatchNorm1d(16), SE1d(16, 1)

        def forward(self, x, lengths=None):  # x: [N, T, F]
            return self.se(self.bn(self.conv(x.transpose(1, 2))), lengths)
    return Net(), (torch.randn(2, 50, 40),), 1


def transposed_input_1d():
    """speechbrain ECAPA-TDNN with lengths made concrete: [N, T, F] transposed inside, Conv1d, 1-d SE over time."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.se = nn.Conv1d(40, 16, 3, padding=1), nn.BatchNorm1d(16), SE(16, 1)

        def forward(self, x):  # x: [N, T, F]
            return self.se(self.bn(self.conv(x.transpose(1, 2)))).transpose(1, 2)
    return Net(), (torch.randn(2, 50, 40),), 1


def dataclass_output():
    """HF transformers v5 (EfficientNet, RegNet, PP-LCNet ...): optional flag arguments and a ModelOutput."""
    from dataclasses import dataclass

    @dataclass
    class Output:
        logits: torch.Tensor

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = bn_se(16)

        def forward(self, pixel_values=None, output_hidden_states=None, return_dict=None, **kwargs):
            return_dict = return_dict if return_dict is not None else True  # HF: self.config.return_dict
            y = self.body(pixel_values)
            return Output(y) if return_dict else (y,)
    return Net(), (torch.randn(2, 3, 32, 32),), 1


def same_padding_in_block():
    """pytorchcv efficientnet_b0b (tf_mode): the block computes TF 'same' padding with float(x.size(2)),
    cannot be traced, contains the SE: find_attention refuses the whole model (no capture route gets through)."""
    import math

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.se = nn.Conv2d(3, 16, 3, stride=2), nn.BatchNorm2d(16), SE(16)

        def forward(self, x):
            pad = max((math.ceil(float(x.size(2)) / 2) - 1) * 2 + 3 - x.size(2), 0)
            x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
            return self.se(self.bn(self.conv(x)))
    return nn.Sequential(Block()), (torch.randn(2, 3, 32, 32),), 1


def input_size_check():
    """segmentation_models_pytorch: forward raises unless H and W divide the output stride."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = bn_se(16)

        def forward(self, x):
            h, w = x.shape[-2:]
            if h % 32 or w % 32:
                raise RuntimeError("size must divide 32")
            return self.body(x)
    return Net(), (torch.randn(2, 3, 32, 32),), 1


def module_called_twice_untraceable():
    """speechbrain Xvector: `try: layer(x, lengths) except TypeError: layer(x)`; the second call of a
    module whose forward cannot be traced has the tracer's module_stack key 'blocks.16@1', which asrfx
    uses as a module path: AttributeError instead of a leaf."""
    class Flat(nn.Module):
        def forward(self, x):
            if x.ndim == 4:  # ndim of a Proxy is a Proxy: control flow
                x = x.flatten(2)
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.flat = Flat()

        def forward(self, x):
            try:
                return self.flat(x, None)  # Xvector: layer(x, lens), falling back to layer(x)
            except TypeError:
                return self.flat(x)
    return Net(), (torch.randn(2, 3, 8),), 0


# -- class 3: convert / fuse break on ordinary code ------------------------------------------------


def view_from_shape_list():
    """MONAI ChannelSELayer: b, c = x.shape[:2]; y.view([b, c] + [1] * (x.ndim - 2)): the batch size
    in the list arithmetic is not folded to 1, so the psi branch views a batch-1 tensor as batch 2."""
    class MonaiSE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Sequential(nn.Linear(c, c // 2), nn.ReLU(), nn.Linear(c // 2, c), nn.Sigmoid())

        def forward(self, x):
            b, c = x.shape[:2]
            y = self.pool(x).view(b, c)
            y = self.fc(y).view([b, c] + [1] * (x.ndim - 2))
            return x * y
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), MonaiSE(16))
    return net, (torch.randn(2, 3, 32, 32),), 1


def inplace_swish_in_psi_branch():
    """timm-efficientnet in smp (and geffnet-style code): Swish written in place, x.mul_(x.sigmoid()),
    inside the excitation: fuse leaves psi behind."""
    class Swish(nn.Module):
        def forward(self, x):
            return x.mul_(x.sigmoid())

    class SwishSE(SE):
        def __init__(self, c):
            super().__init__(c)
            self.act = Swish()

        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)
            return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), SwishSE(16))
    return net, (torch.randn(2, 3, 32, 32),), 1


# -- class 4: gates kept as a constant multiply --------------------------------------------------


def gate_on_branch_sum():
    """HF PP-LCNetV3 / PP-OCRv5 det backbone: re-parameterizable block, x = BN(conv_a(y)) + BN(conv_b(y)) (+ y),
    SE on the sum, and the gated tensor goes into a BatchNorm."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16))
            self.b = nn.Sequential(nn.Conv2d(16, 16, 1, groups=16, bias=False), nn.BatchNorm2d(16))
            self.se = SE(16)
            self.pw = nn.Conv2d(16, 16, 1, bias=False)
            self.bn = nn.BatchNorm2d(16)

        def forward(self, y):
            return self.bn(self.se(self.a(y) + self.b(y)))
    return Net(), (torch.randn(2, 16, 16, 16),), 1


def gate_and_unscaled_reader():
    """smp scSE (x * cSE(x) + x * sSE(x)), HF PP-OCRv5 RSE (x + SE(x)): x is also read unscaled."""
    class SCSE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cse = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // 4, 1), nn.ReLU(), nn.Conv2d(c // 4, c, 1), nn.Sigmoid())
            self.sse = nn.Sequential(nn.Conv2d(c, 1, 1), nn.Sigmoid())

        def forward(self, x):
            return x * self.cse(x) + x * self.sse(x)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), SCSE(16), nn.Conv2d(16, 8, 3, padding=1))
    return net, (torch.randn(2, 3, 32, 32),), 1, True  # the sSE term needs the unscaled x: keeping is right


def residual_se():
    """HF PP-OCRv5 det neck (RSE): x = in_conv(y); x + SE(x), i.e. x * (1 + g): folds into in_conv."""
    class RSE(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_conv, self.se = nn.Conv2d(3, 16, 3, padding=1, bias=False), SE(16)

        def forward(self, y):
            x = self.in_conv(y)
            return x + self.se(x)
    return nn.Sequential(RSE(), nn.Conv2d(16, 8, 3, padding=1)), (torch.randn(2, 3, 32, 32),), 1


def gate_on_split():
    """geffnet/timm MixNet: SiLU, SE, then the gated tensor is split for mixed-kernel convs."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act, self.se = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.SiLU(), SE(16)
            self.convs = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 5, padding=2)])

        def forward(self, x):
            x = self.se(self.act(self.bn(self.conv(x))))
            a, b = torch.split(x, [8, 8], dim=1)
            return torch.cat([self.convs[0](a), self.convs[1](b)], dim=1)
    return Net(), (torch.randn(2, 3, 32, 32),), 1


def gate_on_stacked_branches():
    """pytorchcv SKNet / ResNeSt, timm SelectiveKernel: softmax over branches, y = sum_k y_k * a_k."""
    class SK(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.b1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            self.b2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            self.fc1, self.fc2 = nn.Conv2d(c, 8, 1), nn.Conv2d(8, 2 * c, 1)
            self.c = c

        def forward(self, x):
            y = torch.stack([self.b1(x), self.b2(x)], dim=1)
            a = self.fc2(torch.relu(self.fc1(y.sum(1).mean((2, 3), keepdim=True))))
            a = torch.softmax(a.view(x.shape[0], 2, self.c, 1, 1), dim=1)
            return (y * a).sum(1)
    return nn.Sequential(nn.Conv2d(3, 16, 1), SK(16)), (torch.randn(2, 3, 32, 32),), 1


def gate_times_spatial_map():
    """pytorchcv BAM: att = 1 + sigmoid(ch_att(x) * sp_att(x)); the channel gate multiplies a spatial map."""
    class BAM(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.ch = nn.Sequential(nn.Linear(c, c // 4), nn.ReLU(), nn.Linear(c // 4, c))
            self.sp = nn.Sequential(nn.Conv2d(c, 4, 1), nn.ReLU(), nn.Conv2d(4, 1, 1))

        def forward(self, x):
            ch = self.ch(x.mean((2, 3))).unsqueeze(2).unsqueeze(3).expand_as(x)
            sp = self.sp(x).expand_as(x)
            return x * (1 + torch.sigmoid(ch * sp))
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), BAM(16))
    return net, (torch.randn(2, 3, 32, 32),), 1, True  # folding would need a C-channel spatial conv


REPROS = {f.__name__: f for f in [
    pad_stem, functional_pad, constant_pad_3d, leaf_stem, leaf_mixconv,
    optional_argument, transposed_input_1d, dataclass_output, input_size_check, same_padding_in_block,
    module_called_twice_untraceable,
    view_from_shape_list, inplace_swish_in_psi_branch,
    gate_on_branch_sum, gate_and_unscaled_reader, residual_se, gate_on_split, gate_on_stacked_branches, gate_times_spatial_map,
]}


def _tensor(out):
    return out if isinstance(out, torch.Tensor) else getattr(out, "logits", None) if hasattr(out, "logits") else out[0]


def run(name: str) -> tuple[bool, str]:
    """find -> convert -> fuse (float64, eval); OK when every step works, sites == expected and
    no gate is kept (or, where keeping is right, every kept gate says why)."""
    import asrfx
    torch.manual_seed(0)
    model, inputs, expected, *rest = REPROS[name]()
    kept_ok = bool(rest and rest[0])
    model = model.double().eval()
    inputs = tuple(i.double() for i in inputs)
    got = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sites = asrfx.find_attention(model, example_inputs=inputs)
        got.append(f"{len(sites)} site(s), {len(sites.rejections)} rejection(s), {len(sites.leaves)} leaf(s)")
        warned = [str(w.message).splitlines()[0][:80] for w in caught if "asrfx" in w.category.__name__.lower()]
        if warned:
            got.append("warned: " + "; ".join(warned))
        if len(sites) != expected:
            return False, " | ".join(got)
        if not expected:
            return True, " | ".join(got)
        gm = asrfx.convert(copy.deepcopy(model), example_inputs=inputs).eval()
        with torch.no_grad():
            ref = _tensor(gm(*inputs))
        fused = asrfx.fuse(gm)
        with torch.no_grad():
            err = float((_tensor(fused(*inputs)) - ref).abs().max() / ref.abs().max())
        kept = asrfx.report_of(fused).kept
        got.append(f"fuse rel err {err:.1e}, {len(kept)} gate(s) kept" + (f": {kept[0].reason}" if kept else ""))
        return err <= 1e-10 and (not kept or kept_ok and all(k.reason for k in kept)), " | ".join(got)
    except Exception as exc:  # noqa: BLE001
        got.append(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        return False, " | ".join(got)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append")
    args = ap.parse_args(argv)
    fails = 0
    for name in REPROS:
        if args.only and not any(o in name for o in args.only):
            continue
        ok, text = run(name)
        fails += not ok
        print(f"{'OK  ' if ok else 'FAIL'} {name}: expected {REPROS[name]()[2]} site(s) | {text}", flush=True)
    print(f"{fails} of the repros still fail")
    return 0


if __name__ == "__main__":
    sys.exit(main())
