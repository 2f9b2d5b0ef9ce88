"""NowcastOptimizer: wraps any torch optimizer and replaces every ``period``-th step with a nowcast.

Protocol (NINO_SPEC §5.3), with ``s`` = calls of ``step`` so far and ``q = period // ctx``:
  1. when ``(s + 1) % q == 0`` the parameters are snapshotted (before any update in this call);
  2. when the window then holds ``ctx`` snapshots, this call nowcasts instead of stepping the base optimizer
     (so no gradients are needed: ``need_grads`` is False), and the window is cleared;
  3. otherwise the base optimizer steps.
The base optimizer's own state (Adam moments, its step count) is never touched by a nowcast.

Snapshots are a device-to-host copy on the training thread; a background thread uploads them, so ordinary
steps never wait for the network. A failed nowcast never stops training: it is counted, warned about once per
kind, and the call falls back to a normal base-optimizer step (``on_error="raise"`` to fail loudly instead).
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections import Counter
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .backends import Backend, LocalBackend, RemoteBackend
from .flat import StateError, check_state
from .schedule import MAX_HORIZON, k_at_step
from .spec import ModelSpec
from .transport import NowcastAPIError

Snapshot = dict[str, torch.Tensor]


class NowcastOptimizer:
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        server: str | None = None,
        api_key: str | None = None,
        nowcaster: str | None = None,
        local: bool = False,
        period: int = 1000,
        ctx: int = 5,
        max_train_steps: int = 10_000,
        k_decay: float = 2.0,
        spec: ModelSpec | None = None,
        on_error: str = "warn",
        timeout: float = 120.0,
        retries: int = 2,
        session_name: str | None = None,
        record: bool = False,
        device: str = "cpu",
    ) -> None:
        if on_error not in ("warn", "raise"):
            raise ValueError("on_error must be 'warn' or 'raise'")
        if period < ctx or period % ctx:
            raise ValueError(f"period ({period}) must be a positive multiple of ctx ({ctx})")
        self.optimizer = optimizer
        self.model = _unwrap(model)
        self.spec = spec or ModelSpec.from_module(self.model)
        self._params = dict(self.model.named_parameters())
        missing = [n for n in self.spec.names if n not in self._params]
        if missing:
            raise ValueError(f"spec names not found in the model: {missing[:5]}")
        self.period, self.ctx, self.max_train_steps, self.k_decay = period, ctx, max_train_steps, k_decay
        self.on_error = on_error
        self.step_count = 0  # calls of step() so far
        self.snapshots: list[tuple[int, Snapshot]] = []  # the current window, oldest first
        self.failures: Counter[str] = Counter()
        self.nowcasts: list[dict[str, Any]] = []  # one record per successful nowcast
        self._warned: set[str] = set()
        self._rank0 = _is_rank0()
        self.backend: Backend | None = None
        if self._rank0:
            if server is not None:
                self.backend = RemoteBackend(server, self.spec, api_key=api_key, nowcaster=nowcaster, ctx=ctx,
                                             period=period, max_train_steps=max_train_steps, name=session_name,
                                             record=record, timeout=timeout, retries=retries)
            elif local or nowcaster is not None:
                self.backend = LocalBackend(self.spec, nowcaster or "default", device=device)
            else:
                raise ValueError("give server=URL to nowcast on a server, or local=True / nowcaster=PATH")
        self._uploads: "queue.Queue[tuple[int, Snapshot] | None]" = queue.Queue(maxsize=max(2, ctx))
        self._uploader: threading.Thread | None = None

    # ------------------------------------------------------------------ torch.optim surface
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, group: dict) -> None:
        self.optimizer.add_param_group(group)

    @property
    def snapshot_interval(self) -> int:
        return self.period // self.ctx

    @property
    def need_grads(self) -> bool:
        """False exactly on the calls that will nowcast: skip the backward pass there."""
        return not (len(self.snapshots) == self.ctx - 1 and (self.step_count + 1) % self.snapshot_interval == 0)

    def current_k(self) -> int:
        return k_at_step(self.step_count, self.max_train_steps, self.period, MAX_HORIZON, self.k_decay)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        s = self.step_count
        loss = None
        if (s + 1) % self.snapshot_interval == 0:
            self._snapshot(s)
        if len(self.snapshots) == self.ctx:
            window, self.snapshots = self.snapshots, []
            if not self._nowcast(window, s):
                loss = self.optimizer.step(closure)  # fallback: training goes on
        else:
            loss = self.optimizer.step(closure)
        self.step_count = s + 1
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return {
            "optimizer": self.optimizer.state_dict(),
            "ninocast": {
                "step_count": self.step_count,
                "snapshots": [(step, {k: v.clone() for k, v in snap.items()}) for step, snap in self.snapshots],
                "period": self.period, "ctx": self.ctx, "max_train_steps": self.max_train_steps,
                "failures": dict(self.failures),
                "backend": self.backend.state_dict() if self.backend else {},
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        ours = state["ninocast"]
        for key in ("period", "ctx"):
            if ours[key] != getattr(self, key):
                raise ValueError(f"saved {key}={ours[key]} differs from this wrapper's {getattr(self, key)}")
        self.step_count = int(ours["step_count"])
        self.snapshots = [(int(step), dict(snap)) for step, snap in ours["snapshots"]]
        self.failures = Counter(ours.get("failures", {}))
        if self.backend:
            self.backend.load_state_dict(ours.get("backend", {}))

    def flush(self) -> None:
        """Wait until every snapshot taken so far has been handed to the backend."""
        if self._uploader is not None:
            self._uploads.join()

    def close(self) -> None:
        self.flush()
        if self._uploader is not None:
            self._uploads.put(None)
            self._uploader.join(timeout=10)
            self._uploader = None
        if self.backend:
            self.backend.close()

    # ------------------------------------------------------------------ internals
    def _snapshot(self, step: int) -> None:
        if not self._rank0:
            self.snapshots.append((step, {}))  # other ranks only count the window
            return
        snap = {n: self._params[n].detach().to("cpu", copy=True) for n in self.spec.names}
        self.snapshots.append((step, snap))
        self._ensure_uploader()
        self._uploads.put((step, snap))

    def _ensure_uploader(self) -> None:
        if self._uploader is None or not self._uploader.is_alive():
            self._uploader = threading.Thread(target=self._upload_loop, name="ninocast-upload", daemon=True)
            self._uploader.start()

    def _upload_loop(self) -> None:
        while True:
            item = self._uploads.get()
            try:
                if item is None:
                    return
                assert self.backend is not None
                try:
                    self.backend.add_state(*item)
                except NowcastAPIError as e:  # the nowcast re-sends the window; note it and go on
                    self._note_failure(f"upload_{e.kind}", e, raise_ok=False)
                except Exception as e:  # noqa: BLE001 - the uploader must never die silently
                    self._note_failure("upload_error", e, raise_ok=False)
            finally:
                self._uploads.task_done()

    def _nowcast(self, window: list[tuple[int, Snapshot]], step: int) -> bool:
        """Returns True when the parameters were replaced by a nowcast."""
        ok = torch.ones(1, device=self._params[self.spec.names[0]].device)  # NCCL wants device tensors
        result: dict[str, torch.Tensor] | None = None
        k = self.current_k()
        if self._rank0:
            self.flush()
            t0 = time.perf_counter()
            try:
                assert self.backend is not None
                result = self.backend.nowcast(window, k)
                check_state(result, self.spec, where="nowcast answer")
            except (NowcastAPIError, StateError, ValueError, RuntimeError, OSError) as e:
                kind = getattr(e, "kind", "invalid_response" if isinstance(e, StateError) else "error")
                self._note_failure(kind, e, raise_ok=True)
                ok.zero_()
            else:
                self.nowcasts.append({"step": step, "k": k, "seconds": time.perf_counter() - t0,
                                      "snapshot_steps": [s for s, _ in window]})
        ok = _broadcast_flag(ok)
        if not bool(ok.item()):
            return False
        with torch.no_grad():
            for name in self.spec.names:
                p = self._params[name]
                if result is not None:
                    p.copy_(result[name].to(device=p.device, dtype=p.dtype))
                _broadcast_param(p)
        return True

    def _note_failure(self, kind: str, err: Exception, raise_ok: bool) -> None:
        self.failures[kind] += 1
        if self.on_error == "raise" and raise_ok:
            raise err
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"ninocast: {kind}: {err} -- training continues with the base optimizer "
                          f"(this warning is shown once per kind; see .failures)", RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------- distributed helpers
def _unwrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel / DataParallel keep the real model in ``.module``."""
    return getattr(model, "module", model) if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _dist_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def _is_rank0() -> bool:
    return not _dist_active() or torch.distributed.get_rank() == 0


def _broadcast_flag(flag: torch.Tensor) -> torch.Tensor:
    if _dist_active():
        torch.distributed.broadcast(flag, src=0)
    return flag


def _broadcast_param(p: torch.Tensor) -> None:
    if _dist_active():
        torch.distributed.broadcast(p.data, src=0)
