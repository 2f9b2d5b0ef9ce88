"""The one nowcaster interface: past states of a model in, its predicted parameters out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ninocast.spec import FAMILIES, ModelSpec

from .scaling import scale_states, unscale_vector
from .scope import Scope

if TYPE_CHECKING:
    from ..graphs.base import NeuralGraph


def all_finite(t: Tensor) -> bool:
    """No NaN or Inf in ``t``, in one read-only pass: min and max propagate NaN and are infinite iff an entry is.

    ``torch.isfinite(t).all()`` writes a bool tensor and reduces it: 0.65 s of a 0.67 s linefit nowcast of 25M
    parameters; aminmax reads the states once and allocates nothing.
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


class NowcastError(ValueError):
    """A nowcast request that cannot be served as asked (bad k, wrong shapes, unsupported graph)."""


def check_k(k: object, horizon: int) -> int:
    """The one check of a horizon, wherever k enters (the server, the runner, the models' own forwards)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= horizon:
        raise NowcastError(f"k must be an integer in 1..{horizon}, got {k!r}")
    return k


class Nowcaster(ABC):
    """Predicts a model's parameters ``k`` snapshot intervals past the newest of ``ctx`` states.

    Implementations must be pure: one instance serves many models and users, so ``predict`` never changes
    the nowcaster itself.
    """

    name: str = ""
    kind: str = ""
    ctx: int = 5
    horizon: int = 40  # the largest k it can predict
    needs_graph: bool = False  # predict() wants the spec's NeuralGraph
    needs_lpe: bool = False  # ... with its Laplacian positional encoding
    max_feat_size: int | None = None  # the most values per graph edge (kernel area) it reads; None: any
    reads_16bit: bool = False  # predict() takes bf16 / fp16 states as they are (else the runner makes float32)
    scratch_states: bool = False  # predict() takes overwrite_states= (older subclasses do not: never passed)
    families: tuple[str, ...] = FAMILIES  # what it can run on
    scope: Scope | None = None  # what it was meta-trained on (None: no claim, e.g. linefit)
    start_step: int = 0  # its advice to a run: no nowcast in the first N optimizer calls (measured per model)
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def predict(self, states: Tensor, k: int, spec: ModelSpec, graph: "NeuralGraph | None", *,
                overwrite_states: bool = False) -> Tensor:
        """(P, ctx) float32 states on ``self.device`` -> (P,) float32 prediction. With ``overwrite_states``
        the nowcaster may use ``states`` as scratch (no second (P, ctx) copy); otherwise it leaves them as they are."""

    def to(self, device: torch.device | str) -> "Nowcaster":
        self.device = torch.device(device)
        return self

    def num_parameters(self) -> int:
        return 0

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "ctx": self.ctx, "horizon": self.horizon,
                "parameters": self.num_parameters(), "families": list(self.families),
                "scope": self.scope.to_json() if self.scope else None, "start_step": self.start_step}

    def for_run(self, spec: ModelSpec, spacing: int | None = None) -> "Nowcaster":
        """The nowcaster that serves ``spec`` with snapshots ``spacing`` steps apart: itself, except for a routed
        one, which hands each run to a member (routed.py)."""
        return self

    def advised_start(self, spec: ModelSpec, spacing: int | None = None) -> int:
        """Optimizer calls a run of ``spec`` should train before its first nowcast: the serving model's advice
        (a routed nowcaster's member for this run)."""
        return self.for_run(spec, spacing).start_step

    def scope_warning(self, spec: ModelSpec, spacing: int | None = None) -> str | None:
        """One line when ``spec`` (with snapshots ``spacing`` steps apart, if known) is outside what this
        nowcaster was trained on (see scope.py), else None."""
        return self.scope.warning(self.name, spec, spacing) if self.scope else None


class ScaledNowcaster(Nowcaster):
    """A learned nowcaster that works in per-tensor standardised units (NINO_SPEC §4)."""

    scratch_states = True

    def predict(self, states: Tensor, k: int, spec: ModelSpec, graph: "NeuralGraph | None", *,
                overwrite_states: bool = False) -> Tensor:
        scaled, mu, sigma = scale_states(states, spec, in_place=overwrite_states)
        pred = self.predict_scaled(scaled, k, graph)
        del scaled
        if not all_finite(pred):
            raise FloatingPointError(f"{self.name}: the prediction contains NaN or Inf")
        return unscale_vector(pred, spec, mu, sigma)

    @abstractmethod
    def predict_scaled(self, scaled: Tensor, k: int, graph: "NeuralGraph | None") -> Tensor:
        """(P, ctx) scaled states -> (P,) scaled prediction."""


class ModuleNowcaster(ScaledNowcaster):
    """A scaled nowcaster around a trained ``nn.Module`` whose ``config`` is a NowcasterConfig."""

    def __init__(self, model: torch.nn.Module, name: str, chunk_size: int) -> None:
        self.model = model.eval()
        self.name = name
        self.ctx, self.horizon = model.config.ctx, model.config.seq_len
        self.chunk_size = int(chunk_size)
        self.device = next(model.parameters()).device

    def to(self, device: torch.device | str) -> "ModuleNowcaster":
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict:
        return {**super().describe(), "model_args": self.model.config.model_args()}
