"""Where a NowcastOptimizer's nowcasts run: on a server (RemoteBackend) or in this process (LocalBackend)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .flat import flatten, unflatten
from .spec import ModelSpec
from .transport import NotFound, NowcastClient, RequestRejected

Snapshot = dict[str, torch.Tensor]


class Backend(Protocol):
    def add_state(self, step: int, snapshot: Snapshot) -> None: ...
    def nowcast(self, window: list[tuple[int, Snapshot]], k: int) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class RemoteBackend:
    """Streams snapshots to a server session and asks it for nowcasts.

    The session is created on first use, so a server that is down when training starts costs nothing. If the
    server lost the session or some of the window (expired, restarted without its data), the window is
    re-sent from the local copies once before giving up.
    """

    def __init__(self, url: str, spec: ModelSpec, *, api_key: str | None, nowcaster: str | None, ctx: int,
                 period: int, max_train_steps: int, name: str | None, record: bool, timeout: float,
                 retries: int) -> None:
        self.client = NowcastClient(url, api_key=api_key, timeout=timeout, retries=retries)
        self.spec = spec
        self.session_args = dict(nowcaster=nowcaster, ctx=ctx, period=period, max_train_steps=max_train_steps,
                                 name=name, record=record)
        self.session_id: str | None = None

    def _session(self) -> str:
        if self.session_id is None:
            self.session_id = self.client.create_session(self.spec, **self.session_args)["id"]
        return self.session_id

    def add_state(self, step: int, snapshot: Snapshot) -> None:
        try:
            self.client.put_state(self._session(), step, snapshot)
        except NotFound:
            self.session_id = None
            self.client.put_state(self._session(), step, snapshot)

    def nowcast(self, window: list[tuple[int, Snapshot]], k: int) -> dict[str, torch.Tensor]:
        try:
            return self.client.nowcast(self._session(), k=k)
        except RequestRejected as e:
            if not (isinstance(e, NotFound) or e.status == 409):
                raise
        if self.session_id is not None:  # 409: some states missing on the server; NotFound: session gone
            try:
                self.client.get_session(self.session_id)
            except NotFound:
                self.session_id = None
        for step, snap in window:
            self.add_state(step, snap)
        return self.client.nowcast(self._session(), k=k)

    def state_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.session_id = state.get("session_id")

    def close(self) -> None:
        self.client.close()


class LocalBackend:
    """Runs the engine in this process (needs ``pip install 'ninocast[server]'``)."""

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

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
