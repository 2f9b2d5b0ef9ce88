"""SessionSettings: what a run asks of its server session, built once by NowcastOptimizer and sent as the body of
POST /v1/sessions.

Field by field the server's create-session schema (``ninocast_server.api.schemas.CreateSession``), defaults
included; a test keeps the two in step. The server checks the values (ranges, known nowcaster, spec).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .spec import ModelSpec


@dataclass(frozen=True)
class SessionSettings:
    spec: ModelSpec
    nowcaster: str | None = None  # None: the server's default
    ctx: int | None = None  # states per nowcast; None: the nowcaster's
    period: int = 1000  # optimizer steps between nowcasts (the k schedule)
    max_train_steps: int = 10_000  # planned length of the run (the k schedule)
    name: str | None = None
    record: bool = False  # keep every state, not only the newest ctx

    def to_json(self) -> dict[str, Any]:
        """The request body; unset optional fields are left out (the server then applies its default)."""
        body: dict[str, Any] = {"spec": self.spec.to_json()}
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            if value is not None:
                body[f.name] = value
        return body
