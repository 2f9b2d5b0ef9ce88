"""Task: one training problem (data, model, optimiser settings, metric, target) shared by the speedup benchmark
and trajectory collection for meta-training. Runs with the same seed see the same batches in the same order."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterator

import torch
from torch import nn


class DataMissing(FileNotFoundError):
    """A task's data is not on this machine; the message says how to get it (the CLI prints it as one line)."""


PROBE_SEED_OFFSET = 7919  # the probe's shuffle is independent of every training seed's
PROBE_BATCHES = 8  # batches in a verification probe


class Task(ABC):
    name: str = ""
    kind: str = ""  # "vision" | "language" | "tabular"
    metric: str = ""  # "test_acc" (%) | "val_ppl" | ...
    higher_is_better: bool = True
    target: float = 0.0  # steps-to-target threshold on `metric`
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0
    batch_size: int = 128
    budget: int = 10_000  # max_train_steps
    in_distribution: bool = True  # False: held out of meta-training (FM-32, the 3-64 and Llama language models)

    # --- benchmark protocol (defaults follow NINO_SPEC §5/§7; tasks override what differs)
    period: int = 1000  # nowcast every `period` optimizer calls (ctx snapshots every period // ctx calls)
    ctx: int = 5
    eval_every: int = 50  # evaluate every this many steps (plus around every nowcast), see docs/tasks.md
    eval_before_nowcast: bool = False  # language: also evaluate right before each nowcast step (paper protocol)
    description: str = ""  # one line for tables and docs

    @abstractmethod
    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised model; the same seed gives the same weights."""

    @abstractmethod
    def batches(self, seed: int) -> Iterator[Any]:
        """Training batches forever (epoch after epoch), reshuffled per epoch from (seed, epoch)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Training loss of one batch."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics; includes ``self.metric``."""

    probe_description: str = (f"the first {PROBE_BATCHES} training batches of an independent shuffle "
                               f"(seed + {PROBE_SEED_OFFSET})")

    def probe_batches(self, seed: int) -> list[Any]:
        """The fixed batches a verified run scores its nowcasts on (``ninocast.Verify(batches=...)``; several, so
        that a shadow check can tell a real lead from noise), never from the data ``evaluate`` measures.
        Default: the first batches of an independent shuffle of the training data, for tasks with no held-out
        training split (digits, the language tasks, where training and validation loss move together); tasks
        that have one override it."""
        stream = self.batches(seed + PROBE_SEED_OFFSET)
        return [next(stream) for _ in range(PROBE_BATCHES)]

    def reached(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The base optimizer of the task (AdamW with the task's lr and weight decay)."""
        return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def info(self) -> dict[str, Any]:
        """The task's settings as plain values (written next to benchmark results)."""
        keys = ("name", "kind", "metric", "higher_is_better", "target", "lr", "weight_decay", "batch_size",
                "budget", "in_distribution", "period", "ctx", "eval_every", "eval_before_nowcast", "description")
        return {k: getattr(self, k) for k in keys}

    def __repr__(self) -> str:
        return f"<Task {self.name}: {self.description}>"
