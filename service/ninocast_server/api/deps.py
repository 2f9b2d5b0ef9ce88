"""What a route may ask FastAPI for: the server's parts (one typed object) and the caller's owner id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from ..sessions.queue import ComputeQueue
from ..sessions.registry import NowcasterRegistry
from ..sessions.store import SessionStore
from ..settings import Settings
from .auth import Authenticator, require_owner
from .metrics import Metrics

if TYPE_CHECKING:
    from ..engine.graphs.cache import GraphCache


@dataclass(frozen=True)
class Server:
    """The parts create_app wires together, built once per app."""

    settings: Settings
    store: SessionStore
    registry: NowcasterRegistry
    queue: ComputeQueue
    auth: Authenticator
    metrics: Metrics
    graphs: "GraphCache | None"  # None while the engine cannot be imported (readyz says so)


def server(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(server)]
Owner = Annotated[str, Depends(require_owner)]
