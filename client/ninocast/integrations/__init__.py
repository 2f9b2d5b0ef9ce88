"""Framework integrations (``pip install 'ninocast[integrations]'``); each module imports its framework lazily.

- ``ninocast.integrations.hf.NowcastCallback``: Hugging Face ``transformers.Trainer``.
- ``ninocast.integrations.lightning.NowcastCallback``: PyTorch Lightning ``Trainer``.
- DistributedDataParallel needs no integration: ``NowcastOptimizer`` detects an initialised process group;
  only rank 0 snapshots and talks to the server, and every nowcast is broadcast to all ranks.
"""

from __future__ import annotations

from typing import Any

from ..optimizer import NowcastOptimizer


def find_nowcast_optimizer(optimizer: Any, depth: int = 8) -> NowcastOptimizer | None:
    """The NowcastOptimizer inside framework wrappers (accelerate's AcceleratedOptimizer keeps the wrapped
    optimizer in ``.optimizer``, Lightning's LightningOptimizer in ``._optimizer``), or None."""
    for _ in range(depth):
        if optimizer is None:
            return None
        attrs = getattr(optimizer, "__dict__", {})
        if isinstance(optimizer, NowcastOptimizer) and "_optimizer" not in attrs:  # not Lightning's proxy class
            return optimizer
        optimizer = attrs.get("_optimizer", attrs.get("optimizer"))
    return None


__all__ = ["find_nowcast_optimizer"]
