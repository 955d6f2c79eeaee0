"""Reproduce the ASR paper's accuracy claims with asrfx: every arm, several seeds, error bars.

    python benchmarks/reproduce.py --profile smoke            # seconds: every arm end to end (CI)
    python benchmarks/reproduce.py --profile cpu              # ResNet-20, Fashion-MNIST, 5 arms x 3 seeds
    python benchmarks/reproduce.py --profile full --device cuda --data cifar100 --data-root ~/data
    python benchmarks/reproduce.py --profile cpu --report docs   # tables, plots, docs/results.md

Each (model, arm, seed) trains in its own folder under --out (default runs/<data>-<profile>):
``checkpoint.pt`` after every epoch, ``log.jsonl`` (one line per epoch), ``result.json`` when
done. A rerun skips runs with a result and resumes the others from their last checkpoint.
After training, every ASR run is fused (``asrfx.fuse``) and checked against its ASR form on
the whole test set; the input-dependent SE of the "backbone + SE" arm is measured with
``asrfx.stripe``. Then one interleaved timing run per model (``costs.json``) compares the
training step and inference latency of every arm with the backbone's.

Data is read locally, never downloaded: Fashion-MNIST from Debian's dataset-fashion-mnist
(asrfx.data), CIFAR-10/100 from torchvision's python-pickle folders under --data-root
(cifar-10-batches-py/, cifar-100-python/).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import math
import multiprocessing
import os
import pickle
import platform
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import asrfx
import asrfx.models

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py, also when imported
from timing import interleaved  # noqa: E402


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


# -- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: int

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]


# per-channel pixel statistics of each training set (for normalization)
STATS = {"fashion-mnist": ((0.2860,), (0.3530,)),
         "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
         "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
CIFAR_FOLDERS = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels"),
                 "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels")}


def _load_fashion_mnist(root: str | None) -> Dataset:
    from asrfx.data import FASHION_MNIST_ROOT, fashion_mnist_available, load_fashion_mnist

    folder = Path(root) if root else FASHION_MNIST_ROOT
    if not fashion_mnist_available(folder):
        raise UsageError(f"Fashion-MNIST not found in {folder}: apt-get install dataset-fashion-mnist, or pass "
                         "--data-root FOLDER with the four idx .gz files")
    (tx, ty), (vx, vy) = (load_fashion_mnist(split, folder) for split in ("train", "test"))
    to_bytes = lambda x: x.mul(255).round().to(torch.uint8)  # noqa: E731 (exact: the files are bytes)
    mean, std = STATS["fashion-mnist"]
    return Dataset(to_bytes(tx), ty, to_bytes(vx), vy, mean, std, 10)


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's files are pickles of dicts, lists and numpy arrays: refuse anything else (a pickle can
    run code while it loads, like torch.load without weights_only)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise UsageError(f"{module}.{name} in a CIFAR file: not the python-pickle format of numpy arrays "
                             "torchvision reads; refusing to load it")
        return super().find_class(module, name)


def _load_cifar(name: str, root: str | None) -> Dataset:
    if not root:
        raise UsageError(f"--data {name} needs --data-root: a folder holding torchvision's "
                         f"{CIFAR_FOLDERS[name][0]}/ (nothing is downloaded)")
    folder_name, train_files, test_file, label_key = CIFAR_FOLDERS[name]
    folder = Path(root).expanduser()
    folder = folder if folder.name == folder_name else folder / folder_name
    missing = [f for f in train_files + [test_file] if not (folder / f).is_file()]
    if missing:
        raise UsageError(f"{name} not found: {folder} lacks {', '.join(missing)} (torchvision's python-pickle "
                         "format, e.g. from cifar-10-python.tar.gz; nothing is downloaded)")

    def read(files):
        xs, ys = [], []
        for f in files:
            with open(folder / f, "rb") as fh:
                entry = _ArrayUnpickler(fh, encoding="bytes").load()
            xs.append(torch.as_tensor(entry[b"data"]).reshape(-1, 3, 32, 32))
            ys.append(torch.as_tensor(entry[label_key]))
        return torch.cat(xs).to(torch.uint8), torch.cat(ys).long()

    (tx, ty), (vx, vy) = read(train_files), read([test_file])
    mean, std = STATS[name]
    return Dataset(tx, ty, vx, vy, mean, std, 10 if name == "cifar10" else 100)


@lru_cache(maxsize=2)
def load_data(name: str, root: str | None) -> Dataset:
    if name == "fashion-mnist":
        return _load_fashion_mnist(root)
    if name in CIFAR_FOLDERS:
        return _load_cifar(name, root)
    raise UsageError(f"unknown --data {name!r}; choose from fashion-mnist, cifar10, cifar100")


def normalize(x: torch.Tensor, data: Dataset) -> torch.Tensor:
    mean = torch.tensor(data.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255 - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image (uint8 batch)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [n, 1, h, 1]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [n, 1, 1, w]
    crop = padded.gather(2, rows.expand(n, x.shape[1], h, w + 2 * pad)).gather(3, cols.expand(n, x.shape[1], h, w))
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, crop.flip(3), crop)


@dataclass(frozen=True)
class Split:
    """The fixed split: the last ``held_out`` training images are kept for tuning; the official test set."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def split(data: Dataset, profile: "Profile", device: torch.device) -> Split:
    n = len(data.train_x) - profile.held_out
    train = slice(0, n if profile.train_limit is None else min(n, profile.train_limit))
    test = slice(0, profile.test_limit)
    on = lambda t: t.to(device)  # noqa: E731 (uint8 on the device: 1/4 of the float size)
    return Split(on(data.train_x[train]), on(data.train_y[train]), on(data.train_x[n:]), on(data.train_y[n:]),
                 on(data.test_x[test]), on(data.test_y[test]))


def batches(x: torch.Tensor, y: torch.Tensor, size: int, data: Dataset):
    for i in range(0, len(x), size):
        yield normalize(x[i:i + size], data), y[i:i + size]


# -- models -------------------------------------------------------------------------------------


def _new_stem(old: nn.Conv2d, in_channels: int, stride: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride, old.padding, bias=old.bias is not None)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as both models initialise
    return conv


def cifar_resnet(depth: int, block: str) -> Callable[[int, int], nn.Module]:
    def build(in_channels: int, classes: int) -> nn.Module:
        model = asrfx.models.cifar_resnet(depth, block, classes)
        if in_channels != 3:
            model.conv1 = _new_stem(model.conv1, in_channels, 1)
        return model
    return build


def mobilenet_v2(width: float) -> Callable[[int, int], nn.Module]:
    """torchvision's MobileNetV2 for 28-32 px inputs: stem stride 1 and the 24-channel stage's
    stride 1 (total stride 8, a 4x4 final map at 32 px, as in common CIFAR ports)."""
    def build(in_channels: int, classes: int) -> nn.Module:
        import torchvision

        model = torchvision.models.mobilenet_v2(weights=None, num_classes=classes, width_mult=width)
        model.features[0][0] = _new_stem(model.features[0][0], in_channels, 1)
        model.features[2].conv[1][0].stride = (1, 1)  # the depthwise conv of the first 24-channel block
        return model
    return build


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet8": cifar_resnet(8, "basic"),  # smoke only
    "resnet20": cifar_resnet(20, "basic"),
    "resnet56": cifar_resnet(56, "basic"),
    "resnet164": cifar_resnet(164, "bottleneck"),
    "mobilenetv2": mobilenet_v2(1.0),
    "mobilenetv2-0.25": mobilenet_v2(0.25),  # smoke only
}


# -- arms ---------------------------------------------------------------------------------------


def _freeze_psi(gm: nn.Module) -> nn.Module:
    """Table 8: psi stays at its initial C_0.1 (not trained)."""
    names = [p for site in asrfx.report_of(gm).sites for p in site.psi]
    frozen = [n for n, p in gm.named_parameters() if any(n.endswith(psi) for psi in names)]
    if len(frozen) != len(names):
        raise RuntimeError(f"expected {len(names)} psi parameters, found {frozen}")
    for n, p in gm.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return gm


@dataclass(frozen=True)
class Arm:
    label: str  # the paper's name
    build: Callable[[nn.Module, torch.Tensor], nn.Module]
    deploys_as: str | None  # None: deployed as trained; else the arm whose architecture fuse must give back
    paper: str  # where the paper has it


ARMS: dict[str, Arm] = {
    "backbone": Arm("backbone", lambda m, x: m, None, "Tables 2-3 (Org)"),
    "se": Arm("backbone + SE", lambda m, x: asrfx.insert(m, "se", x, convert=False), None, "Table 4 (w/o ASR)"),
    "asr-se": Arm("ASR(SE)", lambda m, x: asrfx.insert(m, "se", x), "backbone", "Table 3"),
    "asr-se+se": Arm("ASR(SE) + SE", lambda m, x: asrfx.convert(asrfx.insert(m, "se", x, convert=False), x, keep=True),
                     "se", "Table 4 (w/ ASR)"),
    "asr-se-frozen": Arm("ASR(SE), psi frozen at C_0.1", lambda m, x: _freeze_psi(asrfx.insert(m, "se", x)),
                         "backbone", "Table 8"),
    "asr-srm": Arm("ASR(SRM)", lambda m, x: asrfx.insert(m, "srm", x), "backbone", "Table 3"),
    "asr-ie": Arm("ASR(IE)", lambda m, x: asrfx.insert(m, "ie", x), "backbone", "Table 3"),
    "asr-se-d2": Arm("ASR(SE), delta = 2", lambda m, x: asrfx.insert(m, "se", x, repeats=2), "backbone", "Table 7"),
}
BASE_ARMS = ("backbone", "se", "asr-se", "asr-se+se", "asr-se-frozen")


# -- profiles -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    plan: tuple[tuple[str, tuple[str, ...]], ...]  # (model, arms) pairs
    seeds: tuple[int, ...]
    epochs: int
    batch: int
    lr: float
    weight_decay: float
    schedule: str  # "cosine" (per step) or "step" (x0.1 at 50% and 75% of training)
    warmup_epochs: int  # linear warm-up from 0
    train_limit: int | None  # training images used (from the start of the training split)
    held_out: int  # the last images of the training set: the fixed held-out split
    test_limit: int | None  # None: the whole official test set
    jobs: int  # runs in parallel (processes) on a CPU
    threads: int | None  # torch threads per run on a CPU (None: CPUs / jobs); one thread per process
    # stays fast when other work shares the cores, where several OpenMP threads spin and stall
    timing_rounds: int
    stripe_plot: bool = True  # asrfx.stripe's figure of the first seed's SE (seconds of matplotlib)


PROFILES: dict[str, Profile] = {
    # seconds on 2 CPU cores: tiny subsets, one epoch; every arm end to end (tests/training/test_reproduce.py)
    "smoke": Profile(plan=(("resnet8", tuple(ARMS)), ("mobilenetv2-0.25", ("asr-se",))),
                     seeds=(0,), epochs=1, batch=16, lr=0.05, weight_decay=5e-4, schedule="cosine",
                     warmup_epochs=0, train_limit=320, held_out=64, test_limit=128, jobs=1, threads=1, timing_rounds=3,
                     stripe_plot=False),
    # ~70 minutes on 2 quiet CPU cores (two single-threaded runs at a time)
    "cpu": Profile(plan=(("resnet20", BASE_ARMS),), seeds=(0, 1, 2), epochs=5, batch=128, lr=0.1,
                   weight_decay=5e-4, schedule="cosine", warmup_epochs=0, train_limit=16000, held_out=2000,
                   test_limit=None, jobs=2, threads=1, timing_rounds=15),
    # a GPU: the paper's CIFAR recipe (SGD 0.1, batch 128, 164 epochs, x0.1 at 50%/75%, wd 1e-4)
    "full": Profile(plan=(("resnet56", tuple(ARMS)), ("resnet164", tuple(ARMS)),
                          ("mobilenetv2", ("backbone", "se", "asr-se", "asr-se+se"))),
                    seeds=(0, 1, 2, 3, 4), epochs=164, batch=128, lr=0.1, weight_decay=1e-4, schedule="step",
                    warmup_epochs=1, train_limit=None, held_out=5000, test_limit=None, jobs=1, threads=None, timing_rounds=30),
}


def lr_factor(profile: Profile, step: int, total: int, per_epoch: int) -> float:
    warm = profile.warmup_epochs * per_epoch
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    if profile.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    return 0.1 ** sum(t >= m for m in (0.5, 0.75))


# -- one run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    model: str
    arm: str
    seed: int
    profile_name: str
    profile: Profile
    data: str
    data_root: str | None
    device: str
    out: str
    threads: int
    bars: bool  # tqdm bars (else plain log lines)

    @property
    def name(self) -> str:
        return f"{self.model}/{self.arm}/seed{self.seed}"

    @property
    def folder(self) -> Path:
        return Path(self.out) / self.model / self.arm / f"seed{self.seed}"


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(model: str, arm: str, seed: int, data: Dataset) -> nn.Module:
    """The same backbone weights for every arm of a seed (paired comparison), then the arm's changes."""
    torch.manual_seed(seed)
    backbone = MODELS[model](data.channels, data.classes)
    example = normalize(data.test_x[:2], data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", asrfx.AsrfxWarning)
        return ARMS[arm].build(backbone, example)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, data: Dataset, size: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(xb) for xb, _ in batches(x, x, size, data)]).float()


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, data: Dataset) -> tuple[float, float]:
    logits = predict(model, x, data)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def log(spec: RunSpec, message: str) -> None:
    print(f"[{spec.name}] {message}", flush=True)


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)  # atomic: a crash never leaves half a file


def _progress(spec: RunSpec, total: int, desc: str):
    if spec.bars:
        try:
            from tqdm import tqdm
            return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return None


def train_epoch(spec: RunSpec, net: nn.Module, opt: torch.optim.Optimizer, split_: Split, data: Dataset,
                epoch: int, device: torch.device) -> dict[str, float]:
    profile = spec.profile
    per_epoch = len(split_.train_x) // profile.batch  # drop the last partial batch (BatchNorm of 1 image)
    if per_epoch == 0:
        raise UsageError(f"{len(split_.train_x)} training images give no batch of {profile.batch}")
    total = per_epoch * profile.epochs
    gen = torch.Generator().manual_seed(spec.seed * 100_003 + epoch)  # same data order for every arm of a seed
    order = torch.randperm(len(split_.train_x), generator=gen).to(device)
    net.train()
    losses, right = [], torch.zeros((), device=device)
    bar = _progress(spec, per_epoch, f"{spec.name} epoch {epoch + 1}/{profile.epochs}")
    start = time.perf_counter()
    for i in range(per_epoch):
        for group in opt.param_groups:
            group["lr"] = profile.lr * lr_factor(profile, epoch * per_epoch + i, total, per_epoch)
        idx = order[i * profile.batch:(i + 1) * profile.batch]
        x, y = normalize(augment(split_.train_x[idx], gen), data), split_.train_y[idx]
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        right += (logits.argmax(1) == y).sum()
        if bar is not None:
            bar.update(1)
    sync(device)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    losses = torch.stack(losses).float().cpu()
    quarter = max(1, per_epoch // 4)
    if not torch.isfinite(losses).all():
        raise RuntimeError(f"{spec.name}: the training loss is not finite in epoch {epoch + 1}")
    return {"loss": float(losses.mean()), "loss_head": float(losses[:quarter].mean()),
            "loss_tail": float(losses[-quarter:].mean()), "train_acc": float(right) / (per_epoch * profile.batch),
            "seconds": seconds, "steps": per_epoch}


def deployment_check(spec: RunSpec, net: nn.Module, split_: Split, data: Dataset, device: torch.device) -> dict:
    """Fuse; same predictions as the ASR form on the whole test set; parameters and latency of the
    architecture it must give back (the backbone, or backbone + SE for ASR(SE) + SE)."""
    arm = ARMS[spec.arm]
    net.eval()
    fused = asrfx.fuse(copy.deepcopy(net))
    report = asrfx.report_of(fused)
    reference = build(spec.model, arm.deploys_as, spec.seed, data).to(device).eval()
    # TF32 would make both sides round differently on a GPU; the check is about the fold itself
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        want, got = predict(net, split_.test_x, data), predict(fused, split_.test_x, data)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    differ = (want.argmax(1) != got.argmax(1)).nonzero().flatten()
    error = (want - got).abs()
    x = normalize(split_.test_x[:min(len(split_.test_x), spec.profile.batch)], data)

    def timed(model):
        def run(inputs):
            model(inputs)
            sync(device)
        return run

    with torch.inference_mode():
        latency = interleaved({"reference": timed(reference), "fused": timed(fused)}, x,
                              warmup=2, rounds=spec.profile.timing_rounds)
    return {
        "folded": len(report.folds) - len(report.kept), "kept": len(report.kept),
        "test_images": len(want), "differing_images": differ.tolist()[:50], "differing_count": int(len(differ)),
        "differing_logit_error": error[differ].max(1).values.tolist()[:50],
        "max_logit_error": float(error.max()), "max_logit": float(want.abs().max()),
        "fused_test_acc": float((got.argmax(1) == split_.test_y).float().mean()),
        "asr_test_acc": float((want.argmax(1) == split_.test_y).float().mean()),
        "params_fused": count_params(fused), "params_reference": count_params(reference),
        "deploys_as": arm.deploys_as, "latency_batch": len(x),
        "latency_reference_s": latency["reference"], "latency_fused_s": latency["fused"],
    }


STRIPE_ARMS = ("se", "asr-se+se")  # arms with input-dependent attention


def last_gates(recorder) -> dict[str, torch.Tensor]:
    """The latest recorded gates per site ([probe images, channels]), psi-driven copies left out."""
    return {k: v[-1].detach().cpu() for k, v in recorder.history().items() if "[asr]" not in k}


def without_attention(spec: RunSpec, net: nn.Module, data: Dataset) -> nn.Module:
    """The trained model with every SE removed, same weights. (asrfx.backbone(net, x) would be the
    call, but on a model from insert(convert=False) its graph still reads the SE's fc1, which
    backbone replaced by identity: AttributeError on the first call. Reported to the lead.)"""
    plain = MODELS[spec.model](data.channels, data.classes).to(next(net.parameters()).device)
    missing, unexpected = plain.load_state_dict(net.state_dict(), strict=False)
    extra = [k for k in unexpected if ".asr." not in k]
    if missing or extra:
        raise RuntimeError(f"SE model's weights do not map onto the backbone: missing {missing}, unexpected {extra}")
    return plain


@torch.no_grad()
def excitation_usage(net: nn.Module, sites: list[str], test: list[torch.Tensor]) -> dict[str, list[int]]:
    """Per SE: [hidden units of its excitation (fc1, then ReLU) positive on at least one test image,
    hidden units]. With none, the gate is sigmoid(fc2.bias) for every input: a learned constant."""
    active: dict[str, torch.Tensor] = {}

    def hook(site):
        def record(module, inputs, output):
            now = (output > 0).any(0)
            active[site] = now | active[site] if site in active else now
        return record

    modules = dict(net.named_modules())
    handles = [modules[f"{site}.fc1"].register_forward_hook(hook(site)) for site in sites
               if isinstance(modules.get(f"{site}.fc1"), nn.Linear)]
    try:
        net.eval()
        for xb in test:
            net(xb)
    finally:
        for h in handles:
            h.remove()
    return {site: [int(a.sum()), a.numel()] for site, a in active.items()}


def stripe_check(spec: RunSpec, net: nn.Module, split_: Split, data: Dataset) -> dict:
    """The Stripe Observation on the trained input-dependent SE: per site, how much the gate varies
    across test images and across channels; and whether the SE is used at all (accuracy without it)."""
    test = [xb for xb, _ in batches(split_.test_x, split_.test_y, 500, data)]
    stats = asrfx.stripe(net, test, progress=False)
    if spec.profile.stripe_plot and spec.seed == spec.profile.seeds[0]:
        stats.plot(spec.folder / "stripe.png")
    sites = []
    kept = [s for s in stats if s.kind != "asr"]  # ASR(SE) + SE: the psi-driven copy is constant by construction
    usage = excitation_usage(net, [s.module_path for s in kept], test)
    for s in kept:
        mean = s.gate_mean
        sites.append({"site": s.module_path, "channels": s.channels, "score": s.score,
                      "pooled_score": s.pooled_score, "gate_mean": float(mean.mean()),
                      "channel_spread": float(mean.std(unbiased=False)), "channel_min": float(mean.min()),
                      "channel_max": float(mean.max()), "image_std": s.mean_std,
                      "hidden_active": usage.get(s.module_path)})
    if spec.arm != "se":
        return {"sites": sites}
    x = normalize(split_.test_x[:2], data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", asrfx.AsrfxWarning)
        without = without_attention(spec, net, data)
        train_batches = [xb for xb, _ in batches(split_.train_x[:2000], split_.train_y[:2000], 500, data)]
        constant = asrfx.convert(net, x, psi_init="calibrate", data=train_batches)  # gate from the mean u
    return {"sites": sites,
            "test_acc_without_attention": evaluate(without, split_.test_x, split_.test_y, data)[0],
            "test_acc_constant_gate": evaluate(constant, split_.test_x, split_.test_y, data)[0]}


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def run_one(spec: RunSpec) -> dict:
    """Train one (model, arm, seed), resuming from its checkpoint; returns its result record."""
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", asrfx.AsrfxWarning)  # "no attention found" for the backbone
            return _run_one(spec)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (pytest runs this in its own process)


def _run_one(spec: RunSpec) -> dict:
    folder = spec.folder
    result_path = folder / "result.json"
    if result_path.exists():
        log(spec, "done before: skipped")
        return {**json.loads(result_path.read_text()), "skipped": True}
    folder.mkdir(parents=True, exist_ok=True)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    profile = spec.profile
    data = load_data(spec.data, spec.data_root)
    split_ = split(data, profile, device)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    began, cpu_began = time.perf_counter(), time.process_time()
    net = build(spec.model, spec.arm, spec.seed, data).to(device)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=profile.lr, momentum=0.9, weight_decay=profile.weight_decay)
    history: list[dict] = []
    recorder, gates = None, None
    if spec.arm in STRIPE_ARMS:  # Fig. 1c: how the gates of 64 fixed test images move per epoch
        recorder = asrfx.GateRecorder(net, normalize(split_.test_x[:64], data))
        recorder.record()
        gates = last_gates(recorder)
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history = state["history"]
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        gates = state.get("gates", gates)
        log(spec, f"resumed after epoch {len(history)}")
    else:
        torch.manual_seed(spec.seed + 7919)  # dropout and anything else random in training
    for epoch in range(len(history), profile.epochs):
        row = {"epoch": epoch + 1, **train_epoch(spec, net, opt, split_, data, epoch, device)}
        row["val_acc"], row["val_loss"] = evaluate(net, split_.val_x, split_.val_y, data)
        row["test_acc"], row["test_loss"] = evaluate(net, split_.test_x, split_.test_y, data)
        if recorder is not None:
            recorder.record()
            now = last_gates(recorder)
            row["gate_change"] = {k: float((now[k] - gates[k].to(now[k].device)).abs().mean()) for k in now}
            gates = now
        history.append(row)
        with open(folder / "log.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "history": history,
                 "rng": torch.get_rng_state(), **({"gates": gates} if gates is not None else {})}
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        torch.save(state, folder / "checkpoint.tmp")
        os.replace(folder / "checkpoint.tmp", checkpoint)
        log(spec, f"epoch {epoch + 1}/{profile.epochs}: loss {row['loss']:.4f}, train {row['train_acc']:.2%}, "
                  f"held-out {row['val_acc']:.2%}, test {row['test_acc']:.2%} ({row['seconds']:.0f} s)")
    train_seconds = time.perf_counter() - began
    result = {
        "model": spec.model, "arm": spec.arm, "label": ARMS[spec.arm].label, "seed": spec.seed,
        "profile": spec.profile_name, "data": spec.data, "device": str(device), "hardware": hardware(device),
        "torch": torch.__version__, "asrfx": asrfx.__version__, "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in vars(profile).items() if k not in ("plan", "seeds")},
        "train_images": len(split_.train_x), "held_out_images": len(split_.val_x), "test_images": len(split_.test_x),
        "params": count_params(net), "trainable_params": sum(p.numel() for p in trainable),
        "history": history, "loss_start": history[0]["loss_head"], "loss_end": history[-1]["loss_tail"],
        "test_acc": history[-1]["test_acc"], "val_acc": history[-1]["val_acc"],
    }
    if ARMS[spec.arm].deploys_as is not None:
        result["deploy"] = deployment_check(spec, net, split_, data, device)
        d = result["deploy"]
        log(spec, f"fused: {d['differing_count']} of {d['test_images']} test predictions differ from the ASR "
                  f"form (max |logit error| {d['max_logit_error']:.2e}); {d['params_fused']:,} parameters "
                  f"({d['deploys_as']}: {d['params_reference']:,})")
    if spec.arm in STRIPE_ARMS:
        result["stripe"] = stripe_check(spec, net, split_, data)
    result.update(started=started, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  seconds=time.perf_counter() - began, train_seconds=train_seconds,
                  cpu_seconds=time.process_time() - cpu_began)  # this session's part, if it resumed
    write_json(result_path, result)
    log(spec, f"test accuracy {result['test_acc']:.2%} ({result['seconds']:.0f} s); wrote {result_path}")
    return result


def restripe(spec: RunSpec, data: Dataset) -> None:
    """Replace a finished run's stripe record, measured again on its final weights."""
    torch.set_num_threads(spec.threads or torch.get_num_threads())
    device = torch.device(spec.device)
    path = spec.folder / "result.json"
    result = json.loads(path.read_text())
    state = torch.load(spec.folder / "checkpoint.pt", map_location=device, weights_only=True)
    if len(state["history"]) != result["settings"]["epochs"]:
        raise RuntimeError(f"{spec.name}: the checkpoint is not the final one")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", asrfx.AsrfxWarning)
        net = build(spec.model, spec.arm, spec.seed, data).to(device)
        net.load_state_dict(state["model"])
        result["stripe"] = stripe_check(spec, net, split(data, spec.profile, device), data)
    write_json(path, result)
    log(spec, "stripe measured again from the final checkpoint")


# -- costs: one interleaved timing run per model ------------------------------------------------


def measure_costs(profile: Profile, model: str, arms: tuple[str, ...], data: Dataset, device: torch.device) -> dict:
    """Training step (forward, backward, SGD) of every arm, and inference of every deployed form,
    interleaved in one process so that machine noise hits them alike; medians."""
    x = normalize(data.train_x[:profile.batch], data).to(device)
    y = data.train_y[:profile.batch].to(device)
    nets = {arm: build(model, arm, 0, data).to(device) for arm in arms}

    def step(net):
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

        def run(inputs):
            loss = F.cross_entropy(net(inputs), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(device)
        return run

    for net in nets.values():
        net.train()
    train = interleaved({arm: step(net) for arm, net in nets.items()}, x, warmup=2, rounds=profile.timing_rounds)
    deployed = {}
    for arm, net in nets.items():
        net.eval()
        deployed[arm] = asrfx.fuse(copy.deepcopy(net)) if ARMS[arm].deploys_as else net

    def infer(net):
        def run(inputs):
            net(inputs)
            sync(device)
        return run

    with torch.inference_mode():
        infer_t = interleaved({arm: infer(n) for arm, n in deployed.items()}, x, warmup=2,
                              rounds=profile.timing_rounds)
    return {"model": model, "batch": profile.batch, "rounds": profile.timing_rounds, "threads": torch.get_num_threads(),
            "train_step_s": train, "inference_s": infer_t,
            "deployed_params": {arm: count_params(n) for arm, n in deployed.items()}}


# -- report -------------------------------------------------------------------------------------

T_CRIT = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # 5%, 2-sided


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/*/seed*/result.json"))]


def compare(results: list[dict], model: str, arm: str, ref: str) -> dict | None:
    """Paired by seed (same initial backbone and data order): mean and std of the differences."""
    a = {r["seed"]: r["test_acc"] for r in results if r["model"] == model and r["arm"] == arm}
    b = {r["seed"]: r["test_acc"] for r in results if r["model"] == model and r["arm"] == ref}
    seeds = sorted(set(a) & set(b))
    if not seeds or arm == ref:
        return None
    diffs = [100 * (a[s] - b[s]) for s in seeds]
    mean, std = _stats(diffs)
    spread = max(_stats([100 * v for v in a.values()])[1], _stats([100 * v for v in b.values()])[1])
    t = mean / (std / math.sqrt(len(diffs))) if len(diffs) > 1 and std > 0 else float("nan")
    return {"ref": ref, "diffs": diffs, "mean": mean, "std": std, "beyond_spread": abs(mean) > spread,
            "t": t, "significant": len(diffs) - 1 in T_CRIT and abs(t) > T_CRIT[len(diffs) - 1]}


def summarize(results: list[dict], costs: list[dict]) -> dict:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["model"], r["arm"]), []).append(r)
    rows = []
    for (model, arm), rs in groups.items():
        rs.sort(key=lambda r: r["seed"])
        acc = [100 * r["test_acc"] for r in rs]
        mean, std = _stats(acc)
        row = {"model": model, "arm": arm, "label": ARMS[arm].label, "paper": ARMS[arm].paper,
               "seeds": [r["seed"] for r in rs], "test_acc": acc, "mean": mean, "std": std,
               "val_acc": [100 * r["val_acc"] for r in rs], "params": rs[0]["params"],
               "loss_start": [r["loss_start"] for r in rs], "loss_end": [r["loss_end"] for r in rs],
               "curves": [[100 * h["test_acc"] for h in r["history"]] for r in rs],
               "vs_backbone": compare(results, model, arm, "backbone"),
               "vs_se": compare(results, model, arm, "se") if arm == "asr-se+se" else None}
        if all("deploy" in r for r in rs):
            d = [r["deploy"] for r in rs]
            row["deploy"] = {"differing": sum(x["differing_count"] for x in d), "images": sum(x["test_images"] for x in d),
                             "max_logit_error": max(x["max_logit_error"] for x in d),
                             "params_fused": sorted({x["params_fused"] for x in d}),
                             "params_reference": sorted({x["params_reference"] for x in d}),
                             "deploys_as": d[0]["deploys_as"],
                             "latency_ratio": statistics.median(x["latency_fused_s"] / x["latency_reference_s"] for x in d)}
        if all("stripe" in r for r in rs):
            row["stripe"] = [r["stripe"] for r in rs]
        if all("gate_change" in h for r in rs for h in r["history"]):
            # Fig. 1c: mean |v(t+1) - v(t)| over 64 probe images and channels, per site and epoch
            sites = list(rs[0]["history"][0]["gate_change"])
            row["gate_change"] = {site: [statistics.mean(r["history"][e]["gate_change"][site] for r in rs)
                                         for e in range(len(rs[0]["history"]))] for site in sites}
        rows.append(row)
    order = {arm: i for i, arm in enumerate(ARMS)}
    rows.sort(key=lambda r: (r["model"], order[r["arm"]]))
    first = min(results, key=lambda r: r["started"])
    wall = (max(datetime.fromisoformat(r["finished"]) for r in results)
            - min(datetime.fromisoformat(r["started"]) for r in results)).total_seconds()
    return {"profile": first["profile"], "data": first["data"], "hardware": first["hardware"],
            "device": first["device"], "torch": first["torch"], "threads": first["threads"],
            "settings": first["settings"], "train_images": first["train_images"],
            "held_out_images": first["held_out_images"], "test_images": first["test_images"],
            "runs": len(results), "run_seconds": sum(r["seconds"] for r in results), "wall_seconds": wall,
            "rows": rows, "costs": costs}


def _fmt_diff(c: dict | None) -> str:
    if c is None:
        return ""
    seeds = ", ".join(f"{d:+.2f}" for d in c["diffs"])
    if len(c["diffs"]) < 2:
        return f"{c['mean']:+.2f} (one seed)"
    verdict = []
    if c["beyond_spread"]:
        verdict.append("> seed std")
    if c["significant"]:
        verdict.append("paired t: p < 0.05")
    return f"{c['mean']:+.2f} ({seeds}) {'; '.join(verdict) or 'within noise'}"


def markdown(s: dict) -> str:
    st = s["settings"]
    lines = [f"Profile `{s['profile']}` on {s['data']}: {s['train_images']:,} training images "
             f"({s['held_out_images']:,} held out), the {s['test_images']:,}-image official test set; "
             f"{st['epochs']} epochs, batch {st['batch']}, SGD lr {st['lr']} ({st['schedule']}), momentum 0.9, "
             f"weight decay {st['weight_decay']}. {s['runs']} runs on {s['hardware']} ({s['device']}, "
             f"{s['threads']} thread(s) per run), torch {s['torch']}; wall time {s['wall_seconds'] / 60:.0f} min "
             f"(runs added up: {s['run_seconds'] / 60:.0f} min).", "",
             "| model | arm | paper | test accuracy % (mean ± std) | per seed | vs backbone, paired (per seed) |",
             "|---|---|---|---:|---|---|"]
    for r in s["rows"]:
        vs = _fmt_diff(r["vs_backbone"])
        if r["vs_se"]:
            vs += f"; vs backbone + SE: {_fmt_diff(r['vs_se'])}"
        std = "" if math.isnan(r["std"]) else f" ± {r['std']:.2f}"
        lines.append(f"| {r['model']} | {r['label']} | {r['paper']} | {r['mean']:.2f}{std} | "
                     + ", ".join(f"{a:.2f}" for a in r["test_acc"]) + f" | {vs} |")
    lines += ["", "Deployment (every ASR run, fused with `asrfx.fuse`):", "",
              "| model | arm | test predictions differing from the ASR form | max \\|logit error\\| | "
              "parameters trained -> deployed (target) | latency fused / target (median) |",
              "|---|---|---:|---:|---|---:|"]
    for r in s["rows"]:
        d = r.get("deploy")
        if d:
            lines.append(f"| {r['model']} | {r['label']} | {d['differing']} of {d['images']:,} | "
                         f"{d['max_logit_error']:.1e} | {r['params']:,} -> {', '.join(f'{p:,}' for p in d['params_fused'])} "
                         f"({ARMS[d['deploys_as']].label}: {', '.join(f'{p:,}' for p in d['params_reference'])}) | "
                         f"{d['latency_ratio']:.3f} |")
    for c in s["costs"]:
        tr, inf = c["train_step_s"], c["inference_s"]
        lines += ["", f"Costs, {c['model']} (batch {c['batch']}, {c['rounds']} interleaved rounds, medians, "
                      f"{c['threads']} thread(s)):", "",
                  "| arm | training step ms | / backbone | deployed inference ms | / backbone | deployed parameters |",
                  "|---|---:|---:|---:|---:|---:|"]
        for arm in tr:
            lines.append(f"| {ARMS[arm].label} | {1e3 * tr[arm]:.1f} | {tr[arm] / tr['backbone']:.2f} | "
                         f"{1e3 * inf[arm]:.1f} | {inf[arm] / inf['backbone']:.2f} | {c['deployed_params'][arm]:,} |")
    for r in s["rows"]:
        if not r.get("stripe"):
            continue
        runs = r["stripe"]
        lines += ["", f"Stripe Observation, {r['model']} {r['label']} (trained; {len(runs)} seeds, mean over seeds; "
                      "score: the gate's variation across test images relative to its size; channel spread: std "
                      "across channels of the per-channel mean gate; hidden units: those of the excitation's "
                      "ReLU that are positive on at least one test image, per seed):", "",
                  "| site | channels | gate mean | channel spread | channel min..max | std across images | score | "
                  "pooled score | hidden units used |", "|---|---:|---:|---:|---|---:|---:|---:|---|"]
        for i, site in enumerate(runs[0]["sites"]):
            avg = lambda k: statistics.mean(run["sites"][i][k] for run in runs)  # noqa: E731
            lines.append(f"| {site['site']} | {site['channels']} | {avg('gate_mean'):.3f} | {avg('channel_spread'):.3f} | "
                         f"{avg('channel_min'):.3f}..{avg('channel_max'):.3f} | {avg('image_std'):.4f} | "
                         f"{avg('score'):.4f} | {avg('pooled_score'):.3f} | "
                         + ", ".join(f"{u[0]}/{u[1]}" for u in (run["sites"][i].get("hidden_active") for run in runs) if u)
                         + " |")
        if "test_acc_without_attention" not in runs[0]:
            continue
        acc = lambda k: ", ".join(f"{100 * run[k]:.2f}" for run in runs)  # noqa: E731
        if "gate_change" in r:
            epochs = len(next(iter(r["gate_change"].values())))
            lines += ["", f"How far the gates of 64 fixed test images move in each epoch (mean \\|v(t+1) - v(t)\\| "
                          "over images and channels; mean over seeds):", "",
                      "| site | " + " | ".join(str(e + 1) for e in range(epochs)) + " |",
                      "|---|" + "---:|" * epochs]
            lines += [f"| {site} | " + " | ".join(f"{v:.4f}" for v in values) + " |"
                      for site, values in r["gate_change"].items()]
        lines += ["", f"Test accuracy of the trained model ({', '.join(f'{a:.2f}' for a in r['test_acc'])} %) with every "
                      f"SE replaced by identity, same weights: {acc('test_acc_without_attention')} %; with each "
                      f"gate computed once from the mean pooled statistic (`convert(psi_init=\"calibrate\")`, no "
                      f"training): {acc('test_acc_constant_gate')} %."]
    return "\n".join(lines)


def plot(s: dict, curves_png: Path, final_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = sorted({r["model"] for r in s["rows"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in s["rows"] if r["model"] == model):
            c = torch.tensor(r["curves"])
            epochs = torch.arange(1, c.shape[1] + 1)
            mean = c.mean(0)
            std = c.std(0) if len(c) > 1 else torch.zeros_like(mean)
            ax.plot(epochs, mean, marker="o", ms=3, label=f"{r['label']} ({len(c)} seeds)")
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.15)
        ax.set(title=f"{model} on {s['data']}: test accuracy (mean ± std over seeds)", xlabel="epoch",
               ylabel="test accuracy %")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(curves_png, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in s["rows"] if r["model"] == model]
        pos = range(len(rows))
        ax.bar(pos, [r["mean"] for r in rows], yerr=[0 if math.isnan(r["std"]) else r["std"] for r in rows],
               capsize=5, color="#9ecae1", edgecolor="#3182bd")
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r["test_acc"]), r["test_acc"], color="black", s=12, zorder=3)
        low = min(min(r["test_acc"]) for r in rows)
        high = max(max(r["test_acc"]) for r in rows)
        ax.set_ylim(low - 0.6 * (high - low + 0.2), high + 0.3 * (high - low + 0.2))
        ax.set_xticks(list(pos), [r["label"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set(title=f"{model} on {s['data']}: final test accuracy (bar: mean, line: ± std, dots: seeds)",
               ylabel="test accuracy % (axis not from 0)")
        ax.title.set_fontsize(9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(final_png, dpi=110)
    plt.close(fig)


def report(out: Path, docs: Path) -> str:
    results = load_results(out)
    if not results:
        raise UsageError(f"no result.json under {out}: run the profile first")
    costs = [json.loads(p.read_text()) for p in sorted(out.glob("costs-*.json"))]
    s = summarize(results, costs)
    stem = f"repro-{s['data']}-{s['profile']}"
    (docs / "images").mkdir(parents=True, exist_ok=True)
    (docs / "results").mkdir(parents=True, exist_ok=True)
    plot(s, docs / "images" / f"{stem}-curves.png", docs / "images" / f"{stem}-final.png")
    for figure in sorted(out.glob("*/se/seed*/stripe.png"))[:1]:  # asrfx.stripe's figure of the first SE run
        shutil.copyfile(figure, docs / "images" / f"{stem}-stripe-{figure.parts[-4]}-se-{figure.parts[-2]}.png")
    write_json(docs / "results" / f"{stem}.json", s)
    text = markdown(s)
    page = docs / "results.md"
    begin, end = f"<!-- reproduce:{s['data']}:{s['profile']}:begin -->", f"<!-- reproduce:{s['data']}:{s['profile']}:end -->"
    if page.exists() and begin in page.read_text() and end in page.read_text():
        old = page.read_text()
        page.write_text(old[:old.index(begin) + len(begin)] + "\n" + text + "\n" + old[old.index(end):])
    return text


# -- command line -------------------------------------------------------------------------------


def plan_runs(args, profile: Profile) -> list[RunSpec]:
    plan = profile.plan
    if args.models:
        unknown = set(args.models) - {m for m, _ in plan}
        if unknown:
            raise UsageError(f"model(s) {sorted(unknown)} are not in profile {args.profile!r}: "
                             f"{[m for m, _ in plan]}")
        plan = tuple((m, arms) for m, arms in plan if m in args.models)
    if args.arms:
        plan = tuple((m, tuple(a for a in arms if a in args.arms)) for m, arms in plan)
    seeds = tuple(args.seeds) if args.seeds else profile.seeds
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    jobs = args.jobs or (1 if device != "cpu" else profile.jobs)
    threads = args.threads or (profile.threads or max(1, (os.cpu_count() or 1) // jobs) if device == "cpu" else 0)
    bars = jobs == 1 and sys.stderr.isatty()
    out = args.out or f"runs/{args.data}-{args.profile}"
    # seed-major order: an interrupted profile has every arm for its first seeds
    return [RunSpec(m, arm, seed, args.profile, profile, args.data, args.data_root, device, out, threads, bars)
            for seed in seeds for m, arms in plan for arm in arms]


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--profile", default="cpu", help=f"one of {', '.join(PROFILES)} (default cpu)")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist (default), cifar10 or cifar100")
    p.add_argument("--data-root", help="folder with the data (CIFAR: torchvision's python-pickle folders)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--out", help="results folder (default runs/<data>-<profile>)")
    p.add_argument("--arms", nargs="+", help=f"only these arms: {', '.join(ARMS)}")
    p.add_argument("--models", nargs="+", help=f"only these of the profile's models: {', '.join(MODELS)}")
    p.add_argument("--seeds", nargs="+", type=int, help="override the profile's seeds")
    p.add_argument("--epochs", type=int, help="override the profile's epochs")
    p.add_argument("--jobs", type=int, help="runs in parallel (default: the profile's on CPU, 1 on a GPU)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: CPUs / jobs)")
    p.add_argument("--no-costs", action="store_true", help="skip the interleaved timing run")
    p.add_argument("--restripe", action="store_true", help="no training: measure the Stripe Observation of "
                   "finished SE runs again with this version of the script, from their final checkpoints")
    p.add_argument("--report", metavar="DOCS", help="no training: tables and plots from --out's results into "
                                                    "DOCS/images, DOCS/results and DOCS/results.md's markers")
    args = p.parse_args(argv)
    if args.profile not in PROFILES:
        raise UsageError(f"unknown --profile {args.profile!r}; choose from {', '.join(PROFILES)}")
    if args.data not in STATS:
        raise UsageError(f"unknown --data {args.data!r}; choose from {', '.join(STATS)}")
    unknown = [a for a in args.arms or () if a not in ARMS]
    if unknown:
        raise UsageError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            raise UsageError(f"bad --device {args.device!r}: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here")
    for name in ("epochs", "jobs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (pytest runs this in its own process)


def _main(argv: list[str] | None) -> list[dict]:
    args = parse(argv)
    profile = PROFILES[args.profile]
    if args.epochs:
        profile = replace(profile, epochs=args.epochs)
    runs = plan_runs(args, profile)
    out = Path(runs[0].out if runs else args.out or f"runs/{args.data}-{args.profile}")
    if args.report:
        print(report(out, Path(args.report)))
        return []
    data = load_data(args.data, args.data_root)  # fail early, with one line, before any process starts
    if args.restripe:
        for spec in runs:
            if spec.arm in STRIPE_ARMS and (spec.folder / "result.json").exists():
                restripe(spec, data)
        return []
    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs or (1 if runs and runs[0].device != "cpu" else profile.jobs)
    todo = sum(not (r.folder / "result.json").exists() for r in runs)
    print(f"{len(runs)} runs ({todo} to do) in {out}, {jobs} at a time, device {runs[0].device}, "
          f"{runs[0].threads or torch.get_num_threads()} thread(s) each", flush=True)
    if jobs == 1:
        results = [run_one(r) for r in runs]
    else:  # separate processes: single-threaded runs share a busy CPU better than one multi-threaded run
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            results = list(pool.map(run_one, runs))
    if not args.no_costs:
        device = torch.device(runs[0].device)
        if runs[0].threads:
            torch.set_num_threads(runs[0].threads * jobs)
        for model in dict.fromkeys(r.model for r in runs):
            path = out / f"costs-{model}.json"
            if path.exists():
                print(f"costs of {model}: measured before ({path})")
                continue
            arms = tuple(dict.fromkeys(r.arm for r in runs if r.model == model))
            if "backbone" not in arms:
                continue
            print(f"timing every arm of {model} (interleaved) ...", flush=True)
            write_json(path, measure_costs(profile, model, arms, data, device))
    print(f"done: {len(results)} results in {out}; tables and plots: python {sys.argv[0]} --profile {args.profile} "
          f"--data {args.data} --out {out} --report docs")
    return results


if __name__ == "__main__":
    try:
        main()
    except UsageError as exc:
        print(f"reproduce.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
