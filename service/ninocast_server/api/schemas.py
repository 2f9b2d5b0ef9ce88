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


class NowcastReport(BaseModel):
    """What the client decided about one nowcast after verifying it on its probe (ninocast.Verify); small and
    bounded, kept in the session's history."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [
        {"k": 40, "accepted": True, "alpha": 0.5, "probe": "batch", "probe_before": 0.91, "probe_after": 0.83,
         "tried": [[1.0, 1.2], [0.5, 0.83], [0.25, 0.86]], "probe_passes": 4, "verify_s": 0.012}]})

    k: int | None = Field(None, ge=1, le=10**6, description="the nowcast's horizon")
    accepted: bool = Field(description="the jump (or a shorter one, alpha < 1) was kept")
    skipped: Literal["final"] | None = Field(None, description="'final': the budget's last nowcast was skipped")
    alpha: float | None = Field(None, ge=0, le=1, description="fraction of the jump kept (0 = rejected)")
    probe: Literal["batch", "probe", "closure"] | None = Field(None, description="what scored the jump")
    probe_before: float | None = Field(None, description="probe loss before the jump (null = infinite)")
    probe_after: float | None = Field(None, description="probe loss at the kept point")
    tried: list[tuple[float, float | None]] = Field([], max_length=16, description="[alpha, probe] pairs scored")
    probe_passes: int | None = Field(None, ge=0, le=1000)
    verify_s: float | None = Field(None, ge=0, description="seconds the verification took")


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
        view["reports"] = s.reports[-50:]
    verified = [r for r in s.reports if not r.get("skipped")]
    view["verification"] = {"reported": len(s.reports), "accepted": sum(1 for r in verified if r["accepted"]),
                            "rejected": sum(1 for r in verified if not r["accepted"]),
                            "skipped": len(s.reports) - len(verified)}
    return view


def state_ack(s: Session, step: int, size: int, new: bool) -> dict[str, Any]:
    return {"session": s.id, "step": step, "bytes": size, "stored": new, "states_held": len(s.states),
            "ready": len(s.states) >= s.ctx, "at": time.time()}
