"""digits and digits-cnn: a small MLP and a small ConvNet on scikit-learn's 8x8 digits (no download needed).

``digits`` is the seconds-long sanity task of the benchmark; ``digits-cnn`` adds a ConvNet of the FM family's
architecture (``Net``, channels (8, 16, 16)) so that meta-training data holds small convolutional runs besides FM-16.

* Data: ``sklearn.datasets.load_digits`` (1,797 images, 64 pixels in 0..16, scaled to [0, 1]); a fixed split
  from ``numpy.random.default_rng(0).permutation``: 1,437 training and 360 test images.
* Model: Linear(64, 64) → ReLU → Linear(64, 10) (4,810 parameters), default init after ``torch.manual_seed``.
* AdamW(lr 1e-3, wd 0), batch 32 (44 full batches + a remainder of 29 per epoch, reshuffled from seed + epoch),
  budget 1,000 steps, period 100 (a snapshot every 20 steps), evaluated every 10 steps on the 360 test images.
* Target 97.0 % test accuracy: what AdamW reaches at 900-1,000 steps (seeds 1000-5000: 96.9-98.1 % at step
  1,000, median 97.8 %), so AdamW needs most of its budget; see docs/tasks.md.
* digits-cnn: the same data seen as (1, 8, 8) images, ``Net((8, 16, 16))`` (3,738 parameters), AdamW lr 3e-3;
  its target is in docs/tasks.md.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .base import Task
from .vision import Net, shuffled_batches

N_TEST = 360


@lru_cache(maxsize=1)
def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    tr, te = perm[:-N_TEST], perm[-N_TEST:]
    return x[tr], y[tr], x[te], y[te]


class DigitsTask(Task):
    name = "digits"
    kind = "tabular"
    metric = "test_acc"
    higher_is_better = True
    target = 97.0
    lr = 1e-3
    weight_decay = 0.0
    batch_size = 32
    budget = 1_000
    period = 100
    ctx = 5
    eval_every = 10
    in_distribution = True  # an MLP, the family the nowcasters were meta-trained on
    description = "MLP 64-64-10 on sklearn digits (1437 train / 360 test), AdamW lr 1e-3, target 97% test acc"

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y, _, _ = load_digits_split()
        for idx in shuffled_batches(len(x), self.batch_size, seed):
            yield self.inputs(x[idx]), y[idx]

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of 64 pixels as the model takes them (the MLP: as they are)."""
        return x

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        _, _, x, y = load_digits_split()
        out = model(self.inputs(x))
        return {"test_acc": 100.0 * float((out.argmax(1) == y).float().mean()),
                "test_loss": float(nn.functional.cross_entropy(out, y))}


class DigitsConvTask(DigitsTask):
    """The FM ConvNet shrunk to 8x8 digits: the stride-2 first conv leaves 3x3 maps, so it trains in seconds."""

    name = "digits-cnn"
    kind = "vision"
    lr = 3e-3
    target = 90.0
    channels = (8, 16, 16)
    description = "Net conv(8, 16, 16) on sklearn digits as 1x8x8 images, AdamW lr 3e-3, target 90% test acc"

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return Net(self.channels)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, 8, 8)
