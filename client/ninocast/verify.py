"""Verified nowcasts: keep a jump only when a probe says it does not hurt.

A nowcast extrapolates the parameters far ahead of training; a nowcaster that is wrong for the model (out of
distribution, or simply a bad horizon) sends the loss up and training has to recover. ``Verify`` scores the
current parameters theta and the nowcasted ones on a probe (lower is better) and accepts the jump when the probe
is not worse than before (within ``tolerance``). Otherwise shorter jumps along the same direction,
theta + a * (theta_nowcast - theta) for a in ``shrink``, are scored and the best is kept if it passes; if none
does, the parameters are left as they were and the optimizer takes its normal step.

Probes (exactly one):
  - ``Verify(batch=b, loss_fn=f)``: ``f(model, b)`` on a fixed held-out batch (``batches=[...]``: their mean),
    under ``torch.no_grad`` and in eval mode (no dropout, and BatchNorm's running statistics are neither used
    from training mode nor updated by the probe);
  - ``Verify(probe=fn)``: any ``fn(model) -> float``;
  - ``Verify(closure=True)``: the loss of the step's own batch, from ``step(closure)`` (forward and backward per
    score: the closure is the user's; its gradients are put back before a rejected nowcast's normal step).
Cost per nowcast: 2 probe evaluations when the jump is accepted, 2 + len(shrink) otherwise (1 fewer with a
closure, whose first loss is the "before" score); recorded as ``probe_passes`` and ``verify_s``.

Delayed check (``delay=D``; a fixed probe, not the closure): good jumps first *dip* the probe and overtake plain
training 50-200 steps later, so an immediate check rejects most of them. With ``delay`` a jump whose probe rises
by at most ``max_dip`` (relative) is kept *tentatively* at full length; the optimizer keeps a copy of the pre-jump
model and optimizer state (``ninocast.rollback``), trains ``D`` more steps and probes again: no worse than before
the jump (within ``tolerance``) keeps it, otherwise the copy is restored (the D steps are spent). A jump beyond
``max_dip`` is shortened or rejected at once, as without ``delay``. ``baseline="trend"`` makes the check
stricter: the branch must beat the probe plain training was heading for, ``probe_before`` minus its fall over the
last snapshot interval scaled to D steps (scored once on the window's previous snapshot; early in training, when
the loss falls fast, "no worse than before" lets through jumps that leave the run behind for good).
After ``max_rollbacks`` rollbacks in a row
the run goes back to immediate checks only, so a wrong nowcaster costs at most ``max_rollbacks * D`` steps.
Cost: one more probe evaluation per tentative jump, and the copy's memory while the check is pending
(``snapshot_bytes``).

Shadow branch (``shadow=True``, with ``delay``; needs ``step(closure)``): a rollback above throws D steps of
training away, and "no worse than before the jump" is a weak reference for plain training, which would have
moved on too. With ``shadow`` the pre-jump copy keeps training while the check is pending: every call also
takes the base optimizer's step on the copy with the same batch (the closure runs once more), so at the check
both branches have seen the same data, and the jump is kept only when its probe is no worse than plain
training's (``probe_plain``, within ``tolerance``). Every full jump with a finite probe is checked this way (no
``max_dip`` by default here), one that passes the immediate check included. A rejected jump then costs no steps:
the run continues exactly as plain training would have. The price is compute, ``D + 1`` extra forward and
backward passes per tentative jump (``shadow_steps``), and the copy's memory; single process only. With a
probe of several batches (``batches=[...]``) the two branches are compared batch by batch and the jump must win with
``confidence``: the mean of the per-batch differences (jump minus plain) plus ``confidence`` standard errors of
that mean must be <= ``tolerance * |probe_plain|``. The default, 0, compares the means alone: measured, one
standard error also threw away the long first jumps that carry most of NiNo's gain on Fashion-MNIST (they lead
plain training by about one standard error 100 steps later), while it kept language runs from keeping jumps
that were ahead by less than the probe's noise (docs/benchmarks-speedup.md, *Shadow branches*). Rollbacks in a
row do not turn tentative jumps off here (``max_rollbacks`` is for rollbacks that cost steps).

Racing on (``patience=P``, shadow only; by default 2 with a shadow, 0 where the nowcaster warned that the model
is outside its scope): a jump behind plain training at its check
whose gap to it (jump minus plain, on the probe) has narrowed since the last look -- the first look is the dip
right after the jump -- races on for another ``D`` steps, at most ``P`` times, and never past the next
nowcast's call or the budget. A good jump dips the probe and overtakes plain training 50-200 steps later
(Fashion-MNIST: the first jump of a run is the longest and the slowest to pay off), so one fixed delay rejects
some of the jumps that carry the speedup; a jump that falls further behind is rejected at the first look as
before. A race extends trust, and a check of a few hundred steps cannot see a jump that slows training down
later (GPT-2 with the FM-16-only default: every kept jump beat plain training at its check, yet the run ended
above AdamW's perplexity), so the default withholds it from out-of-scope nowcasters; an explicit ``patience``
applies to all. While a race is on, snapshots of both branches are taken; the losing branch's are dropped, so after a
rejection the nowcast window (and the next nowcast's timing) is plain training's. Cost: up to ``P * D`` more
shadow steps per rejected jump (``extended`` and ``race`` in the decision).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

Score = Callable[[], float]
DEFAULT_MAX_DIP = 2.0  # a tentative jump may at most triple the probe loss (chosen in docs/benchmarks-speedup.md)
SHADOW_MAX_DIP = math.inf  # with a shadow branch a rejected jump costs no step: every full jump gets its check
SHADOW_PATIENCE = 2  # a shadow race behind but closing goes on for up to 2 more delays (see the module doc)


@dataclass
class Verify:
    """How nowcasts are checked; see the module doc. ``tolerance`` is relative: a jump passes when
    ``probe_after <= probe_before + tolerance * |probe_before|``. ``delay`` (0: off) turns on the delayed check;
    ``max_dip`` (relative, like ``tolerance``) is the largest immediate rise of the probe a tentative jump may
    have, ``max_rollbacks`` the rollbacks in a row after which tentative jumps stop."""

    batch: Any = None
    batches: Sequence[Any] | None = None
    loss_fn: Callable[[nn.Module, Any], Any] | None = None
    probe: Callable[[nn.Module], float] | None = None
    closure: bool = False
    tolerance: float = 0.0
    shrink: Sequence[float] = (0.5, 0.25)
    eval_mode: bool = True
    delay: int = 0
    max_dip: float | None = None  # None: DEFAULT_MAX_DIP, or SHADOW_MAX_DIP with shadow (see dip_limit)
    max_rollbacks: int = 2
    baseline: str = "before"
    shadow: bool = False
    confidence: float = 0.0
    patience: int | None = None  # None: SHADOW_PATIENCE with shadow (0 out of scope), else 0 (see patience_asked)

    def __post_init__(self) -> None:
        given = [self.batch is not None, bool(self.batches), self.probe is not None, bool(self.closure)]
        if sum(given) != 1:
            raise ValueError("Verify needs exactly one probe: batch= or batches= (with loss_fn=), "
                             "probe=fn(model) -> float, or closure=True (the step's own batch through step(closure))")
        if self.probe is None and not self.closure and not callable(self.loss_fn):
            raise ValueError("Verify(batch=...) needs loss_fn=fn(model, batch) -> loss")
        if not (self.tolerance >= 0 and math.isfinite(self.tolerance)):
            raise ValueError(f"Verify tolerance must be a finite number >= 0, got {self.tolerance}")
        self.shrink = tuple(float(a) for a in self.shrink)
        if any(not 0 < a < 1 for a in self.shrink) or list(self.shrink) != sorted(self.shrink, reverse=True):
            raise ValueError(f"Verify shrink factors must be decreasing and in (0, 1), got {self.shrink}")
        if isinstance(self.delay, bool) or not isinstance(self.delay, int) or self.delay < 0:
            raise ValueError(f"Verify delay must be a whole number of steps >= 0 (0: no delayed check), "
                             f"got {self.delay!r}")
        if self.delay and self.closure:
            raise ValueError("Verify(delay=...) needs a fixed probe (batch=, batches= or probe=): the closure's "
                             "batch changes every step, so a later loss cannot be compared with the one before")
        if self.max_dip is not None and not self.max_dip >= self.tolerance:  # NaN fails too
            raise ValueError(f"Verify max_dip must be a number >= tolerance ({self.tolerance}) or math.inf "
                             f"(no limit), got {self.max_dip}")
        if isinstance(self.max_rollbacks, bool) or not isinstance(self.max_rollbacks, int) or self.max_rollbacks < 1:
            raise ValueError(f"Verify max_rollbacks must be a whole number >= 1, got {self.max_rollbacks!r}")
        if self.baseline not in ("before", "trend"):
            raise ValueError(f"Verify baseline must be 'before' or 'trend', got {self.baseline!r}")
        if not (math.isfinite(self.confidence) and self.confidence >= 0):
            raise ValueError(f"Verify confidence must be a finite number >= 0 (standard errors), got {self.confidence}")
        if self.shadow and not self.delay:
            raise ValueError("Verify(shadow=True) trains the pre-jump copy until a delayed check: it needs delay=D")
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(self.patience, int)
                                          or self.patience < 0):
            raise ValueError(f"Verify patience must be a whole number of extra delays >= 0, got {self.patience!r}")
        if self.patience and not self.shadow:
            raise ValueError("Verify(patience=...) lets a jump race plain training for longer: it needs "
                             "shadow=True (without a shadow branch every extra step would be spent on the jump)")
        if self.shadow and self.baseline != "before":
            raise ValueError("Verify(shadow=True) compares the jump with plain training itself; "
                             f"baseline={self.baseline!r} does not apply")

    @property
    def dip_limit(self) -> float:
        """The ``max_dip`` in force: as given, else 2.0, or no limit (``math.inf``) with ``shadow``: a rejected
        jump costs no step there, so refusing one at once only saves the check's compute, and a limit of 10
        refused a jump of the default nowcaster that paid off (docs/benchmarks-speedup.md, *The dip limit with a
        shadow*)."""
        if self.max_dip is not None:
            return self.max_dip
        return max(SHADOW_MAX_DIP if self.shadow else DEFAULT_MAX_DIP, self.tolerance)

    @property
    def patience_asked(self) -> int:
        """The ``patience`` asked for: as given, else 2 with ``shadow`` and 0 without (the optimizer uses 0
        instead of the default for a nowcaster that warned the model is outside its scope)."""
        if self.patience is not None:
            return self.patience
        return SHADOW_PATIENCE if self.shadow else 0

    @property
    def kind(self) -> str:
        return "probe" if self.probe is not None else "closure" if self.closure else "batch"

    def scorer(self, model: nn.Module, closure: Callable[[], Any] | None) -> Score:
        """The probe as a function of the model's current parameters."""
        if self.kind == "closure":
            if closure is None:
                raise ValueError("Verify(closure=True) needs step(closure); this step was called without one")

            def score_closure() -> float:
                with torch.enable_grad():
                    return _number(closure())
            return score_closure
        if self.kind == "probe":
            return lambda: _number(self.probe(model))  # type: ignore[misc]
        per_batch = self.batch_scorer(model)
        return lambda: sum(per_batch()) / len(self.probe_batches)

    @property
    def probe_batches(self) -> list[Any]:
        return list(self.batches) if self.batches else [self.batch]

    def batch_scorer(self, model: nn.Module) -> Callable[[], list[float]]:
        """The fixed probe's loss on each of its batches (``batch=`` / ``batches=`` probes only): the shadow
        check compares the two branches batch by batch."""
        batches = self.probe_batches

        def score_batches() -> list[float]:
            was_training = model.training
            if self.eval_mode:
                model.eval()
            try:
                with torch.no_grad():
                    return [_number(self.loss_fn(model, b)) for b in batches]  # type: ignore[misc]
            finally:
                model.train(was_training)
        return score_batches


def _number(value: Any) -> float:
    """A probe value as a float; NaN counts as +inf (worse than anything)."""
    x = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    return math.inf if math.isnan(x) else x


def limit_of(before: float, relative: float) -> float:
    """The highest probe value that passes: ``before`` raised by ``relative`` of its size (inf when unknown or
    when ``relative`` is no limit)."""
    return before + relative * abs(before) if math.isfinite(before) and math.isfinite(relative) else math.inf


def verify_jump(params: dict[str, torch.Tensor], nowcast: dict[str, torch.Tensor], score: Score, cfg: Verify,
                before: float | torch.Tensor | None = None, tentative_ok: bool = False) -> dict[str, Any]:
    """Leave ``params`` (the live tensors) at the accepted point, or as they were when the jump is rejected.

    Returns the decision: ``accepted``, ``alpha`` (1.0 = the full nowcast, 0.0 = rejected), ``probe_before``,
    ``probe_after`` (at the kept point), ``tried`` ([alpha, probe] pairs), ``probe_passes``, ``verify_s``.
    ``tentative_ok``: a full jump that fails the check by at most ``cfg.dip_limit`` is kept with
    ``tentative: True`` (the caller checks it again later and may roll it back).
    """
    t0 = time.perf_counter()
    passes = 0
    grads = None
    if cfg.kind == "closure":  # each score recomputes the gradients; a rejected jump's normal step needs theta's
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}
    theta = {n: p.detach().clone() for n, p in params.items()}
    target = {n: nowcast[n].to(device=p.device, dtype=p.dtype) for n, p in params.items()}
    if before is None:
        before, passes = _number(score()), 1
    before = _number(before)
    limit = limit_of(before, cfg.tolerance)
    # the full jump stops the search when it passes, or (tentative_ok) when it stays within the dip limit
    full_limit = max(limit, limit_of(before, cfg.dip_limit)) if tentative_ok else limit

    def place(a: float) -> None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(target[n] if a == 1.0 else theta[n] if a == 0.0 else theta[n] + a * (target[n] - theta[n]))

    tried: list[list[float]] = []
    for a in (1.0, *cfg.shrink):
        place(a)
        tried.append([a, _number(score())])
        passes += 1
        # a NaN or infinite probe never passes, whatever the limits: the shorter jumps are tried
        if a == 1.0 and math.isfinite(tried[0][1]) and tried[0][1] <= full_limit:
            break
    alpha, best = min(tried, key=lambda t: (t[1], -t[0]))  # the lowest probe; a tie goes to the longer jump
    accepted = math.isfinite(best) and best <= limit
    # a shadow compares every full jump with plain training, one that passes at once too: "not worse than
    # before" right after the jump says nothing about being ahead of plain training later
    tentative = tentative_ok and (cfg.shadow or not accepted) and len(tried) == 1 and math.isfinite(best)
    accepted = accepted or tentative
    if accepted:
        if alpha != tried[-1][0]:
            place(alpha)
    else:
        place(0.0)
        alpha, best = 0.0, before
        if grads is not None:
            for n, p in params.items():
                p.grad = grads[n]
    decision = {"accepted": accepted, "alpha": alpha, "probe": cfg.kind, "probe_before": before, "probe_after": best,
                "tried": tried, "probe_passes": passes, "verify_s": time.perf_counter() - t0}
    if tentative:
        decision["delayed"] = "pending"
    return decision


def as_verify(verify: Verify | Callable[[nn.Module], float] | str | None) -> Verify | None:
    """``NowcastOptimizer(verify=...)``'s shorthands: a function is a probe, ``"closure"`` the step's batch."""
    if verify is None:
        return None
    if isinstance(verify, str) and verify == "closure":
        verify = Verify(closure=True)
    elif not isinstance(verify, Verify):
        if not callable(verify):
            raise ValueError(f"verify must be a ninocast.Verify, a function probe(model) -> float or 'closure', "
                             f"got {verify!r}")
        verify = Verify(probe=verify)
    dist = torch.distributed
    if (verify.closure or verify.shadow) and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size() > 1:
        what = "verify='closure'" if verify.closure else "Verify(shadow=True)"
        raise ValueError(f"{what} cannot run under torch.distributed (only rank 0 verifies a nowcast, and a "
                         "shadow branch would step outside the gradient all-reduce); use Verify(batch=..., "
                         "loss_fn=...) or a probe function, with delay=D and no shadow")
    return verify


REPORT_KEYS = ("k", "accepted", "skipped", "alpha", "probe", "probe_before", "probe_after", "tried", "probe_passes",
               "verify_s", "delayed", "delay", "check_step", "probe_delayed", "snapshot_bytes", "probe_plain",
               "probe_se", "shadow_steps", "extended", "race", "patience")


def report_body(record: dict[str, Any]) -> dict[str, Any]:
    """The JSON a server keeps for one nowcast decision (``POST /v1/sessions/{id}/nowcasts/{step}/report``):
    the decision's fields, infinities as null (JSON has none)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return {k: clean(record[k]) for k in REPORT_KEYS if k in record}
