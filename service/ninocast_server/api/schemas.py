"""Request bodies and the JSON views of sessions, with the examples that /docs shows."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ninocast.schedule import k_at_step

from ..sessions.store import Session

EXAMPLE_SPEC = {"family": "generic", "params": [["0.weight", [16, 8]], ["0.bias", [16]], ["2.weight", [4, 16]],
                                                 ["2.bias", [4]]]}


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"spec": EXAMPLE_SPEC, "nowcaster": "linefit", "period": 1000, "max_train_steps": 10000,
         "name": "mlp-lr3e-4"}]})

    spec: dict[str, Any] = Field(description="model spec: {family, params: [[name, shape], ...], num_heads?}")
    nowcaster: str | None = Field(None, description="a name from GET /v1/nowcasters; default: the server's")
    ctx: int | None = Field(None, ge=2, le=64, description="states per nowcast; default: the nowcaster's")
    period: int = Field(1000, gt=0, description="optimizer steps between nowcasts (k schedule)")
    max_train_steps: int = Field(10000, gt=0, description="planned length of the run (k schedule)")
    name: str | None = Field(None, max_length=200)
    record: bool = Field(False, description="keep every state (a trajectory), not only the newest ctx")


class NowcastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{}, {"k": 10, "dtype": "bfloat16"}]})

    k: int | None = Field(None, description="horizon in snapshot intervals (1..40); default: the session's "
                          "schedule position at its newest step")
    dtype: Literal["float32", "bfloat16", "float16", "uploaded"] = Field(
        "float32", description="dtype of the returned tensors; 'uploaded': each tensor's dtype in the newest state")


def next_k(s: Session) -> int | None:
    return k_at_step(max(s.states), s.max_train_steps, s.period) if s.states else None


def session_view(s: Session, ttl_s: float, full: bool = True) -> dict[str, Any]:
    steps = sorted(s.states)
    view: dict[str, Any] = {
        "id": s.id, "name": s.name, "nowcaster": s.nowcaster, "ctx": s.ctx, "period": s.period,
        "max_train_steps": s.max_train_steps, "record": s.record, "created": s.created, "last_used": s.last_used,
        "expires_at": s.last_used + ttl_s,
        "spec": {"family": s.spec.family, "n_params": s.spec.n_params, "n_tensors": len(s.spec.params),
                 "fingerprint": s.spec.fingerprint()[:16]},
        "states": {"count": len(steps), "bytes": sum(s.states.values()),
                   "steps": steps if full else steps[-s.ctx:]},
        "ready": len(steps) >= s.ctx, "next_k": next_k(s), "nowcasts_done": s.n_nowcasts,
    }
    if full:
        view["nowcasts"] = s.nowcasts[-50:]
    return view


def state_ack(s: Session, step: int, size: int, new: bool) -> dict[str, Any]:
    return {"session": s.id, "step": step, "bytes": size, "stored": new, "states_held": len(s.states),
            "ready": len(s.states) >= s.ctx, "at": time.time()}
