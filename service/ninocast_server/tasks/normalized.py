"""fm-16-bn and fm-mlp-ln: Fashion-MNIST tasks whose models have normalisation layers (issue 11).

Every other vision task is normalisation-free; these give meta-training (``ninocast collect``) and the speedup
benchmark a BatchNorm ConvNet and a LayerNorm MLP on exactly the FM tasks' data, split and batches (they are
``FashionMNISTTask`` subclasses that change only the model, the learning rate and the target).

* ``BatchNormNet`` (fm-16-bn): the FM ``Net`` with ``BatchNorm2d`` after each convolution, before the ReLU. The
  convolutions have no bias: under a BatchNorm a bias gets exactly zero gradient, so training never moves it, but a
  nowcast could, and in eval mode (running statistics) that would shift the output for nothing. Parameters, in
  order: ``fc.0.weight`` (conv 1), ``fc.1.{weight,bias}`` (BN 1), ``fc.3.weight``, ``fc.4.*``, ``fc.6.weight``,
  ``fc.7.*``, ``fc.11.{weight,bias}`` (classifier); buffers ``fc.{1,4,7}.{running_mean,running_var,
  num_batches_tracked}`` (not parameters: optimisers and nowcasters never touch them).
* ``LayerNormMLP`` (fm-mlp-ln): flatten → Linear(784, 128) → LayerNorm → ReLU → Linear(128, 128) →
  LayerNorm → ReLU → Linear(128, 10). Parameters: ``fc.1`` (Linear), ``fc.2`` (LN), ``fc.4``, ``fc.5``,
  ``fc.7``, each ``weight`` and ``bias``.

Learning rates (a 2,000-step scan on seed 0) and targets (AdamW's test accuracy around step 9,000, seeds 10-12)
are measured: docs/tasks.md, "Normalisation layers".
"""

from __future__ import annotations

import torch
from torch import nn

from .vision import FashionMNISTTask


class BatchNormNet(nn.Module):
    """The paper's ConvNet (``vision.Net``) with BatchNorm2d between each convolution and its ReLU."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 32), in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        c1, c2, c3 = channels
        self.fc = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, stride=2, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding="same", bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, padding="same", bias=False), nn.BatchNorm2d(c3), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(c3, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class LayerNormMLP(nn.Module):
    """An MLP on flattened 28x28 images with LayerNorm between each hidden Linear and its ReLU."""

    def __init__(self, hidden: tuple[int, ...] = (128, 128), in_features: int = 784, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.fc = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class FashionMNISTBatchNormTask(FashionMNISTTask):
    """FM-16's data and protocol with ``BatchNormNet``; ``evaluate`` runs it in eval mode (running statistics)."""

    lr = 0.006

    def __init__(self, data_dir: str | None = None) -> None:
        super().__init__("fm-16-bn", (16, 32, 32), target=88.2, in_distribution=True, data_dir=data_dir)
        self.description = (f"Net conv{self.channels} + BatchNorm on Fashion-MNIST (55k train, 10k test), AdamW lr "
                            f"{self.lr}, target {self.target}% test accuracy")

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return BatchNormNet(self.channels)


class FashionMNISTMLPTask(FashionMNISTTask):
    """FM-16's data and protocol with ``LayerNormMLP`` 784-128-128-10."""

    lr = 0.001
    hidden = (128, 128)

    def __init__(self, data_dir: str | None = None) -> None:
        super().__init__("fm-mlp-ln", (),  # no channels: the model is an MLP
                         target=88.8, in_distribution=True, data_dir=data_dir)
        self.description = (f"MLP 784-{'-'.join(map(str, self.hidden))}-10 + LayerNorm on Fashion-MNIST (55k train, "
                            f"10k test), AdamW lr {self.lr}, target {self.target}% test accuracy")

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return LayerNormMLP(self.hidden)
