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

The wrapper is a ``torch.optim.Optimizer`` (like accelerate's ``AcceleratedOptimizer`` it delegates
``param_groups``/``state``/``defaults`` to the wrapped optimizer without calling ``Optimizer.__init__``), so LR
schedulers, ``GradScaler``, Hugging Face ``Trainer`` and Lightning accept it. With a ``closure`` (Lightning,
LBFGS-style loops) a nowcast call evaluates the closure once first, as NINO_SPEC §5.3 (2a) does, and returns
its loss.

Under ``torch.distributed`` only rank 0 snapshots and talks to the backend; every nowcast's outcome and the
new parameters are broadcast from rank 0, so all ranks stay identical and take the same fallback decisions.
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
from .verify import Verify, as_verify, report_body, verify_jump

Snapshot = dict[str, torch.Tensor]


class NowcastOptimizer(torch.optim.Optimizer):
    """``NowcastOptimizer(torch.optim.AdamW(model.parameters()), model, server=URL, period=1000)``.

    Where nowcasts run: ``server=URL`` (a ninocast server; ``api_key=``), or ``local=True`` / ``nowcaster=REF``
    (the engine in this process: ``'linefit'``, a nowcaster directory or an official ``.pt``; needs
    ``pip install 'ninocast[server]'``). Readable afterwards: ``nowcasts`` (one record per nowcast),
    ``failures`` (a Counter by kind), ``step_count``.

    ``verify=`` checks every nowcast on a probe before keeping it (``ninocast.Verify(batch=, loss_fn=)``, a
    function ``probe(model) -> float``, or ``"closure"`` for the loss of the step's own batch; see
    ``ninocast.verify``); a rejected nowcast becomes a normal step, so every call then needs gradients.
    ``final_nowcast``: the last nowcast of the budget (fewer than ``period // ctx`` calls left to recover, the
    k = 1 one) is skipped (``"skip"``, a normal step: measured, it dips the final model even when a probe accepts
    it, docs/benchmarks-speedup.md) or kept (``"keep"``, the NINO_SPEC protocol; verified if ``verify`` is set).
    """

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
        verify: Verify | Callable[[nn.Module], float] | str | None = None,
        final_nowcast: str = "skip",
    ) -> None:
        if on_error not in ("warn", "raise"):
            raise ValueError("on_error must be 'warn' or 'raise'")
        if period < ctx or period % ctx:
            raise ValueError(f"period ({period}) must be a positive multiple of ctx ({ctx})")
        if final_nowcast not in ("skip", "keep"):
            raise ValueError(f"final_nowcast must be 'skip' or 'keep', got {final_nowcast!r}")
        self.verify = as_verify(verify)
        self.final_nowcast = final_nowcast
        if server is None and not local and nowcaster is None:
            raise ValueError("give server=URL to nowcast on a server, or local=True / nowcaster=PATH")
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
            else:
                self.backend = LocalBackend(self.spec, nowcaster or "default", device=device)
        self._uploads: "queue.Queue[tuple[int, Snapshot] | None]" = queue.Queue(maxsize=max(2, ctx))
        self._uploader: threading.Thread | None = None

    # ------------------------------------------------------------------ torch.optim surface
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

    def __repr__(self) -> str:
        return f"NowcastOptimizer(period={self.period}, ctx={self.ctx}, step_count={self.step_count}, " \
               f"backend={type(self.backend).__name__}, optimizer={self.optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, group: dict) -> None:
        self.optimizer.add_param_group(group)

    @property
    def snapshot_interval(self) -> int:
        return self.period // self.ctx

    @property
    def need_grads(self) -> bool:
        """False exactly on the calls that will nowcast (unverified): skip the backward pass there."""
        nowcast_call = len(self.snapshots) == self.ctx - 1 and (self.step_count + 1) % self.snapshot_interval == 0
        return not nowcast_call or self.verify is not None or self._skips_final(self.step_count)

    def current_k(self) -> int:
        return k_at_step(self.step_count, self.max_train_steps, self.period, MAX_HORIZON, self.k_decay)

    def set_max_train_steps(self, max_train_steps: int) -> None:
        """Change the planned run length (the k schedule), e.g. once a trainer knows it. Takes effect on the
        server only for a session not created yet (sessions are created at the first upload)."""
        if max_train_steps <= 0:
            raise ValueError(f"max_train_steps must be positive, got {max_train_steps}")
        self.max_train_steps = int(max_train_steps)
        if isinstance(self.backend, RemoteBackend):
            self.backend.session_args["max_train_steps"] = self.max_train_steps

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        s = self.step_count
        loss = None
        if (s + 1) % self.snapshot_interval == 0:
            self._snapshot(s)
        if len(self.snapshots) == self.ctx:
            window, self.snapshots = self.snapshots, []
            if closure is not None:  # NINO_SPEC §5.3 (2a): the closure runs once, before the nowcast
                with torch.enable_grad():
                    loss = closure()
            if self._skips_final(s):
                self._record({"step": s, "k": self.current_k(), "snapshot_steps": [t for t, _ in window],
                              "accepted": False, "skipped": "final"})
            if self._skips_final(s) or not self._nowcast(window, s, closure, loss):  # a normal step instead
                result = self.optimizer.step() if closure is not None else self.optimizer.step(closure)
                loss = loss if closure is not None else result
        else:
            loss = self.optimizer.step(closure)
        self.step_count = s + 1
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state under ``"optimizer"`` and the wrapper's (step counter, the current
        window's snapshots, failures, the server session) under ``"ninocast"``."""
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
        """Restore what ``state_dict`` saved. A plain base-optimizer state dict is accepted too (the wrapper's
        counter then starts at 0)."""
        if "ninocast" not in state:
            self.optimizer.load_state_dict(state)  # type: ignore[arg-type]
            return
        ours = state["ninocast"]
        for key in ("period", "ctx"):
            if ours[key] != getattr(self, key):
                raise ValueError(f"saved {key}={ours[key]} differs from this wrapper's {getattr(self, key)}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.flush()
        self.step_count = int(ours["step_count"])
        # snapshots live on the CPU whatever a framework's device placement did to the dict
        self.snapshots = [(int(step), {k: v.to("cpu") for k, v in dict(snap).items()})
                          for step, snap in ours["snapshots"]]
        self.failures = Counter(ours.get("failures", {}))
        if self.backend:
            self.backend.load_state_dict(dict(ours.get("backend", {})))

    def flush(self) -> None:
        """Wait until every snapshot taken so far has been handed to the backend."""
        if self._uploader is not None:
            self._uploads.join()

    def close(self) -> None:
        """Finish pending uploads and close the connection (the server session is kept)."""
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
        with torch.no_grad():
            snap = {n: self._params[n].detach().to("cpu", copy=True) for n in self.spec.names}
        self.snapshots.append((step, snap))
        if getattr(self.backend, "streams_states", True):
            self._ensure_uploader()
            self._uploads.put((step, snap))  # bounded: a stalled uploader holds at most a few snapshots

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
                except NowcastAPIError as e:  # the nowcast re-sends what is missing; note it and go on
                    self._note_failure(f"upload_{e.kind}", e, raise_ok=False)
                except Exception as e:  # noqa: BLE001 - the uploader must never die silently
                    self._note_failure("upload_error", e, raise_ok=False)
            finally:
                self._uploads.task_done()

    def _skips_final(self, step: int) -> bool:
        """A nowcast that leaves fewer than period // ctx calls of the budget to recover (the last call's, k = 1)."""
        return self.final_nowcast == "skip" and self.max_train_steps - (step + 1) < self.snapshot_interval

    def _nowcast(self, window: list[tuple[int, Snapshot]], step: int, closure: Callable[[], Any] | None = None,
                 loss: Any = None) -> bool:
        """Returns True when the parameters were replaced by a nowcast. Every rank returns the same answer."""
        # 1 = apply the nowcast, 0 = fall back to a base step, -1 = rank 0 raises (on_error="raise")
        flag = torch.ones(1, device=self._params[self.spec.names[0]].device)  # NCCL wants device tensors
        result: dict[str, torch.Tensor] | None = None
        error: BaseException | None = None
        k = self.current_k()
        if self._rank0:
            self.flush()
            t0 = time.perf_counter()
            try:
                assert self.backend is not None
                result = self.backend.nowcast(window, k)
                check_state(result, self.spec, where="nowcast answer")
            except Exception as e:  # noqa: BLE001 - whatever goes wrong, training goes on (policy)
                kind = getattr(e, "kind", "invalid_response" if isinstance(e, StateError) else "error")
                result = None
                if self.on_error == "raise":  # counted, then raised on every rank once all ranks know
                    self.failures[kind] += 1
                    error = e
                    flag.fill_(-1)
                else:
                    self._note_failure(kind, e, raise_ok=False)
                    flag.zero_()
            else:
                record = {"step": step, "k": k, "seconds": time.perf_counter() - t0,
                          "snapshot_steps": [s for s, _ in window], "accepted": True}
                if self.verify is not None:
                    record.update(self._verify(result, closure, loss))
                    result = None  # accepted: the kept point is already in place (rank 0); rejected: theta is
                    flag.fill_(int(record["accepted"]))
                self._record(record)
        flag = _broadcast_flag(flag)
        code = int(flag.item())
        if code < 0:
            raise error if error is not None else RuntimeError("ninocast: the nowcast failed on rank 0")
        if code == 0:
            return False
        with torch.no_grad():
            for name in self.spec.names:
                p = self._params[name]
                if result is not None:
                    p.copy_(result[name].to(device=p.device, dtype=p.dtype))
                _broadcast_param(p)
        return True

    def _verify(self, result: dict[str, torch.Tensor], closure: Callable[[], Any] | None, loss: Any) -> dict:
        """Score the jump on the probe; the params end at the kept point."""
        assert self.verify is not None
        before = loss if self.verify.kind == "closure" else None  # the closure's loss at theta
        params = {n: self._params[n] for n in self.spec.names}
        return verify_jump(params, result, self.verify.scorer(self.model, closure), self.verify, before)

    def _record(self, record: dict[str, Any]) -> None:
        """Keep the decision in ``nowcasts`` and, verified or skipped, send it to the server session's history."""
        self.nowcasts.append(record)
        if not self._rank0 or (self.verify is None and "skipped" not in record):
            return
        try:
            assert self.backend is not None
            self.flush()  # the uploader thread may be creating the session right now
            self.backend.report(record["step"], report_body(record))
        except Exception as e:  # noqa: BLE001 - a lost report never stops training
            self._note_failure(f"report_{getattr(e, 'kind', 'error')}", e, raise_ok=False)

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
    """The model whose parameter names the spec uses: DistributedDataParallel / DataParallel keep it in
    ``.module``, ``torch.compile`` in ``._orig_mod``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


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
