"""Hugging Face ``transformers.Trainer`` integration.

```python
from ninocast.integrations.hf import NowcastCallback

trainer = Trainer(model=model, args=args, train_dataset=ds)
nowcast = NowcastCallback(server="http://gpu-box:8000", api_key=KEY, period=1000).attach(trainer)
trainer.train()                  # resume_from_checkpoint=... restores the window too
nowcast.optimizer.nowcasts, nowcast.optimizer.failures
```

``attach`` makes the optimizer the Trainer creates (``Trainer.create_optimizer``) a ``NowcastOptimizer`` before
accelerate prepares it and before a checkpoint's optimizer state is loaded; the LR scheduler, gradient
accumulation (the wrapper counts optimizer steps, not micro-batches), checkpoints (``optimizer.pt`` holds the
wrapper's state) and ``resume_from_checkpoint`` then work unchanged. Alternatively build the wrapper yourself and
pass ``Trainer(..., optimizers=(NowcastOptimizer(...), None), callbacks=[NowcastCallback()])``.

The Trainer always runs the backward pass, so a nowcast step's gradients are computed and ignored (the wrapper's
``need_grads`` cannot skip them here). ``max_train_steps`` defaults to the Trainer's ``max_steps``. When training
ends (``on_train_end``) the wrapper is closed: its server session is deleted unless ``record=True``.

Verified nowcasts (``ninocast.verify``): ``NowcastCallback(probe="eval_batch", ...)`` scores every nowcast on the
first batch of the Trainer's eval dataloader (``Trainer.compute_loss``; needs ``eval_dataset`` and ``attach``),
``probe=fn`` on ``fn(model) -> float``; or pass ``verify=ninocast.Verify(...)`` directly.
``verify_options={"delay": 100}`` adds ``Verify`` fields to ``probe=`` (here: delayed checks with rollback).
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(f"ninocast.integrations.hf needs transformers (and accelerate): "
                              f"pip install 'ninocast[integrations]' (missing {e.name})") from None

from ..optimizer import NowcastOptimizer
from ..verify import Verify
from . import find_nowcast_optimizer, probe_verify


class NowcastCallback(TrainerCallback):
    """A ``TrainerCallback`` that runs a Trainer's optimizer through ``NowcastOptimizer``.

    ``nowcast_kwargs`` are ``NowcastOptimizer``'s keyword arguments (``server``, ``api_key``, ``local``,
    ``nowcaster``, ``period``, ``max_train_steps``, ``on_error``...). After training, ``self.optimizer`` is the
    wrapper: its ``nowcasts`` and ``failures`` say what happened.
    """

    def __init__(self, probe: Any = None, verify_options: dict[str, Any] | None = None,
                 **nowcast_kwargs: Any) -> None:
        if verify_options and verify_options.get("shadow"):
            raise ValueError("verify_options={'shadow': True} needs step(closure), and the Trainer calls "
                             "optimizer.step() without one; use delayed checks without a shadow here")
        self.probe = probe  # "eval_batch", a function probe(model) -> float, or None
        self.verify_options = verify_options  # more Verify fields for probe=, e.g. {"delay": 100}
        self.nowcast_kwargs = nowcast_kwargs
        self.optimizer: NowcastOptimizer | None = None
        self._trainer: Any = None

    def attach(self, trainer: Any) -> "NowcastCallback":
        """Wrap the optimizer ``trainer`` creates and register this callback; returns this callback."""
        self._trainer = trainer
        original = trainer.create_optimizer

        def create_optimizer(*args: Any, **kwargs: Any) -> Any:
            opt = original(*args, **kwargs)
            if find_nowcast_optimizer(opt) is None:
                model = kwargs.get("model", args[0] if args else None)
                model = trainer.model if model is None else model
                trainer.optimizer = self.wrap(opt, model)
            return trainer.optimizer

        trainer.create_optimizer = create_optimizer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def wrap(self, optimizer: Any, model: Any) -> NowcastOptimizer:
        self.optimizer = NowcastOptimizer(optimizer, model, **self.nowcast_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ TrainerCallback hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        found = find_nowcast_optimizer(optimizer)
        if found is None:
            raise RuntimeError("NowcastCallback: the Trainer's optimizer is not a NowcastOptimizer; use "
                               "NowcastCallback(...).attach(trainer), or pass optimizers=(NowcastOptimizer(...), "
                               "None) to the Trainer")
        self.optimizer = found
        if self.probe is not None and found.verify is None:
            found.verify = probe_verify(self.probe, self._eval_batch_verify, self.verify_options)
        if "max_train_steps" not in self.nowcast_kwargs and state.max_steps and state.max_steps > 0:
            found.set_max_train_steps(state.max_steps)

    def _eval_batch_verify(self) -> Verify:
        trainer = self._trainer
        if trainer is None or getattr(trainer, "eval_dataset", None) is None:
            raise ValueError("NowcastCallback(probe='eval_batch') needs NowcastCallback(...).attach(trainer) and a "
                             "Trainer with an eval_dataset")
        inputs = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader())))
        return Verify(batch=inputs, loss_fn=lambda model, b: trainer.compute_loss(model, b))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The run is over: close the wrapper, which deletes its server session unless ``record=True``."""
        if self.optimizer is not None:
            self.optimizer.close()
