"""Tentative jumps: a copy of everything a training step depends on, to put back when a delayed check fails.

A nowcast kept tentatively (``Verify(delay=D)``) is checked again ``D`` steps later; a failed check must leave
the run exactly where it would be had the jump never happened, apart from the spent steps. What the next steps
depend on: the model's parameters *and* buffers (BatchNorm's running statistics move during the D steps) and the
base optimizer's per-parameter state (Adam's moments and its step count, which sets the bias correction). The
optimizer's ``param_groups`` (learning rates) are not restored: an LR scheduler has moved on with the step
counter, which does not go back either.

With ``Verify(shadow=True)`` the copy is not idle while it waits: it is the run as plain training continues it.
``RunCopy.swap`` exchanges it with the live run (tensor storage, optimizer state and gradients change places; no
data is copied), so one base-optimizer step can be taken on it and the live run put back.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class RunCopy:
    """The model's tensors and the optimizer's per-parameter state at one moment, on their own devices."""

    model: dict[str, torch.Tensor]
    optimizer: dict[int, dict[str, Any]]  # index of the parameter in the param groups -> its state
    nbytes: int = 0
    grads: dict[int, torch.Tensor | None] = field(default_factory=dict)  # swap(): the branch's last gradients

    @classmethod
    def take(cls, model: nn.Module, optimizer: torch.optim.Optimizer) -> "RunCopy":
        tensors = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
        state: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(ordered_params(optimizer)):
            if p in optimizer.state:
                state[i] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                            for k, v in optimizer.state[p].items()}
        nbytes = sum(_nbytes(t) for t in tensors.values()) + sum(
            _nbytes(v) for st in state.values() for v in st.values() if isinstance(v, torch.Tensor))
        return cls(tensors, state, nbytes)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write the copy back in place (the live tensors keep their identity: other references stay valid)."""
        seen: set[int] = set()
        with torch.no_grad():
            for n, t in model.state_dict(keep_vars=True).items():
                if id(t) not in seen:  # a tied tensor once: its first name's copy is the one swap() trains
                    seen.add(id(t))
                    t.copy_(self.model[n])
        for i, p in enumerate(ordered_params(optimizer)):
            if i in self.optimizer:
                optimizer.state[p] = self.optimizer[i]
            else:  # no state before the jump (a parameter first stepped on the branch)
                optimizer.state.pop(p, None)
        self.optimizer = {}  # handed over: the copy is used once

    def swap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Exchange the copy with the live run: afterwards the model and optimizer hold the copy's branch and the
        copy holds theirs. The live tensors keep their identity (only their storage moves), so the optimizer's
        state keys and other references stay valid; a second call puts everything back. Tied tensors are
        exchanged once."""
        seen: set[int] = set()
        for n, t in model.state_dict(keep_vars=True).items():
            if id(t) in seen:
                continue
            seen.add(id(t))
            live = t.data
            t.data = self.model[n]
            self.model[n] = live
        for i, p in enumerate(ordered_params(optimizer)):
            live_state, theirs = optimizer.state.pop(p, None), self.optimizer.pop(i, None)
            if theirs is not None:
                optimizer.state[p] = theirs
            if live_state is not None:
                self.optimizer[i] = live_state
            p.grad, self.grads[i] = self.grads.get(i), p.grad


@dataclass
class Tentative:
    """A jump kept until ``check_step``'s delayed check (``step`` is the nowcast call)."""

    step: int
    check_step: int
    saved: RunCopy
    record: dict[str, Any] = field(default_factory=dict)  # rank 0: the decision in ``opt.nowcasts``
    fresh: bool = False  # shadow: the copy's step for the nowcast call itself is still to take
    gap: float = math.inf  # shadow: the jump's probe minus plain training's at the last look
    plain_snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # shadow: the copy's


def ordered_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
