"""Framework integrations (``pip install 'ninocast[integrations]'``); each module imports its framework lazily.

- ``ninocast.integrations.hf.NowcastCallback``: Hugging Face ``transformers.Trainer``.
- ``ninocast.integrations.lightning.NowcastCallback``: PyTorch Lightning ``Trainer``.
- DistributedDataParallel needs no integration: ``NowcastOptimizer`` detects an initialised process group;
  only rank 0 snapshots and talks to the server, and every nowcast is broadcast to all ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from ..optimizer import NowcastOptimizer
from ..verify import Verify, as_verify


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


def probe_verify(probe: Any, framework_batch: Callable[[], Verify],
                 options: Mapping[str, Any] | None = None) -> Verify:
    """A callback's ``probe=``: the framework's eval batch (``"eval_batch"``), ``"closure"``, or a function;
    ``options``: more ``Verify`` fields (``tolerance``, ``delay``, ``max_dip``...), checked as ``Verify`` does."""
    verify = framework_batch() if probe == "eval_batch" else as_verify(probe)
    assert verify is not None
    if options:
        fields = {f.name for f in dataclasses.fields(Verify)} - {"batch", "batches", "loss_fn", "probe", "closure"}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"verify_options: unknown Verify options {unknown}; known: {sorted(fields)}")
        verify = dataclasses.replace(verify, **options)
    return verify


__all__ = ["find_nowcast_optimizer", "probe_verify"]
