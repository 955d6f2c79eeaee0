"""Fashion-MNIST from local files (Debian's dataset-fashion-mnist), for tests and benchmarks.

Nothing is downloaded: the files come from ``apt-get install dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``) or any folder with the four idx .gz files.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch

__all__ = ["FASHION_MNIST_ROOT", "fashion_mnist_available", "load_fashion_mnist"]

FASHION_MNIST_ROOT = Path(os.environ.get("ASRFX_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fashion_mnist_available(root: Path | str = FASHION_MNIST_ROOT) -> bool:
    return all((Path(root) / name).exists() for pair in _FILES.values() for name in pair)


def _read_idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned bytes
        raise ValueError(f"{path} is not an idx file of unsigned bytes (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


def load_fashion_mnist(split: str = "train", root: Path | str = FASHION_MNIST_ROOT,
                       limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float [N, 1, 28, 28] in [0, 1] and labels as int64 [N]."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not fashion_mnist_available(root):
        raise FileNotFoundError(f"Fashion-MNIST not found in {root}: apt-get install dataset-fashion-mnist "
                                "or set ASRFX_FASHION_MNIST to a folder with the idx .gz files")
    images, labels = (_read_idx(root / name) for name in _FILES[split])
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.unsqueeze(1).float().div_(255.0), labels.long()
