"""A new session, as one service call: the spec checked against the server's limits and the nowcaster, then
the session record written. Everything a first nowcast would trip over is refused here, with a 4xx."""

from __future__ import annotations

from ninocast.spec import SpecError

from ..engine.graphs import check_spec_for
from ..settings import Settings
from .errors import ServiceError
from .nowcast import estimate_bytes
from .queue import ComputeQueue
from .registry import NowcasterRegistry
from .spec_limits import parse_spec
from .store import Session, SessionStore


def create_session(store: SessionStore, registry: NowcasterRegistry, queue: ComputeQueue, settings: Settings,
                   owner: str, raw_spec: object, nowcaster: str | None, ctx: int | None, period: int,
                   max_train_steps: int, record: bool, name: str | None) -> tuple[Session, list[str], int]:
    """(the session, warnings: concerns it is served despite, the serving model's start-step advice). Blocking
    (spec checks, an fsync): run it on a worker thread."""
    from ..engine.graphs import check_spec_for

    spec = parse_spec(raw_spec, settings.max_tensors_per_spec, settings.max_name_length,
                      settings.max_params_per_session)
    nowcaster = nowcaster or registry.default
    model = registry.get(nowcaster)
    if spec.family not in model.families:
        raise ServiceError(422, "unsupported_family", f"nowcaster {nowcaster!r} supports {list(model.families)}, "
                           f"not family {spec.family!r}")
    try:  # a graph that would be wrong or unreadable is refused now, not at the first nowcast
        check_spec_for(spec, model)
    except SpecError as e:
        raise ServiceError(422, "invalid_spec", f"nowcaster {nowcaster!r}: {e}") from None
    ctx = ctx or model.ctx
    if ctx != model.ctx and model.kind != "linefit":
        raise ServiceError(422, "invalid_ctx", f"nowcaster {nowcaster!r} needs ctx={model.ctx}, got {ctx}")
    if period < ctx:  # snapshots come every period // ctx steps: at least one
        raise ServiceError(422, "invalid_period", f"period ({period}) must be at least ctx ({ctx}): a nowcast "
                           f"reads ctx snapshots taken every period // ctx steps")
    queue.check_fits(estimate_bytes(spec, ctx), "spec_too_large")
    s = store.create(owner, spec, nowcaster, ctx, period, max_train_steps, record, name)
    out_of_scope = model.scope_warning(spec, s.spacing)  # served anyway, but said once, here (issue 11)
    return s, [out_of_scope] if out_of_scope else [], model.advised_start(spec, s.spacing)
