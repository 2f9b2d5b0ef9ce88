"""Where a NowcastOptimizer's nowcasts run: on a server (RemoteBackend) or in this process (LocalBackend)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .flat import flatten, unflatten
from .spec import ModelSpec
from .transport import InvalidResponse, NotFound, NowcastClient, RequestRejected

Snapshot = dict[str, torch.Tensor]


class Backend(Protocol):
    streams_states: bool  # True: every snapshot is handed to add_state (on the uploader thread)

    def add_state(self, step: int, snapshot: Snapshot) -> None: ...
    def nowcast(self, window: list[tuple[int, Snapshot]], k: int) -> dict[str, torch.Tensor]: ...
    def report(self, step: int, body: dict[str, Any]) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class RemoteBackend:
    """Streams snapshots to a server session and asks it for nowcasts.

    The session is created on first use, so a server that is down when training starts costs nothing. Before a
    nowcast, every snapshot of the window that the server has not acknowledged (an upload failed while it was
    down) is sent again; the server answers which states it used, and that must be exactly the window. If the
    server lost the session or some of its states (expired, restarted without its data), or holds states this
    run does not know (another process resumed into the same session), a fresh session gets the whole window,
    once, before giving up.
    """

    streams_states = True  # snapshots go to the server in the background, as they are taken

    def __init__(self, url: str, spec: ModelSpec, *, api_key: str | None, nowcaster: str | None, ctx: int,
                 period: int, max_train_steps: int, name: str | None, record: bool, timeout: float,
                 retries: int) -> None:
        # a busy server's Retry-After must not hold a training loop for long: wait at most 5 s per retry
        self.client = NowcastClient(url, api_key=api_key, timeout=timeout, retries=retries, max_retry_wait=5.0)
        self.spec = spec
        self.session_args = dict(nowcaster=nowcaster, ctx=ctx, period=period, max_train_steps=max_train_steps,
                                 name=name, record=record)
        self.session_id: str | None = None
        self.acked: set[int] = set()  # steps the current session acknowledged
        self.last_info: dict[str, Any] = {}

    def _session(self) -> str:
        if self.session_id is None:
            self.session_id = self.client.create_session(self.spec, **self.session_args)["id"]
            self.acked = set()
        return self.session_id

    def _forget_session(self) -> None:
        self.session_id, self.acked = None, set()

    def add_state(self, step: int, snapshot: Snapshot) -> None:
        try:
            self.client.put_state(self._session(), step, snapshot)
        except RequestRejected as e:
            # 404: the session is gone; 409 step_conflict: it holds another run's state at this step
            if not (isinstance(e, NotFound) or e.status == 409):
                raise
            self._forget_session()
            self.client.put_state(self._session(), step, snapshot)
        self.acked.add(step)

    def nowcast(self, window: list[tuple[int, Snapshot]], k: int) -> dict[str, torch.Tensor]:
        steps = [step for step, _ in window]
        for attempt in range(2):
            for step, snap in window:
                if step not in self.acked:
                    self.add_state(step, snap)
            sid = self._session()
            try:
                result, info = self.client.nowcast_with_info(sid, k=k, dtype="uploaded")
            except RequestRejected as e:
                if attempt or not (isinstance(e, NotFound) or e.status == 409):
                    raise
                self._forget_session()  # gone, or too few states: start again with the whole window
                continue
            self.last_info = info
            if info.get("steps") in (None, steps):
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
        return {"session_id": self.session_id, "acked": sorted(self.acked)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.session_id = state.get("session_id")
        self.acked = set(int(x) for x in state.get("acked", []))

    def close(self) -> None:
        self.client.close()


class LocalBackend:
    """Runs the engine in this process (needs ``pip install 'ninocast[server]'``)."""

    streams_states = False  # the window itself is the state: snapshots need no background upload

    def __init__(self, spec: ModelSpec, nowcaster: str, device: str = "cpu") -> None:
        try:
            from ninocast_server.engine.nowcasters.checkpoint import load_nowcaster
            from ninocast_server.engine.runner import nowcast
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"local nowcasting needs the engine: pip install 'ninocast[server]' (missing {e.name})") from None
        self._nowcast = nowcast
        self.model = load_nowcaster(nowcaster, device=device)
        self.spec = spec

    def add_state(self, step: int, snapshot: Snapshot) -> None:
        pass  # the window itself is the state

    def nowcast(self, window: list[tuple[int, Snapshot]], k: int) -> dict[str, torch.Tensor]:
        states = torch.empty(self.spec.n_params, len(window), dtype=torch.float32)
        for i, (_, snap) in enumerate(window):
            flatten(snap, self.spec, out=states[:, i])
        pred = self._nowcast(self.model, self.spec, states, k)
        return unflatten(pred, self.spec)

    def report(self, step: int, body: dict[str, Any]) -> None:
        pass  # local mode: the decision stays in NowcastOptimizer.nowcasts

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
