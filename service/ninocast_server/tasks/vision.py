"""FM-16 and FM-32: the paper's Fashion-MNIST ConvNet tasks, exactly as NINO_SPEC §7.

* Model "Net": conv3x3(1→c1, stride 2, no padding) → ReLU → conv3x3(c1→c2, "same") → ReLU → conv3x3(c2→c3, "same")
  → ReLU → global average pool → flatten → linear(c3→10); PyTorch default init right after ``torch.manual_seed``.
  Parameter names follow the reference (``fc.0``, ``fc.2``, ``fc.4`` convs, ``fc.8`` classifier).
* Data: ToTensor (x/255) then Normalize((0.1307,), (0.3081,)); training uses the first 55,000 of the 60,000
  training images; no augmentation. Batch 128, the last batch of an epoch keeps the remainder (88 images, as a
  DataLoader with ``drop_last=False``); the order of epoch e is ``torch.randperm(55000, generator=seed + e)``.
* AdamW(lr 0.006, weight decay 0); period 1000, max_train_steps 10,000; target test accuracy 89.5 % (FM-16),
  90.5 % (FM-32), measured on the full 10,000-image test set.

The idx files come from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or any
directory holding the four standard files (``.gz`` or not), set with ``NINOCAST_FASHION_MNIST_DIR``.
"""

from __future__ import annotations

import gzip
import os
import struct
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .base import PROBE_SEED_OFFSET, DataMissing, Task

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
ENV_DIR = "NINOCAST_FASHION_MNIST_DIR"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MEAN, STD = 0.1307, 0.3081
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DatasetMissing(DataMissing):
    """The data files are not there; the message says how to get them."""


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or DEFAULT_FASHION_MNIST_DIR)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (``.gz`` or plain): magic 0x0000 <dtype byte> <ndim byte>, big-endian int32 dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic {data[:4]!r})")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx data type 0x{dtype_code:02x}")
    dims = struct.unpack(f">{ndim}i", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    body = data[4 + 4 * ndim:]
    n = int(np.prod(dims)) if dims else 1
    if len(body) != n * dtype.itemsize:
        raise ValueError(f"{path}: {len(body)} data bytes, expected {n * dtype.itemsize} for shape {dims}")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).exists():
            return directory / name
    raise DatasetMissing(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory}. Install Debian's package "
        f"(sudo apt-get install dataset-fashion-mnist, files in {DEFAULT_FASHION_MNIST_DIR}) or download the four "
        f"idx files from https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a directory and set "
        f"{ENV_DIR}=that/directory.")


def load_fashion_mnist(directory: str | None = None) -> dict[str, torch.Tensor]:
    """The four arrays as tensors: images uint8 (n, 28, 28), labels int64 (n,); cached per directory.
    ``directory`` defaults to ``$NINOCAST_FASHION_MNIST_DIR`` or /usr/share/datasets/fashion-mnist."""
    return _load_dir(str(Path(directory) if directory else fashion_mnist_dir()))


@lru_cache(maxsize=4)
def _load_dir(directory: str) -> dict[str, torch.Tensor]:
    d = Path(directory)
    out = {}
    for key, stem in FILES.items():
        arr = read_idx(_find(d, stem))
        out[key] = torch.from_numpy(arr.copy()).to(torch.uint8 if "images" in key else torch.int64)
    for split in ("train", "test"):
        if len(out[f"{split}_images"]) != len(out[f"{split}_labels"]):
            raise ValueError(f"{d}: {split} images and labels differ in count")
    return out


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """ToTensor + Normalize: (n, 28, 28) uint8 → (n, 1, 28, 28) float32."""
    return ((images_u8.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def shuffled_batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Index batches forever: epoch e is ``randperm(n)`` from a generator seeded ``seed + e``; the last batch of
    an epoch keeps the remainder."""
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]
        epoch += 1


class Net(nn.Module):
    """The paper's ConvNet (NINO_SPEC §7.1); ``fc`` is the reference's Sequential, so names match."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 32), in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        c1, c2, c3 = channels
        self.fc = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, stride=2), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding="same"), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, padding="same"), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(c3, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class FashionMNISTTask(Task):
    kind = "vision"
    metric = "test_acc"
    higher_is_better = True
    lr = 0.006
    weight_decay = 0.0
    batch_size = 128
    budget = 10_000
    period = 1000
    ctx = 5
    eval_every = 50
    n_train = 55_000  # first n - n // 12 of the 60,000 training images
    probe_size = 1024  # held-out images in the verification probe, in batches of batch_size
    probe_description = (f"{probe_size} of the 5,000 held-out training images (60,000 - 55,000; never trained on, "
                         f"not the test set) drawn from seed + 7919, in batches of 128")
    eval_chunk = 256  # test images per forward pass (fastest on 1 CPU thread; same result as one 10k batch)

    def __init__(self, name: str, channels: tuple[int, int, int], target: float, in_distribution: bool,
                 data_dir: str | None = None) -> None:
        self.name, self.channels, self.target, self.in_distribution = name, channels, target, in_distribution
        self.data_dir = data_dir
        self.description = (f"Net conv{channels} on Fashion-MNIST (55k train, 10k test), AdamW lr {self.lr}, "
                            f"target {target}% test accuracy")
        self._train_x: torch.Tensor | None = None
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ data
    def _data(self) -> dict[str, torch.Tensor]:
        return load_fashion_mnist(self.data_dir)

    def _n_train(self, d: dict[str, torch.Tensor]) -> int:
        """Training images used; the rest of the training file is held out (the verification probe's)."""
        return min(self.n_train, len(d["train_images"]) - len(d["train_images"]) // 12)

    def _train(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self._data()
        n = self._n_train(d)
        if self._train_x is None:
            self._train_x = normalize(d["train_images"][:n])
        return self._train_x, d["train_labels"][:n]

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self._train()
        for idx in shuffled_batches(len(x), self.batch_size, seed):
            yield x[idx], y[idx]

    def probe_batches(self, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Verification probe from the training images the task never trains on: a ConvNet's training loss
        keeps falling while its test accuracy levels off, so a training-batch probe rejects jumps that generalise
        (docs/benchmarks-speedup.md, issue 12)."""
        d = self._data()
        n = self._n_train(d)
        x, y = d["train_images"][n:], d["train_labels"][n:]
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET))
        pick = pick[:self.probe_size]
        return [(normalize(x[i]), y[i]) for i in pick.split(self.batch_size)]

    # ------------------------------------------------------------------ model
    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return Net(self.channels)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self._test is None:
            d = self._data()
            self._test = (normalize(d["test_images"]), d["test_labels"])
        x, y = self._test
        was_training = model.training
        model.eval()
        correct, loss_sum = 0, 0.0
        for i in range(0, len(x), self.eval_chunk):
            out = model(x[i:i + self.eval_chunk])
            loss_sum += float(nn.functional.cross_entropy(out, y[i:i + self.eval_chunk], reduction="sum"))
            correct += int((out.argmax(1) == y[i:i + self.eval_chunk]).sum())
        model.train(was_training)
        return {"test_acc": 100.0 * correct / len(x), "test_loss": loss_sum / len(x)}


def fm16(data_dir: str | None = None) -> FashionMNISTTask:
    return FashionMNISTTask("fm-16", (16, 32, 32), 89.5, in_distribution=True, data_dir=data_dir)


def fm32(data_dir: str | None = None) -> FashionMNISTTask:
    return FashionMNISTTask("fm-32", (32, 64, 64), 90.5, in_distribution=False, data_dir=data_dir)
