"""A ``torch.optim.Optimizer`` that is another optimizer's front: ``param_groups``, ``state`` and ``defaults``
are the wrapped optimizer's own objects.

Like accelerate's ``AcceleratedOptimizer`` it never calls ``Optimizer.__init__`` (that would build a second set
of groups), so LR schedulers, ``GradScaler``, Hugging Face ``Trainer`` and Lightning, which check the type and
read or set these attributes, act on the wrapped optimizer.
"""

from __future__ import annotations

from typing import Any

import torch


class DelegatingOptimizer(torch.optim.Optimizer):
    """Base of ``NowcastOptimizer``: the subclass sets ``self.optimizer`` and defines ``step``."""

    optimizer: torch.optim.Optimizer

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, group: dict) -> None:
        self.optimizer.add_param_group(group)
