"""Request bodies and every JSON answer (sessions, states, reports, nowcasters, health), with the examples /docs
shows; the routes return these models, so the OpenAPI schema is what is sent."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from ninocast.flat import NOWCAST_DTYPES
from ninocast.schedule import k_at_step

from ..sessions.store import Session

EXAMPLE_SPEC = {"family": "generic", "params": [["0.weight", [16, 8]], ["0.bias", [16]], ["2.weight", [4, 16]],
                                                 ["2.bias", [4]]]}


SPEC_SCHEMA = {"type": "object", "required": ["params"], "properties": {
    "family": {"type": "string", "enum": ["auto", "generic", "gpt2", "llama"], "default": "auto"},
    "params": {"type": "array", "minItems": 1, "description": "[[name, shape], ...] in named_parameters() order",
               "items": {"type": "array", "minItems": 2, "maxItems": 2, "prefixItems": [
                   {"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "integer", "minimum": 1}}]}},
    "num_heads": {"type": "integer", "minimum": 1}, "num_key_value_heads": {"type": "integer", "minimum": 1}}}


class CreateSession(BaseModel):
    # strict: 1000.0, "1000" or true are not integers, 0 is not a boolean
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"spec": EXAMPLE_SPEC, "nowcaster": "linefit", "period": 1000, "max_train_steps": 10000,
         "name": "mlp-lr3e-4"}]})

    spec: dict[str, Any] = Field(description="model spec: {family, params: [[name, shape], ...], num_heads?}",
                                 json_schema_extra=SPEC_SCHEMA)
    nowcaster: str | None = Field(None, max_length=200, description="a name from GET /v1/nowcasters; "
                                  "default: the server's")
    ctx: int | None = Field(None, ge=2, le=64, description="states per nowcast; default: the nowcaster's")
    period: int = Field(1000, gt=0, le=10**9, description="optimizer steps between nowcasts (k schedule)")
    max_train_steps: int = Field(10000, gt=0, le=10**12, description="planned length of the run (k schedule)")
    name: str | None = Field(None, max_length=200)
    record: bool = Field(False, description="keep every state (a trajectory), not only the newest ctx")


class NowcastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{}, {"k": 10, "dtype": "bfloat16"}]})

    k: int | None = Field(None, description="horizon in snapshot intervals (1..the nowcaster's horizon, 40 for "
                          "NiNo); default: the session's schedule position at its newest step")
    dtype: Literal[NOWCAST_DTYPES] = Field(  # type: ignore[valid-type]
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
    delayed: Literal["pending", "kept", "rolled_back"] | None = Field(
        None, description="a tentative jump's delayed check (Verify(delay=D)): 'pending' until it runs, then 'kept' "
                          "or 'rolled_back' (the pre-jump model and optimizer state were restored; accepted is false)")
    delay: int | None = Field(None, ge=1, le=10**6, description="steps between the jump and its delayed check")
    check_step: int | None = Field(None, ge=0, le=10**12, description="the step of the delayed check")
    probe_delayed: float | None = Field(None, description="probe loss at the delayed check (null = infinite)")
    snapshot_bytes: int | None = Field(None, ge=0, le=2**50,
                                       description="memory held for the rollback while the check was pending")
    probe_plain: float | None = Field(None, description="Verify(shadow=True): plain training's probe loss at the "
                                      "check (the pre-jump copy, trained on the same batches; null = infinite)")
    probe_se: float | None = Field(None, ge=0, description="Verify(shadow=True) with several probe batches: the "
                                   "standard error of the per-batch difference (jump minus plain)")
    shadow_steps: int | None = Field(None, ge=0, le=10**6,
                                     description="Verify(shadow=True): base-optimizer steps taken on the copy")
    extended: int | None = Field(None, ge=0, le=1000, description="Verify(patience=P): times the check was put off "
                                 "by another delay (the jump was behind plain training but closing on it)")
    patience: int | None = Field(None, ge=0, le=10**6, description="Verify(shadow=True): the extra delays a jump "
                                 "behind but closing could race for (0 by default for an out-of-scope nowcaster)")
    race: list[tuple[int, float | None]] = Field([], max_length=1001, description="Verify(shadow=True): [check "
                                                 "step, jump's probe minus plain training's] at each look")


# ----------------------------------------------------------------------------- responses (every JSON answer is
# one of these: the routes return them, so the OpenAPI shows exactly what is sent)
class ErrorBody(BaseModel):
    error: str = Field(description="short, stable code, e.g. session_not_found")
    detail: str = Field(description="what is wrong and where")


class NotReady(ErrorBody):
    checks: dict[str, bool]
    free_disk_bytes: int | None = None


class Ready(BaseModel):
    status: Literal["ready"]
    checks: dict[str, bool]
    free_disk_bytes: int | None = None


class Health(BaseModel):
    status: Literal["ok"]


class SpecSummary(BaseModel):
    family: str
    n_params: int
    n_tensors: int
    fingerprint: str


class StatesSummary(BaseModel):
    count: int
    bytes: int
    steps: list[int] = Field(description="steps held (the newest ctx in a listing)")


class NowcastEntry(BaseModel):
    at: float
    k: int
    steps: list[int]
    device: str
    load_s: float
    compute_s: float
    total_s: float


class StoredReport(NowcastReport):
    """A NowcastReport as the session keeps it."""

    # read back from disk: a field dropped later must not break GETs; the request's example does not apply
    model_config = ConfigDict(extra="ignore", json_schema_extra=None)
    step: int
    at: float


class Verification(BaseModel):
    reported: int
    accepted: int
    rejected: int
    skipped: int
    rolled_back: int = Field(description="tentative jumps undone by their delayed check (Verify(delay=D))")
    pending: int = Field(description="tentative jumps whose delayed check has not been reported yet")


class SessionSummary(BaseModel):
    id: str
    name: str | None
    nowcaster: str
    ctx: int
    period: int
    max_train_steps: int
    record: bool
    created: float
    last_used: float
    expires_at: float
    spec: SpecSummary
    states: StatesSummary
    ready: bool = Field(description="ctx states are held: a nowcast can run")
    next_k: int | None
    nowcasts_done: int
    verification: Verification = Field(description="counts of reported, accepted, rejected, skipped nowcasts")


class SessionDetail(SessionSummary):
    nowcasts: list[NowcastEntry] = Field(description="the newest 50 nowcasts")
    reports: list[StoredReport] = Field(description="the newest 50 verification reports")


class CreatedSession(SessionDetail):
    warnings: list[str] = Field(description="one line per concern the session is served despite, e.g. a spec "
                                "outside what the nowcaster was meta-trained on")
    start_step: int = Field(0, description="the serving nowcaster's advice: train this many optimizer calls "
                            "before the run's first nowcast (0: none); the client follows it unless told otherwise")


class SessionList(BaseModel):
    sessions: list[SessionSummary]


class ReportAck(BaseModel):
    session: str
    step: int
    stored: bool
    reports: int = Field(description="reports the session holds")


class StateAck(BaseModel):
    session: str
    step: int
    bytes: int
    stored: bool = Field(description="false: the same bytes were stored at this step before")
    states_held: int
    ready: bool
    at: float


class ScopeView(BaseModel):
    families: list[str]
    tasks: list[str]
    params: list[int] | None = Field(None, min_length=2, max_length=2,
                                     description="[min, max] parameter count; absent: no bound")
    spacing: list[int] | None = Field(None, min_length=2, max_length=2,
                                      description="[min, max] steps between snapshots (period / ctx); absent: no bound")

    @model_serializer(mode="wrap")
    def _absent_params(self, handler: SerializerFunctionWrapHandler):  # no return type: keeps the schema
        """As in the nowcaster's config.json: no bound is no key."""
        out = handler(self)
        for key in ("params", "spacing"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


class NowcasterInfo(BaseModel):
    name: str
    kind: str
    ctx: int
    horizon: int
    parameters: int
    families: list[str]
    scope: ScopeView | None = Field(None, description="what it was meta-trained on (null: no claim)")
    start_step: int | None = Field(0, description="its advice: optimizer calls a run trains before its first "
                                   "nowcast (null for a routed nowcaster: each member advises its own)")
    model_args: dict[str, bool | int | float] | None = Field(None, description="architecture (learned nowcasters)")
    routes: dict[str, "NowcasterInfo | list[NowcasterInfo]"] | None = Field(
        None, description="routed nowcasters: the member that serves each family (its own scope and architecture); "
        "a list where a family has several: the first whose scope.spacing holds the session's period / ctx serves "
        "it, else the first")


class NowcasterList(BaseModel):
    default: str
    devices: list[str]
    nowcasters: list[NowcasterInfo]


def next_k(s: Session) -> int | None:
    return k_at_step(max(s.states), s.max_train_steps, s.period) if s.states else None


def session_summary(s: Session, ttl_s: float) -> SessionSummary:
    return SessionSummary(**_fields(s, ttl_s, full=False))


def session_detail(s: Session, ttl_s: float) -> SessionDetail:
    return SessionDetail(**_fields(s, ttl_s, full=True), nowcasts=s.nowcasts[-50:], reports=s.reports[-50:])


def session_created(s: Session, ttl_s: float, warnings: list[str], start_step: int = 0) -> CreatedSession:
    return CreatedSession(**_fields(s, ttl_s, full=True), nowcasts=s.nowcasts[-50:], reports=s.reports[-50:],
                          warnings=warnings, start_step=start_step)


def _fields(s: Session, ttl_s: float, full: bool) -> dict[str, Any]:
    steps = sorted(s.states)
    verified = [r for r in s.reports if not r.get("skipped")]
    accepted = sum(1 for r in verified if r["accepted"])
    rolled_back = sum(1 for r in verified if r.get("delayed") == "rolled_back")
    return dict(
        id=s.id, name=s.name, nowcaster=s.nowcaster, ctx=s.ctx, period=s.period, max_train_steps=s.max_train_steps,
        record=s.record, created=s.created, last_used=s.last_used, expires_at=s.last_used + ttl_s,
        spec=SpecSummary(family=s.spec.family, n_params=s.spec.n_params, n_tensors=len(s.spec.params),
                         fingerprint=s.spec_fingerprint[:16]),
        states=StatesSummary(count=len(steps), bytes=sum(s.states.values()), steps=steps if full else steps[-s.ctx:]),
        ready=len(steps) >= s.ctx, next_k=next_k(s), nowcasts_done=s.n_nowcasts,
        verification=Verification(reported=len(s.reports), accepted=accepted,
                                  rejected=len(verified) - accepted - rolled_back,
                                  skipped=len(s.reports) - len(verified), rolled_back=rolled_back,
                                  pending=sum(1 for r in verified if r.get("delayed") == "pending")))


def state_ack(s: Session, step: int, size: int, new: bool) -> StateAck:
    return StateAck(session=s.id, step=step, bytes=size, stored=new, states_held=len(s.states),
                    ready=len(s.states) >= s.ctx, at=time.time())
