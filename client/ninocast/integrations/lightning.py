"""PyTorch Lightning integration.

```python
import pytorch_lightning as pl
from ninocast.integrations.lightning import NowcastCallback

trainer = pl.Trainer(max_steps=10_000, callbacks=[NowcastCallback(server="http://gpu-box:8000", period=1000)])
trainer.fit(module, loader)
```

At ``on_fit_start`` (after ``configure_optimizers``, before a checkpoint's optimizer state is restored) the
module's single optimizer is wrapped in a ``NowcastOptimizer``; LR schedulers keep stepping the base optimizer,
and checkpoints carry the wrapper's state, so ``ckpt_path=`` resumes the window. A ``configure_optimizers``
that already returns a ``NowcastOptimizer`` is used as it is. Lightning calls ``step(closure)``: on a nowcast
step the closure (forward and backward) runs once and its gradients are ignored. ``max_train_steps`` defaults
to the Trainer's ``estimated_stepping_batches``. When training ends (``on_train_end``) the wrapper is closed: its
server session is deleted unless ``record=True``. Works with ``pytorch_lightning`` (what the ``integrations``
extra installs: ``import pytorch_lightning as pl; pl.Trainer``) or the ``lightning`` package
(``lightning.pytorch.Trainer``); the callback subclasses whichever is importable, ``lightning`` first.
"""

from __future__ import annotations

import math
from typing import Any

try:
    import lightning.pytorch as pl
except ModuleNotFoundError:
    try:
        import pytorch_lightning as pl
    except ModuleNotFoundError:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("ninocast.integrations.lightning needs PyTorch Lightning: "
                                  "pip install 'ninocast[integrations]'") from None

from ..optimizer import NowcastOptimizer
from . import find_nowcast_optimizer


class NowcastCallback(pl.Callback):
    """``nowcast_kwargs`` are ``NowcastOptimizer``'s keyword arguments (``server``, ``api_key``, ``local``,
    ``nowcaster``, ``period``, ``max_train_steps``, ``on_error``...); ``self.optimizer`` is the wrapper."""

    def __init__(self, **nowcast_kwargs: Any) -> None:
        self.nowcast_kwargs = nowcast_kwargs
        self.optimizer: NowcastOptimizer | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) != 1:
            raise ValueError(f"NowcastCallback handles one optimizer; configure_optimizers returned {len(optimizers)}")
        found = find_nowcast_optimizer(optimizers[0])
        if found is None:
            found = NowcastOptimizer(optimizers[0], pl_module, **self.nowcast_kwargs)
            trainer.strategy.optimizers = [found]
        self.optimizer = found
        steps = getattr(trainer, "estimated_stepping_batches", None)
        if "max_train_steps" not in self.nowcast_kwargs and isinstance(steps, (int, float)) and \
                math.isfinite(steps) and steps > 0:
            found.set_max_train_steps(int(steps))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """The run is over: close the wrapper, which deletes its server session unless ``record=True``."""
        if self.optimizer is not None:
            self.optimizer.close()
