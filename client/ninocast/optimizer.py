"""NowcastOptimizer: wraps any torch optimizer and replaces every ``period``-th step with a nowcast.

Protocol (NINO_SPEC §5.3), with ``s`` = calls of ``step`` so far and ``q = period // ctx``:
  1. when ``(s + 1) % q == 0`` the parameters are snapshotted (before any update in this call);
  2. when the window then holds ``ctx`` snapshots, this call nowcasts instead of stepping the base optimizer
     (so no gradients are needed: ``need_grads`` is False), and the window is cleared;
  3. otherwise the base optimizer steps.
The base optimizer's own state (Adam moments, its step count) is never touched by a nowcast.

What is nowcast: exactly the tensors the wrapped optimizer updates (``requires_grad`` and in its param groups).
Frozen tensors, tensors of other optimizers and tensors the graphs cannot place (scalars; see ``ModelSpec``)
are never snapshotted or written.

Time budget: snapshots are a device-to-host copy on the training thread; one background thread
(``BackendWorker``) uploads them, so ordinary steps never wait for the network; when it falls behind the oldest
queued upload is dropped (counted as ``upload_dropped``; the nowcast re-sends it). A nowcast call waits for the
server at most ``nowcast_timeout`` seconds in all (default: twice the last nowcast's time plus 5 s, 60 s for the
first), then gives up (``timeout``); until the server answers again, later nowcast calls do not wait at all.

A failed nowcast never stops training and never applies a stale update: it is counted in ``failures``, warned
about once per kind, and the call is a *skipped step* -- the parameters and the base optimizer's state stay as
they are (the gradients present may be those of an earlier batch: the loop skipped backward on this call).
``on_error="raise"`` fails loudly instead. Configuration mistakes are not transient: the constructor checks the
URL, and ``check()`` / ``check=True`` asks the server once about the key, nowcaster and spec.

Lifecycle: ``close()`` (or leaving a ``with NowcastOptimizer(...) as opt:`` block) deletes the run's server
session unless ``record=True``; an interrupted run's session expires by the server's TTL.

The wrapper is a ``torch.optim.Optimizer`` that delegates to the wrapped one (``ninocast.delegating``), so LR
schedulers, ``GradScaler``, Hugging Face ``Trainer`` and Lightning accept it. With a ``closure`` (Lightning,
LBFGS-style loops) a nowcast call evaluates the closure once first, as NINO_SPEC §5.3 (2a) does, and returns
its loss.

Under ``torch.distributed`` only rank 0 snapshots and talks to the backend; every nowcast's outcome and the
new parameters are broadcast from rank 0, so all ranks stay identical and take the same fallback decisions
(``ninocast.distributed``). Verification at run time (immediate and delayed checks, rollback, the reports of
decisions) is ``ninocast.checks.RunChecks``.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .backends import Backend, LocalBackend, RemoteBackend, Snapshot, check_backend, request_nowcast
from .backends import ConfigurationError as ConfigurationError  # where 0.1 users import it from
from .checks import RunChecks
from .delegating import DelegatingOptimizer
from .distributed import broadcast_code, broadcast_param, dist_active, is_rank0, nowcast_spec, unwrap
from .flat import StateError, check_state, state_dtype
from .rollback import RunCopy
from .schedule import MAX_HORIZON, k_at_step
from .session_settings import SessionSettings
from .spec import ModelSpec
from .transport import DeadlineExceeded, NowcastAPIError, check_url
from .verify import Verify, as_verify
from .worker import BackendWorker

FIRST_NOWCAST_TIMEOUT_S = 60.0  # no estimate yet: the server may build the model's graph first
NOWCAST_SLACK_S = 5.0  # the default deadline: 2 x the last nowcast's time + this
CLOSE_WAIT_S = 5.0  # close(): the longest wait for a running request, then for the session's deletion


class NowcastOptimizer(DelegatingOptimizer):
    """``NowcastOptimizer(torch.optim.AdamW(model.parameters()), model, server=URL, period=1000)``.

    Where nowcasts run: ``server=URL`` (a ninocast server; ``api_key=``), or ``local=True`` / ``nowcaster=REF``
    (the engine in this process: ``'linefit'``, a nowcaster directory or an official ``.pt``; needs
    ``pip install 'ninocast[server]'``). Readable afterwards: ``nowcasts`` (one record per nowcast),
    ``failures`` (a Counter by kind), ``step_count``.

    ``nowcast_timeout``: the longest a nowcast call waits for the server (None: from the server's timings);
    ``timeout``/``retries``: per HTTP request, for the background uploads. ``check=True`` runs ``check()``.
    Use as a context manager (or call ``close()``) so the server session is deleted when the run ends.
    ``verify=`` checks every nowcast on a probe before keeping it (``ninocast.Verify(batch=, loss_fn=)``, a
    function ``probe(model) -> float``, or ``"closure"`` for the loss of the step's own batch; see
    ``ninocast.verify``); a rejected nowcast becomes a normal step, so every call then needs gradients.
    ``final_nowcast``: the last nowcast of the budget (fewer than ``period // ctx`` calls left to recover, the
    k = 1 one) is skipped (``"skip"``, a normal step: measured, it dips the final model even when a probe accepts
    it, docs/benchmarks-speedup.md) or kept (``"keep"``, the NINO_SPEC protocol; verified if ``verify`` is set).
    ``start_step``: the first ``start_step`` calls are plain steps (no snapshot, no nowcast); the first nowcast
    is the first one due after them. None (default): the nowcaster's advice (its config's ``start_step``; the
    server says it when the session is created). Why: nowcasts in the early loss plateau of small byte-level
    language models delay its end (docs/metatrain.md, *Round 8*).
    ``Verify(delay=D)``: a jump may be kept tentatively and checked again D calls later, with rollback
    (``ninocast.checks``); ``Verify(delay=D, shadow=True)`` trains the pre-jump copy alongside and keeps the
    better branch (``step(closure)`` needed).
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
        nowcast_timeout: float | None = None,
        session_name: str | None = None,
        record: bool = False,
        check: bool = False,
        device: str = "cpu",
        verify: Verify | Callable[[nn.Module], float] | str | None = None,
        final_nowcast: str = "skip",
        start_step: int | None = None,
    ) -> None:
        if on_error not in ("warn", "raise"):
            raise ValueError("on_error must be 'warn' or 'raise'")
        if period < ctx or period % ctx:
            raise ValueError(f"period ({period}) must be a positive multiple of ctx ({ctx})")
        if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, int)
                                       or start_step < 0):
            raise ValueError(f"start_step must be None (the nowcaster's advice) or a non-negative int (calls "
                             f"before the first nowcast), got {start_step!r}")
        if final_nowcast not in ("skip", "keep"):
            raise ValueError(f"final_nowcast must be 'skip' or 'keep', got {final_nowcast!r}")
        self.period = period
        self.verify = verify  # type: ignore[assignment]  # checked by the setter
        self.final_nowcast = final_nowcast
        self._start, self._start_given = start_step, start_step is not None  # None: not known yet
        if server is None and not local and nowcaster is None:
            raise ValueError("give server=URL to nowcast on a server, or local=True / nowcaster=PATH")
        if server is not None:
            server = check_url(server)
        if nowcast_timeout is not None and not nowcast_timeout > 0:
            raise ValueError(f"nowcast_timeout must be positive seconds, got {nowcast_timeout}")
        self.optimizer = optimizer
        self.model = unwrap(model)
        self._params = dict(self.model.named_parameters())
        self.spec = nowcast_spec(self.model, optimizer, spec)
        self.period, self.ctx, self.max_train_steps, self.k_decay = period, ctx, max_train_steps, k_decay
        self.on_error, self.timeout, self.nowcast_timeout, self.record = on_error, timeout, nowcast_timeout, record
        self.server = server
        self._closed = False
        self.step_count = 0  # calls of step() so far
        self.snapshots: list[tuple[int, Snapshot]] = []  # the current window, oldest first
        self.failures: Counter[str] = Counter()
        self.nowcasts: list[dict[str, Any]] = []  # one record per successful nowcast
        self._warned: set[str] = set()
        self._rank0 = is_rank0()
        self.checks = RunChecks(self)
        self.backend: Backend | None = None
        if self._rank0:
            if server is not None:
                settings = SessionSettings(self.spec, nowcaster=nowcaster, ctx=ctx, period=period,
                                           max_train_steps=max_train_steps, name=session_name, record=record)
                self.backend = RemoteBackend(server, settings, api_key=api_key, timeout=timeout, retries=retries)
            else:
                self.backend = LocalBackend(self.spec, nowcaster or "default", device=device,
                                            spacing=self.snapshot_interval)
        self._worker: BackendWorker | None = None
        if self.backend is not None and self.backend.streams_states:
            self._worker = BackendWorker(max_uploads=max(2, ctx), on_error=self._upload_failed)
        if self._start is None and isinstance(self.backend, LocalBackend) and not dist_active():
            self._start = self.backend.start_step  # known now: no extra backward pass at the first window
        self._warn_if_never_nowcasts()
        if check:
            self.check()

    def __repr__(self) -> str:
        return f"NowcastOptimizer(period={self.period}, ctx={self.ctx}, step_count={self.step_count}, " \
               f"backend={type(self.backend).__name__}, optimizer={self.optimizer!r})"

    @property
    def verify(self) -> Verify | None:
        return self._verify_cfg

    @verify.setter
    def verify(self, value: Verify | Callable[[nn.Module], float] | str | None) -> None:
        """``verify=`` now or later (the framework callbacks set it once their eval batch exists)."""
        cfg = as_verify(value)
        if cfg is not None and cfg.delay >= self.period:
            raise ValueError(f"Verify delay ({cfg.delay}) must be shorter than the period ({self.period}): the "
                             f"check must come before the next nowcast")
        self._verify_cfg = cfg

    @property
    def delayed_off(self) -> bool:
        """True after ``verify.max_rollbacks`` rollbacks in a row: immediate checks only from then."""
        return self.checks.delayed_off

    @delayed_off.setter
    def delayed_off(self, value: bool) -> None:
        self.checks.delayed_off = value

    @property
    def param_device(self) -> torch.device:
        """Where the nowcast tensors live (NCCL broadcasts from there)."""
        return self._params[self.spec.names[0]].device

    @property
    def snapshot_interval(self) -> int:
        return self.period // self.ctx

    @property
    def start_step(self) -> int | None:
        """Calls before the first nowcast: the ``start_step`` given, else the nowcaster's advice (None until the
        backend has said it: a server's at the run's first full window)."""
        return self._start

    @property
    def need_grads(self) -> bool:
        """False exactly on the calls that will nowcast unverified: skip the backward pass there (a verified
        nowcast may be rejected, the budget's skipped last nowcast is a normal step, and so is a window before
        the start step: all need gradients). A start step not known yet (a server's advice) is settled here."""
        nowcast_call = len(self.snapshots) == self.ctx - 1 and (self.step_count + 1) % self.snapshot_interval == 0
        if nowcast_call and self._start is None and not (self._closed or dist_active()):
            self._settle_start()  # one process: ask now (under DDP every rank settles it in step)
        return (self._closed or not nowcast_call or self.verify is not None or self._start is None
                or self.step_count < self._start or self._skips_final(self.step_count))

    def current_k(self) -> int:
        return k_at_step(self.step_count, self.max_train_steps, self.period, MAX_HORIZON, self.k_decay)

    def set_max_train_steps(self, max_train_steps: int) -> None:
        """Change the planned run length (the k schedule), e.g. once a trainer knows it. Takes effect on the
        server only for a session not created yet (sessions are created at the first upload)."""
        if max_train_steps <= 0:
            raise ValueError(f"max_train_steps must be positive, got {max_train_steps}")
        self.max_train_steps = int(max_train_steps)
        if isinstance(self.backend, RemoteBackend):
            self.backend.settings = replace(self.backend.settings, max_train_steps=self.max_train_steps)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        s = self.step_count
        loss = None
        if self._closed:  # after close(): the base optimizer alone
            self.step_count = s + 1
            return self.optimizer.step(closure)
        if (s + 1) % self.snapshot_interval == 0:
            if self._window_nowcasts(s):
                self._snapshot(s)
            else:  # a window before the start step (its advice may have come after its first snapshots)
                self.snapshots = []
        if len(self.snapshots) == self.ctx and self._starts_by(s):
            window, self.snapshots = self.snapshots, []
            if closure is not None:  # NINO_SPEC §5.3 (2a): the closure runs once, before the nowcast
                with torch.enable_grad():
                    loss = closure()
            final = self._skips_final(s)
            if final:
                self.checks.record({"step": s, "k": self.current_k(), "snapshot_steps": [t for t, _ in window],
                                    "accepted": False, "skipped": "final"})
            if final or (not self._nowcast(window, s, closure, loss) and self.verify is not None):
                # A normal step: this call computed gradients (need_grads). An unverified nowcast that failed is a
                # skipped step instead: its call skipped backward, so the gradients present are stale.
                result = self.optimizer.step()  # the closure, if any, already ran above
                loss = loss if closure is not None else result
        else:
            if len(self.snapshots) == self.ctx:  # a window before the start step: a plain step, as need_grads said
                self.snapshots = []
            loss = self.optimizer.step(closure)
        self.checks.shadow_step(closure)  # Verify(shadow=True): plain training's step on the pre-jump copy
        self.checks.after_step(s)
        self.step_count = s + 1
        return loss

    def check(self) -> None:
        """Ask the backend once whether this run can nowcast (server: the key, the nowcaster and the spec, by
        creating the run's session now; local: the nowcaster takes the spec's family). Raises
        ``ConfigurationError`` saying what is wrong; the warn-and-continue policy is for transient faults."""
        if self.backend is None:  # not rank 0
            return
        where = f"the server at {self.server}" if self.server else "the local engine"
        check_backend(self.backend, where, self.timeout, self._worker)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state under ``"optimizer"`` and the wrapper's (step counter, the current
        window's snapshots, failures, the server session) under ``"ninocast"``. Waits at most a few seconds
        for queued uploads (not at all for a stalled server): what the server did not get, the next nowcast
        re-sends."""
        if self._worker is not None and not self._worker.stalled:
            self._worker.drain(CLOSE_WAIT_S)
        return {
            "optimizer": self.optimizer.state_dict(),
            "ninocast": {
                "step_count": self.step_count,
                "snapshots": [(step, {k: v.clone() for k, v in snap.items()}) for step, snap in self.snapshots],
                "period": self.period, "ctx": self.ctx, "max_train_steps": self.max_train_steps,
                "failures": dict(self.failures), "start_step": self._start,
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
        if self._worker is not None:  # uploads of the run before the load must not reach the restored session
            self._worker.cancel_pending()
            self._worker.drain(CLOSE_WAIT_S)
        self.step_count = int(ours["step_count"])
        self.checks.drop()  # a check pending before the load belongs to another point of the run
        # snapshots live on the CPU whatever a framework's device placement did to the dict
        self.snapshots = [(int(step), {k: v.to("cpu") for k, v in dict(snap).items()})
                          for step, snap in ours["snapshots"]]
        self.failures = Counter(ours.get("failures", {}))
        if not self._start_given and ours.get("start_step") is not None:
            self._start = int(ours["start_step"])
        if self.backend:
            self.backend.load_state_dict(dict(ours.get("backend", {})))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every snapshot taken so far has been handed to the backend, at most ``timeout`` seconds
        (default: the per-request ``timeout``); True when nothing is left queued."""
        if self._worker is None:
            return True
        return self._worker.drain(self.timeout if timeout is None else timeout)

    def close(self) -> None:
        """End the run's use of the backend. Without ``record=True`` the server session is deleted (queued
        uploads are dropped); with it, queued uploads are sent first (at most ``timeout`` s) and the session is
        kept for the server's trajectory export. Bounded in time; a second call does nothing. A closed wrapper
        steps as the base optimizer alone."""
        if self._closed:
            return
        self._closed = True
        self.checks.drop()  # a pending check is not made: the jump stays
        if self._worker is not None:
            if self.record:
                self._worker.drain(self.timeout)
            self._worker.cancel_pending()
            self._worker.stop(CLOSE_WAIT_S)
        if self.backend is not None:
            try:
                self.backend.close(delete=not self.record, deadline=time.monotonic() + CLOSE_WAIT_S)
            except NowcastAPIError as e:  # the session expires by the server's TTL instead
                self._note_failure(f"close_{e.kind}", e, raise_ok=False)

    def __enter__(self) -> "NowcastOptimizer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def nowcast_deadline_s(self) -> float:
        """How long the next nowcast call may wait for the server (``nowcast_timeout``, else from estimates)."""
        if self.nowcast_timeout is not None:
            return self.nowcast_timeout
        estimate = getattr(self.backend, "estimate_s", None)
        return FIRST_NOWCAST_TIMEOUT_S if estimate is None else 2 * estimate + NOWCAST_SLACK_S

    # ------------------------------------------------------------------ internals
    def _snapshot(self, step: int) -> None:
        if not self._rank0:
            self.snapshots.append((step, {}))  # other ranks only count the window
            return
        snap = self.read_snapshot()
        self.snapshots.append((step, snap))
        if self.checks.branch_snapshot(step):  # a shadow race is on: the winning branch's snapshot is sent later
            return
        self.upload_snapshot(step, snap)

    def read_snapshot(self) -> Snapshot:
        """The tracked parameters as they are now, on the CPU in their state dtype."""
        with torch.no_grad():
            return {n: self._params[n].detach().to("cpu", dtype=state_dtype(self._params[n].dtype), copy=True)
                    for n in self.spec.names}

    def upload_snapshot(self, step: int, snap: Snapshot) -> None:
        """Queue one snapshot for the server (remote mode; local mode keeps the window only)."""
        if self._worker is not None and not self._closed:
            backend = self.backend
            assert backend is not None
            if self._worker.upload(lambda: backend.add_state(step, snap)):
                self._note_failure("upload_dropped", RuntimeError(
                    "the server is slower than the snapshots: the oldest queued upload was dropped (the nowcast "
                    "re-sends what is missing)"), raise_ok=False)

    def _upload_failed(self, err: BaseException) -> None:
        """The worker's report of a failed upload: the nowcast re-sends what is missing; note it and go on."""
        kind = getattr(err, "kind", "error")
        self._note_failure(f"upload_{kind}", err, raise_ok=False)  # type: ignore[arg-type]

    def _window_nowcasts(self, step: int) -> bool:
        """Does the window holding call ``step`` end in a nowcast? Not before the start step: its snapshots are
        not taken (nor uploaded), so those calls are plain steps. While the advice is not known, every window
        is taken."""
        return (step // self.period + 1) * self.period > (self._start or 0)

    def _starts_by(self, step: int) -> bool:
        """May call ``step`` (its window full) nowcast? A full window settles an unknown start step; while the
        backend cannot say it, the window tries its nowcast (which then fails or not on its own)."""
        if self._start is None:
            self._settle_start()
        return step >= (self._start or 0)

    def _settle_start(self) -> None:
        """Ask the backend for its start-step advice, agreed on every rank. A server says it when the session is
        created (the window's uploads usually did that; else this asks now, within the nowcast deadline); one
        that cannot be asked leaves it unknown, to be asked again at the next full window."""
        advice = -1
        if self._rank0 and self.backend is not None:
            if self.backend.start_step is None and not (self._worker is not None and self._worker.stalled):
                try:
                    check_backend(self.backend, "the server", self.nowcast_deadline_s(), self._worker)
                except Exception:  # noqa: BLE001 - asking is best effort; training goes on (policy)
                    pass
            advice = -1 if self.backend.start_step is None else self.backend.start_step
        advice = broadcast_code(advice, self.param_device)
        self._start = None if advice < 0 else advice
        self._warn_if_never_nowcasts()

    def _warn_if_never_nowcasts(self) -> None:
        """One warning when the start step leaves the planned run no nowcast at all (a budget shorter than the
        advice is a plain run: say so rather than let it look like a nowcast run)."""
        if not self._start or not self._rank0:
            return

        def none_by(first: int) -> bool:  # first: calls done when the first nowcast would be made
            return first > self.max_train_steps or self._skips_final(first - 1)

        first = -(-(self._start + 1) // self.period) * self.period
        if none_by(first) and not none_by(self.period):  # the start step, not the budget alone, leaves none
            source = "given" if self._start_given else "the nowcaster's advice"
            warnings.warn(f"ninocast: no nowcast in this run: with start_step={self._start} ({source}) the first "
                          f"would be at call {first}, which max_train_steps={self.max_train_steps} does not allow "
                          f"(final_nowcast={self.final_nowcast!r})", RuntimeWarning, stacklevel=3)

    def _skips_final(self, step: int) -> bool:
        """A nowcast that leaves fewer than period // ctx calls of the budget to recover (the last call's, k = 1)."""
        return self.final_nowcast == "skip" and self.max_train_steps - (step + 1) < self.snapshot_interval

    def _nowcast(self, window: list[tuple[int, Snapshot]], step: int, closure: Callable[[], Any] | None = None,
                 loss: Any = None) -> bool:
        """Fetch on rank 0, verify there when asked, agree on every rank, apply. True when the parameters were
        replaced; False: failed or rejected. Every rank returns the same answer."""
        prediction, error = self._fetch_nowcast(window, step) if self._rank0 else (None, None)
        # 2 = kept tentatively, 1 = apply the nowcast, 0 = keep the parameters, -1 = rank 0 raises
        code = 1 if prediction is not None else (-1 if error is not None else 0)
        tentative_ok = self.checks.tentative_allowed(step)
        # every rank copies the pre-jump run: the decision (made on rank 0) may keep the jump tentatively
        saved = RunCopy.take(self.model, self.optimizer) if tentative_ok and (
            prediction is not None or not self._rank0) else None
        if prediction is not None and self.verify is not None:
            code = self.checks.judge(prediction, window, step, closure, loss, saved, tentative_ok)
            prediction = None  # accepted: the kept point is already in place; rejected: theta was restored
        code = broadcast_code(code, self.param_device)
        if code < 0:
            raise error if error is not None else RuntimeError("ninocast: the nowcast failed on rank 0")
        if code == 0:
            return False
        if code == 2 and saved is not None and self.verify is not None:
            self.checks.hold(step, saved)
        self._apply_nowcast(prediction)
        return True

    def _fetch_nowcast(self, window: list[tuple[int, Snapshot]],
                       step: int) -> tuple[dict[str, torch.Tensor] | None, BaseException | None]:
        """Rank 0: the checked prediction, or (None, the error to raise when on_error="raise"); failures are
        counted here."""
        k = self.current_k()
        t0 = time.perf_counter()
        try:
            assert self.backend is not None
            result = request_nowcast(self.backend, window, k, self._worker, self.nowcast_deadline_s)
            check_state(result, self.spec, where="nowcast answer")
        except Exception as e:  # noqa: BLE001 - whatever goes wrong, training goes on (policy)
            kind = getattr(e, "kind", "invalid_response" if isinstance(e, StateError) else "error")
            if isinstance(e, DeadlineExceeded) and isinstance(self.backend, RemoteBackend):
                self.backend.refresh_estimate = True
            if self.on_error == "raise":  # counted, then raised on every rank once all ranks know
                self.failures[kind] += 1
                return None, e
            self._note_failure(kind, e, raise_ok=False)
            return None, None
        self.nowcasts.append({"step": step, "k": k, "seconds": time.perf_counter() - t0,
                              "snapshot_steps": [s for s, _ in window], "accepted": True})
        return result, None

    def _apply_nowcast(self, prediction: dict[str, torch.Tensor] | None) -> None:
        """Write the prediction (rank 0) into the parameters and broadcast them to the other ranks."""
        with torch.no_grad():
            for name in self.spec.names:
                p = self._params[name]
                if prediction is not None:
                    p.copy_(prediction[name].to(device=p.device, dtype=p.dtype))
                broadcast_param(p)

    def _note_failure(self, kind: str, err: Exception, raise_ok: bool) -> None:
        self.failures[kind] += 1
        if self.on_error == "raise" and raise_ok:
            raise err
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"ninocast: {kind}: {err} -- training continues (a failed nowcast call is a skipped "
                          f"step; this warning is shown once per kind; see .failures)", RuntimeWarning, stacklevel=3)

