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

Verified nowcasts (``ninocast.verify``): ``NowcastCallback(probe="eval_batch")`` scores every nowcast on the first
batch of the validation dataloader through the module's ``training_step`` (its loss, or its ``"loss"``),
``probe="closure"`` on the step's own batch (Lightning's closure: forward and backward per score),
``probe=fn`` on ``fn(model) -> float``; or pass ``verify=ninocast.Verify(...)`` directly.
``verify_options={"delay": 100}`` adds ``Verify`` fields to ``probe=`` (here: delayed checks with rollback).
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
from ..verify import Verify
from . import find_nowcast_optimizer, probe_verify


class NowcastCallback(pl.Callback):
    """``nowcast_kwargs`` are ``NowcastOptimizer``'s keyword arguments (``server``, ``api_key``, ``local``,
    ``nowcaster``, ``period``, ``max_train_steps``, ``on_error``...); ``self.optimizer`` is the wrapper."""

    def __init__(self, probe: Any = None, verify_options: dict[str, Any] | None = None,
                 **nowcast_kwargs: Any) -> None:
        self.probe = probe  # "eval_batch", "closure", a function probe(model) -> float, or None
        self.verify_options = verify_options  # more Verify fields for probe=, e.g. {"delay": 100}
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

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """The validation dataloader exists from here on (after the sanity check)."""
        if self.probe is not None and self.optimizer is not None and self.optimizer.verify is None:
            self.optimizer.verify = probe_verify(self.probe, lambda: _val_batch_verify(trainer, pl_module),
                                                  self.verify_options)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """The run is over: close the wrapper, which deletes its server session unless ``record=True``."""
        if self.optimizer is not None:
            self.optimizer.close()


def _val_batch_verify(trainer: Any, pl_module: Any) -> Verify:
    if trainer.val_dataloaders is None:  # set up lazily (no sanity check yet): ask the validation loop for it
        val_loop = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None)
        if val_loop is not None and hasattr(val_loop, "setup_data"):
            val_loop.setup_data()
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    if loader is None:
        raise ValueError("NowcastCallback(probe='eval_batch') needs a validation dataloader (trainer.fit(..., "
                         "val_dataloaders=...)); or use probe='closure' or a function")
    batch = pl_module.transfer_batch_to_device(next(iter(loader)), pl_module.device, 0)

    def loss_fn(model: Any, b: Any) -> Any:
        out = pl_module.training_step(b, 0)
        return out["loss"] if isinstance(out, dict) else out
    return Verify(batch=batch, loss_fn=loss_fn)
