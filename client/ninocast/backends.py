"""Where a NowcastOptimizer's nowcasts run: on a server (RemoteBackend) or in this process (LocalBackend)."""

from __future__ import annotations

import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from .flat import flatten, unflatten
from .session_settings import SessionSettings
from .spec import ModelSpec
from .transport import (AuthError, DeadlineExceeded, InvalidResponse, NotFound, NowcastAPIError, NowcastClient,
                        RequestRejected, ServerUnavailable)

if TYPE_CHECKING:
    from .worker import BackendWorker

Snapshot = dict[str, torch.Tensor]


class Backend(Protocol):
    streams_states: bool  # True: every snapshot is handed to add_state (on the worker thread)
    out_of_scope: bool  # the nowcaster warned that this model is outside what it was meta-trained on
    start_step: int | None  # the nowcaster's advice: calls before the first nowcast (None: not known yet)

    def add_state(self, step: int, snapshot: Snapshot) -> None: ...
    def nowcast(self, window: list[tuple[int, Snapshot]], k: int,
                deadline: float | None = None) -> dict[str, torch.Tensor]: ...
    def check(self, deadline: float | None = None) -> None: ...
    def report(self, step: int, body: dict[str, Any]) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def close(self, delete: bool = False, deadline: float | None = None) -> None: ...


class ConfigurationError(Exception):
    """This run cannot nowcast as configured (wrong key, unknown nowcaster, a spec the server refuses, a server
    that cannot be reached): raised by ``NowcastOptimizer.check()``, never during training."""


def check_backend(backend: Backend, where: str, timeout: float, worker: BackendWorker | None = None) -> None:
    """Ask ``backend`` once, within ``timeout`` seconds (through ``worker``, behind its queued uploads, when there
    is one), whether this run can nowcast; a refusal becomes a ``ConfigurationError`` naming ``where``."""
    deadline = time.monotonic() + timeout
    try:
        if worker is not None:
            worker.call(lambda: backend.check(deadline), deadline)
        else:
            backend.check(deadline)
    except AuthError as e:
        raise ConfigurationError(f"ninocast: {where} refused the API key: {e.detail or e}") from e
    except RequestRejected as e:
        raise ConfigurationError(f"ninocast: {where} refused this run's configuration "
                                 f"({e.error or e.status}): {e.detail or e}") from e
    except NowcastAPIError as e:
        raise ConfigurationError(f"ninocast: cannot check the configuration with {where}: {e}") from e


def request_nowcast(backend: Backend, window: list[tuple[int, Snapshot]], k: int, worker: BackendWorker | None,
                    deadline_s: Callable[[], float]) -> dict[str, torch.Tensor]:
    """The backend's prediction; through ``worker`` (after the queued uploads) within ``deadline_s()`` seconds,
    at once a ``DeadlineExceeded`` while the worker is stalled."""
    if worker is None:
        return backend.nowcast(window, k)
    if worker.stalled:
        raise DeadlineExceeded("the server has not answered since a request timed out; the step was skipped "
                               "without waiting")
    deadline = time.monotonic() + deadline_s()
    return worker.call(lambda: backend.nowcast(window, k, deadline=deadline), deadline)


class RemoteBackend:
    """Streams snapshots to a server session and asks it for nowcasts.

    The session is created on first use (or by ``check``), so a server that is down when training starts costs
    nothing. Before a nowcast, every snapshot of the window that the server has not acknowledged (an upload
    failed or was dropped) is sent again; the server answers which states it used, and that must be exactly the
    window. If the server lost the session or some of its states (expired, restarted without its data), or
    holds states this run does not know (another process resumed into the same session), a fresh session gets
    the whole window, once, before giving up.

    ``estimate_s`` is how long a nowcast takes here (the last one's round trip, or the server's own timing of
    it); after a nowcast the client gave up on, the next upload reads the server's timing of it from the
    session (GET), so the next deadline fits the model.
    """

    streams_states = True  # snapshots go to the server in the background, as they are taken

    def __init__(self, url: str, settings: SessionSettings, *, api_key: str | None, timeout: float,
                 retries: int) -> None:
        # a busy server's Retry-After must not hold a training loop for long: wait at most 5 s per retry
        self.client = NowcastClient(url, api_key=api_key, timeout=timeout, retries=retries, max_retry_wait=5.0)
        self.settings = settings  # replaced (not changed) when the run's length changes before the session exists
        self.session_id: str | None = None
        self.acked: set[int] = set()  # steps the current session acknowledged
        self.last_info: dict[str, Any] = {}
        self.estimate_s: float | None = None
        self.refresh_estimate = False  # set when a nowcast was given up on: read the server's timing later
        self.closed = False
        self._lock = threading.Lock()  # session_id / acked: read by checkpoints on the training thread
        self.warned: set[str] = set()  # server warnings already shown (a re-created session repeats them)
        self.out_of_scope = False  # the server's create answer warned (its one warning: the nowcaster's scope)
        self.start_step: int | None = None  # the server's advice, known once the session exists

    def _session(self, deadline: float | None = None) -> str:
        if self.closed:
            raise ServerUnavailable("the optimizer was closed: no new session")
        if self.session_id is None:
            created = self.client.create_session(self.settings, deadline=deadline)
            advice = created.get("start_step", 0)  # an older server does not advise: no start step
            self.start_step = advice if isinstance(advice, int) and not isinstance(advice, bool) and advice >= 0 else 0
            with self._lock:
                self.session_id, self.acked = created["id"], set()
            for line in created.get("warnings") or []:
                warn_once(self.warned, line)
                self.out_of_scope = True
        return self.session_id

    def _forget_session(self) -> None:
        with self._lock:
            self.session_id, self.acked = None, set()

    def check(self, deadline: float | None = None) -> None:
        """Create the run's session now: the server validates the key, the nowcaster and the spec at once."""
        self._session(deadline)
        if self.start_step is None:  # a session resumed from a checkpoint older than the advice: none
            self.start_step = 0

    def add_state(self, step: int, snapshot: Snapshot, deadline: float | None = None) -> None:
        try:
            self.client.put_state(self._session(deadline), step, snapshot, deadline=deadline)
        except RequestRejected as e:
            # 404: the session is gone; 409 step_conflict: it holds another run's state at this step
            if not (isinstance(e, NotFound) or e.status == 409):
                raise
            self._forget_session()
            self.client.put_state(self._session(deadline), step, snapshot, deadline=deadline)
        with self._lock:
            self.acked.add(step)
        if self.refresh_estimate and deadline is None:
            self._read_server_timing()

    def _read_server_timing(self) -> None:
        self.refresh_estimate = False
        try:
            done = self.client.get_session(self._session()).get("nowcasts") or []
            seconds = float(done[-1]["total_s"]) if done else None
        except (NowcastAPIError, KeyError, TypeError, ValueError, AttributeError):
            return
        if seconds is not None:
            self.estimate_s = max(self.estimate_s or 0.0, seconds)

    def nowcast(self, window: list[tuple[int, Snapshot]], k: int,
                deadline: float | None = None) -> dict[str, torch.Tensor]:
        steps = [step for step, _ in window]
        t0 = time.monotonic()
        for attempt in range(2):
            for step, snap in window:
                if step not in self.acked:
                    self.add_state(step, snap, deadline=deadline)
            sid = self._session(deadline)
            try:
                result, info = self.client.nowcast_with_info(sid, k=k, dtype="uploaded", deadline=deadline)
            except RequestRejected as e:
                if attempt or not (isinstance(e, NotFound) or e.status == 409):
                    raise
                self._forget_session()  # gone, or too few states: start again with the whole window
                continue
            self.last_info = info
            if info.get("steps") in (None, steps):
                server_s = _server_total_s(info.get("server_timing"))
                self.estimate_s = max(time.monotonic() - t0, server_s or 0.0)
                return result
            if attempt:
                break
            self._forget_session()  # the session holds states outside this window
        raise InvalidResponse(f"the server nowcast from steps {self.last_info.get('steps')}, this run's window "
                              f"is {steps}")

    def report(self, step: int, body: dict[str, Any]) -> None:
        """A verified (or skipped) nowcast's decision, kept in the session's history."""
        self.client.report_nowcast(self._session(), step, body)

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"session_id": self.session_id, "acked": sorted(self.acked), "start_step": self.start_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.session_id = state.get("session_id")
            self.acked = set(int(x) for x in state.get("acked", []))
            advice = state.get("start_step")  # the resumed session's advice (its create answer is not repeated)
            self.start_step = None if advice is None else int(advice)

    def close(self, delete: bool = False, deadline: float | None = None) -> None:
        """Close the connection; with ``delete`` first delete the run's session (errors are raised, after the
        connection is closed: the session then expires by the server's TTL)."""
        self.closed = True
        try:
            if delete and self.session_id is not None:
                try:
                    self.client.delete_session(self.session_id, deadline=deadline)
                except NotFound:
                    pass  # already gone (expired, deleted)
        finally:
            self.client.close()


def _server_total_s(header: str | None) -> float | None:
    """The ``total;dur=MS`` entry of a Server-Timing header, in seconds."""
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        if name == "total" and rest.startswith("dur="):
            try:
                return float(rest[4:]) / 1e3
            except ValueError:
                return None
    return None


class LocalBackend:
    """Runs the engine in this process (needs ``pip install 'ninocast[server]'``)."""

    streams_states = False  # the window itself is the state: snapshots need no background upload

    def __init__(self, spec: ModelSpec, nowcaster: str, device: str = "cpu", spacing: int | None = None) -> None:
        try:
            from ninocast_server.engine.graphs import check_spec_for
            from ninocast_server.engine.nowcasters.checkpoint import load_nowcaster
            from ninocast_server.engine.runner import nowcast
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"local nowcasting needs the engine: pip install 'ninocast[server]' (missing {e.name})") from None
        self._nowcast = nowcast
        self.model = load_nowcaster(nowcaster, device=device)
        check_spec_for(spec, self.model)  # a spec its graph cannot describe fails here, not at the first nowcast
        self.spec, self.spacing = spec, spacing
        line = self.model.scope_warning(spec, spacing)  # spacing: steps between the snapshots a nowcast reads
        self.out_of_scope = line is not None
        self.start_step: int | None = self.model.advised_start(spec, spacing)
        if line:  # the local nowcaster is chosen once per optimizer: one warning
            warnings.warn(f"ninocast: {line}", RuntimeWarning, stacklevel=4)

    def add_state(self, step: int, snapshot: Snapshot) -> None:
        pass  # the window itself is the state

    def check(self, deadline: float | None = None) -> None:
        """The nowcaster was loaded by the constructor; here: does it take this spec's family?"""
        families = getattr(self.model, "families", None)
        if families is not None and self.spec.family not in families:
            raise RequestRejected(f"nowcaster {getattr(self.model, 'name', '?')!r} supports {list(families)}, "
                                  f"not family {self.spec.family!r}", error="unsupported_family")

    def nowcast(self, window: list[tuple[int, Snapshot]], k: int,
                deadline: float | None = None) -> dict[str, torch.Tensor]:
        states = torch.empty(self.spec.n_params, len(window), dtype=torch.float32)
        for i, (_, snap) in enumerate(window):
            flatten(snap, self.spec, out=states[:, i])
        pred = self._nowcast(self.model, self.spec, states, k, spacing=self.spacing)  # a routed model picks by it
        return unflatten(pred, self.spec)

    def report(self, step: int, body: dict[str, Any]) -> None:
        pass  # local mode: the decision stays in NowcastOptimizer.nowcasts

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self, delete: bool = False, deadline: float | None = None) -> None:
        pass


def warn_once(shown: set[str], line: str) -> None:
    """A nowcaster outside what it was trained on (the server's create-session ``warnings``, or the local
    nowcaster's scope): one RuntimeWarning per distinct line."""
    if line not in shown:
        shown.add(line)
        warnings.warn(f"ninocast: {line}", RuntimeWarning, stacklevel=2)
